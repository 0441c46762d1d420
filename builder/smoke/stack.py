"""Check 1, "stack": what is installed is what was locked, file for file, the CUDA build is the declared one, the
GPU is usable for ZeRO-3 (arch compiled in, NCCL, bf16), and no compatibility rule matches the installed versions.

"What was locked" is judged on the environment itself (``environment_problems``): every distribution Python can
see is locked, at the locked version, once (a second dist-info of a name is a copy that shadows or is shadowed),
from the locked URL where the lock pins one, and every file its RECORD lists still has the hash the installer
recorded. Also ``verify_install``: the build-time form (no torch import), run by the Dockerfile so an image
whose layers disagree with its lockfile never finishes building.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import Version

from .. import contract
from ..lockfile import Lockfile
from ..rules import installed_versions, load_rules, training_conditions

# What every run imports: what the smoke's own checks need (the HF Trainer needs accelerate, GRPO trl, the image
# processor PIL). An image's variant.json adds the modules its spec names (the stack's and each group's).
BASE_IMPORTS = ("torch", "transformers", "deepspeed", "accelerate", "trl", "PIL")


def modules_to_import(variant: contract.VariantInfo | None, installed: dict[str, str]) -> list[str]:
    modules = list(BASE_IMPORTS)
    for module in (variant or {}).get("imports") or []:
        if module not in modules:
            modules.append(module)
    if "flash-attn" in installed and "flash_attn" not in modules:
        modules.append("flash_attn")
    return modules


def lock_mismatches(lock: Lockfile, installed: dict[str, str], left_out: Iterable[str] = ()) -> list[str]:
    """Every locked package installed at its locked version, but those the image goes without (``left_out``, its
    variant.json's: a source build a build here left out), which must then be absent."""
    problems = []
    left_out = set(left_out)
    for req in sorted(lock.requirements, key=lambda r: r.name):
        have, pinned = installed.get(req.name), req.version
        if req.name in left_out:
            if have is not None:
                problems.append(f"{req.name}: the image says it goes without it (left out), but {have} is installed")
            continue
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


# The smoke itself: staged beside the environment it checks, never part of its lock.
SMOKE_DISTRIBUTION = "vlmbuild"


def distributions_on_path() -> dict[str, list[metadata.Distribution]]:
    """Every distribution the environment's Python sees, by canonical name, in sys.path order (the first is the one
    imported). The working directory ``python -m`` puts first is left out: it is where the smoke was started from
    (a checkout of vlmbuild, say), not part of the environment."""
    out: dict[str, list[metadata.Distribution]] = {}
    seen: set[str] = set()
    path = [p for p in sys.path if p not in ("", os.getcwd())]
    for dist in metadata.distributions(path=path):
        name = dist.metadata.get("Name")  # type: ignore[attr-defined]  # an email.message.Message at run time
        where = os.path.realpath(str(getattr(dist, "_path", "") or dist.locate_file("")))
        if not name or where in seen:  # one directory twice on sys.path is one distribution
            continue
        seen.add(where)
        out.setdefault(canonicalize_name(name), []).append(dist)
    return out


def dist_location(dist: metadata.Distribution) -> str:
    return str(getattr(dist, "_path", None) or dist.locate_file(""))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def record_problems(dists: list[metadata.Distribution]) -> tuple[int, list[str]]:
    """(files checked, problems): every file each distribution's RECORD lists with a sha256 must be there with that
    hash. Bytecode caches are left out: Python rewrites a .pyc whenever its source's mtime changes (the image
    build clamps mtimes) and checks it against its source itself."""
    todo: list[tuple[str, Path, str]] = []
    problems: list[str] = []
    for dist in dists:
        name = f"{dist.metadata['Name']} {dist.version}"
        for entry in dist.files or []:
            if entry.hash is None or entry.suffix == ".pyc":
                continue
            if entry.hash.mode != "sha256":
                problems.append(f"{name}: {entry} has a {entry.hash.mode} hash in RECORD, not sha256")
                continue
            todo.append((name, Path(str(entry.locate())), entry.hash.value))

    def check(item: tuple[str, Path, str]) -> str | None:
        name, path, expected = item
        try:
            actual = _file_sha256(path)
        except FileNotFoundError:
            return f"{name}: {path} is listed in its RECORD but missing"
        except OSError as exc:
            return f"{name}: {path} cannot be read ({exc.strerror})"
        return None if actual == expected else f"{name}: {path} differs from its RECORD hash (changed after install)"

    # hashlib releases the GIL on large buffers: threads hash a CUDA venv's gigabytes in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems += [p for p in pool.map(check, todo) if p]
    return len(todo), problems


def direct_url_problems(lock: Lockfile, found: dict[str, list[metadata.Distribution]]) -> list[str]:
    """A requirement the lock pins to a URL (flash-attn's wheel) must be installed from that URL, and, where the
    installer recorded the archive's hash, from that very file: the version alone says nothing of the build."""
    problems = []
    for req in lock.requirements:
        if req.url is None or not found.get(req.name):
            continue
        dist = found[req.name][0]
        raw = dist.read_text("direct_url.json")
        if raw is None:
            problems.append(f"{req.name}: locked as {req.url}, installed from an index (no direct_url.json)")
            continue
        info = json.loads(raw)
        if info.get("url") != req.url:
            problems.append(f"{req.name}: locked as {req.url}, installed from {info.get('url')}")
            continue
        archive = info.get("archive_info") or {}
        hashes = dict(archive.get("hashes") or {})
        if "hash" in archive and "=" in archive["hash"]:
            algo, value = archive["hash"].split("=", 1)
            hashes.setdefault(algo, value)
        locked = {h.split(":", 1)[1] for h in req.hashes if h.startswith("sha256:")}
        if "sha256" in hashes and hashes["sha256"] not in locked:
            problems.append(f"{req.name}: installed from a file with sha256 {hashes['sha256']}, the lock pins "
                            f"{', '.join(sorted(locked))}")
    return problems


def declared_alternate(name: str, dists: list[metadata.Distribution], alternates: dict[str, str]) -> bool:
    """Two copies of ``name`` that the image declares: the first under the path of another build of it (a CUDA
    image's CPU-accelerator DeepSpeed, put first on the path by the CPU pass), at the version of the second."""
    where = alternates.get(name)
    if where is None or len(dists) != 2 or dists[0].version != dists[1].version:
        return False
    return os.path.realpath(dist_location(dists[0])).startswith(os.path.realpath(where) + os.sep)


def environment_problems(lock: Lockfile | None, alternates: dict[str, str] | None = None,
                         left_out: Iterable[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """(facts, problems) of the environment as a whole: duplicates (but ``alternates``, name -> the directory of
    a declared second build), RECORD hashes and, given a lock, versions (of all but ``left_out``), unlocked
    distributions and direct URLs."""
    found = distributions_on_path()
    problems = []
    for name, dists in sorted(found.items()):
        if len(dists) > 1 and not declared_alternate(name, dists, alternates or {}):
            where = ", ".join(f"{d.version} at {dist_location(d)}" for d in dists)
            problems.append(f"{name}: {len(dists)} installed copies, the first shadows the rest: {where}")
    checked, record = record_problems([d for dists in found.values() for d in dists])
    problems += record
    facts: dict[str, Any] = {"distributions": len(found), "files": {"checked": checked, "mismatches": len(record)}}
    if lock is not None:
        mismatches = lock_mismatches(lock, {name: dists[0].version for name, dists in found.items()}, left_out)
        unlocked = sorted(f"{name} {dists[0].version} ({dist_location(dists[0])})" for name, dists in found.items()
                          if name not in lock.pins and name != SMOKE_DISTRIBUTION)
        problems += mismatches + [f"{u}: installed but not in the lockfile" for u in unlocked]
        problems += direct_url_problems(lock, found)
        facts["unlocked"] = len(unlocked)
        facts["version_mismatches"] = len(mismatches)
    return facts, problems


def verify_install(lock: Lockfile, left_out: Iterable[str] = ()) -> list[str]:
    return environment_problems(lock, left_out=left_out)[1]


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


def check_stack(mode: str, lock: Lockfile | None, variant: contract.VariantInfo | None) -> dict[str, Any]:
    """The stack facts as details; raises StackProblem listing every problem found (not just the first)."""
    problems: list[str] = []
    details: dict[str, Any] = {"python": sys.version.split()[0]}
    installed = installed_versions()
    details["versions"] = {k: installed.get(k) for k in (*contract.KEY_PACKAGES, "safetensors", "tokenizers")}
    build = deepspeed_build_for(variant, mode)
    path = build["path"] if build else None
    alternates = {"deepspeed": path} if path else {}
    environment, env_problems = environment_problems(lock, alternates, variant.get("left_out", {}) if variant else {})
    details["files"] = environment["files"]
    details["lock"] = None if lock is None else {
        "path": str(lock.path), "sha256": lock.sha256, "packages": len(lock.pins),
        "mismatches": environment["version_mismatches"], "unlocked": environment["unlocked"]}
    problems += env_problems

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
    if "deepspeed" in sys.modules:
        # which of the image's DeepSpeed builds this pass runs: the one built for its accelerator
        from deepspeed.git_version_info import accelerator_name

        details["deepspeed"] = {"path": os.path.dirname(str(sys.modules["deepspeed"].__file__)),
                                "built_for": accelerator_name}
        if build and accelerator_name != build["accelerator"]:
            problems.append(f"deepspeed at {details['deepspeed']['path']} was built for the {accelerator_name} "
                            f"accelerator; this {mode} pass runs {build['accelerator']} ops (its prebuilt ops would "
                            "be compiled again at first use)")
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
    # A sweep measures what the versions do, rules included: there a rule's match is recorded, and the checks
    # decide (VLMBUILD_SMOKE_RULES=record). Everywhere else a known-bad combination fails the stack check.
    enforce = os.environ.get(RULES_ENV, "enforce") != "record"
    details["rules_enforced"] = enforce
    for v in violations:
        if v.rule.severity == "error" and enforce:
            found = ", ".join(f"{k}=={x}" for k, x in v.versions.items())
            problems.append(f"rule {v.rule.id} matches the installed versions ({found}): {v.rule.symptom}")
    if problems:
        raise StackProblem(problems, details)
    return details


RULES_ENV = "VLMBUILD_SMOKE_RULES"


def deepspeed_build_for(variant: contract.VariantInfo | None, mode: str) -> contract.DeepSpeedBuildInfo | None:
    """The image's DeepSpeed build that serves ``mode``'s accelerator (variant.json's deepspeed_builds:
    accelerator, ops, path or None for the venv's own); None outside an image built with one."""
    accelerator = "cuda" if mode == "gpu" else "cpu"
    builds = variant.get("deepspeed_builds", []) if variant else []
    return next((b for b in builds if b["accelerator"] == accelerator), None)


class StackProblem(Exception):
    def __init__(self, problems: list[str], details: dict[str, Any]) -> None:
        self.problems, self.details = problems, details
        super().__init__(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))


def default_paths() -> tuple[Path | None, Path | None]:
    """Inside an image the lockfile and variant metadata lie at fixed paths (the contract's)."""
    lock = Path(contract.LOCK_PATH)
    variant = Path(contract.VARIANT_PATH)
    return (lock if lock.is_file() else None, variant if variant.is_file() else None)

