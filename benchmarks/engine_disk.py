"""What each shape of build leaves on the engine's disk that nothing accounts for (issue 29).

    python benchmarks/engine_disk.py [--shapes cold,warm,...] [--out FILE]

Run .ci/setup first (a Docker engine, the local registry). Each shape runs alone, on the `local` variant, and is
followed by the engine's storage as du sees it against `docker system df`'s images, containers and build cache
(vlmbuild.engine_disk): the unaccounted bytes after it, their change, and the storage directories it left that
were not there before (BuildKit's snapshots have 25-character ids, the layer store's 64 hex digits).

Shapes: cold (BuildKit's cache ignored: --no-cache), warm (--rebuild on a warm cache), prune (BuildKit's whole
cache pruned after a build), sigterm and sigkill (a cold build killed mid-install), keep-failed (a smoke killed at
its timeout, the candidate kept, then removed as a user would), two (two builds at once), cache-to (the build
cache exported to the local registry), smoke-timeout (a smoke killed at its timeout), prune-under-image (a build,
BuildKit's cache pruned while its image is still tagged, the image removed after), two-cold (two --no-cache
builds at once), cache-from (BuildKit's cache pruned, a build importing the cache cache-to pushed),
rebuild-under-image (a build, then a --no-cache build of the same inputs while the first image is tagged, then
BuildKit's cache pruned: moby/moby#45939, vlmbuild.engine_orphans), reclaim (dockerd stopped, and started again by
vlmbuild.engine_setup, which first removes the storage directories nothing references; only for the dockerd
engine_setup started).

Images it makes go to throwaway repositories and are removed after each shape.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker
from vlmbuild import engine_disk, engine_orphans, engine_setup

REPO = Path(__file__).resolve().parent.parent
BENCH_REPO = "vlmbuild-bench/leak"
REGISTRY = os.environ.get("VLMBUILD_REGISTRY", "127.0.0.1:5000")
LOCAL_BASE = "vlmbuild-local/debian:bookworm"
SHAPES = ("cold", "warm", "prune", "sigterm", "sigkill", "keep-failed", "two", "cache-to", "smoke-timeout",
          "prune-under-image", "two-cold", "cache-from", "rebuild-under-image", "reclaim")

lines: list[str] = []


def say(text: str) -> None:
    print(text, flush=True)
    lines.append(text)


def build_cmd(*extra: str, repository: str = BENCH_REPO) -> list[str]:
    return [sys.executable, "-m", "vlmbuild", "build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu",
            "--repository", repository, "--base-image", LOCAL_BASE, "--repeat", "1", "--rebuild", *extra]


def build(*extra: str, repository: str = BENCH_REPO) -> int:
    return subprocess.run(build_cmd(*extra, repository=repository), cwd=REPO, capture_output=True,
                          text=True).returncode


def buildkit_cli_running() -> bool:
    return subprocess.run(["pgrep", "-f", "docker build --progress=plain"], capture_output=True).returncode == 0


def killed_build(sig: int) -> int:
    """A cold build killed with ``sig`` once BuildKit has been installing for 30 s."""
    proc = subprocess.Popen(build_cmd("--no-cache"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "uv pip install" in line or "running" in line:
            break
    time.sleep(30)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    # SIGKILL reaches vlmbuild only: the BuildKit CLI it started goes on; the disk is measured once it is done
    deadline = time.monotonic() + 1800
    while buildkit_cli_running() and time.monotonic() < deadline:
        time.sleep(2)
    return proc.returncode


def remove_bench_images(client) -> None:
    for image in client.images.list():
        for tag in image.tags:
            if tag.startswith(("vlmbuild-bench/", f"{REGISTRY}/vlmbuild-bench/")):
                client.images.remove(tag, force=True)
    client.images.prune(filters={"dangling": True})


class LeastFree:
    """The least free disk seen while a shape runs (every 2 s): what a build of it takes at its peak."""

    def __init__(self, path: str) -> None:
        self.path, self.least, self.done = path, shutil.disk_usage(path).free, threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.done.wait(2):
            self.least = min(self.least, shutil.disk_usage(self.path).free)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.least


def storage_dirs(storage: str) -> dict[str, int]:
    root = Path(storage)
    return {d.name: engine_disk.du_bytes(d) or 0 for d in root.iterdir() if d.is_dir() and d.name != "l"}


def run_shape(name: str, client) -> str:
    if name == "cold":
        return f"exit {build('--no-cache')}"
    if name == "warm":
        return f"exit {build()}"
    if name == "prune":
        freed = client.api.prune_builds(all=True).get("SpaceReclaimed", 0)
        return f"BuildKit reports {freed / 1e9:.1f} GB reclaimed"
    if name == "sigterm":
        return f"exit {killed_build(signal.SIGTERM)}"
    if name == "sigkill":
        return f"exit {killed_build(signal.SIGKILL)}"
    if name == "keep-failed":
        # the kept candidate is untagged and carries none of the evidence labels (those come with the evidence
        # layer, after a smoke that passed): it is the untagged image the build left
        before = {i.id for i in client.images.list(all=True)}
        code = build("--keep-failed", "--smoke-timeout", "20")
        kept = [i for i in client.images.list(all=True) if not i.tags and i.id not in before]
        for image in kept:
            client.images.remove(image.id, force=True)
        return f"exit {code}, {len(kept)} kept candidate(s) then removed"
    if name == "two":
        procs = [subprocess.Popen(build_cmd(repository=f"{BENCH_REPO}-{n}"), cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for n in (1, 2)]
        return "exits " + ", ".join(str(p.wait()) for p in procs)
    if name == "cache-to":
        return f"exit {build('--cache-to', f'{REGISTRY}/vlmbuild-bench/cache:local')}"
    if name == "smoke-timeout":
        return f"exit {build('--smoke-timeout', '20')}"
    if name == "two-cold":
        # two builds of the same new layers at once (moby/moby#46136: parallel builds leak; fixed in moby 23.0.11,
        # 24.0.10 and 25.0.4 by moby/moby#47523, never in 20.10)
        procs = [subprocess.Popen(build_cmd("--no-cache", repository=f"{BENCH_REPO}-{n}"), cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for n in (1, 2)]
        return "exits " + ", ".join(str(p.wait()) for p in procs)
    if name == "cache-from":
        # a new machine: BuildKit's cache pruned, the layers imported from the cache cache-to pushed
        client.api.prune_builds(all=True)
        return f"exit {build('--cache-from', f'{REGISTRY}/vlmbuild-bench/cache:local')}"
    if name == "prune-under-image":
        # what the suite and a release runner do: BuildKit's cache pruned while an image built from it is still
        # tagged, the image removed afterwards
        code = build()
        freed = client.api.prune_builds(all=True).get("SpaceReclaimed", 0)
        remove_bench_images(client)
        return f"exit {code}, BuildKit reports {freed / 1e9:.1f} GB reclaimed with the image still there"
    if name == "rebuild-under-image":
        first = build()
        again = build("--no-cache")
        freed = client.api.prune_builds(all=True).get("SpaceReclaimed", 0)
        orphans = engine_orphans.find_orphans(Path(engine_disk.measure(client).storage).parent)
        return (f"exits {first}, {again}, BuildKit reports {freed / 1e9:.1f} GB reclaimed; {len(orphans)} directories "
                f"nothing references, {sum(o.size or 0 for o in orphans) / 1e9:.2f} GB")
    if name == "reclaim":
        if not engine_setup.stop_started_dockerd():
            return "skipped: this dockerd was not started by vlmbuild.engine_setup"
        setup = subprocess.run([sys.executable, "-m", "vlmbuild.engine_setup"], capture_output=True, text=True)
        said = [line for line in setup.stdout.splitlines() if "removed" in line]
        return f"exit {setup.returncode}; {said[0].removeprefix('[engine] ') if said else 'nothing removed'}"
    raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    client = docker.from_env(timeout=900)
    remove_bench_images(client)
    disk = engine_disk.measure(client)
    say(f"start: {engine_disk.describe(disk)}")
    say(f"{'shape':<14} {'seconds':>8} {'unaccounted GB':>15} {'change GB':>10} {'free GB':>8} {'peak use GB':>11}"
        "  outcome; new storage dirs left")
    for name in args.shapes.split(","):
        before_dirs = storage_dirs(disk.storage)
        before, free_before = disk.unaccounted or 0, disk.free
        started = time.monotonic()
        watcher = LeastFree(disk.storage)
        outcome = run_shape(name, client)
        client = docker.from_env(timeout=900)  # a new connection: the reclaim shape restarts the daemon
        seconds = time.monotonic() - started
        least = watcher.stop()
        remove_bench_images(client)
        disk = engine_disk.measure(client)
        after_dirs = storage_dirs(disk.storage)
        new = sorted(((size, d) for d, size in after_dirs.items() if d not in before_dirs), reverse=True)
        left = ", ".join(f"{d[:12]}{'(bk)' if len(d) == 25 else ''} {size / 1e9:.2f}" for size, d in new[:4])
        change = (disk.unaccounted or 0) - before
        say(f"{name:<14} {seconds:8.0f} {(disk.unaccounted or 0) / 1e9:15.2f} {change / 1e9:+10.2f} "
            f"{disk.free / 1e9:8.1f} {(free_before - least) / 1e9:11.1f}  {outcome}; "
            f"{len(new)} new dirs ({sum(s for s, _ in new) / 1e9:.2f} GB){': ' + left if left else ''}")
    say(f"end: {engine_disk.describe(disk)}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
