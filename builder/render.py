"""Writing a build plan out as a complete Docker build context: Dockerfile, lock layers, build helpers, smoke code.

Everything here is decided already (vlmbuild.plan); this module only writes files. The template is a file
(images/templates/Dockerfile.j2) loaded with StrictUndefined. The base image is a parameter: the production base
comes from the spec, a local one (no registry here) from ``--base-image``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import __version__, contract
from .build_layout import (
    BASE_MOUNTS,
    BUILD_EPOCH,
    BUILD_FILES,
    BUILD_FILES_MOUNT,
    COMPILE_BYTECODE,
    MOUNT_POINTS,
    NORMALIZE_TIMES,
    NORMALIZE_VENV,
    PACKAGE_DIR,
    SCRATCH,
    UV_INSTALL,
    UV_MOUNTS,
    VENV,
    mount_points_and_parents,
    site_packages,
)
from .errors import VlmbuildError
from .plan import BuildPlan

# What of vlmbuild ships inside the image: the smoke and what it imports, nothing that needs click/jinja/docker.
SMOKE_SOURCES = ("__init__.py", "contract.py", "lockfile.py", "rules", "smoke")
SMOKE_ENTRYPOINT = contract.SMOKE_ENTRYPOINT

SMOKE_ENTRY_SH = """\
#!/bin/sh
# vlmbuild's smoke gate inside the image: `vlmbuild-smoke --help`.
PYTHONPATH="/opt/vlmbuild/lib${PYTHONPATH:+:$PYTHONPATH}" exec /opt/venv/bin/python -m vlmbuild.smoke "$@"
"""


@dataclass(frozen=True)
class RenderResult:
    plan: BuildPlan
    context: Path
    dockerfile: str
    labels: dict[str, str]

    # what a reader of the result asks of the plan it wrote
    @property
    def tag(self) -> str:
        return self.plan.tag

    @property
    def lock(self):
        return self.plan.lock

    @property
    def layers(self):
        return self.plan.layers

    @property
    def packages(self):
        return self.plan.package_layers

    @property
    def wheel_stages(self) -> list[str]:
        return self.plan.wheel_stages


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


def fix_times(context: Path) -> None:
    """Every file and directory of the context gets the build's fixed time: what BuildKit copies or mounts from
    the context then has the same metadata on every machine (and the context digest ignores times anyway)."""
    for path in sorted(context.rglob("*"), reverse=True):
        os.utime(path, (BUILD_EPOCH, BUILD_EPOCH), follow_symlinks=False)
    os.utime(context, (BUILD_EPOCH, BUILD_EPOCH))


def render(plan: BuildPlan, base_image: str | None, output: Path) -> RenderResult:
    """Write the complete build context of ``plan`` on ``base_image`` (None: the spec's) into ``output`` (created;
    must be empty or absent)."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise VlmbuildError(f"{output}: output directory is not empty")
    variant, lock = plan.variant, plan.lock
    tools = variant.image.build_tools_lockfile
    if not tools.is_file():
        raise VlmbuildError(f"{tools}: build-tools lockfile missing: run `vlmbuild lock`")
    base = base_image or variant.base_image
    labels = plan.labels(base)
    deepspeed = plan.deepspeed[0]
    wheel_files = {"deepspeed-wheel": deepspeed.lock_file, **{b.stage: b.lock_file for b in plan.source_builds}}

    # Render into a temporary sibling, then move into place: no half-written context on failure.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        (staging / "lock").mkdir()
        shutil.copy2(tools, staging / "lock" / "build-tools.txt")
        for layer, reqs in plan.chain:
            (staging / layer.file).write_text("\n".join(r.render() for r in reqs) + "\n")
        for package, req in plan.packages:
            (staging / wheel_files.get(package.built, package.file)).write_text(req.render() + "\n")
        (staging / deepspeed.requires_file).write_text("".join(r.render() + "\n" for r in deepspeed.requirements))
        for build in plan.source_builds:
            (staging / build.requires_file).write_text("".join(r.render() + "\n" for r in build.requirements))
        (staging / "pip").mkdir()
        (staging / "pip" / "constraint.txt").write_text(plan.pip_constraints)
        shutil.copytree(BUILD_FILES, staging / "build", ignore=shutil.ignore_patterns("__pycache__"))

        smoke_dir = staging / "vlmbuild"
        stage_smoke_sources(smoke_dir)
        (smoke_dir / "bin").mkdir()
        (smoke_dir / "bin" / SMOKE_ENTRYPOINT).write_text(SMOKE_ENTRY_SH)
        (smoke_dir / "lock.txt").write_text(lock.text)
        (smoke_dir / "variant.json").write_text(plan.variant_json)
        dockerfile = render_dockerfile(plan, base, labels)
        (staging / "Dockerfile").write_text(dockerfile)
        fix_times(staging)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RenderResult(plan, output, dockerfile, labels)


def render_dockerfile(plan: BuildPlan, base: str, labels: dict[str, str]) -> str:
    variant = plan.variant
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(variant.image.template.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["basename"] = lambda p: Path(p).name
    try:
        return env.get_template(variant.image.template.name).render(
            vlmbuild_version=__version__,
            image=variant.image,
            variant=variant,
            base_image=base,
            venv=VENV,
            uv_mounts=UV_MOUNTS,
            base_mounts=BASE_MOUNTS,
            uv_install=UV_INSTALL,
            compile_bytecode=f"{VENV}/bin/python {COMPILE_BYTECODE} {site_packages(variant.python)}",
            compile_stdlib=f"{variant.family.python_command(variant.python)} {COMPILE_BYTECODE} "
                           f"{variant.family.stdlib_dir(variant.python)}",
            compile_smoke=f"{VENV}/bin/python {COMPILE_BYTECODE} {contract.IMAGE_DIR}/lib",
            scratch=SCRATCH,
            epoch=BUILD_EPOCH,
            mount_points=MOUNT_POINTS,
            mount_points_and_parents=mount_points_and_parents(),
            python=variant.family.python_command(variant.python),
            base_install=variant.family.install(variant.family.python_packages(variant.python), SCRATCH),
            normalize_times=NORMALIZE_TIMES,
            normalize_venv=NORMALIZE_VENV,
            chain_layers=plan.layers,
            package_layers=plan.package_layers,
            deepspeed=plan.deepspeed[0],
            deepspeed_extra=list(plan.deepspeed[1:]),
            source_builds=list(plan.source_builds),
            cuda_toolkit=plan.cuda_toolkit,
            build_files=BUILD_FILES_MOUNT,
            sbom=contract.SBOM_PATH,
            pip_constraint=contract.PIP_CONSTRAINT_PATH,
            built_wheels=contract.BUILT_WHEELS_PATH,
            labels=labels,
            lock_sha256=plan.lock.sha256,
        )
    except jinja2.TemplateError as exc:
        raise VlmbuildError(f"{variant.image.template}: cannot render: {exc}") from None
