"""The smoke's ranks: started as torchrun starts its workers, watched, stopped together, their records merged.

Each rank is a `python -m vlmbuild.smoke.worker` process; a rank that fails stops the others (they would wait
for it in a collective until the timeout), and a launcher that dies takes its ranks with it (rank_processes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from .. import contract
from .rank_processes import die_with_parent, remove_shm_buffers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Ranks:
    """The smoke's ranks: one process each, started with the environment torchrun gives its workers (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Not torchrun itself: its agent would import torch once more before
    any rank starts (seconds, on every smoke). As torchrun does, when one rank fails the others are stopped."""

    def __init__(self, args: argparse.Namespace, mode: str, world: int, workdir: Path, checks: tuple[str, ...],
                 extensions: Path, results: str = "results", model_dir: Path | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.args, self.world, self.checks = args, world, checks
        self.results_dir = workdir / results
        self.results_dir.mkdir(exist_ok=True)
        self.addr, self.port = "127.0.0.1", free_port()
        self.log_path = workdir / f"workers-{results}.log"
        self.facts: list[dict[str, Any]] = []  # each rank's device and loaded ops, once it has ended
        self.started = time.monotonic()
        self.procs: list[subprocess.Popen] = []
        cmd = worker_command(args, mode, workdir, self.results_dir, checks, model_dir, extra)
        env = worker_env(mode, world)
        # Where torch JIT-compiles an op: this run's empty directory (checked afterwards, check prebuilt_ops) or
        # the environment's own one (environment_extensions_dir).
        env["TORCH_EXTENSIONS_DIR"] = str(extensions)
        env.update(MASTER_ADDR=self.addr, MASTER_PORT=str(self.port), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world))
        self.start(cmd, env)

    def start(self, cmd: list[str], env: dict[str, str]) -> None:
        with open(self.log_path, "w") as log:
            for rank in range(self.world):
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

    def await_other_nodes(self) -> None:
        """All ranks are this host's: none to wait for (node_ranks.NodeRanks waits for the other nodes' files)."""

    def wait(self) -> list[contract.CheckRecord]:
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
        if not timed_out:
            self.await_other_nodes()
        codes = [p.returncode for p in self.procs]
        returncode = next((c for c in codes if c != 0), 0)
        elapsed = time.monotonic() - self.started
        log_tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
        per_rank = read_rank_files(self.results_dir, self.world)
        merged = merge_rank_results(per_rank, timed_out, elapsed, self.args.timeout, log_tail, self.checks)
        self.facts = rank_facts(per_rank)
        return fail_on_bad_exit(merged, None if timed_out else returncode, log_tail)


def worker_command(args: argparse.Namespace, mode: str, workdir: Path, results_dir: Path, checks: tuple[str, ...],
                   model_dir: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The arguments of `python -m vlmbuild.smoke.worker` for one run of ranks."""
    cmd = ["--device", mode, "--workdir", str(workdir), "--results-dir", str(results_dir),
           "--timeout", str(max(60, int(args.timeout))), "--checks", ",".join(checks), *extra]
    model_dir = model_dir or (Path(args.model_dir) if args.model_dir else None)
    if model_dir:
        cmd += ["--model-dir", str(model_dir)]
    if model_dir and not args.model_dir:
        cmd.append("--tiny-model")  # the tiny checkpoint an earlier run saved: still the tiny model
    return [sys.executable, "-m", "vlmbuild.smoke.worker", *cmd]


def run_workers(args: argparse.Namespace, mode: str, world: int, workdir: Path, checks: tuple[str, ...],
                extensions: Path, results: str = "results", model_dir: Path | None = None,
                extra: tuple[str, ...] = ()) -> list[contract.CheckRecord]:
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


def fail_on_bad_exit(checks: list[contract.CheckRecord], returncode: int | None,
                     log_tail: str) -> list[contract.CheckRecord]:
    """The ranks' exit status counts: a rank that dies after its last result was written (a crash in teardown,
    a hang killed by the watchdog) turns the last passing check into a failure instead of a silent PASS."""
    if returncode in (0, None) or not checks or not all(contract.check_passed(c) for c in checks):
        return checks
    last = checks[-1]
    last["status"] = "failed"
    last["error"] = (f"every check reported a pass, but the ranks exited with status {returncode}; last output:\n"
                     f"{log_tail}")
    return checks


def merge_rank_results(per_rank: list[dict[str, Any] | None], timed_out: bool, elapsed: float, timeout: float,
                       log_tail: str, checks: tuple[str, ...]) -> list[contract.CheckRecord]:
    """Rank 0's view, with any rank's failure folded in; checks that never reported become failures."""
    world = len(per_rank)
    fatal = next((r for r in per_rank if r and r.get("fatal")), None)
    merged: dict[str, contract.CheckRecord] = {}  # what the ranks wrote (contract.check_record's records)
    for data in per_rank:
        for check in (data or {}).get("checks", []):
            current = merged.get(check["name"])
            if current is None or (contract.check_passed(current) and not contract.check_passed(check)):
                merged[check["name"]] = check
            elif current["error"] == "failed on another rank" and check.get("error") != "failed on another rank":
                merged[check["name"]] = check
    out: list[contract.CheckRecord] = []
    for name in checks:
        if name in merged:
            out.append(merged[name])
            continue
        entry = contract.check_record(name, world, None, "failed", seconds=elapsed)
        if out and not contract.check_passed(out[-1]):
            entry["status"], entry["seconds"] = "skipped", 0.0
            entry["error"] = f"not run: {out[-1]['name']} did not pass"
        elif fatal:
            entry["error"], entry["traceback"] = fatal["fatal"], fatal.get("traceback")
        elif timed_out:
            entry["error"] = f"timed out: the ranks were killed after {timeout:.0f} s"
        else:
            entry["error"] = "the ranks exited without reporting this check (crash?); last output:\n" + log_tail
        out.append(entry)
    return out


