"""Build speed and size of the local variant against a naive Dockerfile, side by side, on a real engine.

    python benchmarks/bench_build.py [--runs N] [--skip-cold] [--skip-base-change] [--out FILE]

Run .ci/setup first (a Docker engine, the local registry). Figures, each with the naive one from the same run:

1. cold build: BuildKit's cache pruned (build cache and cache mounts: no layer, no download kept), then
   `vlmbuild build --rebuild` (build + smoke), against `docker build --no-cache` of benchmarks/naive/Dockerfile
   (one apt step, one `pip install` of the same lockfile, on the same base);
2. rebuild after a change that invalidates the torch layer, with a warm download cache: a new base image
   (the local base plus one small file);
3. bump of one top-layer package (accelerate 1.15.0 -> 1.14.0, re-locked in a scratch copy): relock and build
   time and the bytes of the layers a registry has to take, measured by pushing both images to the local
   registry; once with the cache warm, once more after pruning BuildKit's layer records (downloads and the
   DeepSpeed wheel kept), where every layer is rebuilt and must come out with the same bytes;
4. image size against the naive image;
5. the CPU smoke inside the image: the four checks the first slice had, and every check, N runs each.

Images and tags it makes go to throwaway repositories and are removed at the end; the BuildKit cache is not
restored (the next build of the local variant is cold).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parent.parent
NAIVE = REPO / "benchmarks" / "naive"
BENCH_REPO = "vlmbuild-bench/vlm-r1"
NAIVE_REPO = "vlmbuild-bench/naive"
REGISTRY = os.environ.get("VLMBUILD_REGISTRY", "127.0.0.1:5000")
LOCAL_BASE = "vlmbuild-local/debian:bookworm"
NEW_BASE = "vlmbuild-bench/base:relabelled"
BUMP = ("accelerate", "1.15.0", "1.14.0")
FOUR_CHECKS = "stack,zero3_load,train_step,checkpoint_resume"

lines: list[str] = []


def say(text: str) -> None:
    print(text, flush=True)
    lines.append(text)


def prune_build_cache(layers_only: bool = False) -> None:
    """Cold: BuildKit's whole cache, cache mounts (uv's downloads, the DeepSpeed wheels) included; or only its
    layer records (what a machine that pruned its cache, or another runner, starts from)."""
    subprocess.run(["docker", "builder", "prune", "-af"] + (["--filter", "type=regular"] if layers_only else []),
                   check=True, capture_output=True)


def docker_cli() -> tuple[list[str], dict[str, str]]:
    sys.path.insert(0, str(REPO))
    from vlmbuild.buildkit import builder_command

    return builder_command()


def build_naive(lock: Path, base: str, tag: str, nocache: bool, python: str = "3.11",
                without: tuple[str, ...] = (), split: tuple[str, ...] = (), dockerfile: str = "Dockerfile",
                build_args: dict[str, str] | None = None) -> float:
    """A naive Dockerfile of benchmarks/naive (``dockerfile``) with the same lockfile on ``base`` (whose Python is
    ``python``), less the packages ``without`` (what the image compared with was built without: --leave-out); the
    packages ``split`` go to deepspeed.txt beside requirements.txt, for a Dockerfile that installs them apart; wall
    seconds."""
    from vlmbuild.lockfile import read_lockfile

    ctx = Path(tempfile.mkdtemp(prefix="vlmbuild-naive-"))
    try:
        shutil.copy2(NAIVE / dockerfile, ctx / "Dockerfile")
        reqs = [r for r in read_lockfile(lock).requirements if r.name not in without]
        (ctx / "requirements.txt").write_text("".join(r.render() + "\n" for r in reqs if r.name not in split))
        (ctx / "deepspeed.txt").write_text("".join(r.render() + "\n" for r in reqs if r.name in split))
        ca = os.environ.get("SSL_CERT_FILE", "")
        (ctx / "build-ca.pem").write_bytes(Path(ca).read_bytes() if ca and Path(ca).is_file() else b"")
        prefix, env = docker_cli()
        args = {"BASE_IMAGE": base, "PYTHON": python, **(build_args or {})}
        cmd = prefix + ["--progress=plain", "-t", tag, *(a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")),
                        str(ctx)]
        if nocache:
            cmd.insert(len(prefix), "--no-cache")
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if proc.returncode != 0:
            sys.exit(f"naive build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return time.monotonic() - started
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def vlmbuild(*args: str, root: Path | None = None, env: dict[str, str] | None = None) -> tuple[float, dict]:
    """`vlmbuild ARGS --report`: (wall seconds, the build's report entry with the stages that ran); ``env`` is
    added to this process's environment."""
    report = Path(tempfile.mkdtemp()) / "build.json"
    cmd = [sys.executable, "-m", "vlmbuild"] + (["--root", str(root)] if root else []) + list(args) + [
        "--report", str(report)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    build = json.loads(report.read_text())["builds"][0]
    build["stages"] = [line.strip() for line in proc.stdout.splitlines()
                       if re.search(r"stage \S+: done in|exporting the image|built candidate", line)]
    return wall, build


def stage_lines(build: dict) -> None:
    """Where a build's time went: BuildKit's stages that ran (not cached), with when each ended."""
    for line in build.get("stages", []):
        say(f"    {line}")


def push_and_manifest(client, image_id: str, name: str) -> dict[str, int]:
    """Push ``image_id`` to the local registry; its layers as {digest: compressed bytes}."""
    ref = f"{REGISTRY}/{name}"
    client.api.tag(image_id, ref, "bench", force=True)
    for event in client.api.push(ref, tag="bench", stream=True, decode=True):
        if "error" in event:
            sys.exit(f"push of {ref} failed: {event['error']}")
    request = urllib.request.Request(f"http://{REGISTRY}/v2/{name}/manifests/bench", headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        manifest = json.load(resp)
    return {layer["digest"]: layer["size"] for layer in manifest["layers"]}


def smoke_runs(client, image: str, checks: str | None, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        cmd = ["vlmbuild-smoke", "--device", "cpu"] + (["--checks", checks] if checks else [])
        started = time.monotonic()
        container = client.containers.run(image, cmd, detach=True, network_mode="none", shm_size="2g")
        code = container.wait()["StatusCode"]
        seconds = time.monotonic() - started
        logs = container.logs().decode(errors="replace")
        container.remove(force=True)
        if code != 0:
            sys.exit(f"smoke failed in {image}:\n{logs[-3000:]}")
        split = re.findall(r"^\s+PASS (\S+)\s+([\d.]+)s", logs, re.M)
        say(f"  run: {seconds:5.1f}s wall (" + ", ".join(f"{n} {s}s" for n, s in split) + ")")
        out.append(seconds)
    return out


def ratio(ours: float, naive: float) -> str:
    return f"{ours / naive:.2f}x naive"


def measure(client, args) -> None:
    sys.path.insert(0, str(REPO))
    from vlmbuild.localbase import ensure_local_base

    ensure_local_base(client, LOCAL_BASE)
    lock = REPO / "lockfiles" / "vlm-r1" / "local.txt"
    base = ["build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu", "--repository", BENCH_REPO]
    say(f"# benchmarks/bench_build.py on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")

    if not args.skip_cold:
        prune_build_cache()
        naive_cold = build_naive(lock, LOCAL_BASE, f"{NAIVE_REPO}:cold", nocache=True)
        prune_build_cache()
        wall, cold = vlmbuild(*base, "--rebuild")
        say(f"cold build:        ours {cold['build_seconds']:6.1f}s build (+{cold['smoke_seconds']:.1f}s smoke) | "
            f"naive {naive_cold:6.1f}s | {ratio(cold['build_seconds'], naive_cold)}")
        stage_lines(cold)
    else:
        wall, cold = vlmbuild(*base)
        naive_cold = None
    first = cold["image_id"]

    # 2. a base with one more file (a new layer: BuildKit's cache keys follow the base's layers, not its id):
    #    everything from the base up is rebuilt, with uv's download cache (and the DeepSpeed wheels) warm
    naive_reference = f"{NAIVE_REPO}:cold"
    if not args.skip_base_change:
        client.images.build(fileobj=__import__("io").BytesIO(
            f"FROM {LOCAL_BASE}\nRUN echo {time.time()} > /etc/vlmbuild-bench-base\n".encode()), tag=NEW_BASE, rm=True)
        wall, rebased = vlmbuild(*base, "--base-image", NEW_BASE, "--rebuild")
        naive_rebased = build_naive(lock, NEW_BASE, f"{NAIVE_REPO}:rebased", nocache=False)
        say(f"base changed:      ours {rebased['build_seconds']:6.1f}s build (+{rebased['smoke_seconds']:.1f}s smoke) | "
            f"naive {naive_rebased:6.1f}s | {ratio(rebased['build_seconds'], naive_rebased)}")
        stage_lines(rebased)
        naive_reference = f"{NAIVE_REPO}:rebased"
        # 7 GB each: disk is shared (a full run once filled it)
        client.images.remove(rebased["image_id"], force=True)
    if naive_cold is None and args.skip_base_change:
        build_naive(lock, LOCAL_BASE, naive_reference, nocache=False)

    # 3. one top-layer package bumped, relock included: with the cache warm, then after a prune of its layers
    scratch = Path(tempfile.mkdtemp(prefix="vlmbuild-bench-"))
    try:
        shutil.copytree(REPO / "images", scratch / "images")
        shutil.copytree(REPO / "lockfiles", scratch / "lockfiles")
        spec = scratch / "images" / "vlm-r1.yaml"
        name, old, new = BUMP
        spec.write_text(re.sub(rf'{name}: "[^"]*"', f'{name}: "=={new}"', spec.read_text()))
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "vlmbuild", "--root", str(scratch), "lock", "vlm-r1", "--variant",
                        "local"], check=True, capture_output=True)
        relock = time.monotonic() - started
        bumped_lock = scratch / "lockfiles" / "vlm-r1" / "local.txt"
        wall, bumped = vlmbuild(*base, root=scratch)
        naive_bumped = build_naive(bumped_lock, LOCAL_BASE, f"{NAIVE_REPO}:bumped", nocache=False)
        prune_build_cache(layers_only=True)
        wall, pruned = vlmbuild(*base[:-1], f"{BENCH_REPO}-pruned", root=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    before = push_and_manifest(client, first, "vlmbuild-bench/ours")
    after = push_and_manifest(client, bumped["image_id"], "vlmbuild-bench/ours")
    after_prune = push_and_manifest(client, pruned["image_id"], "vlmbuild-bench/ours")
    naive_before = push_and_manifest(client, client.images.get(naive_reference).id, "vlmbuild-bench/naive")
    naive_after = push_and_manifest(client, client.images.get(f"{NAIVE_REPO}:bumped").id, "vlmbuild-bench/naive")
    naive_changed = {d: s for d, s in naive_after.items() if d not in naive_before}
    for label, build, manifest in (("warm cache", bumped, after), ("after a prune of the layer cache", pruned,
                                                                   after_prune)):
        changed = {d: s for d, s in manifest.items() if d not in before}
        total = relock + build["build_seconds"]
        say(f"bump {name} {old}->{new}, {label}: ours {relock:.1f}s relock + {build['build_seconds']:.1f}s build "
            f"| naive {naive_bumped:6.1f}s | {ratio(total, naive_bumped)}")
        say(f"  layers a registry takes: ours {len(changed)} of {len(manifest)}, {sum(changed.values()) / 1e6:.1f} MB "
            f"compressed | naive {len(naive_changed)} of {len(naive_after)}, "
            f"{sum(naive_changed.values()) / 1e6:.1f} MB")

    # 4. size
    ours_size = client.images.get(first).attrs["Size"]
    naive_size = client.images.get(naive_reference).attrs["Size"]
    ops = client.containers.run(first, ["bash", "-c", "du -cb /opt/venv/lib/python3.11/site-packages/deepspeed/ops/"
                                                      "*/*.so | tail -1"], remove=True, network_mode="none")
    say(f"image size:        ours {ours_size / 1e9:.2f} GB | naive {naive_size / 1e9:.2f} GB | "
        f"{ours_size / naive_size:.3f}x naive (ours holds {int(ops.split()[0]) / 1e6:.1f} MB of compiled DeepSpeed "
        "ops, the smoke and its evidence; the naive image none of them)")

    # 5. the smoke in the image
    say(f"smoke in the image, the first slice's four checks ({FOUR_CHECKS}):")
    four = smoke_runs(client, first, FOUR_CHECKS, args.runs)
    say(f"  min {min(four):.1f}s, max {max(four):.1f}s over {len(four)} runs")
    say("smoke in the image, every check:")
    every = smoke_runs(client, first, None, args.runs)
    say(f"  min {min(every):.1f}s, max {max(every):.1f}s over {len(every)} runs, all passed")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


def remove_bench_images(client) -> None:
    """What the benchmark tagged, also when it fails or is interrupted (disk is shared)."""
    for repo in (BENCH_REPO, f"{BENCH_REPO}-pruned", NAIVE_REPO, "vlmbuild-bench/base", f"{REGISTRY}/vlmbuild-bench/ours",
                 f"{REGISTRY}/vlmbuild-bench/naive"):
        for image in client.images.list(name=repo):
            # by id: an image pushed keeps a repo digest under the registry's name after its tags are gone
            client.images.remove(image.id, force=True)
    from vlmbuild.engine_setup import purge_local_repository

    for name in ("vlmbuild-bench/ours", "vlmbuild-bench/naive"):
        purge_local_repository(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="smoke runs per kind")
    parser.add_argument("--skip-cold", action="store_true", help="skip the two cold builds (they prune the cache)")
    parser.add_argument("--skip-base-change", action="store_true", help="skip the rebuild on a changed base")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "build-2cpu.txt")
    args = parser.parse_args()
    client = docker.from_env(timeout=1800)
    try:
        measure(client, args)
    finally:
        remove_bench_images(client)


if __name__ == "__main__":
    main()
