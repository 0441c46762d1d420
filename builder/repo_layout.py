"""Where a vlmbuild repository keeps its sources: the one module that knows the layout.

    images/<image>.yaml              the specs (images/templates/ beside them)
    lockfiles/<image>/<variant>.txt  each variant's hash-locked lockfile
    lockfiles/build-tools.txt        the tools the build stages install (uv), locked once for every image
    compat/<image>-<variant>.json    what `vlmbuild sweep` measured over version matrices of that variant
"""

from __future__ import annotations

from pathlib import Path


def images_dir(root: Path) -> Path:
    return root / "images"


def spec_paths(root: Path) -> list[Path]:
    return sorted(images_dir(root).glob("*.yaml"))


def spec_path(root: Path, image: str) -> Path:
    return images_dir(root) / f"{image}.yaml"


def variant_lockfile(root: Path, image: str, variant: str) -> Path:
    return root / "lockfiles" / image / f"{variant}.txt"


def build_tools_lockfile(root: Path) -> Path:
    return root / "lockfiles" / "build-tools.txt"


def compat_results(root: Path, image: str, variant: str) -> Path:
    return root / "compat" / f"{image}-{variant}.json"


def compat_files(root: Path, image: str) -> list[Path]:
    return sorted((root / "compat").glob(f"{image}-*.json"))
