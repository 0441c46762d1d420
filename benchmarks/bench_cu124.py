"""The released variant (cu124: Debian 13, Debian's CUDA 12.4.1 toolkit, DeepSpeed's CUDA and CPU ops) on a real
engine, side by side with naive Dockerfiles on the same trixie base, in one run.

    python benchmarks/bench_cu124.py [--runs N] [--skip-cold] [--out FILE]

Run .ci/setup first. Figures:

1. cold build: BuildKit's whole cache pruned (cache mounts included: no download, no DeepSpeed wheel kept), then
   `vlmbuild build --rebuild` (build + CPU smoke), with the stages that ran and when each ended;
2. rebuild after a change of the smoke's code (a comment in a scratch copy of the builder): what runs again,
   asserted to compile no op and download no toolkit (only the final stage may run);
3. the CPU smoke inside the image, every check, N runs, each asserted to have compiled nothing (prebuilt_ops);
4. image size against benchmarks/naive/Dockerfile on the same base with the same lockfile (one `pip install`),
   without and with Debian's toolkit installed the naive way (`apt-get install nvidia-cuda-toolkit` from
   non-free, which also drags in NVIDIA's driver libraries), and the toolkit layer's own size;
5. the naive toolkit image's careful twin (benchmarks/naive/Dockerfile.deepspeed-ops): DeepSpeed built from its
   sdist with the same ops for the same archs as ours (read from vlmbuild's plan), asserted to hold the compiled ops;
   our cold build against both naive builds (each with --no-cache), side by side.

Images it tags go to throwaway repositories and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_build import build_naive, lines, prune_build_cache, say, stage_lines, vlmbuild  # noqa: E402

BENCH_REPO = "vlmbuild-bench/vlm-r1-cu124"
NAIVE_REPO = "vlmbuild-bench/naive-cu124"
LOCAL_BASE = "vlmbuild-local/debian:trixie"
LOCK = REPO / "lockfiles" / "vlm-r1" / "cu124.txt"
# flash-attn's CUDA kernels take hours of nvcc on 2 cores: built without it, as the README's command and CI build,
# and the naive images compared with it go without it too
LEFT_OUT = ("flash-attn",)
STAGE_RE = re.compile(r"stage (\S+): done in")
# nvidia/cuda cannot be pulled here: its size is taken from a public record, `docker image ls` after `docker pull
# nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04` (image edd3b6bf59a6) in github.com/pinakinathc/learn_cuda's README.
# Docker prints sizes in units of 1e9 bytes, as this script does.
PUBLIC_NVIDIA_CUDA = ("nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04", 8.29e9, "pinakinathc/learn_cuda README")


def stages_run(build: dict) -> list[str]:
    """The BuildKit stages a build ran (not taken from the cache)."""
    return sorted({m.group(1) for line in build["stages"] for m in [STAGE_RE.search(line)] if m})


def smoke_code_changed_copy(scratch: Path) -> Path:
    """A copy of the builder whose smoke differs by one comment, importable as vlmbuild (PYTHONPATH=result)."""
    shutil.copytree(REPO / "builder", scratch / "vlmbuild", ignore=shutil.ignore_patterns("__pycache__"))
    report = scratch / "vlmbuild" / "smoke" / "report.py"
    report.write_text(report.read_text() + f"\n# bench_cu124: a smoke-code change ({time.time()})\n")
    return scratch


def naive_with_toolkit(base: str, tag: str) -> tuple[float, float]:
    """The naive image plus Debian's toolkit installed by hand: non-free added, `apt-get install
    nvidia-cuda-toolkit` (no placeholder: the driver libraries come along), then the same pip install; wall seconds
    of the toolkit base (``tag``-base, which the careful twin builds on too) and of the whole."""
    with tempfile.TemporaryDirectory(prefix="vlmbuild-naive-base-") as ctx:
        Path(ctx, "Dockerfile").write_text(
            f"FROM {base}\n"
            # the driver packages the toolkit pulls in without a placeholder need contrib (glx-alternative-nvidia) and
            # non-free-firmware (firmware-nvidia-gsp) too
            "RUN echo 'deb http://deb.debian.org/debian trixie contrib non-free non-free-firmware' \\\n"
            "      > /etc/apt/sources.list.d/non-free.list \\\n"
            " && apt-get update && apt-get install -y --no-install-recommends nvidia-cuda-toolkit \\\n"
            " && rm -rf /var/lib/apt/lists/*\n")
        started = time.monotonic()
        docker.from_env(timeout=3600).images.build(path=ctx, tag=f"{tag}-base", rm=True, forcerm=True, nocache=True)
        seconds = time.monotonic() - started
    return seconds, seconds + build_naive(LOCK, f"{tag}-base", tag, nocache=True, python="3.13", without=LEFT_OUT)


def naive_with_ops(base: str, tag: str) -> tuple[float, list[str]]:
    """The careful twin on the naive toolkit base: the lockfile less DeepSpeed, then DeepSpeed from its sdist with
    the ops and archs of our cu124 build (its plan's build environment); wall seconds and the compiled op libraries
    the image holds (none is a failure: the twin would JIT like the naive one)."""
    from vlmbuild.lock import load_variant_lock
    from vlmbuild.plan import make_plan
    from vlmbuild.spec import load_spec

    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("cu124")
    build = make_plan(variant, load_variant_lock(variant)).deepspeed[0]
    if build.accelerator != "cuda":
        sys.exit(f"cu124's first DeepSpeed build is for {build.accelerator}, not cuda")
    env = dict(part.split("=", 1) for part in build.env.split())
    switches = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("DS_"))
    archs = env["TORCH_CUDA_ARCH_LIST"].strip("'")
    say(f"careful twin: {switches} TORCH_CUDA_ARCH_LIST={archs} (ops: {', '.join(build.ops)})")
    seconds = build_naive(LOCK, base, tag, nocache=True, python="3.13", without=LEFT_OUT, split=("deepspeed",),
                          dockerfile="Dockerfile.deepspeed-ops",
                          build_args={"TORCH_CUDA_ARCH_LIST": archs, "DS_BUILD_SWITCHES": switches})
    listing = docker.from_env().containers.run(
        tag, ["sh", "-c", "find /opt/venv/lib -path '*deepspeed/ops*' -name '*_op*.so' -printf '%f\\n'"],
        remove=True, network_mode="none").decode().split()
    if not listing:
        sys.exit(f"the careful twin {tag} holds no compiled DeepSpeed op")
    return seconds, sorted(listing)


def measure(client, args) -> None:
    from vlmbuild.localbase import ensure_local_base

    say(f"# benchmarks/bench_cu124.py on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    started = time.monotonic()
    ensure_local_base(client, LOCAL_BASE)
    say(f"local base {LOCAL_BASE}: {time.monotonic() - started:.0f}s (made when missing)")
    base = ["build", "vlm-r1", "--variant", "cu124", "--base-image", LOCAL_BASE, "--smoke-device", "cpu",
            "--repository", BENCH_REPO, *(a for name in LEFT_OUT for a in ("--leave-out", name))]
    if args.size_only:
        wall, cold = vlmbuild(*base)
        size(client, args, cold["image_id"])
        return
    if not args.skip_cold:
        prune_build_cache()
        wall, cold = vlmbuild(*base, "--rebuild")
        say(f"cold build:        {cold['build_seconds']:6.1f}s build + {cold['smoke_seconds']:.1f}s smoke "
            f"({wall:.0f}s wall)")
        stage_lines(cold)
    else:
        wall, cold = vlmbuild(*base)
    image = cold["image_id"]

    with tempfile.TemporaryDirectory(prefix="vlmbuild-bench-") as tmp:
        wall, changed = vlmbuild(*base, "--rebuild", env={"PYTHONPATH": str(smoke_code_changed_copy(Path(tmp)))})
    ran = stages_run(changed)
    heavy = [s for s in ran if s.startswith(("python-base", "deepspeed-wheel", "layer-", "pkg-"))]
    say(f"smoke code changed: {changed['build_seconds']:6.1f}s build + {changed['smoke_seconds']:.1f}s smoke; "
        f"stages run again: {', '.join(ran) or 'the final one only'}")
    if heavy:
        sys.exit(f"a smoke-code change rebuilt {heavy}: the toolkit or an op would be installed/compiled again")
    client.images.remove(changed["image_id"], force=True)

    say("CPU smoke in the image, every check:")
    runs = []
    for _ in range(args.runs):
        t = time.monotonic()
        container = client.containers.run(image, ["vlmbuild-smoke", "--device", "cpu", "--json"], detach=True,
                                          network_mode="none", shm_size="2g")
        code = container.wait()["StatusCode"]
        seconds = time.monotonic() - t
        report = json.loads(container.logs(stderr=False).decode())
        container.remove(force=True)
        prebuilt = next(c for c in report["checks"] if c["name"] == "prebuilt_ops")
        if code != 0 or prebuilt["details"]["compiled_at_run_time"]:
            sys.exit(f"the smoke failed or compiled: {prebuilt}")
        say(f"  run: {seconds:5.1f}s wall (" + ", ".join(f"{c['name']} {c['seconds']:.1f}s" for c in report["checks"])
            + "), nothing compiled")
        runs.append(seconds)
    say(f"  min {min(runs):.1f}s, max {max(runs):.1f}s over {len(runs)} runs")
    size(client, args, image, cold=None if args.skip_cold else cold)


def size(client, args, image: str, cold: dict | None = None) -> None:
    naive_plain = build_naive(LOCK, LOCAL_BASE, f"{NAIVE_REPO}:plain", nocache=False, python="3.13", without=LEFT_OUT)
    toolkit_base, naive_toolkit = naive_with_toolkit(LOCAL_BASE, f"{NAIVE_REPO}:toolkit")
    naive_ops, ops = naive_with_ops(f"{NAIVE_REPO}:toolkit-base", f"{NAIVE_REPO}:ops")
    ours = client.images.get(image).attrs["Size"]
    plain = client.images.get(f"{NAIVE_REPO}:plain").attrs["Size"]
    toolkit = client.images.get(f"{NAIVE_REPO}:toolkit").attrs["Size"]
    toolkit_layer = max(int(e.get("Size") or 0) for e in client.api.history(image)
                        if "nvidia-cuda-toolkit" in (e.get("CreatedBy") or ""))
    say(f"image size:        ours {ours / 1e9:.2f} GB (toolkit layer {toolkit_layer / 1e9:.2f} GB) | naive with the "
        f"toolkit {toolkit / 1e9:.2f} GB ({naive_toolkit:.0f}s to build) | {ours / toolkit:.3f}x")
    say(f"                   ours without the toolkit layer {(ours - toolkit_layer) / 1e9:.2f} GB | naive pip-only "
        f"{plain / 1e9:.2f} GB ({naive_plain:.0f}s) | {(ours - toolkit_layer) / plain:.3f}x (ours also holds the CPU "
        "DeepSpeed build, the compiled ops, the smoke and its evidence)")
    twin = client.images.get(f"{NAIVE_REPO}:ops").attrs["Size"]
    say(f"                   naive with the toolkit and DeepSpeed's ops compiled ({', '.join(ops)}) "
        f"{twin / 1e9:.2f} GB | {ours / twin:.3f}x")
    if cold:
        say(f"build time, cold:  ours {cold['build_seconds'] + cold['smoke_seconds']:.0f}s (build "
            f"{cold['build_seconds']:.0f}s + CPU smoke {cold['smoke_seconds']:.0f}s) | naive with the toolkit "
            f"{naive_toolkit:.0f}s (no op compiled: JIT at first use) | careful twin {toolkit_base + naive_ops:.0f}s "
            f"(ops compiled, no smoke); naive builds with --no-cache, the toolkit base's {toolkit_base:.0f}s in both")
    say(public_comparison(ours, plain, client.images.get(LOCAL_BASE).attrs["Size"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


def public_comparison(ours: float, naive_plain: float, base: float) -> str:
    """nvidia/cuda's devel image plus the same stack, estimated: the public image's size and what the same
    `pip install` added to our trixie base (the naive pip-only image less that base). An estimate, not a build:
    Ubuntu 22.04's Python 3.10 wheels of the stack are about the size of the cp313 ones."""
    ref, public, source = PUBLIC_NVIDIA_CUDA
    stack = naive_plain - base
    return (f"public comparison: {ref} {public / 1e9:.2f} GB ({source}) + the same stack {stack / 1e9:.2f} GB "
            f"(naive pip-only less the {base / 1e9:.2f} GB base) = {(public + stack) / 1e9:.2f} GB, estimated | "
            f"ours {ours / 1e9:.2f} GB | {ours / (public + stack):.3f}x")


def remove_bench_images(client) -> None:
    for repo in (BENCH_REPO, NAIVE_REPO):
        for image in client.images.list(name=repo):
            client.images.remove(image.id, force=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="CPU smoke runs")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold build (it prunes the whole cache)")
    parser.add_argument("--size-only", action="store_true", help="only the size against the naive images")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cu124-2cpu.txt")
    args = parser.parse_args()
    client = docker.from_env(timeout=3600)
    try:
        measure(client, args)
    finally:
        remove_bench_images(client)


if __name__ == "__main__":
    main()
