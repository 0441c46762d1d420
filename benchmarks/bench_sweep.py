"""What a sweep cost, read from its results file: seconds per cell and per step, cells per hour, the whole wall time.

    python benchmarks/bench_sweep.py [compat/vlm-r1-local.json]

Every cell records the seconds of its steps (lock, install, deepspeed_ops: DeepSpeed's CPU ops built or taken from
the helper's cache, smoke, smoke_with_setting: the second smoke of a CPU route). A cell whose DeepSpeed wheel came
from the cache is a warm cell (deepspeed_ops under 30 s); the first cell of each DeepSpeed version builds it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARM_OPS_S = 30.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="?", default=str(REPO / "compat" / "vlm-r1-local.json"))
    args = parser.parse_args()
    data = json.loads(Path(args.results).read_text())
    cells = data["cells"]
    measured = [c for c in cells if c["result"] in ("passed", "failed")]
    totals = [sum(c["seconds"].values()) for c in measured]
    warm = [c for c in measured if c["seconds"].get("deepspeed_ops", 0) < WARM_OPS_S]
    steps = sorted({k for c in measured for k in c["seconds"]})
    print(f"{args.results}: {len(cells)} cells ({len(measured)} smoked, "
          f"{sum(1 for c in cells if c['result'] == 'unresolvable')} unresolvable, "
          f"{sum(1 for c in cells if c['result'] == 'install_failed')} install_failed)")
    hosts = {(c["host"]["cpu"], c["host"]["cores"]) for c in cells}
    print(f"hosts: {', '.join(f'{cpu} x{cores}' for cpu, cores in sorted(hosts, key=str))}")
    if not measured:
        return
    print(f"seconds per smoked cell: median {statistics.median(totals):.0f}, min {min(totals):.0f}, "
          f"max {max(totals):.0f}")
    for step in steps:
        values = [c["seconds"][step] for c in measured if step in c["seconds"]]
        print(f"  {step:<20} median {statistics.median(values):6.1f} s  max {max(values):6.1f} s  ({len(values)} cells)")
    if warm:
        warm_totals = [sum(c["seconds"].values()) for c in warm]
        print(f"warm cells (DeepSpeed's ops from the cache): {len(warm)}, median {statistics.median(warm_totals):.0f} s"
              f" -> {3600 / statistics.median(warm_totals):.0f} cells/hour")
    compiled = sorted({op for c in cells for op in c.get("jit_compiled", [])})
    print(f"ops JIT-compiled in any cell: {', '.join(compiled) or 'none'}")
    def ended(cell: dict) -> datetime.datetime:
        return datetime.datetime.strptime(cell["measured_at"], "%Y-%m-%dT%H:%M:%SZ")

    by_end = sorted(cells, key=ended)
    start = ended(by_end[0]) - datetime.timedelta(seconds=sum(by_end[0]["seconds"].values()))
    print(f"wall time, first cell's start to last cell's end: {(ended(by_end[-1]) - start).total_seconds():.0f} s "
          "(one run only if the cells were measured in one)")


if __name__ == "__main__":
    main()
