"""`vlmbuild sweep`: measure a version matrix (`sweep IMAGE ...`), show it (`sweep report`), join shards
(`sweep merge`). Registers on `main` when imported by cli.py."""

from __future__ import annotations

import os
from pathlib import Path

import click

from . import repo_layout
from .cli import Context, guarded, main, pass_ctx
from .errors import VlmbuildError


class SweepGroup(click.Group):
    """`vlmbuild sweep IMAGE ...` is `vlmbuild sweep run IMAGE ...`: the group's own word for measuring."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@main.group(cls=SweepGroup)
def sweep() -> None:
    """The gate over a version matrix: `sweep IMAGE --axis PKG=V1,V2 ...` measures each combination in an
    environment of its own; `sweep report` renders the results; `sweep merge` joins shards."""


def default_work_dir() -> Path:
    return Path(os.environ.get("VLMBUILD_SWEEP_WORK", Path.home() / ".cache" / "vlmbuild" / "sweep"))


@sweep.command("run")
@click.argument("image")
@click.option("--variant", default=None, help="The variant whose lock inputs each cell moves (default: the spec's).")
@click.option("--axis", "axes", multiple=True, metavar="PACKAGE=V1,V2",
              help="A package of the variant and the versions to try (repeatable; default: the spec's sweep: axes).")
@click.option("--checks", default=None, help="Only these checks in every cell (comma-separated).")
@click.option("--repeat", type=click.IntRange(1, 20), default=None,
              help="The ZeRO-3 load's repeat count in every cell (default: the spec's sweep.repeat, else 1).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The results file (default: compat/<image>-<variant>.json).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where cells' locks, environments and DeepSpeed wheels go (default: $VLMBUILD_SWEEP_WORK or "
                   "~/.cache/vlmbuild/sweep).")
@click.option("--shard", default=None, metavar="I/N", help="Measure only shard I of N (a CI matrix's share).")
@click.option("--force", is_flag=True, help="Measure cells the results already hold again.")
@click.option("--keep-envs", is_flag=True, help="Keep each cell's environment (default: removed after the cell).")
@pass_ctx
@guarded
def sweep_run(ctx: Context, image: str, variant: str | None, axes: tuple[str, ...], checks: str | None,
              repeat: int | None, device: str, results: Path | None, work: Path | None, shard: str | None,
              force: bool, keep_envs: bool) -> None:
    """Measure every combination of the axes (IMAGE: a spec name, e.g. vlm-r1)."""
    from .progress import Progress
    from .sweep import SweepRequest, default_results_path, run_sweep
    from .sweep_axes import Measure, parse_axis, parse_shard

    spec = ctx.spec(image)
    chosen = spec.variant(variant or spec.default_variant)
    if axes:
        parsed, origin = tuple(parse_axis(a) for a in axes), "--axis"
    else:
        parsed, origin = spec.sweep.axes, f"{spec.path}: sweep.axes"
    measure = Measure(device, repeat or spec.sweep.repeat, checks or spec.sweep.checks)
    request = SweepRequest(chosen, parsed, measure, results or default_results_path(ctx.root, chosen),
                           work or default_work_dir(), parse_shard(shard), force, keep_envs, origin)
    progress = Progress(f"sweep {image}/{chosen.name}")
    try:
        run_sweep(request, ctx.root, progress)
    finally:
        progress.close()


@sweep.command("report")
@click.argument("results", nargs=-1, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--markdown", "as_markdown", is_flag=True, help="The grid as Markdown (what the README carries).")
@pass_ctx
@guarded
def sweep_report(ctx: Context, results: tuple[Path, ...], as_markdown: bool) -> None:
    """Show measured results (default: every compat/*.json)."""
    from . import sweep_results
    from .sweep_grid import markdown
    from .sweep_verdict import is_finding

    paths = list(results) or [p for spec in ctx.specs(None) for p in repo_layout.compat_files(ctx.root, spec.name)]
    if not paths:
        raise VlmbuildError(f"{ctx.root / 'compat'}: no results files (run `vlmbuild sweep IMAGE --axis ...` first)")
    for path in paths:
        data = sweep_results.load(path)
        if as_markdown:
            click.echo(markdown(data), nl=False)
            continue
        click.echo(f"{path}: {data['image']}/{data['variant']}, {len(data['cells'])} cell(s)")
        for cell in sorted(data["cells"], key=lambda c: sweep_results.pins_text(c)):
            from .sweep import describe

            mark = "  finding:" if is_finding(cell) else "  "
            click.echo(f"{mark} {sweep_results.pins_text(cell)} [{cell['device']}]: {describe(cell)}")


@sweep.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where the joined results go (written atomically).")
@guarded
def sweep_merge(parts: tuple[Path, ...], output: Path) -> None:
    """Join shards' results files into one (each cell once; a cell measured differently by two shards fails), each
    cell's kept smoke reports copied beside the output."""
    from . import sweep_results

    data = sweep_results.merge_files(list(parts), output)
    click.echo(f"merged {len(parts)} file(s) into {output}: {len(data['cells'])} cell(s)")


@sweep.command("rejudge")
@click.argument("image")
@click.option("--variant", default=None, help="The variant the results are of (default: the spec's).")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The results file (default: compat/<image>-<variant>.json).")
@pass_ctx
@guarded
def sweep_rejudge(ctx: Context, image: str, variant: str | None, results: Path | None) -> None:
    """Judge measured cells again, from their kept smoke reports, with the rules as they are now (nothing is
    measured again)."""
    from . import sweep_results
    from .sweep import default_results_path, rejudge

    spec = ctx.spec(image)
    chosen = spec.variant(variant or spec.default_variant)
    path = results or default_results_path(ctx.root, chosen)
    data, changed = rejudge(path, chosen)
    sweep_results.save(path, data)
    click.echo(f"{path}: {len(data['cells'])} cell(s), {len(changed)} judged differently now"
               + (f": {', '.join(changed)}" if changed else ""))
