"""Check 1, "stack": what is installed is what was locked, the CUDA build is the declared one, the GPU is
usable for ZeRO-3 (arch compiled in, NCCL, bf16), and no compatibility rule matches the installed versions.

Also ``verify_install``: the build-time form (no torch import; importlib.metadata only), run by the
Dockerfile so an image whose layers disagree with its lockfile never finishes building.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from packaging.version import Version

from .. import contract
from ..lockfile import Lockfile
from ..rules import installed_versions, load_rules, training_conditions

# What every run imports: what the smoke's own checks need (the HF Trainer needs accelerate, GRPO trl, the image
# processor PIL). An image's variant.json adds the modules its spec names (the stack's and each group's).
BASE_IMPORTS = ("torch", "transformers", "deepspeed", "accelerate", "trl", "PIL")


def modules_to_import(variant: dict[str, Any] | None, installed: dict[str, str]) -> list[str]:
    modules = list(BASE_IMPORTS)
    for module in (variant or {}).get("imports") or []:
        if module not in modules:
            modules.append(module)
    if "flash-attn" in installed and "flash_attn" not in modules:
        modules.append("flash_attn")
    return modules


def lock_mismatches(lock: Lockfile, installed: dict[str, str]) -> list[str]:
    problems = []
    for req in sorted(lock.requirements, key=lambda r: r.name):
        have, pinned = installed.get(req.name), req.version
        if have is None:
            problems.append(f"{req.name}: locked {pinned}, not installed")
            continue
        same = Version(have) == Version(pinned)
        if not same and req.url is not None:
            # A direct wheel's version comes from its file name, whose local segment (flash-attn's
            # +cu12torch2.6cxx11abiFALSE) its own metadata may leave out; the sha256 pinned the exact file.
            same = Version(have).public == Version(pinned).public
        if not same:
            problems.append(f"{req.name}: locked {pinned}, installed {have}")
    return problems


def verify_install(lock: Lockfile) -> list[str]:
    return lock_mismatches(lock, installed_versions())


def _gpu_facts(torch: Any) -> tuple[dict[str, Any], list[str]]:
    facts: dict[str, Any] = {}
    problems: list[str] = []
    count = torch.cuda.device_count()
    facts["gpus"] = count
    if count == 0:
        return facts, ["GPU mode but torch sees no CUDA device"]
    major, minor = torch.cuda.get_device_capability(0)
    arch = f"sm_{major}{minor}"
    arch_list = torch.cuda.get_arch_list()
    facts.update(device_name=torch.cuda.get_device_name(0), capability=f"{major}.{minor}", arch_list=arch_list,
                 nccl=torch.distributed.is_nccl_available(), bf16=torch.cuda.is_bf16_supported())
    # A newer GPU runs PTX of the highest compute_XY <= its own; without either, kernels are missing.
    ptx_ok = any(a.startswith("compute_") and int(a.split("_")[1]) <= major * 10 + minor for a in arch_list)
    if arch not in arch_list and not ptx_ok:
        problems.append(f"GPU {facts['device_name']} is {arch}, not in torch's arch list {arch_list} (no PTX fallback)")
    if not facts["nccl"]:
        problems.append("NCCL is not available in this torch build (ZeRO-3 across GPUs needs it)")
    if not facts["bf16"]:
        problems.append(f"bf16 is not supported on {facts['device_name']} (the recipe trains in bf16)")
    return facts, problems


def check_stack(mode: str, lock: Lockfile | None, variant: dict[str, Any] | None) -> dict[str, Any]:
    """The stack facts as details; raises StackProblem listing every problem found (not just the first)."""
    problems: list[str] = []
    details: dict[str, Any] = {"python": sys.version.split()[0]}
    installed = installed_versions()
    details["versions"] = {k: installed.get(k) for k in ("torch", "deepspeed", "transformers", "accelerate", "trl",
                                                          "triton", "flash-attn", "safetensors", "tokenizers")}
    if lock is not None:
        mismatches = lock_mismatches(lock, installed)
        details["lock"] = {"path": str(lock.path), "sha256": lock.sha256, "packages": len(lock.pins),
                           "mismatches": len(mismatches)}
        problems += mismatches
    else:
        details["lock"] = None

    modules = modules_to_import(variant, installed)
    import_seconds: dict[str, float] = {}
    for module in modules:
        started = time.monotonic()
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - the import error is the finding (e.g. triton's "0 active drivers")
            problems.append(f"import {module} failed: {type(exc).__name__}: {exc}")
        import_seconds[module] = round(time.monotonic() - started, 3)
    details["imports"] = import_seconds
    import torch

    details["torch_cuda"] = torch.version.cuda
    declared_cuda = (variant or {}).get("cuda")
    if declared_cuda and torch.version.cuda != declared_cuda:
        problems.append(f"torch.version.cuda is {torch.version.cuda}, the variant declares CUDA {declared_cuda}")
    if mode == "gpu":
        facts, gpu_problems = _gpu_facts(torch)
        details["gpu"] = facts
        problems += gpu_problems

    # The image's declared training path; gpu_less_host when this run has no GPU and the host none either.
    gpu_less = mode == "cpu" and not os.path.exists("/dev/nvidia0")
    conditions = training_conditions((variant or {}).get("conditions"), installed, gpu_less_host=gpu_less)
    violations = load_rules().evaluate(installed, conditions)
    details["rules"] = [{"id": v.rule.id, "severity": v.rule.severity, "versions": v.versions} for v in violations]
    for v in violations:
        if v.rule.severity == "error":
            found = ", ".join(f"{k}=={x}" for k, x in v.versions.items())
            problems.append(f"rule {v.rule.id} matches the installed versions ({found}): {v.rule.symptom}")
    if problems:
        raise StackProblem(problems, details)
    return details


class StackProblem(Exception):
    def __init__(self, problems: list[str], details: dict[str, Any]) -> None:
        self.problems, self.details = problems, details
        super().__init__(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))


def default_paths() -> tuple[Path | None, Path | None]:
    """Inside an image the lockfile and variant metadata lie at fixed paths (the contract's)."""
    lock = Path(contract.LOCK_PATH)
    variant = Path(contract.VARIANT_PATH)
    return (lock if lock.is_file() else None, variant if variant.is_file() else None)

