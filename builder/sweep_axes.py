"""The cells of a sweep: a variant's lock inputs with a few packages moved, one cell per combination of the axes.

An axis is a package of the variant and the versions to try (``--axis deepspeed=0.16.9,0.19.8``, or the spec's
``sweep:`` section). Every name and version is checked before anything is installed: a package the variant does
not have, or a version the index does not have for the variant's Python and platform, is bad input (exit 2), not
a cell that "fails".

A cell's id is a hash of everything that decides what it measures (the variant's requirements with its pins, its
Python and platform, the checks, the repeat count, the device): a cell whose id is already in the results was
measured, and a changed input makes a new cell rather than silently reusing an old answer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .errors import VlmbuildError
from .spec import Variant

SWEEP_FORMAT = 1


@dataclass(frozen=True)
class Axis:
    package: str  # canonical name
    versions: tuple[str, ...]


@dataclass(frozen=True)
class Measure:
    """What every cell of one sweep runs: the same checks, repeat count and device."""
    device: str = "cpu"
    repeat: int = 1
    checks: str | None = None  # comma-separated, as `vlmbuild smoke --checks`; None: every check the device runs


@dataclass(frozen=True)
class Cell:
    variant: Variant
    pins: tuple[tuple[str, str], ...]  # (package, version) in axis order
    measure: Measure

    def requirement_lines(self) -> list[str]:
        """The variant's top-level requirements with this cell's pins in place of the spec's specifiers."""
        pinned = dict(self.variant.packages)
        pinned.update({name: f"=={version}" for name, version in self.pins})
        return [f"{name}{spec}" for name, spec in sorted(pinned.items())]

    @property
    def id(self) -> str:
        payload = {"format": SWEEP_FORMAT, "image": self.variant.image.name, "variant": self.variant.name,
                   "python": self.variant.python, "platform": self.variant.platform,
                   "requirements": self.requirement_lines(), "device": self.measure.device,
                   "repeat": self.measure.repeat, "checks": self.measure.checks}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        return " ".join(f"{name}={version}" for name, version in self.pins)


def parse_axis(text: str, origin: str = "--axis") -> Axis:
    name, sep, values = text.partition("=")
    versions = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not name.strip() or not versions:
        raise VlmbuildError(f"{origin} {text!r}: write PACKAGE=VERSION[,VERSION...], e.g. deepspeed=0.16.9,0.19.8")
    for version in versions:
        try:
            Version(version)
        except InvalidVersion:
            raise VlmbuildError(f"{origin} {text!r}: {version!r} is not a version (PEP 440)") from None
    if len(set(versions)) != len(versions):
        raise VlmbuildError(f"{origin} {text!r}: a version is listed twice")
    return Axis(canonicalize_name(name.strip()), versions)


def check_axes(axes: Sequence[Axis], variant: Variant, origin: str) -> None:
    """Each axis a package the variant installs, each package on one axis."""
    if not axes:
        raise VlmbuildError(f"{origin}: no axis given (--axis PACKAGE=VERSION,..., or the spec's sweep: section)")
    seen: set[str] = set()
    for axis in axes:
        if axis.package not in variant.packages:
            known = ", ".join(sorted(variant.packages))
            raise VlmbuildError(f"{origin}: axis {axis.package!r}: variant {variant.image.name}/{variant.name} "
                                f"({variant.image.path}) has no package of that name; it has: {known}")
        if axis.package in seen:
            raise VlmbuildError(f"{origin}: package {axis.package!r} is on two axes")
        seen.add(axis.package)


def check_versions_exist(axes: Sequence[Axis], variant: Variant, origin: str) -> None:
    """Every version of every axis exists on the index for the variant's Python and platform: asked of uv
    (one no-deps resolution per version: the index and the proxy uv is configured with, its cache)."""
    from .lock import resolver_environment, uv_binary

    with tempfile.TemporaryDirectory(prefix="vlmbuild-sweep-versions-") as tmp:
        for axis in axes:
            for version in axis.versions:
                Path(tmp, "in.txt").write_text(f"{axis.package}=={version}\n")
                proc = subprocess.run(
                    [uv_binary(), "pip", "compile", "in.txt", "--no-deps", "--quiet", "--no-header",
                     "--python-version", variant.python, "--python-platform", variant.platform,
                     "--prerelease", "if-necessary-or-explicit"],
                    cwd=tmp, capture_output=True, text=True, env=resolver_environment())
                if proc.returncode != 0:
                    raise VlmbuildError(f"{origin}: axis {axis.package}: the index has no {axis.package} {version} "
                                        f"for Python {variant.python} on {variant.platform} "
                                        f"({first_line(proc.stderr)})")


def make_cells(variant: Variant, axes: Sequence[Axis], measure: Measure) -> list[Cell]:
    """Every combination, the first axis varying slowest (the order the grid reads in)."""
    combos = itertools.product(*[[(axis.package, v) for v in axis.versions] for axis in axes])
    return [Cell(variant, tuple(combo), measure) for combo in combos]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, sep, total = text.partition("/")
    try:
        i, n = int(index), int(total)
    except ValueError:
        i, n = 0, 0
    if not sep or n < 1 or not 1 <= i <= n:
        raise VlmbuildError(f"--shard {text!r}: write I/N with 1 <= I <= N, e.g. 1/4")
    return i, n


def shard_of(cells: Iterable[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Shard I of N: the cells whose place in id order is I-1 modulo N. Ids, not positions in the product: the
    share of a runner does not depend on how the axes were written, and the shards together are every cell once."""
    cells = list(cells)
    if shard is None:
        return cells
    index, total = shard
    ordered = sorted(cells, key=lambda c: c.id)
    chosen = {c.id for n, c in enumerate(ordered) if n % total == index - 1}
    return [c for c in cells if c.id in chosen]


def first_line(text: str) -> str:
    """What a uv error says went wrong, on one line: its ``cause:`` (with the lines it wraps onto), else its
    ``error:`` line, else the first line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for mark in ("cause:", "╰─▶", "error:"):
        for n, line in enumerate(lines):
            if line.startswith(mark):
                rest = itertools.takewhile(lambda l: not l.startswith(("cause:", "╰─▶", "error:", "hint:", "help:")),
                                           lines[n + 1:])
                return " ".join([line.removeprefix(mark).strip(), *rest])
    return lines[0] if lines else "no output"
