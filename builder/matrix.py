"""`vlmbuild matrix`: the variants as JSON rows, for CI matrices (GitHub's fromJSON) and the README table."""

from __future__ import annotations

from typing import Any

from .bases import LOCAL_BASE_PREFIX, split_digest
from .checks import pinned_versions
from .contract import KEY_PACKAGES
from .spec import Variant


def matrix_rows(variants: list[Variant], include_rejected: bool = False, release: bool = False) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        if v.expected_rejected and not include_rejected:
            continue
        if release and v.base_image.startswith(LOCAL_BASE_PREFIX):
            continue
        versions, not_locked = pinned_versions(v)
        locked = not_locked is None
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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README's version table: generated from the specs and lockfiles, never written by hand."""
    head = "| image | variant | tag | base | Python | CUDA | torch | DeepSpeed | transformers | trl | accelerate |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        v = r["versions"]
        tag = r["tag"] + (" (latest)" if r["default"] else "")
        ref, digest = split_digest(r["base_image"])
        base = f"`{ref}`" + (f" @ `{digest[:19]}…`" if digest else " (made locally)")
        lines.append(f"| {r['image']} | {r['variant']}{' (rejected)' if r['expect'] == 'rejected' else ''} | "
                     f"`{tag}` | {base} | {r['python']} | {r['cuda'] or '-'} | {v.get('torch', '-')} | "
                     f"{v.get('deepspeed', '-')} | {v.get('transformers', '-')} | {v.get('trl', '-')} | "
                     f"{v.get('accelerate', '-')} |")
    return "\n".join(lines)


def build_summary(report: dict[str, Any], origin: str) -> str:
    from .errors import VlmbuildError

    builds = report.get("builds")
    if not isinstance(builds, list):
        raise VlmbuildError(f"{origin}: builds: expected a list (a `vlmbuild build --report` file)")
    lines = ["| variant | result | smoke passes | tags | digest | checks | build s | smoke s |",
             "|---|---|---|---|---|---|---|---|"]
    for b in builds:
        checks = (b.get("smoke_report") or {}).get("checks") or []
        check_text = ", ".join(f"{c['name']} {c['status']}" for c in checks) or "-"
        digests = ", ".join(f"`{d[:19]}`" for d in (b.get("digests") or {}).values()) or "-"
        result = "passed" if b.get("passed") else "FAILED"
        if b.get("reused"):
            result = "already validated (reused)"
        if b.get("push_error"):
            result += f"; push failed: {b['push_error']}"
        passes = "; ".join(b.get("passes") or []) or "-"
        lines.append(f"| {b['image']}/{b['variant']} | {result} on {(b.get('smoke_device') or '?').upper()} | "
                     f"{passes} | {', '.join(b.get('tags') or []) or 'not tagged'} | {digests} | {check_text} | "
                     f"{b.get('build_seconds', 0):.0f} | {b.get('smoke_seconds', 0):.0f} |")
    return "\n".join(lines)
