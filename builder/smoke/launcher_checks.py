"""The checks the launcher runs itself, outside the ranks: the stack, the ZeRO-3 load repeated in fresh ranks, the
prebuilt ops (nothing JIT-compiled); the registry (vlmbuild.contract) names them here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import contract
from ..lockfile import LockfileError, read_lockfile
from .ranks import run_workers
from .stack import StackProblem, check_stack, deepspeed_build_for


class UsageProblem(Exception):
    pass


@dataclass
class Launch:
    """What the launcher's checks see of the run: its settings, the scratch directory, the records so far and what
    each rank said about itself once the ranks ended."""

    args: argparse.Namespace
    mode: str
    world: int
    workdir: Path
    extensions: Path
    lock_path: Path | None
    variant: contract.VariantInfo | None
    prebuilt: list[str]
    records: list[contract.CheckRecord] = field(default_factory=list)
    facts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rank_device(self) -> str:
        return self.facts[0]["device"] if self.facts and self.facts[0].get("device") else self.mode


def repeat_zero3_load(launch: Launch) -> contract.CheckRecord:
    """The ZeRO-3 load ``--repeat`` times in all, each in fresh processes, from the same checkpoint: every run
    must be bit-identical to the checkpoint, and all of them alike (corruption can be intermittent)."""
    started = time.monotonic()
    args, first = launch.args, launch.records
    device = next((c.get("device") for c in first if c["name"] == "zero3_load"), launch.mode)
    load = next(c for c in first if c["name"] == "zero3_load")
    model_dir = Path(args.model_dir) if args.model_dir else launch.workdir / "tiny-model"
    digests = [load["details"].get("weights_sha256")]
    problems = []
    for run in range(2, args.repeat + 1):
        again = run_workers(args, launch.mode, launch.world, launch.workdir, ("zero3_load",), launch.extensions,
                            results=f"results-{run}", model_dir=model_dir)
        result = again[0]
        # Each run is judged by zero3_load's own test (every tensor bit-identical to the checkpoint file), so
        # runs that pass are alike by construction: a comparison between them could never fail.
        if not contract.check_passed(result):
            problems.append(f"run {run}: {result.get('error') or result['status']}")
            digests.append(None)
        else:
            digests.append(result["details"].get("weights_sha256"))
    details = {"runs": args.repeat, "weights_sha256": digests,
               "failed_runs": [i + 1 for i, d in enumerate(digests) if d is None]}
    return contract.check_record("zero3_repeat", launch.world, device, "failed" if problems else "passed",
                                 "\n".join(problems) or None, details, time.monotonic() - started)


def run_stack(launch: Launch) -> contract.CheckRecord:
    started = time.monotonic()
    mode = launch.mode
    try:
        lock = read_lockfile(launch.lock_path) if launch.lock_path else None
        return contract.check_record("stack", 1, mode, details=check_stack(mode, lock, launch.variant),
                                     seconds=time.monotonic() - started)
    except StackProblem as exc:
        return contract.check_record("stack", 1, mode, "failed", str(exc), exc.details, time.monotonic() - started)
    except LockfileError as exc:
        raise UsageProblem(str(exc)) from None


def prebuilt_ops_for(variant: contract.VariantInfo | None, mode: str) -> list[str]:
    """The DeepSpeed ops the image was built with for the accelerator this mode loads."""
    build = deepspeed_build_for(variant, mode)
    return list(build["ops"]) if build else []


def use_deepspeed_build(variant: contract.VariantInfo | None, mode: str) -> str | None:
    """Put the image's DeepSpeed build for this mode's accelerator first on the path (this process and the ranks)
    when it lies apart from the venv's (a CUDA image's CPU build); its directory, or None."""
    build = deepspeed_build_for(variant, mode)
    path = build["path"] if build else None
    if not path:
        return None
    if not os.path.isdir(path):
        raise UsageProblem(f"variant.json declares a {mode} DeepSpeed build at {path}, which this image lacks")
    sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = path + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return path


def check_prebuilt_ops(launch: Launch) -> contract.CheckRecord:
    """Every op the image declares was loaded during the run, on every rank, through its DeepSpeed builder and
    from DeepSpeed's own package (not JIT-compiled, not from elsewhere), and nothing was compiled: torch's
    extensions directory of this run is still empty. Judged from what the ranks loaded, not from DeepSpeed's
    build metadata: DeepSpeed skips an op it finds incompatible without a word (``build_shm_op`` returns None)."""
    started = time.monotonic()
    ops, extensions, ranks = launch.prebuilt, launch.extensions, launch.facts
    # The checks it needs passed, so DeepSpeed imported here and in every rank, and every rank wrote its facts.
    import deepspeed
    from deepspeed.git_version_info import installed_ops

    package = os.path.realpath(os.path.dirname(deepspeed.__file__))
    built_in = {op: bool(installed_ops.get(op)) for op in ops}
    problems = [f"{op}: not built into DeepSpeed (it would be compiled at first use)"
                for op, ok in built_in.items() if not ok]
    loaded: dict[str, dict[str, str | None]] = {}
    for op in ops:
        loaded[op] = {}
        for rank in ranks:
            if op not in rank["loaded_ops"]:
                problems.append(f"{op}: not loaded on rank {rank['rank']} (the smoke loads it in "
                                f"{contract.OP_LOADED_BY.get(op, 'no check: nothing here proves it')}); "
                                "DeepSpeed skips an op it finds incompatible without an error")
                continue
            origin = rank["loaded_ops"][op]
            loaded[op][str(rank["rank"])] = origin
            if not os.path.realpath(origin or "?").startswith(package + os.sep):
                problems.append(f"{op}: loaded on rank {rank['rank']} from {origin}, not from DeepSpeed's package "
                                f"{package} (compiled at run time or put there by something else)")
    compiled = sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*"))
    if compiled:
        problems.append(f"ops were compiled at run time into {extensions}: {', '.join(compiled[:8])}")
    details = {"ops": built_in, "loaded": loaded, "package": package, "compiled_at_run_time": compiled}
    return contract.check_record("prebuilt_ops", launch.world, launch.rank_device,
                                 "failed" if problems else "passed", "\n".join(problems) or None, details,
                                 time.monotonic() - started)


def flash_attention_installed() -> bool:
    from importlib import metadata

    try:
        metadata.version("flash-attn")
    except metadata.PackageNotFoundError:
        return False
    return True


def run_launcher_check(launch: Launch, name: str) -> contract.CheckRecord:
    """A launcher check of the registry, skipped when a check it needs did not pass."""
    failed = contract.failed_needs(name, launch.records)
    if failed:
        return contract.check_record(name, launch.world, launch.rank_device, "skipped",
                                     f"not run: {', '.join(failed)} did not pass")
    return contract.entry_point(contract.REGISTRY[name].run)(launch)


def finish_rank_checks(launch: Launch) -> None:
    """Each rank check with a ``finish`` whose rank half passed is completed by it (in processes of its own)."""
    for index, record in enumerate(launch.records):
        finish = contract.REGISTRY[record["name"]].finish
        if finish and contract.check_passed(record):
            launch.records[index] = contract.entry_point(finish)(launch, record)


