"""The smoke over two nodes against the 1-node smoke of the same checks, on one image, alternated in one run.

    python benchmarks/bench_nodes.py IMAGE [--runs N] [--out FILE]

Run .ci/setup first; IMAGE is a vlmbuild image (e.g. the local variant's tag after `vlmbuild build vlm-r1 --variant
local`). Both sides run the checks that cross nodes (contract.ACROSS_NODES); the 1-node side has no `nodes` check
(there is no rendezvous to check), the 2-node side has it: two containers on an internal network, the image's
torchrun and c10d rendezvous, gloo over the containers' interfaces. Wall time of Engine.run_smoke, containers
created and removed included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    from vlmbuild import contract
    from vlmbuild.engine import Engine
    from vlmbuild.progress import Progress

    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "smoke-nodes.txt")
    args = parser.parse_args()
    engine = Engine()
    progress = Progress("bench", tty=False, github=False)
    one_node = ",".join(n for n in contract.ACROSS_NODES if n != "nodes")
    lines = [f"# benchmarks/bench_nodes.py on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, image {args.image}",
             f"checks: 1 node {one_node}; 2 nodes {','.join(contract.ACROSS_NODES)}"]
    print(lines[-1], flush=True)
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for run in range(args.runs):
        for nodes in (1, 2):
            checks = one_node if nodes == 1 else ",".join(contract.ACROSS_NODES)
            started = time.monotonic()
            result = engine.run_smoke(args.image, "cpu", 900, progress, checks=checks, nodes=nodes)
            wall = time.monotonic() - started
            if not result.passed:
                raise SystemExit(f"the {nodes}-node smoke failed:\n{result.logs[-3000:]}")
            report = result.report or {}
            per_check = ", ".join(f"{c['name']} {c['seconds']:.1f}s" for c in report["checks"])
            lines.append(f"run {run + 1}, {nodes} node(s): {wall:5.1f}s wall, world {report['world_size']} "
                         f"({per_check})")
            print(lines[-1], flush=True)
            seconds[nodes].append(wall)
    one, two = statistics.mean(seconds[1]), statistics.mean(seconds[2])
    lines.append(f"mean: 1 node {one:.1f}s (min {min(seconds[1]):.1f}, max {max(seconds[1]):.1f}) | 2 nodes "
                 f"{two:.1f}s (min {min(seconds[2]):.1f}, max {max(seconds[2]):.1f}) | {two / one:.2f}x")
    print(lines[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
