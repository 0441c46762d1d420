"""The `vlmbuild` command line. Turns errors into exit codes: 0 ok, 1 the thing checked is bad, 2 bad input.

Each command is a thin shell over one module: spec → lock → render → build → smoke → tag/push.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__, repo_layout
from .contract import DEFAULT_SMOKE_TIMEOUT, HEADLINE_PACKAGES
from .errors import CheckFailed, VlmbuildError
from .spec import ImageSpec, Variant, all_spec_paths, find_spec_path, load_spec

if TYPE_CHECKING:
    from .options import PushPolicy

PACKAGE_DIR = Path(__file__).resolve().parent


def default_root() -> Path:
    env = os.environ.get("VLMBUILD_ROOT")
    if env:
        return Path(env)
    source_root = PACKAGE_DIR.parent  # an editable install: the repository
    if repo_layout.images_dir(source_root).is_dir():
        return source_root
    return Path.cwd()


def fail(exc: VlmbuildError) -> None:
    click.echo(f"vlmbuild: error: {exc}", err=True)
    sys.exit(exc.exit_code)


class Terminated(BaseException):
    """SIGTERM (how CI runners cancel a job): raised in the main thread so that it unwinds exactly like Ctrl-C,
    through every cleanup on the way (the smoke container, the candidate image, the tags, the BuildKit CLI)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def guarded(fn: Callable) -> Callable:
    """Bad input → one paragraph on stderr and exit 2, never a traceback. Ctrl-C → 130, SIGTERM → 143, both
    after the same cleanup."""
    import functools
    import signal

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except VlmbuildError as exc:
            fail(exc)
        except KeyboardInterrupt:
            click.echo("vlmbuild: interrupted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("vlmbuild: terminated (SIGTERM)", err=True)
            sys.exit(143)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


class Context:
    def __init__(self, root: Path) -> None:
        self.root = root

    def spec(self, image: str) -> ImageSpec:
        return load_spec(find_spec_path(image, self.root))

    def specs(self, image: str | None) -> list[ImageSpec]:
        if image:
            return [self.spec(image)]
        paths = all_spec_paths(self.root)
        if not paths:
            raise VlmbuildError(f"{repo_layout.images_dir(self.root)}: no image specs (*.yaml) found")
        return [load_spec(p) for p in paths]

    def variants(self, image: str | None, names: Iterable[str] = (), include_rejected: bool = True,
                 leave_out: Iterable[str] = ()) -> list[Variant]:
        """The variants named (default: all, or all buildable), each without the source builds ``leave_out``."""
        from .options import leaving_out

        out = []
        names = list(names)
        for spec in self.specs(image):
            if names:
                out += [spec.variant(n) for n in names]
            else:
                out += [v for v in spec.variants.values() if include_rejected or not v.expected_rejected]
        return leaving_out(out, leave_out)


def leave_out_option(fn: Callable) -> Callable:
    """--leave-out NAME, on every command that renders or finds a build: the same flag gives the same identity."""
    return click.option(
        "--leave-out", "leave_out", multiple=True, envvar="VLMBUILD_LEAVE_OUT", metavar="NAME",
        help="Build without this package the spec builds from its sdist (source_builds: flash-attn's CUDA kernels "
             "take hours on 2 cores); the labels, the report and inspect name it (repeatable; env "
             "VLMBUILD_LEAVE_OUT, space-separated).")(fn)


@dataclass(frozen=True)
class PushFlags:
    """What `build --push` and `push` are told about what a push may accept and who signs it."""

    allow_cpu_evidence: bool
    allow_left_out: bool
    sign_key: Path | None
    sign_keyless: bool
    unsigned: bool

    def policy(self, pushing: bool = True) -> PushPolicy:
        """The push policy; its signer is chosen (exactly one of the three flags) only when something is pushed."""
        from .options import PushPolicy
        from .signing import signer_from_flags

        signer = signer_from_flags(self.sign_key, self.sign_keyless, self.unsigned) if pushing else None
        return PushPolicy(self.allow_cpu_evidence, self.allow_left_out, signer)


def push_policy_options(fn: Callable) -> Callable:
    """The push flags of `build` and `push`, handed to the command as one PushFlags (``push_flags``)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, allow_cpu_evidence: bool, allow_left_out: bool, sign_key: Path | None, sign_keyless: bool,
                unsigned: bool, **kwargs):
        flags = PushFlags(allow_cpu_evidence, allow_left_out, sign_key, sign_keyless, unsigned)
        return fn(*args, push_flags=flags, **kwargs)

    options = [
        click.option("--allow-cpu-evidence", is_flag=True,
                     help="Allow pushing an image whose smoke ran on CPU only (build: with --push)."),
        click.option("--allow-left-out", is_flag=True, help="Allow pushing an image that goes without something its "
                     "spec names (see inspect; build: with --push)."),
        click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Sign the pushed digest and attest its report and SBOM with this cosign key (password in "
                          "COSIGN_PASSWORD; no transparency-log upload)."),
        click.option("--sign-keyless", is_flag=True,
                     help="Sign keyless (CI: the job's OIDC identity, Fulcio and Rekor)."),
        click.option("--unsigned", is_flag=True, help="Push without a signature: evidence nothing binds to the digest."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vlmbuild")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Repository root holding images/ and lockfiles/ (default: $VLMBUILD_ROOT or the source tree).")
@click.pass_context
def main(ctx: click.Context, root: Path | None) -> None:
    """Build container images for Qwen2.5-VL training, validated by a ZeRO-3 smoke before they are tagged."""
    ctx.obj = Context(root or default_root())


# ---------------------------------------------------------------- matrix


@main.command()
@click.argument("image", required=False)
@click.option("--all", "include_all", is_flag=True, help="Include variants marked 'expect: rejected'.")
@click.option("--release", is_flag=True, help="Only variants a release builds: no rejected ones, no local base.")
@click.option("--markdown", is_flag=True, help="A Markdown version table (the README's) instead of JSON.")
@pass_ctx
@guarded
def matrix(ctx: Context, image: str | None, include_all: bool, release: bool, markdown: bool) -> None:
    """Print every image variant as a JSON list (for a CI matrix via fromJSON)."""
    from .matrix import markdown_table, matrix_rows

    rows = matrix_rows(ctx.variants(image), include_rejected=include_all and not release, release=release)
    click.echo(markdown_table(rows) if markdown else json.dumps(rows, separators=(",", ":")))


# ---------------------------------------------------------------- check


@main.command()
@click.argument("image", required=False)
@click.option("--env", "env_mode", is_flag=True, help="Check the current Python environment instead of the specs.")
@click.option("--when", multiple=True, help="With --env: a training condition (repeatable). Default: the VLM-R1 recipe.")
@click.option("--rules", "rules_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="A rules file to use instead of the shipped one.")
@pass_ctx
@guarded
def check(ctx: Context, image: str | None, env_mode: bool, when: tuple[str, ...], rules_path: Path | None) -> None:
    """Check every spec and lockfile (or, with --env, this environment) against the compatibility rules."""
    from .checks import check_environment, check_variant, format_verdict
    from .rules import KNOWN_CONDITIONS, RulesFileError, load_rules

    try:
        rules = load_rules(rules_path)
    except RulesFileError as exc:
        raise VlmbuildError(str(exc)) from None
    if env_mode:
        bad = set(when) - KNOWN_CONDITIONS
        if bad:
            raise VlmbuildError(f"--when {sorted(bad)[0]}: unknown condition; known: {sorted(KNOWN_CONDITIONS)}")
        versions, conds, violations = check_environment(rules, when or None)
        keys = ", ".join(f"{k} {versions[k]}" for k in HEADLINE_PACKAGES if k in versions)
        click.echo(f"environment {sys.executable}: {keys or 'no training packages'} [when {', '.join(conds)}]")
        for v in violations:
            click.echo(v.explain(indent="    "))
        errors = [v for v in violations if v.rule.severity == "error"]
        click.echo(f"{len(errors)} error(s), {len(violations) - len(errors)} warning(s) from {len(rules.rules)} rules")
        if errors:
            sys.exit(1)
        return
    verdicts = [check_variant(v, rules) for v in ctx.variants(image)]
    for verdict in verdicts:
        click.echo(format_verdict(verdict))
    bad = [v for v in verdicts if not v.ok]
    click.echo(f"{len(verdicts)} variant(s) checked against {len(rules.rules)} rules: {len(bad)} failing")
    if bad:
        sys.exit(1)


# ---------------------------------------------------------------- lock


@main.command()
@click.argument("image", required=False)
@click.option("--variant", "variants", multiple=True, help="Only this variant (repeatable).")
@click.option("--check", "check_only", is_flag=True, help="Resolve nothing; exit 1 naming each stale or missing lockfile.")
@click.option("--upgrade", is_flag=True, help="Move every pin to the newest version the spec allows (default: keep "
                                              "every current pin the spec still allows).")
@click.option("--upgrade-package", "upgrade_packages", multiple=True, metavar="NAME",
              help="Move this package to the newest version the spec allows, keep the rest (repeatable).")
@pass_ctx
@guarded
def lock(ctx: Context, image: str | None, variants: tuple[str, ...], check_only: bool, upgrade: bool,
         upgrade_packages: tuple[str, ...]) -> None:
    """Resolve variants into hash-locked lockfiles/<image>/<variant>.txt with uv, keeping the current pins."""
    from . import lock as lock_mod

    if variants and not image:
        raise VlmbuildError("--variant needs IMAGE")
    selected = ctx.variants(image, variants)
    if check_only:
        statuses = [lock_mod.build_tools_status(ctx.root)] + [lock_mod.variant_status(v) for v in selected]
        bad = [s for s in statuses if s.state != "fresh"]
        for s in statuses:
            click.echo(f"{s.state:<8} {s.path.relative_to(ctx.root) if s.path.is_relative_to(ctx.root) else s.path}"
                       + (f": {s.detail}" if s.detail else ""))
        if bad:
            raise CheckFailed(f"{len(bad)} lockfile(s) stale or missing: "
                              + ", ".join(str(s.path.name) for s in bad) + "; run `vlmbuild lock`")
        return
    total = time.monotonic()
    started = time.monotonic()
    path = lock_mod.lock_build_tools(ctx.root, upgrade, upgrade_packages)
    click.echo(f"locked   {path.relative_to(ctx.root)} in {time.monotonic() - started:.1f}s")
    for v in selected:
        started = time.monotonic()
        path = lock_mod.lock_variant(v, upgrade, upgrade_packages)
        click.echo(f"locked   {path.relative_to(ctx.root)} in {time.monotonic() - started:.1f}s")
    click.echo(f"{len(selected)} variant(s) locked in {time.monotonic() - total:.1f}s")


# ---------------------------------------------------------------- render


@main.command()
@click.argument("image")
@click.option("--variant", required=True, help="The variant to render.")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="New directory for the context.")
@click.option("--base-image", default=None, help="Use this base instead of the spec's (e.g. a locally made one).")
@leave_out_option
@pass_ctx
@guarded
def render(ctx: Context, image: str, variant: str, output: Path, base_image: str | None,
           leave_out: tuple[str, ...]) -> None:
    """Write the Dockerfile and the complete build context of a variant into DIR.

    The context holds no secret: `vlmbuild build` hands the build its CA bundle and network settings as BuildKit
    secrets `build-ca` and `build-env`; to build it by hand pass both with `--secret id=...,src=FILE`."""
    from .lock import load_variant_lock
    from .plan import make_plan
    from .render import render as render_plan

    chosen = ctx.variants(image, [variant], leave_out=leave_out)[0]
    plan = make_plan(chosen, load_variant_lock(chosen))
    result = render_plan(plan, base_image, output)
    click.echo(f"rendered {image}/{variant} as tag {plan.tag} into {result.context} "
               f"({', '.join(f'{l.name} {l.count}' for l in plan.layers)}, then {len(plan.packages)} "
               "package layers)")


# ---------------------------------------------------------------- smoke


@main.command()
@click.argument("image_ref", required=False)
@click.option("--local", "local", is_flag=True, help="Smoke this environment instead of an image.")
@click.option("--python", "python", default=None, help="With --local: the interpreter of the environment (default: this one).")
@click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True)
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also check a real local Qwen2.5-VL checkpoint (mounted read-only into the image).")
@click.option("--lockfile", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="With --local: compare installed versions with this lockfile.")
@click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Run the ZeRO-3 load this many times in fresh processes; fail if any run differs.")
@click.option("--checks", default=None, help="Only these checks (comma-separated, with what they depend on).")
@click.option("--timeout", type=int, default=None,
              help=f"Seconds before the smoke is killed (default: {DEFAULT_SMOKE_TIMEOUT}, as a spec's smoke.timeout).")
@pass_ctx
@guarded
def smoke(ctx: Context, image_ref: str | None, local: bool, python: str | None, device: str, report: Path | None,
          model_dir: Path | None, lockfile: Path | None, repeat: int, checks: str | None, timeout: int | None) -> None:
    """Run the ZeRO-3 smoke in this environment (--local) or inside a built image (IMAGE_REF)."""
    from .smoke_command import run_local, smoke_image

    if local == bool(image_ref):
        raise VlmbuildError("give exactly one of --local or IMAGE_REF")
    timeout = timeout or DEFAULT_SMOKE_TIMEOUT
    if local:
        code = run_local(python or sys.executable, device, report, model_dir, lockfile, timeout, ctx.root, repeat,
                         checks)
    else:
        code = smoke_image(image_ref, device, report, timeout, repeat, model_dir, checks)
    sys.exit(code)


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
          repeat: int | None, model_dir: Path | None, rebuild: bool, report: Path | None, ignore_rules: bool,
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
                            model_dir=model_dir, base_image=base_image, push=push, keep_failed=keep_failed,
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
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=Path("/var/lib/docker"),
              show_default=True, help="With --reclaim-orphans: the stopped engine's data root.")
@pass_ctx
@guarded
def doctor(ctx: Context, image: str | None, variants: tuple[str, ...], as_json: bool, reclaim_orphans: bool,
           data_root: Path) -> None:
    """The build host's health: the engine's storage on disk against what the engine accounts for (the bytes no
    image, container or build-cache record owns, which no prune reaches) and the directories that hold them, our
    leftover containers, and whether the free disk holds the next build of each variant (the gate's rule). Exit 1
    when a variant would not fit."""
    from .engine import OWNER_LABEL, Engine, leftover
    from .engine_disk import describe, gb
    from .engine_orphans import find_orphans, reclaim

    if reclaim_orphans:
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
