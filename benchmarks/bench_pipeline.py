"""Build-pipeline numbers for the local variant, on a real engine (run .ci/setup first).

    python benchmarks/bench_pipeline.py [--skip-cold]

1. cold build (--no-cache) + CPU smoke of the local variant;
2. rebuild after bumping one small top-layer package (accelerate, re-locked in a scratch copy);
3. which layers changed on that bump and their bytes;
4. the final image's size against the size of its installed packages (/opt/venv) and of its base.
Images are tagged into a throwaway repository and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parent.parent
BENCH_REPO = "vlmbuild-bench/vlm-r1"
BUMP = ("accelerate", "1.15.0", "1.14.0")


def vlmbuild(*args: str, root: Path | None = None) -> tuple[float, dict]:
    report = Path(tempfile.mkdtemp()) / "build.json"
    cmd = [sys.executable, "-m", "vlmbuild"] + (["--root", str(root)] if root else []) + list(args) + [
        "--report", str(report)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, json.loads(report.read_text())["builds"][0]


def layer_sizes(client, image_id: str) -> list[tuple[str, int]]:
    """(created-by, size) of the layers that hold files, bottom to top."""
    history = client.api.history(image_id)
    return [(h["CreatedBy"][-70:], h["Size"]) for h in reversed(history) if h["Size"] > 0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-cold", action="store_true", help="use the engine's cache for the first build")
    args = parser.parse_args()
    client = docker.from_env(timeout=1800)
    base = ["build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu", "--repository", BENCH_REPO]

    wall, first = vlmbuild(*base, *([] if args.skip_cold else ["--no-cache"]))
    print(f"{'cached' if args.skip_cold else 'cold'} build of local: {first['build_seconds']:.0f}s build, "
          f"{first['smoke_seconds']:.0f}s smoke in the image, {wall:.0f}s wall")

    scratch = Path(tempfile.mkdtemp(prefix="vlmbuild-bench-"))
    try:
        shutil.copytree(REPO / "images", scratch / "images")
        shutil.copytree(REPO / "lockfiles", scratch / "lockfiles")
        spec = scratch / "images" / "vlm-r1.yaml"
        name, old, new = BUMP
        spec.write_text(re.sub(rf'{name}: "[^"]*"', f'{name}: "=={new}"', spec.read_text()))
        subprocess.run([sys.executable, "-m", "vlmbuild", "--root", str(scratch), "lock", "vlm-r1", "--variant",
                        "local"], check=True, capture_output=True)
        wall, bumped = vlmbuild(*base, root=scratch)
        print(f"rebuild after bumping {name} {old} -> {new}: {bumped['build_seconds']:.0f}s build, "
              f"{bumped['smoke_seconds']:.0f}s smoke, {wall:.0f}s wall")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    before = client.images.get(first["image_id"]).attrs["RootFS"]["Layers"]
    after_img = client.images.get(bumped["image_id"])
    after = after_img.attrs["RootFS"]["Layers"]
    shared = sum(1 for a, b in zip(before, after, strict=False) if a == b)
    sizes = layer_sizes(client, bumped["image_id"])
    changed = sizes[shared:]
    print(f"layers: {len(after)}; shared with the previous image: {shared}; changed: {len(after) - shared}")
    for created, size in changed:
        print(f"  changed layer {size / 1e6:9.1f} MB  {created}")
    print(f"bytes to re-pull after the bump: {sum(s for _, s in changed) / 1e6:.1f} MB "
          f"of {after_img.attrs['Size'] / 1e9:.2f} GB")

    venv = client.containers.run(bumped["image_id"], ["du", "-sb", "/opt/venv"], remove=True, network_mode="none")
    venv_bytes = int(venv.split()[0])
    base_bytes = client.images.get("vlmbuild-local/debian:bookworm").attrs["Size"]
    total = after_img.attrs["Size"]
    print(f"image {total / 1e9:.2f} GB = base {base_bytes / 1e9:.2f} GB + installed packages (/opt/venv) "
          f"{venv_bytes / 1e9:.2f} GB + other {(total - base_bytes - venv_bytes) / 1e9:.2f} GB "
          "(Python, g++, the smoke, evidence)")
    for created, size in sizes:
        print(f"  layer {size / 1e6:9.1f} MB  {created}")

    for image in client.images.list(name=BENCH_REPO):
        for tag in image.tags:
            client.images.remove(tag)


if __name__ == "__main__":
    main()
