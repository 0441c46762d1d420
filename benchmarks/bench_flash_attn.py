"""How long the release's flash-attn build takes: the cu124 flash-attn-wheel stage (PyPI's sdist, Debian's nvcc 12.4,
sm_80 + sm_90) run here for a limited time, each compile step timed as ninja reports it, the whole extrapolated.

    python benchmarks/bench_flash_attn.py [--minutes 12]

Builds here leave flash-attn out (--leave-out flash-attn): its 85 compile steps take hours on 2 cores. This runs the
stage as the release runner runs it (same Dockerfile, same lockfile, a locally made Debian 13 root as base) until
the time is up, then cancels the build (nothing is kept: the stage's wheel cache is written only at its end).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCAL_BASE = "vlmbuild-local/debian:trixie"
STEP = re.compile(r"\[(\d+)/(\d+)\] (?:/\S*/)?(nvcc|c\+\+|g\+\+|\S*portable-cxx)\b.*?(\S+\.(?:cu|cpp))\b")


class TimeUp(BaseException):
    """The time given is over: the build is cancelled (vlmbuild.buildkit stops the CLI on any BaseException)."""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=12.0)
    args = parser.parse_args()

    from vlmbuild import buildkit
    from vlmbuild.engine import Engine
    from vlmbuild.lock import load_variant_lock
    from vlmbuild.plan import make_plan
    from vlmbuild.progress import Progress
    from vlmbuild.render import render
    from vlmbuild.spec import load_spec

    base = Engine().resolve_base(LOCAL_BASE, Progress("base"))
    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("cu124")
    steps: list[tuple[float, int, int, str]] = []  # (seconds since the first compile step, n, total, source)
    feed = buildkit.PlainLog.feed

    def timed_feed(self, line: str) -> None:
        match = STEP.search(line)
        if match:
            now = time.monotonic()
            at = now - clock.setdefault("first step", now)
            steps.append((at, int(match.group(1)), int(match.group(2)), Path(match.group(4)).name))
            print(f"  [{steps[-1][1]}/{steps[-1][2]}] at {at:7.1f}s  {steps[-1][3]}", flush=True)
        feed(self, line)

    clock: dict[str, float] = {}

    def time_up(signum, frame):
        raise TimeUp()

    buildkit.PlainLog.feed = timed_feed
    signal.signal(signal.SIGALRM, time_up)
    print(f"# benchmarks/bench_flash_attn.py on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}: the "
          f"flash-attn-wheel stage for {args.minutes:.0f} min")
    with tempfile.TemporaryDirectory(prefix="vlmbuild-bench-fa-") as tmp:
        rendered = render(make_plan(variant, load_variant_lock(variant)), base.ref, Path(tmp) / "ctx")
        assert "flash-attn-wheel" in rendered.wheel_stages
        signal.alarm(int(args.minutes * 60))
        t0 = time.monotonic()
        try:
            buildkit.build(rendered.context, Progress("flash-attn-wheel"), target="flash-attn-wheel")
            print(f"the stage finished in {time.monotonic() - t0:.0f}s")
        except TimeUp:
            print(f"cancelled after {time.monotonic() - t0:.0f}s")
        finally:
            signal.alarm(0)
    if len(steps) < 2:
        print("no compile step finished: nothing to extrapolate")
        return 1
    # ninja names a step when it starts: the steps between the first and the last seen have run their course
    done = len(steps) - 1
    seconds = steps[-1][0] - steps[0][0]
    total = steps[-1][2]
    print(f"{done} of {total} compile steps in {seconds:.0f}s ({seconds / done:.0f}s each, one ninja job on this "
          f"machine: flash-attn's setup.py picks cores / 2); the whole stage at that pace: about "
          f"{seconds / done * total / 3600:.1f} h (the bwd kernels come first and are the heaviest)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
