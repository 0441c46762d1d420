"""`vlmbuild sweep`: the gate over a version matrix, its results as data.

Every input is checked before anything is installed (sweep_axes). Cells already in the results file are not
measured again unless ``force``. The results file is rewritten after each cell, so Ctrl-C or SIGTERM loses at
most the cell in flight: both unwind through the smoke's launcher (which stops its ranks and removes their
shared-memory buffers) and remove the cell's environment.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import repo_layout, sweep_results
from .plan import git_revision
from .progress import Progress
from .rules import load_rules
from .spec import Variant
from .sweep_axes import Axis, Cell, Measure, check_axes, check_versions_exist, make_cells, shard_of
from .sweep_cell import Measured, Workdir, measure_cell
from .sweep_verdict import cpu_route, first_failure_rules, is_finding, make_record


@dataclass(frozen=True)
class SweepRequest:
    variant: Variant
    axes: tuple[Axis, ...]
    measure: Measure
    results: Path
    work: Path
    shard: tuple[int, int] | None = None
    force: bool = False
    keep_envs: bool = False
    origin: str = "--axis"  # where the axes came from, for error messages


def default_results_path(root: Path, variant: Variant) -> Path:
    return repo_layout.compat_results(root, variant.image.name, variant.name)


def plan_cells(request: SweepRequest) -> tuple[list[Cell], list[Cell]]:
    """(this run's cells, those of them still to measure); raises on bad input before anything is installed."""
    check_axes(request.axes, request.variant, request.origin)
    check_versions_exist(request.axes, request.variant, request.origin)
    cells = shard_of(make_cells(request.variant, request.axes, request.measure), request.shard)
    data = sweep_results.load(request.results, request.variant.image.name, request.variant.name)
    done = sweep_results.measured_ids(data)
    todo = cells if request.force else [c for c in cells if c.id not in done]
    return cells, todo


def run_sweep(request: SweepRequest, root: Path, progress: Progress) -> dict:
    """Measure the cells still to measure; returns the results (every cell of this run's share among them)."""
    cells, todo = plan_cells(request)
    variant = request.variant
    data = sweep_results.load(request.results, variant.image.name, variant.name)
    sweep_results.add_axes(data, [(a.package, a.versions) for a in request.axes])
    skipped = len(cells) - len(todo)
    progress.info(f"sweep {variant.image.name}/{variant.name}: {len(cells)} cell(s)"
                  + (f" (shard {request.shard[0]}/{request.shard[1]})" if request.shard else "")
                  + (f", {skipped} already measured in {request.results}" if skipped else "")
                  + f", {len(todo)} to measure")
    sweep_results.save(request.results, data)
    work = Workdir(request.work)
    revision = git_revision(root)
    rules = load_rules()
    started = time.monotonic()
    # Ctrl-C and SIGTERM (cli.guarded) unwind through here: the smoke in flight is stopped with its ranks
    # (smoke_command.run_launcher), the finished cells are on disk already.
    try:
        for n, cell in enumerate(todo, 1):
            progress.info(f"[{n}/{len(todo)}] {cell.label()}: measuring (cell {cell.id})")
            measured = measure_cell(cell, work, root, keep_env=request.keep_envs,
                                    reroute=functools.partial(cpu_route, cell, rules=rules))
            record = make_record(cell, measured, revision, rules)
            record["reports"] = keep_reports(cell, work, request.results) if measured.report is not None else []
            sweep_results.put(data, record)
            sweep_results.save(request.results, data)
            elapsed = time.monotonic() - started
            eta = elapsed / n * (len(todo) - n)
            progress.info(f"[{n}/{len(todo)}] {cell.label()}: {describe(record)} "
                          f"({sum(record['seconds'].values()):.0f} s; elapsed {elapsed:.0f} s, ETA {eta:.0f} s)")
    finally:
        if not request.keep_envs:
            shutil.rmtree(work.root / "envs", ignore_errors=True)
    return data


def rejudge(results: Path, variant: Variant) -> tuple[dict, list[str]]:
    """The results judged again from the smoke reports kept beside them, with the rules as they are now: a rule
    added after a sweep explains its failures without measuring anything again. Returns the results and the ids
    of the cells whose verdict changed; what was measured (checks' raw statuses, timings, hashes) stays."""
    data = sweep_results.load(results, variant.image.name, variant.name)
    rules = load_rules()
    changed = []
    for n, record in enumerate(data["cells"]):
        if record["result"] not in ("passed", "failed", "install_failed", "unresolvable") or (
                record["result"] in ("passed", "failed") and not record["reports"]):
            continue
        inputs = record["inputs"]
        cell = Cell(variant, tuple(record["pins"].items()),
                    Measure(record["device"], inputs["repeat"], inputs["checks"]))
        if record["result"] in ("install_failed", "unresolvable"):
            # no smoke ran, no report: judged from what the record says (the build's error line, uv's reason)
            measured = Measured(record["result"], record["reason"], record["lock_sha256"],
                                pins=dict(record["versions"]))
            judged_keys: tuple[str, ...] = ("explained_by",)
        else:
            reports = [json.loads((results.parent / r).read_text()) for r in record["reports"]]
            measured = Measured("measured", "", record["lock_sha256"], reports[0], None,
                                pins=dict(record["versions"]))
            if len(reports) == 2:  # a CPU route: the second report is the cell's result
                measured = Measured("measured", "", record["lock_sha256"], reports[1], record["report_sha256"],
                                    pins=dict(record["versions"]),
                                    zero_settings=(record["cpu_accelerator"] or {}).get("setting"), first_run=measured)
            judged_keys = ("result", "reason", "first_failure", "explained_by", "cpu_accelerator", "checks")
        judged = make_record(cell, measured, record["vlmbuild_revision"], rules)
        verdict = {k: judged[k] for k in judged_keys}
        if any(record[k] != v for k, v in verdict.items()):
            changed.append(record["id"])
            data["cells"][n] = {**record, **verdict}
    return data, changed


def keep_reports(cell: Cell, work: Workdir, results: Path) -> list[str]:
    """The cell's smoke reports (and the second one of a CPU route), kept beside the results file: the evidence a
    user re-checks against the record's report_sha256 (paths relative to the results file)."""
    kept = []
    target = sweep_results.reports_dir(results)
    for name, suffix in (("smoke-report.json", ""), ("smoke-report-with-setting.json", "-with-setting")):
        source = work.cell(cell) / name
        if source.is_file():
            target.mkdir(parents=True, exist_ok=True)
            dest = target / f"{cell.id}{suffix}.json"
            shutil.copyfile(source, dest)
            kept.append(str(dest.relative_to(results.parent)))
    return kept


def describe(record: dict) -> str:
    result = record["result"]
    cpu = record["cpu_accelerator"]
    if result == "passed":
        if cpu and cpu.get("setting"):
            before = cpu.get("without_setting") or {}
            return (f"PASS with {setting_text(cpu['setting'])} ({', '.join(cpu['rules'])}: {cpu['note']}; "
                    f"without it {before.get('check')} failed: {before.get('error')})")
        return "PASS"
    if result != "failed":
        explained = f" [explained by {', '.join(record['explained_by'])}]" if record["explained_by"] else ""
        return f"{result}: {record['reason']}{explained}"
    text = f"FAIL {record['reason']}"
    cpu_rules = set((cpu or {}).get("rules") or ())
    # the rules of the failure the line names; those of the cell's other failing checks after them
    own = [r for r in first_failure_rules(record) if r not in cpu_rules]
    others = sorted(set(record["explained_by"]) - cpu_rules - set(own))
    if own:
        text += f" [explained by {', '.join(own)}]"
    if others:
        text += f" [other checks: {', '.join(others)}]"
    if cpu:
        text += f" [{', '.join(sorted(cpu_rules))}: {cpu['note']}]"
    if is_finding(record):
        text += " [unexplained: a finding]"
    return text


def setting_text(settings: dict) -> str:
    return ", ".join(f"{k}: {json.dumps(v)}" for k, v in sorted(settings.items()))
