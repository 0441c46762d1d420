"""The contract between the builder and the images it makes: in-image paths, label keys, check names, the pass test.

Both sides import this one module: the builder (labels it writes, files it reads back, what it calls passed) and
the smoke inside every image (where it finds the lockfile, which checks it runs, what it reports). Standard
library only: it ships inside every image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# ---------------------------------------------------------------- inside the image

IMAGE_DIR = "/opt/vlmbuild"
LOCK_PATH = f"{IMAGE_DIR}/lock.txt"
VARIANT_PATH = f"{IMAGE_DIR}/variant.json"
REPORT_PATH = f"{IMAGE_DIR}/smoke-report.json"
SMOKE_ENTRYPOINT = "vlmbuild-smoke"
VENV = "/opt/venv"

# ---------------------------------------------------------------- labels

LABEL_PREFIX = "io.vlmbuild"
SMOKE_LABEL = f"{LABEL_PREFIX}.smoke"
LABEL_LOCK_SHA256 = f"{LABEL_PREFIX}.lock-sha256"
LABEL_VERSIONS = f"{LABEL_PREFIX}.versions"
LABEL_SMOKE_ENTRYPOINT = f"{LABEL_PREFIX}.smoke-entrypoint"
LABEL_RESULT = f"{SMOKE_LABEL}.result"
LABEL_DEVICE = f"{SMOKE_LABEL}.device"
LABEL_VALIDATED_ON = f"{SMOKE_LABEL}.validated-on"
LABEL_WORLD_SIZE = f"{SMOKE_LABEL}.world-size"
LABEL_CHECKS = f"{SMOKE_LABEL}.checks"
LABEL_REPORT_PATH = f"{SMOKE_LABEL}.report-path"
LABEL_REPORT_SHA256 = f"{SMOKE_LABEL}.report-sha256"
LABEL_SECONDS = f"{SMOKE_LABEL}.seconds"
# Marks the containers we start, so that leftovers of an interrupted run can be found and removed.
OWNER_LABEL = f"{LABEL_PREFIX}.owner"

# ---------------------------------------------------------------- checks

# Every check the smoke can run, in the order it runs them. "gpu" checks run only in GPU mode.
CHECKS: tuple[tuple[str, str, str], ...] = (
    ("stack", "any", "installed versions and every installed file equal the lockfile (RECORD hashes; nothing "
                     "unlocked, duplicated or from another URL); CUDA build, GPU arch, NCCL, bf16; rules; every "
                     "module of the stack and the recipe imports"),
    ("zero3_load", "any", "from_pretrained under ZeRO-3: every parameter partitioned, every gathered tensor "
                          "bit-identical to the checkpoint file"),
    ("train_step", "any", "deepspeed.initialize, gradient checkpointing, optimizer steps on an image+text batch "
                          "(DeepSpeed's FusedAdam on GPU), loss falling"),
    ("checkpoint_resume", "any", "save_checkpoint, load into a fresh engine: parameters, fp32 partitions and Adam "
                                 "moments equal; one more step"),
    ("grpo", "any", "trl's GRPOTrainer (its generation and loss replaced by the smoke's, with images) with the "
                    "recipe's ZeRO-3 config: generation through trl's unwrap_model_for_generation, every completion "
                    "non-empty, rule-based rewards, a reference model through trl's prepare_deepspeed, optimizer "
                    "steps that move the weights, the consolidated 16-bit save equal to the trained parameters"),
    ("optimizer_offload", "any", "one GRPO step with the recipe's zero3_offload config: DeepSpeed's CPU Adam took "
                                 "the step (Adam state with a step count, moments written); on GPU the fp32 "
                                 "partitions, the moments and the parameter shards are on the CPU"),
    ("attention", "gpu", "flash_attention_2 against sdpa in bf16, vision tower and language model"),
    ("zero3_repeat", "repeat", "the ZeRO-3 load again in fresh processes (--repeat N): every run bit-identical "
                               "to the checkpoint"),
    ("prebuilt_ops", "image", "every DeepSpeed op the image was built with was loaded by the checks that use it, "
                              "on every rank, from DeepSpeed's package, and nothing was compiled while they ran"),
)
# What a check needs to have run before it (the launcher refuses a selection without them). prebuilt_ops needs the
# checks that load the ops: train_step (fused_adam on GPU) and optimizer_offload (cpu_adam); the CPU
# accelerator's deepspeed_shm_comm is loaded when the ranks start.
DEPENDS = {"train_step": ("zero3_load",), "checkpoint_resume": ("train_step",), "grpo": ("zero3_load",),
           "optimizer_offload": ("grpo",), "attention": ("zero3_load",), "zero3_repeat": ("zero3_load",),
           "prebuilt_ops": ("train_step", "optimizer_offload")}
# Which part of the smoke loads each DeepSpeed op an image may carry (for the prebuilt_ops check's messages).
OP_LOADED_BY = {"fused_adam": "train_step (GPU)", "cpu_adam": "optimizer_offload",
                "deepspeed_shm_comm": "the ranks' start (deepspeed.init_distributed, CPU accelerator)"}

# A check's status. A check that passed only with a workaround the recipe applies (the attention check with
# VLM-R1's fp32 rotary fix) says so in a status of its own: it counts as passing, never as a plain pass.
PASSED, PASSED_WITH_WORKAROUND, FAILED, SKIPPED = "passed", "passed_with_workaround", "failed", "skipped"
PASSING = (PASSED, PASSED_WITH_WORKAROUND)


def check_passed(check: Mapping[str, Any]) -> bool:
    return check.get("status") in PASSING


def status_of(details: Mapping[str, Any] | None) -> str:
    """The status of a check that ran to its end without a failure: a workaround in its details makes it
    passed_with_workaround."""
    return PASSED_WITH_WORKAROUND if (details or {}).get("workaround") else PASSED


CHECK_NAMES = tuple(name for name, _, _ in CHECKS)
SBOM_PATH = f"{IMAGE_DIR}/sbom.cdx.json"
BUILT_WHEELS_PATH = f"{IMAGE_DIR}/built-wheels.sha256"
# The checks that run in the torchrun ranks (the others run in the launcher).
WORKER_CHECKS = ("zero3_load", "train_step", "checkpoint_resume", "grpo", "optimizer_offload", "attention")


def checks_for(mode: str, flash_attention: bool, prebuilt_ops: bool = False, repeat: int = 1) -> tuple[str, ...]:
    """The checks a run in ``mode`` ("cpu" or "gpu") performs: ``attention`` needs a GPU and flash-attn,
    ``prebuilt_ops`` an image whose DeepSpeed was built with the ops this mode's accelerator loads,
    ``zero3_repeat`` a repeat count above one."""
    out = []
    for name, where, _ in CHECKS:
        if (where == "any" or (where == "image" and prebuilt_ops) or (where == "repeat" and repeat > 1)
                or (where == mode == "gpu" and flash_attention)):
            out.append(name)
    return tuple(out)


def report_passed(report: Mapping[str, Any] | None) -> bool:
    """The one pass test, used by the smoke for its verdict and by the builder before it tags or pushes:
    a report with checks, every one of which passed (plainly or with the recipe's workaround)."""
    if not report:
        return False
    checks = report.get("checks") or []
    return bool(checks) and all(check_passed(c) for c in checks)


def checks_label(reports: list[Mapping[str, Any]]) -> dict[str, str]:
    """What the checks label holds: each check's status over every smoke pass (a later pass wins a name)."""
    return {c["name"]: c["status"] for r in reports for c in r.get("checks", [])}


def world_size_label(reports: list[Mapping[str, Any]]) -> str:
    """What the world-size label holds: the distinct world sizes of the smoke passes, ascending."""
    return ",".join(str(w) for w in sorted({r.get("world_size", 0) for r in reports}))


def evidence_passed(evidence: Mapping[str, Any] | None) -> bool:
    """The pass test of an image's evidence file: at least one smoke pass, every pass passed."""
    passes = (evidence or {}).get("passes") or []
    return bool(passes) and all(report_passed(p) for p in passes)
