"""This node's ranks in a smoke over several nodes, started as users start them: by the image's own `torchrun`.

Every node runs `torchrun --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT` (VLM-R1's
run_scripts/multinode_training_demo.sh, one container per node), and the ranks torchrun starts are the smoke's own
worker, so one code path reports. The workdir is one that every node mounts (a shared filesystem, as training
clusters have): the tiny checkpoint rank 0 writes, the ZeRO-3 checkpoint every rank saves its partition of, and each
rank's results file. The rendezvous is bounded: a node that cannot reach it, or whose peer never comes, fails within
--rdzv-timeout naming itself, not after torchrun's default 600 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from .. import contract
from .rank_processes import die_with_parent
from .ranks import Ranks, worker_command, worker_env

# How long the ranks of the other nodes may take to write their results once this node's have ended: the collectives
# end together, the files follow within moments.
OTHER_NODES_GRACE_SECONDS = 60
# An elastic run (--min-nodes) waits this long for late nodes once the least it accepts have joined (torchrun: 30 s).
LAST_CALL_SECONDS = 10
RENDEZVOUS_ERROR = re.compile(r"\b(Rendezvous\w*Error|DistNetworkError)\b")


def torchrun_command(args: argparse.Namespace, per_node: int) -> list[str]:
    """The image's own torchrun (beside its python) with the node's rendezvous; c10d's join and read timeouts are
    --rdzv-timeout, so a node whose peer never comes, or that cannot reach the endpoint, ends in bounded time."""
    nnodes = f"{args.min_nodes}:{args.nodes}" if args.min_nodes and args.min_nodes != args.nodes else str(args.nodes)
    timeout = int(args.rdzv_timeout)
    return [str(Path(sys.executable).with_name("torchrun")), "--nnodes", nnodes, "--nproc-per-node", str(per_node),
            "--node-rank", str(args.node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint,
            "--rdzv-id", args.run_id,
            "--rdzv-conf", f"join_timeout={timeout},read_timeout={timeout},last_call_timeout={LAST_CALL_SECONDS}",
            "--max-restarts", "0"]


class NodeRanks(Ranks):
    """The ranks of this node (``per_node`` of them) in the world of ``args.nodes`` nodes, under one torchrun."""

    def __init__(self, args: argparse.Namespace, mode: str, per_node: int, workdir: Path, checks: tuple[str, ...],
                 extensions: Path) -> None:
        self.args, self.world, self.checks = args, args.nodes * per_node, checks
        self.results_dir = workdir / "results"
        self.results_dir.mkdir(exist_ok=True)
        self.log_path = workdir / f"torchrun-node{args.node_rank}.log"
        self.facts = []
        self.started = time.monotonic()
        self.procs = []
        worker = worker_command(args, mode, workdir, self.results_dir, checks,
                                extra=("--expect-world", str(self.world), "--expect-nodes", str(args.nodes)))
        cmd = torchrun_command(args, per_node) + worker[1:]  # `-m vlmbuild.smoke.worker ...`: torchrun's --module
        env = worker_env(mode, per_node)
        env["TORCH_EXTENSIONS_DIR"] = str(extensions)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # torchrun's to set
        with open(self.log_path, "w") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                               preexec_fn=partial(die_with_parent, os.getpid()), env=env))

    def stop(self) -> None:
        """torchrun passes a SIGTERM on to its workers and waits for them; a SIGKILL of its group follows."""
        proc = self.procs[0]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def await_other_nodes(self) -> None:
        """This node's torchrun ended well: the other nodes' ranks write their results within moments."""
        if self.procs[0].returncode != 0 or self.saw_a_wrong_world():
            return
        deadline = time.monotonic() + OTHER_NODES_GRACE_SECONDS
        files = [self.results_dir / f"rank{rank}.json" for rank in range(self.world)]
        while not all(f.is_file() for f in files) and time.monotonic() < deadline:
            time.sleep(0.2)

    def saw_a_wrong_world(self) -> bool:
        """This node's ranks found their world wrong (check nodes failed): no rank of another node will write into
        this world's results, and waiting for them only delays the failure (a world per node waited 60 s)."""
        for path in self.results_dir.glob("rank*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written, or another world's: the ranks' own merge reads it later
            if any(c.get("name") == "nodes" and c.get("status") == "failed" for c in data.get("checks", [])):
                return True
        return False

    def wait(self) -> list[contract.CheckRecord]:
        records = super().wait()
        log = self.log_path.read_text(errors="replace")
        found = RENDEZVOUS_ERROR.search(log)
        if found and not any(self.results_dir.glob("rank*.json")):
            # nothing ran: say what failed first, in place of "the ranks exited without reporting"
            why = (f"node {self.args.node_rank}: torchrun's c10d rendezvous at {self.args.rdzv_endpoint} did not "
                   f"complete within {self.args.rdzv_timeout:.0f} s ({found.group(1)}): the endpoint cannot be "
                   "reached from this node, or the other nodes never joined")
            for record in records:
                if record["status"] == "failed":
                    record["error"] = f"{why}; torchrun's last output:\n" + "\n".join(log.splitlines()[-15:])
                    break
        return records
