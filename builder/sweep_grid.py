"""The results as a Markdown grid: the first axis as rows, the second as columns, every further axis as sections.

A cell shows PASS, or the first failing check and why in a word (the rule that explains it, ``unexplained``, or the
CPU accelerator's defect), or that the combination cannot be installed. A section shows the rows and columns it has
cells in; a combination not measured there shows ``·``. A cell the grid cannot place (one that installed nothing, so
its version of an unpinned axis package is unknown) is listed under it: every cell is shown once.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from packaging.version import Version

from .sweep_verdict import NOT_MEASURED, first_failure_rules


def cell_text(cell: Mapping[str, Any]) -> str:
    result = cell["result"]
    cpu = cell.get("cpu_accelerator") or {}
    if result == "passed":
        return f"PASS (CPU: with {', '.join(sorted(cpu['setting']))})" if cpu.get("setting") else "PASS"
    if result in ("unresolvable", "install_failed"):
        why = f" ({', '.join(cell['explained_by'])})" if cell.get("explained_by") else ""
        return ("unresolvable" if result == "unresolvable" else "install failed") + why
    first = (cell.get("first_failure") or {}).get("check") or "smoke"
    named = first_failure_rules(cell)
    cpu_rules = set(cpu.get("rules") or ())
    own = [r for r in named if r not in cpu_rules]
    if own:
        why = ", ".join(own)
    elif set(named) & cpu_rules:
        unmeasured = sum(1 for c in cell["checks"] if c["status"] == NOT_MEASURED)
        why = f"CPU accelerator, {unmeasured} not measured"
    else:
        why = "unexplained"
    if cpu.get("setting"):
        why += f"; CPU: with {', '.join(sorted(cpu['setting']))}"
    return f"FAIL {first} ({why})"


def position(cell: Mapping[str, Any], package: str) -> str | None:
    return cell["pins"].get(package) or cell.get("versions", {}).get(package)


def markdown(data: Mapping[str, Any]) -> str:
    cells = data["cells"]
    # every version an axis names, and every version a cell of another sweep had there (its lock's)
    axes = [(a["package"], sorted({*a["versions"], *(v for c in cells if (v := position(c, a["package"])))},
                                  key=Version)) for a in data["axes"]]
    if not axes or not cells:
        return f"_No cells measured for {data['image']}/{data['variant']}._\n"
    # A cell is placed by its version of each axis package: its pin, else what its lock installed (a cell of a
    # sweep over other axes holds the variant's lock version there)
    names = [name for name, _ in axes]
    by_pins = {tuple(sorted((n, position(c, n)) for n in names)): c for c in cells}
    rows = axes[0]
    cols = axes[1] if len(axes) > 1 else ("", [""])
    sections = axes[2:]
    devices = sorted({c["device"] for c in cells})
    lines = [f"Measured by `vlmbuild sweep` on {', '.join(devices)}: {len(cells)} cell(s) of "
             f"{data['image']}/{data['variant']}; the rest of each cell's stack is the variant's lock. "
             "A cell names its first failing check and the rule that explains it."]
    placed: set[str] = set()
    for combo in itertools.product(*[[(name, v) for v in versions] for name, versions in sections]):
        present = [c for c in cells if all(position(c, k) == v for k, v in combo)
                   and position(c, rows[0]) and (not cols[0] or position(c, cols[0]))]
        if not present:
            continue
        placed.update(c["id"] for c in present)
        shown_rows = [r for r in rows[1] if any(position(c, rows[0]) == r for c in present)]
        shown_cols = [v for v in cols[1] if not cols[0] or any(position(c, cols[0]) == v for c in present)]
        lines.append("")
        if combo:
            lines.append("**" + ", ".join(f"{k} {v}" for k, v in combo) + "**")
            lines.append("")
        header = f"| {rows[0]} \\ {cols[0]} |" if cols[0] else f"| {rows[0]} |"
        lines.append(header + "".join(f" {v} |" for v in shown_cols))
        lines.append("|---|" + "---|" * len(shown_cols))
        for row in shown_rows:
            texts = []
            for col in shown_cols:
                pins = {rows[0]: row, **({cols[0]: col} if cols[0] else {}), **dict(combo)}
                found = by_pins.get(tuple(sorted((n, pins.get(n)) for n in names)))
                texts.append(cell_text(found) if found else "·")
            lines.append(f"| {row} |" + "".join(f" {t} |" for t in texts))
    unplaced = [c for c in cells if c["id"] not in placed]
    if unplaced:
        lines += ["", "Not placed in the grid (nothing installed, so an unpinned axis package has no version):", ""]
        lines += [f"- {', '.join(f'{k} {v}' for k, v in c['pins'].items())}: {cell_text(c)}" for c in unplaced]
    return "\n".join(lines) + "\n"
