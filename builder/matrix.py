"""`vlmbuild matrix`: the variants as JSON rows, for CI matrices (GitHub's fromJSON) and the README table."""

from __future__ import annotations

from typing import Any

from .checks import declared_versions
from .lockfile import LockfileError, read_lockfile
from .render import KEY_PACKAGES
from .spec import Variant

LOCAL_BASE_PREFIX = "vlmbuild-local/"


def variant_versions(variant: Variant) -> tuple[dict[str, str], bool]:
    """(versions, locked): the lockfile's pins when there is one, else the spec's exact pins."""
    if variant.lockfile_path.is_file():
        try:
            return read_lockfile(variant.lockfile_path).pins, True
        except LockfileError:
            pass
    return declared_versions(variant), False


def matrix_rows(variants: list[Variant], include_rejected: bool = False, release: bool = False) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        if v.expected_rejected and not include_rejected:
            continue
        if release and v.base_image.startswith(LOCAL_BASE_PREFIX):
            continue
        versions, locked = variant_versions(v)
        rows.append({
            "image": v.image.name,
            "variant": v.name,
            "tag": v.tag(versions),
            "repository": v.image.repository,
            "base_image": v.base_image,
            "python": v.python,
            "cuda": v.cuda,
            "default": v.is_default,
            "expect": v.expect,
            "locked": locked,
            "versions": {k: versions[k] for k in KEY_PACKAGES if k in versions},
        })
    return rows
