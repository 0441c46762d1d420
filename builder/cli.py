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
from .contract import DEFAULT_SMOKE_MEMORY_GB, DEFAULT_SMOKE_PIDS, DEFAULT_SMOKE_TIMEOUT, HEADLINE_PACKAGES
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
        unknown = set(when) - KNOWN_CONDITIONS
        if unknown:
            raise VlmbuildError(f"--when {sorted(unknown)[0]}: unknown condition; known: {sorted(KNOWN_CONDITIONS)}")
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
    from .sweep_warnings import warning_lines

    verdicts = [check_variant(v, rules) for v in ctx.variants(image)]
    for verdict in verdicts:
        click.echo(format_verdict(verdict))
        for line in warning_lines(ctx.root, verdict.variant, verdict.versions):
            click.echo(line)
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
    from .checks import pinned_versions
    from .sweep_warnings import warning_lines

    for v in selected:
        started = time.monotonic()
        path = lock_mod.lock_variant(v, upgrade, upgrade_packages)
        click.echo(f"locked   {path.relative_to(ctx.root)} in {time.monotonic() - started:.1f}s")
        for line in warning_lines(ctx.root, v, pinned_versions(v)[0]):
            click.echo(line)
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
@click.option("--memory-gb", type=click.FloatRange(1, 4096), default=DEFAULT_SMOKE_MEMORY_GB, show_default=True,
              help="With IMAGE_REF: the smoke container's memory limit (as a spec's smoke.memory_gb).")
@click.option("--pids", type=click.IntRange(256), default=DEFAULT_SMOKE_PIDS, show_default=True,
              help="With IMAGE_REF: the smoke container's task limit (as a spec's smoke.pids).")
@click.option("--nodes", type=click.IntRange(1, 8), default=1, show_default=True,
              help="With IMAGE_REF: run the smoke over this many nodes, one container each on a private network, "
                   "each starting the image's torchrun against node 0's c10d rendezvous.")
@pass_ctx
@guarded
def smoke(ctx: Context, image_ref: str | None, local: bool, python: str | None, device: str, report: Path | None,
          model_dir: Path | None, lockfile: Path | None, repeat: int, checks: str | None, timeout: int | None,
          memory_gb: float, pids: int, nodes: int) -> None:
    """Run the ZeRO-3 smoke in this environment (--local) or inside a built image (IMAGE_REF)."""
    from .engine_api import SmokeLimits
    from .smoke_command import run_local, smoke_image

    if local == bool(image_ref):
        raise VlmbuildError("give exactly one of --local or IMAGE_REF")
    timeout = timeout or DEFAULT_SMOKE_TIMEOUT
    if local and nodes > 1:
        raise VlmbuildError("--nodes runs one container of an image per node: give IMAGE_REF, not --local")
    if local:
        code = run_local(python or sys.executable, device, report, model_dir, lockfile, timeout, ctx.root, repeat,
                         checks)
    else:
        assert image_ref is not None  # exactly one of the two, checked above
        code = smoke_image(image_ref, device, report, timeout, repeat, model_dir, checks, SmokeLimits(memory_gb, pids),
                           nodes)
    sys.exit(code)


# The engine-side commands (build, push, plan, doctor, inspect, summary) live in cli_engine.py and register on
# `main` when it is imported.
from . import cli_engine, cli_sweep  # noqa: E402,F401

