"""Rules meet measurements: where a variant's locked versions sit on a cell a sweep measured failing, `vlmbuild
check` and `vlmbuild lock` say so (a warning, exit 0: a measurement on one host and device is evidence to read, not
a rule)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import repo_layout, sweep_results
from .spec import Variant


def measured_failures(root: Path, variant: Variant, versions: Mapping[str, str]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(results file, cell) for each cell measured failing whose every pin the variant's versions hold."""
    for path in repo_layout.compat_files(root, variant.image.name):
        data = sweep_results.load(path)
        for cell in data["cells"]:
            if cell["result"] == "failed" and all(versions.get(k) == v for k, v in cell["pins"].items()):
                yield path, cell


def warning_lines(root: Path, variant: Variant, versions: Mapping[str, str]) -> list[str]:
    lines = []
    for path, cell in measured_failures(root, variant, versions):
        first = cell.get("first_failure") or {}
        why = (f"explained by {', '.join(cell['explained_by'])}" if cell["explained_by"]
               else "; ".join(cell["cpu_accelerator"]["rules"]) + f" ({cell['cpu_accelerator']['note']})"
               if cell["cpu_accelerator"] else "unexplained")
        where = path.relative_to(root) if path.is_relative_to(root) else path
        lines.append(f"  warning: {variant.image.name}/{variant.name} sits on a cell measured failing "
                     f"({sweep_results.pins_text(cell)}, {cell['device']}, {where}): check {first.get('check')} "
                     f"failed: {first.get('error')} [{why}]")
    return lines
