"""The commands that talk to the Docker engine: build, push, plan, doctor, inspect (and summary, of a build report).

They register on vlmbuild.cli's `main` group; the spec-side commands (matrix, check, lock, render, smoke) are there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli import Context, PushFlags, guarded, leave_out_option, main, pass_ctx, push_policy_options
from .errors import CheckFailed, VlmbuildError

# ---------------------------------------------------------------- build / push / plan / inspect


@main.command()
@click.argument("image")
@click.option("--variant", "variants", multiple=True, help="Build this variant (repeatable). Default: every variant "
              "not marked 'expect: rejected'.")
@click.option("--smoke-device", type=click.Choice(["auto", "gpu", "cpu"]), default=None,
              help="Where the smoke runs (default: the spec's smoke.device; auto: GPU if the engine can give one).")
@click.option("--base-image", default=None, help="Build on this base instead of the spec's.")
@click.option("--repository", default=None, help="Tag (and push) into this repository instead of the spec's.")
@click.option("--push", is_flag=True, help="Push the tags that passed.")
@push_policy_options
@click.option("--keep-failed", is_flag=True, help="Keep a candidate that failed the smoke (untagged) for inspection.")
@click.option("--smoke-timeout", type=int, default=None, help="Kill the smoke after SECONDS (default: the spec's).")
@click.option("--repeat", type=click.IntRange(1, 20), default=None,
              help="ZeRO-3 loads in fresh processes (default: the spec's smoke.repeat).")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Smoke with a real local Qwen2.5-VL checkpoint too (mounted read-only).")
@click.option("--smoke-nodes", type=click.IntRange(1, 8), default=None,
              help="A further smoke pass over this many nodes (containers, torchrun's c10d rendezvous) (default: the "
                   "spec's smoke.nodes, 1: none).")
@click.option("--rebuild", is_flag=True, help="Build and smoke again even if the immutable tag already names a "
              "validated image of the same inputs (that tag stays where it is).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a JSON build report (tags, digests, smoke reports) here.")
@click.option("--ignore-rules", is_flag=True, help="Build a variant the rules reject (the smoke still judges it).")
@click.option("--no-cache", "nocache", is_flag=True, help="Build without BuildKit's layer cache.")
@click.option("--no-disk-check", is_flag=True, help="Start the build even when the engine's free disk is below what "
              "a cold build of the variant takes (its build_disk_gb): for a rebuild whose layers are cached.")
@click.option("--cache-from", multiple=True, envvar="VLMBUILD_CACHE_FROM", metavar="REF",
              help="Reuse layers, and the compiled wheels, from the build cache at REF (pushed by --cache-to on any "
                   "machine; repeatable; env VLMBUILD_CACHE_FROM, space-separated).")
@click.option("--cache-to", default=None, envvar="VLMBUILD_CACHE_TO", metavar="REF",
              help="Push this build's cache to REF (and each wheel stage's beside it) after it is built.")
@leave_out_option
@pass_ctx
@guarded
def build(ctx: Context, image: str, variants: tuple[str, ...], smoke_device: str | None, base_image: str | None,
          repository: str | None, push: bool, push_flags: PushFlags, keep_failed: bool, smoke_timeout: int | None,
          repeat: int | None, model_dir: Path | None, smoke_nodes: int | None, rebuild: bool, report: Path | None, ignore_rules: bool,
          nocache: bool, no_disk_check: bool, cache_from: tuple[str, ...], cache_to: str | None,
          leave_out: tuple[str, ...]) -> None:
    """Build, smoke and tag variants of IMAGE; an image that fails the smoke is never tagged."""
    from .build_cache import BuildCache
    from .gate import GateFailed
    from .options import build_options
    from .pipeline import build_variant, write_build_report
    from .release import PushFailed

    policy = push_flags.policy(pushing=push)
    selected = ctx.variants(image, variants, include_rejected=False, leave_out=[n for n in leave_out if n])
    if not selected:
        raise VlmbuildError(f"{image}: no variant to build (all are marked 'expect: rejected'; name one with --variant)")
    options = build_options(selected[0].image, smoke_device=smoke_device, smoke_timeout=smoke_timeout, repeat=repeat,
                            model_dir=model_dir, smoke_nodes=smoke_nodes, base_image=base_image, push=push, keep_failed=keep_failed,
                            ignore_rules=ignore_rules, repository=repository, push_policy=policy,
                            cache=BuildCache(tuple(r for r in cache_from if r), cache_to or None), nocache=nocache, rebuild=rebuild,
                            disk_check=not no_disk_check)
    outcomes, failures, push_errors = [], [], []
    for variant in selected:
        try:
            outcomes.append(build_variant(variant, options))
        except GateFailed as exc:
            outcomes.append(exc.outcome)
            failures.append(str(exc))
        except PushFailed as exc:
            outcomes.append(exc.outcome)
            push_errors.append(exc)
        finally:
            if report:
                write_build_report(report, outcomes)
    for o in outcomes:
        state = "PASS" if o.passed else "FAIL"
        how = ("already built and validated, reused" if o.reused else
               f"build {o.build_seconds:.0f}s, smoke {o.smoke_seconds:.0f}s ({'; '.join(o.passes) or '-'})")
        click.echo(f"{state} {o.image}/{o.variant}: {how}"
                   + (f", tags {', '.join(o.tags)}" if o.tags else ", not tagged")
                   + (f"; push failed: {o.push_error}" if o.push_error else ""))
    if failures:
        raise CheckFailed("; ".join(failures))
    if push_errors:
        raise push_errors[0]


@main.command()
@click.argument("image")
@click.option("--variant", "variants", multiple=True, help="Push this variant (repeatable). Default: all buildable.")
@click.option("--repository", default=None, help="The repository the image was tagged in (default: the spec's).")
@click.option("--base-image", default=None, help="The base it was built on, if not the spec's.")
@push_policy_options
@leave_out_option
@pass_ctx
@guarded
def push(ctx: Context, image: str, variants: tuple[str, ...], repository: str | None, base_image: str | None,
         push_flags: PushFlags, leave_out: tuple[str, ...]) -> None:
    """Push the tags of IMAGE's variants that passed the smoke, signing the digest and attesting its report and SBOM
    before any moving tag is pushed; print each pushed digest."""
    from .engine import Engine
    from .release import push_tags
    from .resolve import resolve_for_tags

    policy = push_flags.policy()
    engine = Engine()
    for variant in ctx.variants(image, variants, include_rejected=False, leave_out=[n for n in leave_out if n]):
        resolved = resolve_for_tags(variant, engine, base_image, repository)
        push_tags(engine, resolved, resolved.tags, policy)


@main.command()
@click.argument("image")
@click.option("--variant", "variants", multiple=True, help="This variant (repeatable). Default: all buildable.")
@click.option("--repository", default=None, help="Tag into this repository instead of the spec's.")
@click.option("--base-image", default=None, help="Build on this base instead of the spec's.")
@leave_out_option
@pass_ctx
@guarded
def plan(ctx: Context, image: str, variants: tuple[str, ...], repository: str | None, base_image: str | None,
         leave_out: tuple[str, ...]) -> None:
    """What a build would make, resolved against this engine: base, identity, tags, and whether it exists."""
    from .engine import Engine
    from .release import validated_image
    from .resolve import resolve_for_tags

    engine = Engine()
    disk = engine.disk()
    for variant in ctx.variants(image, variants, include_rejected=False, leave_out=[n for n in leave_out if n]):
        r = resolve_for_tags(variant, engine, base_image, repository)
        existing = validated_image(engine, r)
        click.echo(json.dumps({
            "image": image, "variant": variant.name, "repository": r.repository, "tags": r.tags,
            "immutable_tag": r.immutable_tag, "identity": r.identity, "base": r.base.ref,
            "base_image_id": r.base.image_id, "base_digest": r.base.digest, "lock_sha256": r.lock.sha256,
            "left_out": sorted(variant.left_out),
            "built": existing,
            "disk": room(disk, variant),
        }, indent=2))


def room(disk, variant) -> dict:
    """The engine's disk against what a build of ``variant`` takes: cold, and with BuildKit's cache as it is (the
    gate's rule, engine_disk.required_free)."""
    from .engine_disk import required_free

    need = int(variant.build_disk_gb * 1e9)
    required = required_free(disk, need)
    return {**disk.as_dict(), "needed_for_a_cold_build": need, "required_free": required,
            "enough": disk.free >= required, "enough_for_a_cold_build": disk.free >= need}


@main.command()
@click.argument("image", required=False)
@click.option("--variant", "variants", multiple=True, help="This variant (repeatable). Default: all buildable.")
@click.option("--json", "as_json", is_flag=True, help="The findings as JSON.")
@click.option("--reclaim-orphans", is_flag=True, help="With dockerd stopped: remove the storage directories nothing "
              "references (vlmbuild.engine_orphans), then exit. Refused while any dockerd runs.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --reclaim-orphans: the stopped engine's data root (default: /etc/docker/daemon.json's "
                   "data-root, else /var/lib/docker).")
@pass_ctx
@guarded
def doctor(ctx: Context, image: str | None, variants: tuple[str, ...], as_json: bool, reclaim_orphans: bool,
           data_root: Path | None) -> None:
    """The build host's health: the engine's storage on disk against what the engine accounts for (the bytes no
    image, container or build-cache record owns, which no prune reaches) and the directories that hold them, our
    leftover containers, and whether the free disk holds the next build of each variant (the gate's rule). Exit 1
    when a variant would not fit."""
    from .engine import OWNER_LABEL, Engine, leftover
    from .engine_disk import describe, gb
    from .engine_orphans import find_orphans, reclaim

    if reclaim_orphans:
        from .engine_setup import data_root as configured_data_root

        data_root = data_root or configured_data_root()
        removed = reclaim(data_root)
        click.echo(f"removed {len(removed)} storage directories nothing referenced under {data_root}: "
                   f"{gb(sum(o.size or 0 for o in removed))}")
        return
    engine = Engine()
    disk = engine.disk()
    try:
        orphans = find_orphans(Path(disk.storage).parent, Path(disk.storage).name)
    except VlmbuildError:
        orphans = None  # a remote engine, or not root: unknown, as the unaccounted bytes are
    ours = engine.client.containers.list(all=True, filters={"label": OWNER_LABEL})
    leftovers = sorted(c.short_id for c in ours if leftover(c))
    fits = [{"image": v.image.name, "variant": v.name, **room(disk, v)} for v in ctx.variants(image, variants,
                                                                                            include_rejected=False)]
    if as_json:
        click.echo(json.dumps({
            "disk": disk.as_dict(), "leftover_containers": leftovers,
            "orphaned_storage": None if orphans is None else [{"name": o.name, "size": o.size} for o in orphans],
            "variants": [{k: f[k] for k in ("image", "variant", "needed_for_a_cold_build", "required_free", "enough",
                                            "enough_for_a_cold_build")} for f in fits]}, indent=2))
    else:
        click.echo(describe(disk))
        if orphans:
            click.echo(f"storage directories nothing references: {len(orphans)}, "
                       f"{gb(sum(o.size or 0 for o in orphans))} (left by dockerd's BuildKit when a build re-makes "
                       "a layer an image already holds, moby/moby#45939; no prune reaches them: stop dockerd, then "
                       "`vlmbuild doctor --reclaim-orphans`)")
        click.echo(f"containers of ours whose process is gone: {', '.join(leftovers) or 'none'} "
                   "(the next build removes them)")
        for f in fits:
            click.echo(f"{f['image']}/{f['variant']}: a cold build takes {gb(f['needed_for_a_cold_build'])}, the next "
                       f"build needs {gb(f['required_free'])} free with BuildKit's cache as it is: "
                       + ("fits" if f["enough"] else "DOES NOT FIT"))
    if not all(f["enough"] for f in fits):
        sys.exit(1)


@main.command()
@click.argument("image_ref")
@click.option("--json", "as_json", is_flag=True, help="The findings as JSON.")
@click.option("--verify", is_flag=True, help="Also verify from the registry: the digest's signature, and the attested "
              "report and SBOM equal to the ones inside.")
@click.option("--key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="With --verify: the cosign public key the signature must verify with.")
@click.option("--certificate-identity", default=None, help="With --verify, keyless: the signer's identity (the "
              "release workflow's URL at its ref).")
@click.option("--certificate-oidc-issuer", default=None,
              help="With --verify, keyless: the identity's issuer (https://token.actions.githubusercontent.com).")
@guarded
def inspect(image_ref: str, as_json: bool, verify: bool, key: Path | None, certificate_identity: str | None,
            certificate_oidc_issuer: str | None) -> None:
    """Re-verify an image's evidence from the image itself (report, lockfile, SBOM, installed packages) and show
    what each layer holds; with --verify, that a trusted signer signed its digest and attested that evidence.
    Exit 1 when anything disagrees."""
    from .engine import Engine
    from .inspect_image import format_inspection, inspect_image
    from .signing import Verifier
    from .verify_registry import verify_from_registry

    verifier = Verifier(key, certificate_identity, certificate_oidc_issuer) if verify else None
    engine = Engine()
    result = inspect_image(image_ref, engine)
    if verifier is not None:
        verify_from_registry(engine, result, image_ref, verifier)
    click.echo(json.dumps(result.as_json(), indent=2) if as_json else format_inspection(result))
    if not result.ok:
        sys.exit(1)


@main.command()
@click.argument("report", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@guarded
def summary(report: Path) -> None:
    """A Markdown table of a build report (variant, tags, digest, checks, seconds), e.g. for a CI job summary."""
    from .matrix import build_summary

    try:
        data = json.loads(report.read_text())
    except json.JSONDecodeError as exc:
        raise VlmbuildError(f"{report}: not a JSON build report: {exc}") from None
    click.echo(build_summary(data, str(report)))


if __name__ == "__main__":
    main()
