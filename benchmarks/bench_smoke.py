"""Wall time of the tiny CPU smoke (all checks), including DeepSpeed's JIT op build, in the test venv.

    python benchmarks/bench_smoke.py [--python PATH] [--runs N]

A fresh TORCH_EXTENSIONS_DIR per run, so every run pays the op build as a new container would.
Prints one line per run and a summary (in an image the ops are built in: benchmarks/bench_build.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def default_python() -> str:
    venvs = sorted((Path.home() / ".cache" / "vlmbuild-tests").glob("stack-*/bin/python"))
    if not venvs:
        sys.exit("no stack venv: run the stack tests once (pytest -m stack) or pass --python")
    return str(venvs[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", default=None)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    python = args.python or default_python()
    times = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(Path(tmp) / "ext")}
            report = Path(tmp) / "report.json"
            started = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "vlmbuild", "smoke", "--local", "--python", python,
                                   "--device", "cpu", "--report", str(report)], env=env, capture_output=True, text=True)
            wall = time.monotonic() - started
            data = json.loads(report.read_text())
            per_check = ", ".join(f"{c['name']} {c['seconds']:.1f}s" for c in data["checks"])
            print(f"run {i + 1}: exit {proc.returncode}, wall {wall:.1f}s ({per_check})")
            times.append(wall)
    print(f"cpu smoke wall time: min {min(times):.1f}s, max {max(times):.1f}s over {len(times)} runs")


if __name__ == "__main__":
    main()
