"""Rendering a variant into a complete Docker build context: Dockerfile, lock layers, smoke code.

The template is a file (images/templates/Dockerfile.j2) loaded with StrictUndefined. The base image is a
parameter: the production base comes from the spec, a local one (no registry here) from ``--base-image``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from . import __version__
from .errors import VlmbuildError
from .lock import build_tools_path
from .lockfile import Lockfile, LockfileError, read_lockfile
from .spec import Variant

PACKAGE_DIR = Path(__file__).resolve().parent
# What of vlmbuild ships inside the image: the smoke and what it imports, nothing that needs click/jinja/docker.
SMOKE_SOURCES = ("__init__.py", "contract.py", "lockfile.py", "rules", "smoke")
KEY_PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "trl", "triton", "flash-attn")
LABEL_PREFIX = "io.vlmbuild"
IMAGE_LOCK_PATH = "/opt/vlmbuild/lock.txt"
IMAGE_VARIANT_PATH = "/opt/vlmbuild/variant.json"
IMAGE_REPORT_PATH = "/opt/vlmbuild/smoke-report.json"
SMOKE_ENTRYPOINT = "vlmbuild-smoke"

BUILD_ENV_SH = """\
# Sourced by the installer stages only (never by the released stage): trust the build's CA if one was
# handed over, for pip and uv. The released image COPYs installed files from those stages, not this.
if [ -s /tmp/vlmbuild-build/build-ca.pem ]; then
  export SSL_CERT_FILE=/tmp/vlmbuild-build/build-ca.pem PIP_CERT=/tmp/vlmbuild-build/build-ca.pem
fi
export PIP_NO_CACHE_DIR=1 UV_NO_CACHE=1
"""

SMOKE_ENTRY_SH = """\
#!/bin/sh
# vlmbuild's smoke gate inside the image: `vlmbuild-smoke --help`.
PYTHONPATH="/opt/vlmbuild/lib${PYTHONPATH:+:$PYTHONPATH}" exec /opt/venv/bin/python -m vlmbuild.smoke "$@"
"""


@dataclass
class LayerFile:
    name: str
    file: str
    count: int
    summary: str


@dataclass
class RenderResult:
    context: Path
    dockerfile: str
    tag: str
    lock: Lockfile
    labels: dict[str, str]
    key_versions: dict[str, str]
    layers: list[LayerFile] = field(default_factory=list)


def git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def load_variant_lock(variant: Variant) -> Lockfile:
    path = variant.lockfile_path
    if not path.is_file():
        raise VlmbuildError(f"{path}: lockfile missing for {variant.image.name}/{variant.name}: run `vlmbuild lock "
                            f"{variant.image.name} --variant {variant.name}`")
    try:
        return read_lockfile(path)
    except LockfileError as exc:
        raise VlmbuildError(str(exc)) from None


def key_versions(lock: Lockfile) -> dict[str, str]:
    return {name: lock.pins[name] for name in KEY_PACKAGES if name in lock.pins}


def variant_labels(variant: Variant, lock: Lockfile, tag: str, base_image: str) -> dict[str, str]:
    image = variant.image
    labels = dict(image.labels)
    labels.update({
        "org.opencontainers.image.title": image.name,
        "org.opencontainers.image.description": variant.description or image.description,
        "org.opencontainers.image.version": tag,
        "org.opencontainers.image.base.name": base_image,
    })
    revision = git_revision(image.root)
    if revision:
        labels["org.opencontainers.image.revision"] = revision
    labels.update({
        f"{LABEL_PREFIX}.image": image.name,
        f"{LABEL_PREFIX}.variant": variant.name,
        f"{LABEL_PREFIX}.python": variant.python,
        f"{LABEL_PREFIX}.cuda": variant.cuda or "none",
        f"{LABEL_PREFIX}.lock-sha256": lock.sha256,
        f"{LABEL_PREFIX}.versions": json.dumps(key_versions(lock), sort_keys=True, separators=(",", ":")),
        f"{LABEL_PREFIX}.smoke-entrypoint": SMOKE_ENTRYPOINT,
    })
    return labels


def variant_metadata(variant: Variant, lock: Lockfile, tag: str) -> str:
    """variant.json, what the smoke reads of the variant it runs in: CUDA, conditions, the modules to import."""
    return json.dumps({
        "schema": 1,
        "image": variant.image.name,
        "variant": variant.name,
        "tag": tag,
        "python": variant.python,
        "cuda": variant.cuda,
        "conditions": list(variant.image.conditions),
        "imports": list(variant.imports),
        "key_versions": key_versions(lock),
        "lock_sha256": lock.sha256,
    }, indent=2) + "\n"


def _split_layers(variant: Variant, lock: Lockfile) -> list[tuple[str, list]]:
    buckets: dict[str, list] = {layer.name: [] for layer in variant.image.layers}
    for req in lock.requirements:
        buckets[variant.image.layer_of(req.name).name].append(req)
    return [(name, reqs) for name, reqs in buckets.items() if reqs]


def stage_smoke_sources(dest: Path) -> None:
    """Lay out the smoke as it lies in an image: DEST/lib/vlmbuild/... (put DEST/lib on PYTHONPATH)."""
    lib = dest / "lib" / "vlmbuild"
    lib.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SMOKE_SOURCES:
        src = PACKAGE_DIR / name
        if src.is_dir():
            shutil.copytree(src, lib / name, ignore=ignore)
        else:
            shutil.copy2(src, lib / name)


def host_ca_bundle() -> Path | None:
    """The CA bundle this host trusts for PyPI (SSL_CERT_FILE), which containers need to build here."""
    value = os.environ.get("SSL_CERT_FILE")
    return Path(value) if value and Path(value).is_file() else None


def render(variant: Variant, output: Path, base_image: str | None = None, ca_bundle: Path | None = None) -> RenderResult:
    """Write the complete build context of ``variant`` into ``output`` (created; must be empty or absent)."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise VlmbuildError(f"{output}: output directory is not empty")
    lock = load_variant_lock(variant)
    tools = build_tools_path(variant.image.root)
    if not tools.is_file():
        raise VlmbuildError(f"{tools}: build-tools lockfile missing: run `vlmbuild lock`")
    tag = variant.tag(lock.pins)
    base = base_image or variant.base_image
    labels = variant_labels(variant, lock, tag, base)

    # Render into a temporary sibling, then move into place: no half-written context on failure.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        (staging / "lock").mkdir()
        shutil.copy2(tools, staging / "lock" / "build-tools.txt")
        layers = []
        for index, (name, reqs) in enumerate(_split_layers(variant, lock), start=1):
            rel = f"lock/layer-{index}-{name}.txt"
            (staging / rel).write_text("\n".join(r.render() for r in reqs) + "\n")
            names = [r.name for r in reqs]
            summary = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            layers.append(LayerFile(name, rel, len(reqs), summary))
        (staging / "build-env.sh").write_text(BUILD_ENV_SH)
        ca_src = ca_bundle if ca_bundle is not None else host_ca_bundle()
        (staging / "build-ca.pem").write_bytes(ca_src.read_bytes() if ca_src else b"")

        smoke_dir = staging / "vlmbuild"
        stage_smoke_sources(smoke_dir)
        (smoke_dir / "bin").mkdir()
        (smoke_dir / "bin" / SMOKE_ENTRYPOINT).write_text(SMOKE_ENTRY_SH)
        (smoke_dir / "lock.txt").write_text(lock.text)
        (smoke_dir / "variant.json").write_text(variant_metadata(variant, lock, tag))

        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(variant.image.template.parent)),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )
        env.filters["basename"] = lambda p: Path(p).name
        try:
            dockerfile = env.get_template(variant.image.template.name).render(
                vlmbuild_version=__version__,
                image=variant.image,
                variant=variant,
                base_image=base,
                layers=layers,
                labels=labels,
                lock_sha256=lock.sha256,
            )
        except jinja2.TemplateError as exc:
            raise VlmbuildError(f"{variant.image.template}: cannot render: {exc}") from None
        (staging / "Dockerfile").write_text(dockerfile)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RenderResult(output, dockerfile, tag, lock, labels, key_versions(lock), layers)
