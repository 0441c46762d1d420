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
import sys
import tempfile
import time
from pathlib import Path

from .. import __version__, contract
from ..lockfile import LockfileError, read_lockfile
from . import report as report_mod
from .common import zero_settings
from .launcher_checks import (
    Launch,
    UsageProblem,
    finish_rank_checks,
    flash_attention_installed,
    prebuilt_ops_for,
    run_launcher_check,
    use_deepspeed_build,
)
from .model_dir import ModelDirProblem, describe_checkpoint, validate_model_dir
from .node_ranks import NodeRanks
from .ranks import Ranks
from .stack import deepspeed_build_for, default_paths, verify_install

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def choose_mode(requested: str, nodes: int = 1) -> tuple[str, int]:
    """(mode, world size). A GPU is used only when torch can really reach one. Over several nodes, each node's
    ranks: one on the CPU (gloo across the nodes is what is tested), the GPUs the node sees on a GPU host."""
    if requested == "cpu":
        return "cpu", 2 if nodes == 1 else nodes
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - no torch at all: not an environment the smoke can judge
        raise UsageProblem(f"cannot import torch ({type(exc).__name__}: {exc}); this is not a training environment") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "gpu" and gpus == 0:
        raise UsageProblem("--device gpu, but torch sees no CUDA device (is the container run with --gpus all?)")
    if requested == "gpu" or (requested == "auto" and gpus > 0):
        return "gpu", min(2, gpus) if nodes == 1 else gpus * nodes
    return "cpu", 2 if nodes == 1 else nodes


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


def run_planned(launch: Launch, planned: tuple[str, ...]) -> list[contract.CheckRecord]:
    """The planned checks in the registry's order. The ranks start first (they import and load for a while);
    the launcher checks that come before the rank checks run here meanwhile, those after them once they ended."""
    ranks_checks = tuple(n for n in planned if contract.REGISTRY[n].runs_in == "ranks")
    first_rank = planned.index(ranks_checks[0]) if ranks_checks else len(planned)
    ranks: Ranks | None = None
    if ranks_checks and launch.args.nodes > 1:
        ranks = NodeRanks(launch.args, launch.mode, launch.world // launch.args.nodes, launch.workdir, ranks_checks,
                          launch.extensions)
    elif ranks_checks:
        ranks = Ranks(launch.args, launch.mode, launch.world, launch.workdir, ranks_checks, launch.extensions)
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
    check_nodes_usage(args)
    # No warm pool of inductor compile workers in the launcher (the stack check imports the stack) or the ranks: every
    # process that imports a transformers model imports torch._dynamo (transformers.pytorch_utils ->
    # torch.distributed.tensor.parallel -> torch._dynamo.external_utils), and where triton is installed (torch's CUDA
    # wheels bring it) torch._inductor.async_compile then starts compile_threads worker processes at import, each
    # importing torch again. The smoke compiles nothing with inductor; on 2 cores the CPU smoke took 50-53 s with the
    # pools and 37-48 s without (no zero3_repeat). TORCH_WARM_POOL is torch's own switch; a value the caller set is
    # kept.
    os.environ.setdefault("TORCH_WARM_POOL", "0")
    mode, world = choose_mode(args.device, args.nodes)
    if mode == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before the stack check imports deepspeed
        os.environ.setdefault("LOCAL_SIZE", str(world // args.nodes))

    deepspeed_path = use_deepspeed_build(variant, mode)  # before anything imports deepspeed
    prebuilt = prebuilt_ops_for(variant, mode)
    cuda = deepspeed_build_for(variant, "gpu")
    cuda_build = bool(cuda and cuda["ops"])
    planned = select_checks(contract.checks_for(mode, flash_attention=flash_attention_installed(),
                                                prebuilt_ops=bool(prebuilt), repeat=args.repeat,
                                                cuda_ops=cuda_build, nodes=args.nodes), args.checks, mode)
    if args.node_rank > 0:  # the launcher checks are node 0's: every node of the smoke runs the same image
        planned = tuple(n for n in planned if contract.REGISTRY[n].runs_in == "ranks")
    if args.nodes > 1:  # every node's launcher works in the one directory all nodes mount
        workdir = Path(args.workdir) / f"vlmbuild-smoke-{args.run_id}"
        workdir.mkdir(exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="vlmbuild-smoke-", dir=args.workdir))
    # In an image whose DeepSpeed carries its ops, nothing may be compiled: torch's extensions directory is an
    # empty one, checked afterwards. Elsewhere ops are JIT-compiled into this environment's own directory.
    if prebuilt:
        extensions = workdir / f"torch_extensions-node{args.node_rank}"
        extensions.mkdir(mode=0o555)  # read-only: a compile attempt by a non-root user fails where it starts
    else:
        extensions = environment_extensions_dir()
    launch = Launch(args, mode, world, workdir, extensions, lock_path, variant, prebuilt)
    try:
        checks = run_planned(launch, planned)
    finally:
        # a shared directory is the caller's to remove: another node may still read it
        if not args.keep_workdir and args.nodes == 1:
            shutil.rmtree(workdir, ignore_errors=True)
    device_name = None
    gpu = checks[0]["details"].get("gpu") if checks else None
    if gpu:
        device_name = gpu.get("device_name")
    report = report_mod.finalize({
        "schema_version": report_mod.SCHEMA_VERSION,
        "tool": f"vlmbuild-smoke {__version__}",
        "mode": mode,
        "world_size": world,
        "nodes": args.nodes,
        **({"node_rank": args.node_rank, "rendezvous": f"c10d at {args.rdzv_endpoint} (torchrun)"}
           if args.nodes > 1 else {}),
        "device_name": device_name,
        "model": model["path"] if model else "tiny random Qwen2.5-VL (built locally)",
        "checkpoint": model,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - started))),
        "seconds": 0.0,
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "variant": variant, "lockfile": str(lock_path) if lock_path else None,
                        "torch_extensions_dir": None if prebuilt else str(extensions),
                        "deepspeed_build": deepspeed_path or "the venv's own",
                        # ZeRO settings laid over every DeepSpeed config of the run (a sweep's CPU route), if any
                        "zero_settings": zero_settings() or None},
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
    nodes = p.add_argument_group("over several nodes (each node runs this with its --node-rank; torchrun's c10d "
                                 "rendezvous; --workdir a directory every node mounts)")
    nodes.add_argument("--nodes", type=int, default=1, help="how many nodes the world spans (default 1)")
    nodes.add_argument("--node-rank", type=int, default=0, help="this node's rank (node 0 hosts the rendezvous)")
    nodes.add_argument("--rdzv-endpoint", default="node0:29400", help="HOST:PORT of the rendezvous, on node 0")
    nodes.add_argument("--rdzv-timeout", type=float, default=float(contract.DEFAULT_RDZV_TIMEOUT),
                       help="fail when the rendezvous has not completed after this many seconds")
    nodes.add_argument("--run-id", default="vlmbuild-smoke", help="the rendezvous id, the same on every node")
    nodes.add_argument("--min-nodes", type=int, default=0,
                       help="torchrun's lower bound of an elastic run (--nnodes MIN:MAX); the smoke still "
                            "asserts the world that --nodes make")
    return p


def check_nodes_usage(args: argparse.Namespace) -> None:
    if not 1 <= args.nodes <= 64:
        raise UsageProblem(f"--nodes {args.nodes}: expected 1 to 64")
    if args.nodes > 1:
        if not 0 <= args.node_rank < args.nodes:
            raise UsageProblem(f"--node-rank {args.node_rank}: expected 0 to {args.nodes - 1}")
        if not args.workdir:
            raise UsageProblem("--nodes: give --workdir, a directory every node mounts (the checkpoints and the "
                               "ranks' results are shared through it)")
        if ":" not in args.rdzv_endpoint:
            raise UsageProblem(f"--rdzv-endpoint {args.rdzv_endpoint}: expected HOST:PORT")


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
    stop_on_sigterm()
    sys.exit(main())
