"""Signing and the cross-machine build cache, on a real engine and the local registry, side by side in one run.

    python benchmarks/bench_supply_chain.py [--variant local] [--out FILE]

Run .ci/setup first (a Docker engine, the local registry, cosign in .venv/bin). Figures:

1. sign + attest (the signature and the two attestations cosign pushes for a digest) and verify (the signature,
   each attestation verified and compared with the file inside the image), on the variant's image pushed to the
   local registry, with a fresh cosign key pair;
2. the second machine: BuildKit's whole cache and its cache mounts pruned, then the variant's image built with
   `--cache-from` the cache a first build pushed (`--cache-to`), against the same build after the same prune
   with no cache to import (a cold build: every download, every compile).

The image must have been built (`vlmbuild build vlm-r1 --variant local`). Throwaway tags go to
127.0.0.1:5000/vlmbuild-bench/*; the BuildKit cache is not restored (the next build is cold).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vlmbuild import buildkit, contract  # noqa: E402
from vlmbuild.build_cache import BuildCache, export  # noqa: E402
from vlmbuild.engine import Engine  # noqa: E402
from vlmbuild.engine_setup import purge_local_repository  # noqa: E402
from vlmbuild.inspect_image import Inspection  # noqa: E402
from vlmbuild.lock import load_variant_lock  # noqa: E402
from vlmbuild.lockfile import read_lockfile  # noqa: E402
from vlmbuild.plan import make_plan  # noqa: E402
from vlmbuild.progress import Progress  # noqa: E402
from vlmbuild.render import render  # noqa: E402
from vlmbuild.signing import Signer, Verifier, cosign_binary, sign_and_attest  # noqa: E402
from vlmbuild.spec import load_spec  # noqa: E402
from vlmbuild.verify_registry import verify_from_registry  # noqa: E402

BENCH = "127.0.0.1:5000/vlmbuild-bench/vlm-r1"


class Quiet:
    def say(self, _text: str) -> None:
        pass

    info = say


def timed(fn):
    started = time.monotonic()
    value = fn()
    return time.monotonic() - started, value


def signing(engine: Engine, image: str, work: Path) -> list[str]:
    os.environ["COSIGN_PASSWORD"] = "bench"
    subprocess.run([cosign_binary(), "generate-key-pair"], cwd=work, check=True, capture_output=True)
    engine.tag(image, BENCH, "signed")
    digest = engine.push(BENCH, "signed", Progress("push"))
    files = engine.read_image_files(image, [contract.REPORT_PATH, contract.SBOM_PATH])
    sign_s, _ = timed(lambda: sign_and_attest(f"{BENCH}@{digest}", files[contract.REPORT_PATH],
                                              files[contract.SBOM_PATH], Signer(work / "cosign.key"), Quiet()))
    result = Inspection(f"{BENCH}:signed", image)
    verify_s, _ = timed(lambda: verify_from_registry(engine, result, f"{BENCH}:signed",
                                                     Verifier(key=work / "cosign.pub")))
    assert result.ok, [f for f in result.findings if not f.ok]
    return [f"sign + attest (signature, report and SBOM attestations): {sign_s:.1f} s",
            f"verify from the registry ({len(result.findings)} findings: signature, attestations, equal to the "
            f"files inside): {verify_s:.1f} s"]


def drop(client, image: str) -> None:
    """Remove an image unless it is the parent of a tagged one (a build of the same inputs gives the same id)."""
    try:
        client.images.remove(image)
    except docker.errors.APIError:
        pass


def second_machine(client, engine: Engine, variant_name: str, base: str, work: Path) -> list[str]:
    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant(variant_name)
    rendered = render(make_plan(variant, load_variant_lock(variant)), base, work / "context")
    cache = BuildCache(cache_from=(f"{BENCH}:cache",), cache_to=f"{BENCH}:cache")
    first = buildkit.build(rendered.context, Progress("first machine"), inline_cache=True)
    export(engine, rendered.context, cache, rendered.wheel_stages, first, Progress("cache export"))
    layers = client.images.get(first).attrs["RootFS"]["Layers"]
    drop(client, first)
    client.api.prune_builds(all=True)
    warm_s, again = timed(lambda: buildkit.build(rendered.context, Progress("second machine, --cache-from"),
                                                 cache_from=cache.import_refs(rendered.wheel_stages)))
    same = client.images.get(again).attrs["RootFS"]["Layers"] == layers
    drop(client, again)
    client.api.prune_builds(all=True)
    cold_s, cold = timed(lambda: buildkit.build(rendered.context, Progress("second machine, no cache")))
    drop(client, cold)
    return [f"second machine, --cache-from the registry: {warm_s:.0f} s (layers identical to the first build: {same})",
            f"second machine, cold (no cache): {cold_s:.0f} s",
            f"ratio: {cold_s / warm_s:.1f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="local")
    parser.add_argument("--image", default=None, help="the built image (default: the spec's variant tag)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    client, engine = docker.from_env(timeout=900), Engine()
    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant(args.variant)
    image = args.image or f"{variant.image.repository}:{variant.tag(read_lockfile(variant.lockfile_path).pins)}"
    if engine.image_id(image) is None:
        sys.exit(f"{image}: not built; run `vlmbuild build vlm-r1 --variant {args.variant}` first")
    base = engine.labels(image)["org.opencontainers.image.base.name"]
    with tempfile.TemporaryDirectory(prefix="vlmbuild-bench-") as tmp:
        lines = [f"vlm-r1/{args.variant} on {base}, {os.cpu_count()} cores"]
        lines += signing(engine, image, Path(tmp))
        lines += second_machine(client, engine, args.variant, base, Path(tmp))
    for ref in [t for i in client.images.list(name=BENCH) for t in i.tags]:
        client.images.remove(ref)
    purge_local_repository(BENCH.split("/", 1)[1])
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
