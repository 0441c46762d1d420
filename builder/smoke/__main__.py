"""Entry point of the smoke, inside an image (``vlmbuild-smoke``) or in any environment (``python -m vlmbuild.smoke``).

    vlmbuild-smoke [--device auto|gpu|cpu] [--report FILE] [--model-dir DIR] [--lockfile FILE] [--timeout S]
    vlmbuild-smoke verify-install [--lockfile FILE]

Starts its own ranks for the ZeRO-3 checks (worker.py), one process each, and runs check 1 (stack) here meanwhile:
world size 2 on CPU (gloo), min(2, GPUs) on GPU (NCCL). Exit 0 when every check passed, 1 when one
failed, 2 for bad usage or an environment it cannot run in. Standard library only until torch is needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .. import __version__, contract
from ..lockfile import LockfileError, read_lockfile
from . import report as report_mod
from .model_dir import ModelDirProblem, describe_checkpoint, validate_model_dir
from .rank_processes import die_with_parent, remove_shm_buffers
from .stack import StackProblem, check_stack, deepspeed_build_for, default_paths, verify_install

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageProblem(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_mode(requested: str) -> tuple[str, int]:
    """(mode, world size). A GPU is used only when torch can really reach one."""
    if requested == "cpu":
        return "cpu", 2
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - no torch at all: not an environment the smoke can judge
        raise UsageProblem(f"cannot import torch ({type(exc).__name__}: {exc}); this is not a training environment") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "gpu" and gpus == 0:
        raise UsageProblem("--device gpu, but torch sees no CUDA device (is the container run with --gpus all?)")
    if requested == "gpu" or (requested == "auto" and gpus > 0):
        return "gpu", min(2, gpus)
    return "cpu", 2


def environment_extensions_dir() -> Path:
    """Where this environment's JIT-compiled ops go when its DeepSpeed was not built with them: a directory of
    its own under torch's usual one, keyed by its Python, torch and DeepSpeed (versions and where they are
    installed). torch's default directory is shared by every environment of a user with the same Python and
    CUDA: two environments JIT-compiling the same op there at once load each other's build (a DeepSpeed 0.19.8
    smoke loaded another DeepSpeed's ``deepspeed_shm_comm`` and failed on a missing attribute)."""
    from importlib import metadata

    parts = [os.path.realpath(sys.prefix), platform.python_version()]
    versions = []
    for name in ("torch", "deepspeed"):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            parts.append(f"{name} -")
            continue
        parts.append(f"{name} {dist.version} {os.path.realpath(str(dist.locate_file('')))}")
        versions.append(f"{name}{dist.version}")
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    tag = "-".join([f"py{sys.version_info.major}{sys.version_info.minor}", *versions])
    return Path(root) / f"vlmbuild-{tag}-{key}"


def worker_env(mode: str, world: int) -> dict[str, str]:
    env = dict(os.environ)
    lib = str(Path(__file__).absolute().parent.parent.parent)
    env["PYTHONPATH"] = lib + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    if mode == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator: gloo, fp32
        env["LOCAL_SIZE"] = str(world)  # else it counts NUMA devices with numactl
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def select_checks(applicable: tuple[str, ...], requested: str | None, mode: str) -> tuple[str, ...]:
    """The checks to run: every applicable one, or those ``--checks`` names (with what they depend on)."""
    if not requested:
        return applicable
    names = [n.strip() for n in requested.split(",") if n.strip()]
    known = contract.check_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageProblem(f"--checks {','.join(unknown)}: unknown check; known: {', '.join(known)}")
    not_here = [n for n in names if n not in applicable]
    if not_here:
        raise UsageProblem(f"--checks {','.join(not_here)}: does not run in {mode} mode here "
                           f"(this run can do {', '.join(applicable)})")
    # a check that --repeat asks for comes with what it repeats
    names += [n for n in applicable if contract.REGISTRY[n].when == "repeat" and n not in names
              and all(d in names for d in contract.REGISTRY[n].needs)]
    missing = [f"{n} needs {d}" for n in names for d in contract.REGISTRY[n].needs if d not in names]
    if missing:
        raise UsageProblem(f"--checks: {'; '.join(missing)}")
    return tuple(n for n in applicable if n in names)


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
    variant: dict[str, Any] | None
    prebuilt: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    facts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rank_device(self) -> str:
        return self.facts[0]["device"] if self.facts and self.facts[0].get("device") else self.mode


def repeat_zero3_load(launch: Launch) -> dict[str, Any]:
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


class Ranks:
    """The smoke's ranks: one process each, started with the environment torchrun gives its workers (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Not torchrun itself: its agent would import torch once more before
    any rank starts (seconds, on every smoke). As torchrun does, when one rank fails the others are stopped."""

    def __init__(self, args: argparse.Namespace, mode: str, world: int, workdir: Path, checks: tuple[str, ...],
                 extensions: Path, results: str = "results", model_dir: Path | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.args, self.world, self.checks = args, world, checks
        self.results_dir = workdir / results
        self.results_dir.mkdir()
        cmd = [sys.executable, "-m", "vlmbuild.smoke.worker", "--device", mode, "--workdir", str(workdir),
               "--results-dir", str(self.results_dir), "--timeout", str(max(60, int(args.timeout))),
               "--checks", ",".join(checks), *extra]
        model_dir = model_dir or (Path(args.model_dir) if args.model_dir else None)
        if model_dir:
            cmd += ["--model-dir", str(model_dir)]
        if model_dir and not args.model_dir:
            cmd.append("--tiny-model")  # the tiny checkpoint an earlier run saved: still the tiny model
        env = worker_env(mode, world)
        # Where torch JIT-compiles an op: this run's empty directory (checked afterwards, check prebuilt_ops) or
        # the environment's own one (environment_extensions_dir).
        env["TORCH_EXTENSIONS_DIR"] = str(extensions)
        self.addr, self.port = "127.0.0.1", free_port()
        env.update(MASTER_ADDR=self.addr, MASTER_PORT=str(self.port), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world))
        self.log_path = workdir / f"workers-{results}.log"
        self.facts: list[dict[str, Any]] = []  # each rank's device and loaded ops, once it has ended
        self.started = time.monotonic()
        self.procs: list[subprocess.Popen] = []
        with open(self.log_path, "w") as log:
            for rank in range(world):
                self.procs.append(subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=partial(die_with_parent, os.getpid()),
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"}))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            proc.wait()
        remove_shm_buffers(self.addr, self.port)

    def wait(self) -> list[dict[str, Any]]:
        deadline = self.started + self.args.timeout
        timed_out = False
        try:
            while any(p.poll() is None for p in self.procs):
                if any(p.returncode not in (None, 0) for p in self.procs):
                    break  # one rank failed: the others would wait for it in a collective until the timeout
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.1)
        finally:
            self.stop()
        codes = [p.returncode for p in self.procs]
        returncode = next((c for c in codes if c != 0), 0)
        elapsed = time.monotonic() - self.started
        log_tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
        per_rank = read_rank_files(self.results_dir, self.world)
        merged = merge_rank_results(per_rank, timed_out, elapsed, self.args.timeout, log_tail, self.checks)
        self.facts = rank_facts(per_rank)
        return fail_on_bad_exit(merged, None if timed_out else returncode, log_tail)


def run_workers(args: argparse.Namespace, mode: str, world: int, workdir: Path, checks: tuple[str, ...],
                extensions: Path, results: str = "results", model_dir: Path | None = None,
                extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Fresh ranks that run ``checks`` (``extra``: more worker arguments) and end; their merged records."""
    return Ranks(args, mode, world, workdir, checks, extensions, results, model_dir, extra).wait()


def read_rank_files(results_dir: Path, world: int) -> list[dict[str, Any] | None]:
    """What each rank wrote (rank{N}.json), None for a rank that wrote nothing."""
    files = [results_dir / f"rank{rank}.json" for rank in range(world)]
    return [json.loads(f.read_text()) if f.is_file() else None for f in files]


def rank_facts(per_rank: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """What each rank that reported says about itself: its rank, device and the DeepSpeed ops it loaded."""
    return [{"rank": rank, "device": data.get("device"), "loaded_ops": data["loaded_ops"]}
            for rank, data in enumerate(per_rank) if data and "loaded_ops" in data]


def fail_on_bad_exit(checks: list[dict[str, Any]], returncode: int | None, log_tail: str) -> list[dict[str, Any]]:
    """The ranks' exit status counts: a rank that dies after its last result was written (a crash in teardown,
    a hang killed by the watchdog) turns the last passing check into a failure instead of a silent PASS."""
    if returncode in (0, None) or not checks or not all(contract.check_passed(c) for c in checks):
        return checks
    last = checks[-1]
    last.update(status="failed", error=f"every check reported a pass, but the ranks exited with status {returncode}; "
                                       f"last output:\n{log_tail}")
    return checks


def merge_rank_results(per_rank: list[dict[str, Any] | None], timed_out: bool, elapsed: float, timeout: float,
                       log_tail: str, checks: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rank 0's view, with any rank's failure folded in; checks that never reported become failures."""
    world = len(per_rank)
    fatal = next((r for r in per_rank if r and r.get("fatal")), None)
    merged: dict[str, dict[str, Any]] = {}
    for data in per_rank:
        for check in (data or {}).get("checks", []):
            current = merged.get(check["name"])
            if current is None or (contract.check_passed(current) and not contract.check_passed(check)):
                merged[check["name"]] = check
            elif current["error"] == "failed on another rank" and check.get("error") != "failed on another rank":
                merged[check["name"]] = check
    out = []
    for name in checks:
        if name in merged:
            out.append(merged[name])
            continue
        entry = contract.check_record(name, world, None, "failed", seconds=elapsed)
        if out and not contract.check_passed(out[-1]):
            entry.update(status="skipped", seconds=0.0, error=f"not run: {out[-1]['name']} did not pass")
        elif fatal:
            entry.update(error=fatal["fatal"], traceback=fatal.get("traceback"))
        elif timed_out:
            entry["error"] = f"timed out: the ranks were killed after {timeout:.0f} s"
        else:
            entry["error"] = "the ranks exited without reporting this check (crash?); last output:\n" + log_tail
        out.append(entry)
    return out


def run_stack(launch: Launch) -> dict[str, Any]:
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


def prebuilt_ops_for(variant: dict[str, Any] | None, mode: str) -> list[str]:
    """The DeepSpeed ops the image was built with for the accelerator this mode loads."""
    return list((deepspeed_build_for(variant, mode) or {}).get("ops") or [])


def use_deepspeed_build(variant: dict[str, Any] | None, mode: str) -> str | None:
    """Put the image's DeepSpeed build for this mode's accelerator first on the path (this process and the ranks)
    when it lies apart from the venv's (a CUDA image's CPU build); its directory, or None."""
    path = (deepspeed_build_for(variant, mode) or {}).get("path")
    if not path:
        return None
    if not os.path.isdir(path):
        raise UsageProblem(f"variant.json declares a {mode} DeepSpeed build at {path}, which this image lacks")
    sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = path + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return path


def check_prebuilt_ops(launch: Launch) -> dict[str, Any]:
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


def run_launcher_check(launch: Launch, name: str) -> dict[str, Any]:
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


def run_planned(launch: Launch, planned: tuple[str, ...]) -> list[dict[str, Any]]:
    """The planned checks in the registry's order. The ranks start first (they import and load for a while);
    the launcher checks that come before the rank checks run here meanwhile, those after them once they ended."""
    ranks_checks = tuple(n for n in planned if contract.REGISTRY[n].runs_in == "ranks")
    first_rank = planned.index(ranks_checks[0]) if ranks_checks else len(planned)
    ranks = Ranks(launch.args, launch.mode, launch.world, launch.workdir, ranks_checks,
                  launch.extensions) if ranks_checks else None
    try:
        for name in planned[:first_rank]:
            launch.records.append(run_launcher_check(launch, name))
    except BaseException:
        if ranks:
            ranks.stop()
        raise
    if ranks:
        launch.records += ranks.wait()
        launch.facts = ranks.facts
        finish_rank_checks(launch)
    for name in planned[first_rank:]:
        if contract.REGISTRY[name].runs_in == "launcher":
            launch.records.append(run_launcher_check(launch, name))
    return launch.records


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    default_lock, default_variant = default_paths()
    lock_path = Path(args.lockfile) if args.lockfile else default_lock
    variant_path = Path(args.variant_json) if args.variant_json else default_variant
    if lock_path is not None and not lock_path.is_file():
        raise UsageProblem(f"--lockfile {lock_path}: no such file")
    variant = json.loads(variant_path.read_text()) if variant_path else None
    model = None
    if args.model_dir:
        try:
            validate_model_dir(Path(args.model_dir))
            model = describe_checkpoint(Path(args.model_dir), args.model_label)
        except (ModelDirProblem, OSError, ValueError) as exc:
            raise UsageProblem(str(exc)) from None
    if not 1 <= args.repeat <= 20:
        raise UsageProblem(f"--repeat {args.repeat}: expected 1 to 20")
    # No warm pool of inductor compile workers in the launcher (the stack check imports the stack) or the ranks: every
    # process that imports a transformers model imports torch._dynamo (transformers.pytorch_utils ->
    # torch.distributed.tensor.parallel -> torch._dynamo.external_utils), and where triton is installed (torch's CUDA
    # wheels bring it) torch._inductor.async_compile then starts compile_threads worker processes at import, each
    # importing torch again. The smoke compiles nothing with inductor; on 2 cores the CPU smoke took 50-53 s with the
    # pools and 37-48 s without (no zero3_repeat). TORCH_WARM_POOL is torch's own switch; a value the caller set is
    # kept.
    os.environ.setdefault("TORCH_WARM_POOL", "0")
    mode, world = resolve_mode(args.device)
    if mode == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before the stack check imports deepspeed
        os.environ.setdefault("LOCAL_SIZE", str(world))

    deepspeed_path = use_deepspeed_build(variant, mode)  # before anything imports deepspeed
    prebuilt = prebuilt_ops_for(variant, mode)
    cuda_build = bool((deepspeed_build_for(variant, "gpu") or {}).get("ops"))
    planned = select_checks(contract.checks_for(mode, flash_attention=flash_attention_installed(),
                                                prebuilt_ops=bool(prebuilt), repeat=args.repeat,
                                                cuda_ops=cuda_build), args.checks, mode)
    workdir = Path(tempfile.mkdtemp(prefix="vlmbuild-smoke-", dir=args.workdir))
    # In an image whose DeepSpeed carries its ops, nothing may be compiled: torch's extensions directory is an
    # empty one, checked afterwards. Elsewhere ops are JIT-compiled into this environment's own directory.
    if prebuilt:
        extensions = workdir / "torch_extensions"
        extensions.mkdir(mode=0o555)  # read-only: a compile attempt by a non-root user fails where it starts
    else:
        extensions = environment_extensions_dir()
    launch = Launch(args, mode, world, workdir, extensions, lock_path, variant, prebuilt)
    try:
        checks = run_planned(launch, planned)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    device_name = None
    gpu = (checks[0].get("details") or {}).get("gpu") if checks else None
    if gpu:
        device_name = gpu.get("device_name")
    report = report_mod.finalize({
        "schema_version": report_mod.SCHEMA_VERSION,
        "tool": f"vlmbuild-smoke {__version__}",
        "mode": mode,
        "world_size": world,
        "device_name": device_name,
        "model": model["path"] if model else "tiny random Qwen2.5-VL (built locally)",
        "checkpoint": model,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - started))),
        "seconds": 0.0,
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "variant": variant, "lockfile": str(lock_path) if lock_path else None,
                        "torch_extensions_dir": None if prebuilt else str(extensions),
                        "deepspeed_build": deepspeed_path or "the venv's own"},
        "checks": checks,
    })
    report["seconds"] = round(time.monotonic() - started, 3)
    text = report_mod.dumps(report)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text)
    if args.json:
        sys.stdout.write(text)
    else:
        print(report_mod.summary(report))
    return EXIT_OK if report["passed"] else EXIT_FAILED


def run_verify_install(args: argparse.Namespace) -> int:
    lock_path = Path(args.lockfile) if args.lockfile else default_paths()[0]
    if lock_path is None or not lock_path.is_file():
        raise UsageProblem("verify-install: no lockfile (give --lockfile)")
    try:
        lock = read_lockfile(lock_path)
    except LockfileError as exc:
        raise UsageProblem(str(exc)) from None
    variant_path = default_paths()[1]
    left_out = (json.loads(variant_path.read_text()).get("left_out") or {}) if variant_path else {}
    problems = verify_install(lock, left_out)
    if problems:
        print(f"verify-install: the installed packages disagree with {lock_path}:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_FAILED
    print(f"verify-install: {len(lock.pins) - len(left_out)} packages installed exactly as locked"
          + (f", {', '.join(sorted(left_out))} left out (variant.json)" if left_out else ""))
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmbuild-smoke", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                   help="gpu: NCCL, bf16 where supported; cpu: DS_ACCELERATOR=cpu, gloo, fp32; auto: gpu if one is visible")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the summary")
    p.add_argument("--model-dir", help="also check a real local Qwen2.5-VL checkpoint (e.g. Qwen2.5-VL-3B-Instruct)")
    p.add_argument("--model-label", default=None,
                   help="how the report names --model-dir (its path on the host, where it is mounted in a container)")
    p.add_argument("--lockfile", help="compare installed versions with this lockfile (default: the image's)")
    p.add_argument("--variant-json", help="variant metadata (default: the image's)")
    p.add_argument("--timeout", type=float, default=float(contract.DEFAULT_SMOKE_TIMEOUT),
                   help="kill the ranks after this many seconds")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the ZeRO-3 load this many times in all, in fresh processes; fail if any run differs")
    p.add_argument("--checks", default=None,
                   help="only these checks (comma-separated, with what they depend on), e.g. stack,zero3_load")
    p.add_argument("--workdir", default=None, help="parent of the scratch directory (default: the system temp dir)")
    p.add_argument("--keep-workdir", action="store_true", help="keep checkpoints and rank logs for inspection")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["verify-install"]:
            vp = argparse.ArgumentParser(prog="vlmbuild-smoke verify-install")
            vp.add_argument("--lockfile")
            return run_verify_install(vp.parse_args(argv[1:]))
        return run(parser().parse_args(argv))
    except UsageProblem as exc:
        print(f"vlmbuild-smoke: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vlmbuild-smoke: interrupted", file=sys.stderr)
        return 130


def stop_on_sigterm() -> None:
    """SIGTERM (a container stop, an outer timeout) unwinds like Ctrl-C, so the ranks are stopped and their
    buffers removed on the way out; a SIGKILL cannot be caught, and the ranks' parent-death signal covers it."""
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


if __name__ == "__main__":
    # The registry names launcher checks as vlmbuild.smoke.__main__:*; run as `python -m`, this module is
    # __main__, and importing it by name again would make a second copy (with a second UsageProblem class).
    sys.modules.setdefault("vlmbuild.smoke.__main__", sys.modules[__name__])
    stop_on_sigterm()
    sys.exit(main())
