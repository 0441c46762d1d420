"""A sweep's results as data: compat/<image>-<variant>.json, one record per measured cell.

A record says what ran (the cell's pins, its requirements, the sha256 of its lock, the checks, repeat, device), on
what (the vlmbuild revision, the host's CPU/GPU and Python, the date) and what was seen (each check's status,
seconds and first error line; the smoke report's sha256), and what that means (the rules that explain a failure,
else ``unexplained``). The file is written whole and atomically after every cell: an interrupted sweep keeps what
it finished, and the next run goes on from there.

Statuses of a cell: ``passed`` (every check the device runs passed), ``failed`` (the first failing check names
why), ``unresolvable`` (the resolver's reason), ``install_failed`` (the environment, not the stack, failed).
A check's own status is the smoke's, or ``not_measured`` when a CPU-accelerator defect made its result say
nothing (see sweep_verdict).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import VlmbuildError

SCHEMA = 1
RECORD_KEYS = ("id", "pins", "device", "result", "reason", "first_failure", "explained_by", "cpu_accelerator",
               "checks", "versions", "inputs", "lock_sha256", "report_sha256", "reports", "vlmbuild_revision", "host",
               "measured_at", "seconds", "jit_compiled")
# What may differ between two measurements of the same cell without the result differing: when, where, how long.
CIRCUMSTANCES = ("vlmbuild_revision", "host", "measured_at", "seconds", "report_sha256", "lock_sha256", "reports")
RESULTS = ("passed", "failed", "unresolvable", "install_failed")


class SweepDataError(VlmbuildError):
    """A results file that is not what this version of vlmbuild writes."""


def empty(image: str, variant: str) -> dict[str, Any]:
    return {"schema": SCHEMA, "image": image, "variant": variant, "axes": [], "cells": []}


def load(path: Path, image: str | None = None, variant: str | None = None) -> dict[str, Any]:
    """The results at ``path``; a missing file is an empty sweep of (image, variant)."""
    if not path.is_file():
        if image is None or variant is None:
            raise SweepDataError(f"{path}: no such results file")
        return empty(image, variant)
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SweepDataError(f"{path}: not JSON ({exc})") from None
    check_data(data, str(path))
    if image is not None and (data["image"], data["variant"]) != (image, variant):
        raise SweepDataError(f"{path}: holds {data['image']}/{data['variant']}, not {image}/{variant}")
    return data


def check_data(data: Any, origin: str) -> None:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise SweepDataError(f"{origin}: key schema: expected {SCHEMA} (a results file of `vlmbuild sweep`)")
    for key in ("image", "variant", "axes", "cells"):
        if key not in data:
            raise SweepDataError(f"{origin}: key {key}: missing")
    for n, cell in enumerate(data["cells"]):
        missing = [k for k in RECORD_KEYS if k not in cell]
        if missing:
            raise SweepDataError(f"{origin}: cells[{n}]: missing key(s) {', '.join(missing)}")
        if cell["result"] not in RESULTS:
            raise SweepDataError(f"{origin}: cells[{n}].result: {cell['result']!r} is not one of {', '.join(RESULTS)}")


def save(path: Path, data: Mapping[str, Any]) -> None:
    """Written whole to a temporary file beside it, then renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = {**data, "cells": sorted(data["cells"], key=lambda c: c["id"])}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(ordered, fh, indent=1, sort_keys=False)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_axes(data: dict[str, Any], axes: Iterable[tuple[str, tuple[str, ...]]]) -> None:
    """The axes the file's cells span: each package with every version measured, in first-seen order."""
    known = {a["package"]: a for a in data["axes"]}
    for package, versions in axes:
        axis = known.get(package)
        if axis is None:
            axis = {"package": package, "versions": []}
            data["axes"].append(axis)
            known[package] = axis
        axis["versions"].extend(v for v in versions if v not in axis["versions"])


def put(data: dict[str, Any], record: Mapping[str, Any]) -> None:
    data["cells"] = [c for c in data["cells"] if c["id"] != record["id"]] + [dict(record)]


def measured_ids(data: Mapping[str, Any]) -> set[str]:
    return {c["id"] for c in data["cells"]}


def merge(parts: list[dict[str, Any]], origins: list[str]) -> dict[str, Any]:
    """Shards' results joined: every cell once. One cell measured twice with different results is an error (a
    flaky cell or different inputs under one id), never silently one of them."""
    if not parts:
        raise SweepDataError("sweep merge: no results file given")
    image, variant = parts[0]["image"], parts[0]["variant"]
    out = empty(image, variant)
    seen: dict[str, tuple[dict[str, Any], str]] = {}
    for data, origin in zip(parts, origins, strict=True):
        if (data["image"], data["variant"]) != (image, variant):
            raise SweepDataError(f"{origin}: holds {data['image']}/{data['variant']}, not {image}/{variant} "
                                 f"({origins[0]})")
        add_axes(out, [(a["package"], tuple(a["versions"])) for a in data["axes"]])
        for cell in data["cells"]:
            if cell["id"] in seen and outcome(seen[cell["id"]][0]) != outcome(cell):
                raise SweepDataError(f"{origin}: cell {cell['id']} ({pins_text(cell)}) disagrees with "
                                     f"{seen[cell['id']][1]}: {cell['result']} vs {seen[cell['id']][0]['result']}")
            seen.setdefault(cell["id"], (cell, origin))
    out["cells"] = sorted((c for c, _ in seen.values()), key=lambda c: c["id"])
    return out


def merge_files(paths: list[Path], output: Path) -> dict[str, Any]:
    """``merge`` of results files, with the evidence: each cell's kept smoke reports are copied from beside the file
    its record came from to beside ``output`` (reports/<output name>/), its paths rewritten, and the report its
    ``report_sha256`` names checked. A report missing or not those bytes is an error before anything is written."""
    parts = [load(p) for p in paths]
    data = merge(parts, [str(p) for p in paths])
    holder: dict[str, Path] = {}
    for path, part in zip(paths, parts, strict=True):
        for cell in part["cells"]:
            holder.setdefault(cell["id"], path)  # merge keeps each cell's first record: its reports go with it
    copies: list[tuple[Path, Path]] = []
    target = reports_dir(output)
    for n, cell in enumerate(data["cells"]):
        origin = holder[cell["id"]]
        kept = []
        for i, relative in enumerate(cell["reports"]):
            source = origin.parent / relative
            if not source.is_file():
                raise SweepDataError(f"{origin}: cell {cell['id']} ({pins_text(cell)}) names its smoke report "
                                     f"{relative}, which is not there: copy the reports beside the results file")
            if i == len(cell["reports"]) - 1 and cell["report_sha256"] and \
                    hashlib.sha256(source.read_bytes()).hexdigest() != cell["report_sha256"]:
                raise SweepDataError(f"{origin}: cell {cell['id']} ({pins_text(cell)}): {relative} is not the report "
                                     "its report_sha256 names")
            dest = target / source.name
            copies.append((source, dest))
            kept.append(str(dest.relative_to(output.parent)))
        data["cells"][n] = {**cell, "reports": kept}
    for source, dest in copies:
        if source.resolve() != dest.resolve():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
    save(output, data)
    return data


def outcome(cell: Mapping[str, Any]) -> dict[str, Any]:
    """A record without its circumstances, and its checks without their timings: what two measurements of one
    cell must agree on."""
    kept = {k: v for k, v in cell.items() if k not in CIRCUMSTANCES}
    kept["checks"] = [{k: v for k, v in check.items() if k != "seconds"} for check in cell.get("checks", [])]
    return kept


def pins_text(cell: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in cell["pins"].items())


def reports_dir(results: Path) -> Path:
    """Where the smoke reports of a results file's cells are kept, beside it: reports/<results name>/<cell>.json."""
    return results.parent / "reports" / results.stem


def host_facts(device: str) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None if device == "cpu" else device,
            "python": platform.python_version(), "system": f"{platform.system()} {platform.machine()}"}
