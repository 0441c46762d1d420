"""The contract between the builder and the images it makes: in-image paths, label keys, check names, the pass test.

Both sides import this one module: the builder (labels it writes, files it reads back, what it calls passed) and
the smoke inside every image (where it finds the lockfile, which checks it runs, what it reports). Standard
library only: it ships inside every image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

# ---------------------------------------------------------------- inside the image

IMAGE_DIR = "/opt/vlmbuild"
LOCK_PATH = f"{IMAGE_DIR}/lock.txt"
VARIANT_PATH = f"{IMAGE_DIR}/variant.json"
REPORT_PATH = f"{IMAGE_DIR}/smoke-report.json"
SMOKE_ENTRYPOINT = "vlmbuild-smoke"
VENV = "/opt/venv"
# A CUDA image's second DeepSpeed, built for the CPU accelerator: the smoke's CPU pass puts it first on the path
DEEPSPEED_CPU_PATH = "/opt/deepspeed-cpu"
# Seconds before a smoke's ranks are killed, when neither the spec nor a flag says (the one default of it).
DEFAULT_SMOKE_TIMEOUT = 1200
# How long a node of a smoke over several nodes waits for the rendezvous to complete (every node joined) before
# it fails naming itself; torchrun's own default is 600 s.
DEFAULT_RDZV_TIMEOUT = 120
# What a smoke container may take (engine_api.SmokeLimits; spec keys smoke.memory_gb and smoke.pids): the CPU smoke
# fits many times over (benchmarks/results/smoke-limits.txt); a real checkpoint's GPU smoke sets what it needs.
DEFAULT_SMOKE_MEMORY_GB = 16.0
DEFAULT_SMOKE_PIDS = 4096

# The packages that decide whether the recipe trains: the versions label and the stack check name them; a
# one-line summary (`vlmbuild check`) names the headline ones.
KEY_PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "trl", "triton", "flash-attn")
HEADLINE_PACKAGES = ("torch", "deepspeed", "transformers", "trl")

# ---------------------------------------------------------------- labels

LABEL_PREFIX = "io.vlmbuild"
SMOKE_LABEL = f"{LABEL_PREFIX}.smoke"
LABEL_LOCK_SHA256 = f"{LABEL_PREFIX}.lock-sha256"
LABEL_VERSIONS = f"{LABEL_PREFIX}.versions"
LABEL_SMOKE_ENTRYPOINT = f"{LABEL_PREFIX}.smoke-entrypoint"
# What the spec names but the image goes without (JSON: package -> "url: why"); absent when nothing is left out
LABEL_LEFT_OUT = f"{LABEL_PREFIX}.left-out"
LABEL_RESULT = f"{SMOKE_LABEL}.result"
LABEL_DEVICE = f"{SMOKE_LABEL}.device"
LABEL_VALIDATED_ON = f"{SMOKE_LABEL}.validated-on"
LABEL_WORLD_SIZE = f"{SMOKE_LABEL}.world-size"
LABEL_NODES = f"{SMOKE_LABEL}.nodes"  # the nodes (containers) each smoke pass spanned
LABEL_CHECKS = f"{SMOKE_LABEL}.checks"
LABEL_REPORT_PATH = f"{SMOKE_LABEL}.report-path"
LABEL_REPORT_SHA256 = f"{SMOKE_LABEL}.report-sha256"
LABEL_SECONDS = f"{SMOKE_LABEL}.seconds"
# Marks the containers we start, so that leftovers of an interrupted run can be found and removed.
OWNER_LABEL = f"{LABEL_PREFIX}.owner"
# ... and the process that started them (vlmbuild.owner.mark): a container whose process is gone is a leftover.
OWNER_PROCESS_LABEL = f"{LABEL_PREFIX}.owner-process"

# ---------------------------------------------------------------- checks

# Every smoke check, defined once. The launcher (smoke/__main__.py) plans and runs them in this order, the ranks
# (smoke/worker.py) run those marked "ranks", the report shows each one's detail line; nothing else lists checks.
# Adding a check: a function (launcher: ``fn(launch) -> record``; ranks: ``fn(smoke) -> details``), a detail
# function (``fn(record) -> str``), one ``register`` call below, and its tests.


@dataclass(frozen=True)
class Check:
    name: str
    proves: str  # what a pass proves, in words
    runs_in: str  # "launcher": the smoke's own process; "ranks": every rank, inside the process group
    run: str  # "module:attribute" of the function that runs it
    detail: str = ""  # "module:attribute" of ``fn(record) -> str``, the summary line's detail of a passing check
    needs: tuple[str, ...] = ()  # checks that must have passed before it (a --checks selection must name them)
    # "any"; "gpu": GPU mode with flash-attn installed; "repeat": --repeat above one; "image": an image whose
    # DeepSpeed was built with the ops this mode's accelerator loads; "cuda_ops": an image with CUDA ops compiled
    # in (any mode: the check needs no GPU); "nodes": a smoke over more than one node (--nodes)
    when: str = "any"
    # A rank check that ends in other processes: "module:attribute" of ``fn(launch, record) -> record``, which the
    # launcher calls once the ranks ended and the rank half passed (trainer_resume: fresh ranks resume the run the
    # smoke's ranks saved). Its record is the check's.
    finish: str = ""


REGISTRY: dict[str, Check] = {}
_WHEN = ("any", "gpu", "repeat", "image", "cuda_ops", "nodes")


def register(check: Check) -> Check:
    if check.runs_in not in ("launcher", "ranks") or check.when not in _WHEN:
        raise ValueError(f"check {check.name}: runs_in launcher|ranks, when one of {_WHEN}")
    if check.finish and check.runs_in != "ranks":
        raise ValueError(f"check {check.name}: only a rank check has a finish")
    unknown = [n for n in check.needs if n not in REGISTRY]
    if unknown:
        raise ValueError(f"check {check.name} needs {unknown}, which are not registered before it")
    REGISTRY[check.name] = check
    return check


def entry_point(ref: str) -> Any:
    """The object a registry reference ("module:attribute.attribute") names."""
    import importlib

    module, _, attributes = ref.partition(":")
    target: Any = importlib.import_module(module)
    for attribute in attributes.split("."):
        target = getattr(target, attribute)
    return target


def check_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def checks_for(mode: str, flash_attention: bool, prebuilt_ops: bool = False, repeat: int = 1,
               cuda_ops: bool = False, nodes: int = 1) -> tuple[str, ...]:
    """The checks a run in ``mode`` ("cpu" or "gpu") performs, in order (see ``Check.when``); over more than one
    node, those of ACROSS_NODES only."""
    applies = {"any": True, "gpu": mode == "gpu" and flash_attention, "repeat": repeat > 1, "image": prebuilt_ops,
               "cuda_ops": cuda_ops, "nodes": nodes > 1}
    return tuple(name for name, check in REGISTRY.items()
                 if applies[check.when] and (nodes == 1 or name in ACROSS_NODES))


class CheckRecord(TypedDict):
    """One check's result in a smoke report (``checks`` of SmokeReport), as check_record makes it."""

    name: str
    status: str  # passed | failed | skipped | not_run
    seconds: float
    error: str | None
    traceback: str | None
    details: dict[str, Any]  # the check's own facts (smoke/report.py's detail_* say them in one line)
    world_size: int
    device: str | None


class DeepSpeedBuildInfo(TypedDict):
    accelerator: str
    path: str | None  # None: the venv's own DeepSpeed
    ops: list[str]


class VariantInfo(TypedDict, total=False):
    """variant.json (VARIANT_PATH in the image): what the builder decided about the variant, for the smoke and for
    `vlmbuild inspect` (vlmbuild.plan writes every key; a local smoke's holds only some: smoke_command)."""

    schema: int
    image: str
    variant: str
    tag: str
    python: str
    cuda: str | None
    conditions: list[str]
    imports: list[str]
    deepspeed_builds: list[DeepSpeedBuildInfo]
    cuda_archs: str | None  # TORCH_CUDA_ARCH_LIST the CUDA ops were compiled with
    left_out: dict[str, str]  # what the spec names but the image goes without, and why
    source_builds: list[str]
    release_base: str
    layers: list[str]  # the lock layers installed in place, bottom to top
    packages: list[str]  # name==version of each per-package layer, in order
    key_versions: dict[str, str]
    lock_sha256: str


def check_record(name: str, world_size: int, device: str | None, status: str = "passed", error: str | None = None,
                 details: Mapping[str, Any] | None = None, seconds: float = 0.0,
                 traceback: str | None = None) -> CheckRecord:
    """A check's result as the report holds it: the one place such a record is made."""
    return {"name": name, "status": status, "seconds": round(seconds, 3), "error": error, "traceback": traceback,
            "details": dict(details or {}), "world_size": world_size, "device": device}


def failed_needs(name: str, earlier: Sequence[Mapping[str, Any]]) -> list[str]:
    """The checks ``name`` needs that ran before it and did not pass."""
    needs = REGISTRY[name].needs
    return [c["name"] for c in earlier if c["name"] in needs and not check_passed(c)]


LAUNCHER, RANKS = "vlmbuild.smoke.launcher_checks", "vlmbuild.smoke.worker"
DETAIL = "vlmbuild.smoke.report"
register(Check("stack", "installed versions and every installed file equal the lockfile (RECORD hashes; nothing "
                        "unlocked, duplicated or from another URL); CUDA build, GPU arch, NCCL, bf16; rules; every "
                        "module of the stack and the recipe imports",
               "launcher", f"{LAUNCHER}:run_stack", f"{DETAIL}:detail_stack"))
register(Check("cuda_ops", "the CUDA ops compiled into the image, with no GPU: DeepSpeed (DS_ACCELERATOR=cuda) "
                           "reports each installed and compatible and loads it from its package, nothing compiled; "
                           "cuobjdump lists a cubin for every arch of cuda_archs and the PTX of the newest",
               "launcher", "vlmbuild.smoke.cuda_ops:check_cuda_ops", f"{DETAIL}:detail_cuda_ops", when="cuda_ops"))
register(Check("nodes", "over --nodes N: every rank joined one world of the size the nodes make, and every node's "
                        "hostname is in it (a rendezvous that formed a world per node fails here)",
               "ranks", "vlmbuild.smoke.nodes:check_nodes", f"{DETAIL}:detail_nodes", when="nodes"))
register(Check("zero3_load", "from_pretrained under ZeRO-3: every parameter partitioned, every gathered tensor "
                             "bit-identical to the checkpoint file",
               "ranks", f"{RANKS}:Smoke.check_zero3_load", f"{DETAIL}:detail_zero3_load"))
register(Check("train_step", "deepspeed.initialize, gradient checkpointing, optimizer steps on an image+text batch "
                             "(DeepSpeed's FusedAdam on GPU), loss falling",
               "ranks", f"{RANKS}:Smoke.check_train_step", f"{DETAIL}:detail_train_step", needs=("zero3_load",)))
register(Check("checkpoint_resume", "save_checkpoint, load into a fresh engine: parameters, fp32 partitions and "
                                    "Adam moments equal; one more step",
               "ranks", f"{RANKS}:Smoke.check_checkpoint_resume", f"{DETAIL}:detail_checkpoint_resume",
               needs=("train_step",)))
register(Check("grpo", "trl's GRPOTrainer (its generation and loss replaced by the smoke's, with images) with the "
                       "recipe's ZeRO-3 config: generation through trl's unwrap_model_for_generation, every completion "
                       "non-empty, rule-based rewards, a reference model through trl's prepare_deepspeed, optimizer "
                       "steps that move the weights, the consolidated 16-bit save equal to the trained parameters",
               "ranks", f"{RANKS}:Smoke.check_grpo", f"{DETAIL}:detail_grpo", needs=("zero3_load",)))
register(Check("optimizer_offload", "one GRPO step with the recipe's zero3_offload config: DeepSpeed's CPU Adam "
                                    "took the step (Adam state with a step count, moments written); on GPU the fp32 "
                                    "partitions, the moments and the parameter shards are on the CPU",
               "ranks", f"{RANKS}:Smoke.check_optimizer_offload", f"{DETAIL}:detail_optimizer_offload",
               needs=("grpo",)))
register(Check("lora", "the recipe's LoRA run (peft on every linear layer outside the vision tower, vision frozen) "
                       "under its zero2.json (DeepSpeed's AdamW) and under ZeRO-3, 2 GRPO steps each: only the LoRA "
                       "parameters trainable, every one moved, every base weight bit-identical to the checkpoint, the "
                       "saved adapter on a fresh base model gives the trained model's logits",
               "ranks", "vlmbuild.smoke.lora:check_lora", f"{DETAIL}:detail_lora", needs=("zero3_load",)))
register(Check("trainer_resume", "the HF Trainer's own resume under ZeRO-3 (the recipe's zero3 config): a run saved "
                                 "at step 2, resumed in fresh processes with train(resume_from_checkpoint=...), equals "
                                 "the run that never stopped: step count, learning rate, data order, sampled tokens, "
                                 "Adam moments and parameters (bit for bit on the CPU)",
               "ranks", "vlmbuild.smoke.trainer_resume:check_trainer_resume", f"{DETAIL}:detail_trainer_resume",
               needs=("zero3_load",), finish="vlmbuild.smoke.trainer_resume:finish_trainer_resume"))
register(Check("attention", "flash_attention_2 against sdpa in bf16, vision tower and language model",
               "ranks", f"{RANKS}:Smoke.check_attention", f"{DETAIL}:detail_attention", needs=("zero3_load",),
               when="gpu"))
register(Check("zero3_repeat", "the ZeRO-3 load again in fresh processes (--repeat N): every run bit-identical "
                               "to the checkpoint",
               "launcher", f"{LAUNCHER}:repeat_zero3_load", f"{DETAIL}:detail_zero3_repeat", needs=("zero3_load",),
               when="repeat"))
# What a smoke over several nodes runs (torchrun's c10d rendezvous across containers): the node's own install
# (stack), the world it formed, and the ZeRO-3 paths whose collectives and shared checkpoint cross the nodes. The
# other checks exercise nothing more across nodes, and the 1-node smoke of the same image runs them.
ACROSS_NODES = ("stack", "nodes", "zero3_load", "train_step", "checkpoint_resume", "grpo")
# prebuilt_ops needs the checks that load the ops: train_step (fused_adam on GPU), optimizer_offload (cpu_adam) and
# lora (fused_adam, on the CPU accelerator too: zero2.json's optimizer block); the CPU accelerator's
# deepspeed_shm_comm is loaded when the ranks start.
register(Check("prebuilt_ops", "every DeepSpeed op the image was built with was loaded by the checks that use it, "
                               "on every rank, from DeepSpeed's package, and nothing was compiled while they ran",
               "launcher", f"{LAUNCHER}:check_prebuilt_ops", f"{DETAIL}:detail_prebuilt_ops",
               needs=("train_step", "optimizer_offload", "lora"), when="image"))

# Which part of the smoke loads each DeepSpeed op an image may carry (for the prebuilt_ops check's messages).
OP_LOADED_BY = {"fused_adam": "train_step (GPU) and lora (zero2.json's DeepSpeed AdamW)", "cpu_adam": "optimizer_offload",
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


SBOM_PATH = f"{IMAGE_DIR}/sbom.cdx.json"
BUILT_WHEELS_PATH = f"{IMAGE_DIR}/built-wheels.sha256"
# pip's constraints in the image (where NGC images keep theirs since 25.03): the locked KEY_PACKAGES, named by
# PIP_CONSTRAINT and UV_CONSTRAINT. A `pip install` adds packages but cannot replace a validated one of the stack
# without saying so. VLM-R1's setup.sh pins deepspeed==0.15.4, which cannot resume on torch 2.6: run as is, it is
# refused.
PIP_CONSTRAINT_PATH = "/etc/pip/constraint.txt"

# The in-toto predicate types of the attestations a signed push attaches to the digest (vlmbuild.signing). The
# smoke report's is ours: its predicate is the report exactly as REPORT_PATH holds it; v1 is that shape (README,
# "Verifying what you pull"). A change to the report's shape that a reader must know of bumps the version.
PREDICATE_SMOKE_REPORT = "https://vlmbuild.dev/attestations/smoke-report/v1"
PREDICATE_SBOM = "https://cyclonedx.org/bom"


def report_passed(report: Mapping[str, Any] | None) -> bool:
    """The one pass test, used by the smoke for its verdict and by the builder before it tags or pushes:
    a report with checks, every one of which passed (plainly or with the recipe's workaround)."""
    if not report:
        return False
    checks = report.get("checks") or []
    return bool(checks) and all(check_passed(c) for c in checks)


def checks_label(reports: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """What the checks label holds: each check's status over every smoke pass (a later pass wins a name)."""
    return {c["name"]: c["status"] for r in reports for c in r.get("checks", [])}


def pass_name(report: Mapping[str, Any] | None, device: str) -> str:
    """How a smoke pass is named in labels and output: its mode and world size, and its nodes when more than one."""
    report = report or {}
    nodes = report.get("nodes", 1)
    return (f"{report.get('mode', device)} x{report.get('world_size', '?')}"
            + (f" over {nodes} nodes" if nodes > 1 else ""))


def nodes_label(reports: Sequence[Mapping[str, Any]]) -> str:
    """What the nodes label holds: the distinct node counts of the smoke passes, ascending (1: one host's ranks)."""
    return ",".join(str(n) for n in sorted({r.get("nodes", 1) for r in reports}))


def world_size_label(reports: Sequence[Mapping[str, Any]]) -> str:
    """What the world-size label holds: the distinct world sizes of the smoke passes, ascending."""
    return ",".join(str(w) for w in sorted({r.get("world_size", 0) for r in reports}))


def evidence_passed(evidence: Mapping[str, Any] | None) -> bool:
    """The pass test of an image's evidence file: at least one smoke pass, every pass passed."""
    passes = (evidence or {}).get("passes") or []
    return bool(passes) and all(report_passed(p) for p in passes)
