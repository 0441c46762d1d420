"""Rendering a variant into a complete Docker build context: Dockerfile, lock layers, smoke code.

The template is a file (images/templates/Dockerfile.j2) loaded with StrictUndefined. The base image is a
parameter: the production base comes from the spec, a local one (no registry here) from ``--base-image``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import jinja2

from . import __version__, contract
from .errors import VlmbuildError
from .lock import load_variant_lock
from .lockfile import Lockfile, Requirement
from .spec import Layer, SourceBuild, Variant

PACKAGE_DIR = Path(__file__).resolve().parent
# What of vlmbuild ships inside the image: the smoke and what it imports, nothing that needs click/jinja/docker.
SMOKE_SOURCES = ("__init__.py", "contract.py", "lockfile.py", "rules", "smoke")
KEY_PACKAGES = contract.KEY_PACKAGES
LABEL_PREFIX = contract.LABEL_PREFIX
SMOKE_ENTRYPOINT = contract.SMOKE_ENTRYPOINT

VENV = contract.VENV
UV_CACHE = "/root/.cache/uv"
# The fixed time every file of the image carries (1980-01-01, the earliest a zip entry can hold): the same inputs
# give the same layer bytes whenever they are built (build_files/normalize-times).
BUILD_EPOCH = 315532800
# A tmpfs in every RUN: the files a RUN mounts (lock layers, build helpers, the wheel) are mounted inside it, so
# BuildKit 0.8 makes no mount point for them in the layer (moby/buildkit#3153).
SCRATCH = "/tmp/vlmbuild"
# Helper files of the build stages (build_files/), in the context under build/ and bind-mounted here.
BUILD_FILES = PACKAGE_DIR / "build_files"
BUILD_FILES_MOUNT = f"{SCRATCH}/files"
# Both helpers run with -S -B: the venv's .pth files import modules at startup (setuptools' distutils-precedence.pth
# imports _distutils_hack), and a plain start writes their bytecode, timestamp-based, with the source's install time
# in it, before anything else runs (a rebuild got another _distutils_hack .pyc in the libraries layer).
HELPER_PYTHON_FLAGS = "-S -B"
NORMALIZE_TIMES = f"{HELPER_PYTHON_FLAGS} {BUILD_FILES_MOUNT}/normalize-times {BUILD_EPOCH}"
# Every mount point a RUN of the build uses outside SCRATCH, made once in the first RUN with the fixed time.
MOUNT_POINTS = ("/run/secrets", SCRATCH, UV_CACHE, "/root/.cache/pip", "/opt/build-tools", "/var/cache/vlmbuild-wheels")
# Every RUN: the build's secrets (inside a tmpfs: no file of theirs in any layer), the scratch tmpfs with the build
# helpers in it. Every RUN that installs adds uv's download cache (one for every build on this machine: uv
# verifies hashes on every install, so a shared cache cannot smuggle a file in) and uv from the tools stage.
BASE_MOUNTS = ("--mount=type=tmpfs,target=/run/secrets "
               "--mount=type=secret,id=build-env --mount=type=secret,id=build-ca "
               f"--mount=type=tmpfs,target={SCRATCH} "
               f"--mount=type=bind,source=build,target={BUILD_FILES_MOUNT}")
UV_MOUNTS = (f"{BASE_MOUNTS} --mount=type=cache,id=vlmbuild-uv,target={UV_CACHE},sharing=shared "
             f"--mount=type=bind,from=tools,source=/opt/build-tools,target=/opt/build-tools")
# uv installs, compile-bytecode compiles what it added (hash-based .pyc, the same bytes on every build: uv's own
# --compile-bytecode gives bytes that depend on the order its workers finish, astral-sh/uv#10619). It is told the
# directories to compile: under -S, sysconfig answers Debian's posix_local scheme, not the venv's.
UV_INSTALL = (f"/opt/build-tools/bin/uv pip install --python {VENV}/bin/python --no-deps")
COMPILE_BYTECODE = f"{HELPER_PYTHON_FLAGS} {BUILD_FILES_MOUNT}/compile-bytecode"


def site_packages(python: str) -> str:
    """The venv's site-packages for Python ``python`` ("3.13")."""
    return f"{VENV}/lib/python{python}/site-packages"


def mount_points_and_parents() -> list[str]:
    """The mount points and every directory above them but /: what making them changes."""
    paths = set()
    for point in MOUNT_POINTS:
        path = PurePosixPath(point)
        paths.add(str(path))
        paths.update(str(parent) for parent in path.parents if str(parent) != "/")
    return sorted(paths)


# After a package stage's install: keep only the package's files and directories (uv's lock, pyvenv.cfg and the
# lib64 link are the base venv's, already in the image).
NORMALIZE_VENV = f"rm -f {VENV}/.lock {VENV}/pyvenv.cfg {VENV}/lib64"


SMOKE_ENTRY_SH = """\
#!/bin/sh
# vlmbuild's smoke gate inside the image: `vlmbuild-smoke --help`.
PYTHONPATH="/opt/vlmbuild/lib${PYTHONPATH:+:$PYTHONPATH}" exec /opt/venv/bin/python -m vlmbuild.smoke "$@"
"""


@dataclass
class LayerFile:
    """A lock layer installed in place (``stage`` derives from ``parent``)."""

    name: str
    file: str
    count: int
    summary: str
    stage: str = ""
    parent: str = ""


@dataclass
class PackageLayer:
    """One package in a build stage of its own, COPYed into the image as one layer."""

    name: str
    version: str
    stage: str
    file: str
    built: str = ""  # the stage whose wheel it is installed from (deepspeed-wheel, a source build's), if any


@dataclass
class DeepSpeedBuild:
    version: str
    lock_file: str
    accelerator: str
    ops: list[str]
    env: str
    parent: str  # the stage it builds on: the lock layer that holds torch
    parent_file: str  # that layer's lock file, part of the wheel's cache key
    requires_file: str
    requirements: list[Requirement] = field(default_factory=list)  # its build requirements outside that layer
    stage: str = "deepspeed-wheel"
    # where the image holds it: "" for the venv (the variant's own accelerator); a directory of its own for the CPU
    # build beside a CUDA one (the smoke's CPU pass puts it first on the path)
    target: str = ""

    @property
    def requires(self) -> list[str]:
        return [r.name for r in self.requirements]


@dataclass
class SourceWheelBuild:
    """A package the spec builds from its locked sdist (vlmbuild.spec.SourceBuild), in a stage of its own."""

    name: str
    version: str
    lock_file: str
    env: str
    parent: str  # the lock layer that holds torch
    parent_file: str  # that layer's lock file, part of the wheel's cache key
    requires_file: str
    requirements: list[Requirement] = field(default_factory=list)  # its build requirements outside that layer
    why: str = ""

    @property
    def stage(self) -> str:
        return source_stage(self.name)


def source_stage(name: str) -> str:
    return f"{name}-wheel"


# The lock cut into layers: those installed in place, in order, and the per-package ones, in order.
LayerPlan = tuple[list[tuple[LayerFile, list[Requirement]]], list[tuple[PackageLayer, Requirement]]]


@dataclass
class RenderResult:
    context: Path
    dockerfile: str
    tag: str
    lock: Lockfile
    labels: dict[str, str]
    key_versions: dict[str, str]
    layers: list[LayerFile] = field(default_factory=list)
    packages: list[PackageLayer] = field(default_factory=list)
    # the stages that build a wheel from source (DeepSpeed's ops: minutes of compile), which a cache must carry
    # although the image holds none of their layers (vlmbuild.build_cache)
    wheel_stages: list[str] = field(default_factory=list)


def git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def key_versions(lock: Lockfile, left_out: Iterable[str] = ()) -> dict[str, str]:
    """The locked versions of the key packages the image holds (``left_out``: those it goes without)."""
    return {name: lock.pins[name] for name in KEY_PACKAGES if name in lock.pins and name not in left_out}


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
        contract.LABEL_LOCK_SHA256: lock.sha256,
        contract.LABEL_VERSIONS: json.dumps(key_versions(lock, variant.left_out), sort_keys=True, separators=(",", ":")),
        contract.LABEL_SMOKE_ENTRYPOINT: SMOKE_ENTRYPOINT,
    })
    if variant.left_out:
        labels[contract.LABEL_LEFT_OUT] = json.dumps(variant.left_out, sort_keys=True, separators=(",", ":"))
    return labels


def variant_metadata(variant: Variant, lock: Lockfile, tag: str, plan: LayerPlan | None = None) -> str:
    """variant.json, what the smoke reads of the variant it runs in: CUDA, conditions, the modules to import.
    ``plan``: the variant's layer plan when the caller has made it already (render)."""
    chain, packages = plan or plan_layers(variant, lock)
    return json.dumps({
        "schema": 1,
        "image": variant.image.name,
        "variant": variant.name,
        "tag": tag,
        "python": variant.python,
        "cuda": variant.cuda,
        "conditions": list(variant.image.conditions),
        "imports": list(variant.imports),
        # each DeepSpeed build in the image (deepspeed-wheel stages): the accelerator it serves, its ops, where it is
        "deepspeed_builds": deepspeed_ops(variant),
        # the GPU architectures the CUDA ops are compiled for (the cuda_ops check compares the cubins with them)
        "cuda_archs": cuda_arch_list(variant.cuda_archs) if variant.cuda and variant.cuda_archs else None,
        # what the spec names but this image goes without, and why; which of them the release runner builds
        "left_out": variant.left_out,
        "source_builds": sorted(variant.source_builds),
        # the base the release builds on (the spec's, pinned); the image's label names the one it was built on
        "release_base": variant.base_image,
        # the layer plan, bottom to top: `vlmbuild inspect` names what each layer holds with it
        "layers": [layer.name for layer, _ in chain],
        "packages": [f"{package.name}=={package.version}" for package, _ in packages],
        "key_versions": key_versions(lock, variant.left_out),
        "lock_sha256": lock.sha256,
    }, indent=2) + "\n"


def pip_constraints(lock: Lockfile, tag: str) -> str:
    """The image's pip constraints: the locked version of each key package of the validated stack it holds (and of
    one it goes without: a flash-attn built in the image later is the locked one, not a 2.8 that fails to load
    beside torch 2.6)."""
    pins = [f"{name}=={version}" for name, version in key_versions(lock).items()]
    return (f"# vlmbuild: the stack validated in this image ({tag}); pip and uv read this file through\n"
            "# PIP_CONSTRAINT / UV_CONSTRAINT. To replace one of these on purpose, unset it for that command:\n"
            "#   PIP_CONSTRAINT= pip install ...   (the image's smoke evidence then no longer covers it)\n"
            + "".join(p + "\n" for p in pins))


def _bucket(variant: Variant, lock: Lockfile) -> dict[str, list[Requirement]]:
    buckets: dict[str, list[Requirement]] = {layer.name: [] for layer in variant.image.layers}
    for req in lock.requirements:
        buckets[variant.image.layer_of(req.name).name].append(req)
    return buckets


def _split_order(layer: Layer, reqs: list[Requirement], variant: Variant) -> list[Requirement]:
    """A split layer's packages in the order the spec names them (its patterns, or its group's packages)."""
    def rank(req: Requirement) -> tuple[int, str]:
        position = variant.image.position_in(layer, req.name)
        return (len(reqs) + 1000 if position is None else position, req.name)

    return sorted(reqs, key=rank)


def cuda_arch_list(cuda_archs: str) -> str:
    """TORCH_CUDA_ARCH_LIST for the spec's architectures: cubins for each, and PTX of the newest, so that a GPU newer
    than all of them JIT-compiles the kernels from PTX instead of failing with "no kernel image"."""
    archs = [a.removesuffix("+PTX") for a in cuda_archs.split(";") if a]
    newest = max(archs, key=lambda a: tuple(int(x) for x in a.split(".")))
    return ";".join(a + ("+PTX" if a == newest else "") for a in archs)


def deepspeed_targets(variant: Variant) -> list[tuple[str, str | None]]:
    """(accelerator, where the image holds that DeepSpeed build: None for the venv) of every build, the variant's own
    first. A CUDA image carries a CPU-accelerator build beside its own (contract.DEEPSPEED_CPU_PATH): DeepSpeed
    serves prebuilt ops only to the accelerator its wheel was built for (op_builder/builder.py compares the wheel's
    accelerator_name with the running one), so the CPU pass would JIT-compile its comm op and cpu_adam (326 s of a
    724 s smoke on 2 cores)."""
    own = [(variant.accelerator, None)]
    if variant.accelerator != "cpu" and variant.image.deepspeed_build.ops.get("cpu"):
        own.append(("cpu", contract.DEEPSPEED_CPU_PATH))
    return own


def deepspeed_build_env(variant: Variant, build_files: str, accelerator: str | None = None) -> dict[str, str]:
    """The environment build_files/build-sdist-wheel.sh builds the variant's DeepSpeed with for ``accelerator`` (the
    variant's own unless given; ``build_files``: where the helpers lie): the ops to compile, the portable compiler,
    the parallel build, the fixed time."""
    how = variant.image.deepspeed_build
    accelerator = accelerator or variant.accelerator
    ops = how.ops.get(accelerator, {})
    env = {"DS_ACCELERATOR": accelerator, "DS_BUILD_OPS": "0", **{var: "1" for var in ops.values()}}
    host_compiler = ""
    if accelerator == "cuda":
        # nvcc needs no GPU to compile for these architectures; the base family says where the toolkit lies.
        toolkit = variant.family.cuda_toolkit(variant.cuda or "", SCRATCH)
        env.update({"TORCH_CUDA_ARCH_LIST": cuda_arch_list(variant.cuda_archs or ""), "CUDA_HOME": toolkit.home})
        host_compiler = toolkit.host_compiler
    if host_compiler:
        # torch hands $CC to nvcc as its host compiler (-ccbin): the wrapper must call one nvcc accepts
        env["VLMBUILD_REAL_CXX"] = host_compiler
    env.update({
        # the portable compiler (build_files/portable-cxx) and the parallel build of the ops (build_ext.cfg)
        "CC": f"{build_files}/portable-cxx", "CXX": f"{build_files}/portable-cxx",
        "VLMBUILD_MARCH": how.march, "VLMBUILD_SIMD": how.simd,
        "DIST_EXTRA_CONFIG": f"{build_files}/build_ext.cfg", "MAX_JOBS": "4",
        # the wheel's zip entries carry this time, not the build's; its METADATA lists extras from a set, in the
        # order of the string hashes (PYTHONHASHSEED fixes it)
        "SOURCE_DATE_EPOCH": str(BUILD_EPOCH), "PYTHONHASHSEED": "0",
    })
    return env


def deepspeed_builds(variant: Variant, lock: Lockfile, plan: LayerPlan) -> list[DeepSpeedBuild]:
    """How DeepSpeed is built: on the lock layer that holds torch, with the spec's build requirements (as locked)
    installed beside it, and nothing else of the lock; once for the variant's accelerator and, in a CUDA image,
    once more for the CPU accelerator (its ops served to the CPU pass without compiling)."""
    req = lock.get("deepspeed")
    if req is None or req.url is not None:
        raise VlmbuildError(f"{variant.lockfile_path}: deepspeed must be locked from the index (name==version with "
                            "its sdist hash) to be built with its ops")
    torch_layer, in_torch_layer = torch_layer_of(variant, plan)
    how = variant.image.deepspeed_build
    missing = [name for name in how.requires if lock.get(name) is None]
    if missing:
        raise VlmbuildError(f"{variant.lockfile_path}: deepspeed_build.requires names {', '.join(missing)}, which the "
                            f"lockfile does not hold (add it to the spec's packages and run `vlmbuild lock`)")
    requirements = [lock.get(name) for name in how.requires if name not in in_torch_layer]
    builds = []
    for accelerator, target in deepspeed_targets(variant):
        env = deepspeed_build_env(variant, BUILD_FILES_MOUNT, accelerator)
        builds.append(DeepSpeedBuild(req.version, "lock/sdist-deepspeed.txt", accelerator,
                                     sorted(how.ops.get(accelerator, {})),
                                     " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                                     torch_layer.stage, torch_layer.file, "lock/deepspeed-build.txt", requirements,
                                     stage=f"deepspeed-wheel-{accelerator}" if target else "deepspeed-wheel",
                                     target=target or ""))
    return builds


def deepspeed_ops(variant: Variant) -> list[dict[str, object]]:
    """What variant.json says of the image's DeepSpeed builds: accelerator, ops, and where the image holds it
    (None: the venv's own)."""
    ops = variant.image.deepspeed_build.ops
    return [{"accelerator": accelerator, "path": target, "ops": sorted(ops.get(accelerator, {}))}
            for accelerator, target in deepspeed_targets(variant)]


def torch_layer_of(variant: Variant, plan: LayerPlan) -> tuple[LayerFile, set[str]]:
    """The lock layer installed in place that holds torch (what wheels are built against), and its packages."""
    chain, _ = plan
    found = next(((layer, {r.name for r in reqs}) for layer, reqs in chain if any(r.name == "torch" for r in reqs)),
                 None)
    if found is None:
        raise VlmbuildError(f"{variant.image.path}: layers: torch must be in a layer installed in place (DeepSpeed "
                            "and every source build are built against it)")
    return found


def source_build_env(variant: Variant, build: SourceBuild) -> dict[str, str]:
    """The environment a source build compiles in: the CUDA toolkit and its host compiler (the base family's), the
    portable compiler, the fixed time and hash seed (as DeepSpeed's), then the spec's own switches."""
    env = {}
    if variant.cuda:
        toolkit = variant.family.cuda_toolkit(variant.cuda, SCRATCH)
        env["CUDA_HOME"] = toolkit.home
        if toolkit.host_compiler:
            env["VLMBUILD_REAL_CXX"] = toolkit.host_compiler
    how = variant.image.deepspeed_build
    env.update({"CC": f"{BUILD_FILES_MOUNT}/portable-cxx", "CXX": f"{BUILD_FILES_MOUNT}/portable-cxx",
                "VLMBUILD_MARCH": how.march, "VLMBUILD_SIMD": how.simd,
                "SOURCE_DATE_EPOCH": str(BUILD_EPOCH), "PYTHONHASHSEED": "0"})
    env.update(build.env)
    return env


def source_builds(variant: Variant, lock: Lockfile, plan: LayerPlan) -> list[SourceWheelBuild]:
    """The source builds this build makes (the spec's, less --leave-out): each on the torch layer with its build
    requirements (as locked) beside it, from the sdist the lockfile pins."""
    builds = []
    for name, how in sorted(variant.built_from_source.items()):
        req = lock.get(name)
        if req is None or req.url is not None or req.version != how.version:
            raise VlmbuildError(f"{variant.lockfile_path}: {name} must be locked from the index as =={how.version} "
                                "with its sdist's hash to be built from source: run `vlmbuild lock`")
        missing = [n for n in how.build_requires if lock.get(n) is None]
        if missing:
            raise VlmbuildError(f"{variant.lockfile_path}: source_builds.{name}.build_requires names "
                                f"{', '.join(missing)}, which the lockfile does not hold (add it to the variant's "
                                "packages and run `vlmbuild lock`)")
        torch_layer, in_torch_layer = torch_layer_of(variant, plan)
        env = source_build_env(variant, how)
        builds.append(SourceWheelBuild(name, req.version, f"lock/sdist-{name}.txt",
                                       " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                                       torch_layer.stage, torch_layer.file, f"lock/{name}-build.txt",
                                       [lock.get(n) for n in how.build_requires if n not in in_torch_layer], how.why))
    return builds


def plan_layers(variant: Variant, lock: Lockfile) -> LayerPlan:
    """The lock cut into layers installed in place (in order) and per-package layers (in order)."""
    chain: list[tuple[LayerFile, list[Requirement]]] = []
    packages: list[tuple[PackageLayer, Requirement]] = []
    buckets = _bucket(variant, lock)
    parent = "python-base"
    built = {"deepspeed": "deepspeed-wheel", **{name: source_stage(name) for name in variant.source_builds}}
    for layer in variant.image.layers:
        reqs = [r for r in buckets[layer.name] if r.name not in variant.leave_out]
        if not reqs:
            continue
        if layer.split:
            for req in _split_order(layer, reqs, variant):
                packages.append((PackageLayer(req.name, req.version, f"pkg-{req.name}", f"lock/pkg-{req.name}.txt",
                                              built=built.get(req.name, "")), req))
            continue
        in_place = sorted(set(built) & {r.name for r in reqs})
        if in_place:
            raise VlmbuildError(f"{variant.image.path}: layers: {in_place[0]} is built from its sdist in a stage of its "
                                f"own and must sit in a split layer, not in {layer.name!r}")
        names = [r.name for r in reqs]
        summary = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        index = len(chain) + 1
        stage = f"layer-{layer.name}"
        chain.append((LayerFile(layer.name, f"lock/layer-{index}-{layer.name}.txt", len(reqs), summary, stage,
                                parent), reqs))
        parent = stage
    if not chain:
        raise VlmbuildError(f"{variant.image.path}: layers: no layer installed in place holds a package (torch?)")
    if not any(p.built == "deepspeed-wheel" for p, _ in packages):
        raise VlmbuildError(f"{variant.image.path}: layers: deepspeed must sit in a split layer (it is built from "
                            "its sdist with its ops in a stage of its own)")
    return chain, packages


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


def render(variant: Variant, output: Path, base_image: str | None = None, lock: Lockfile | None = None,
           tag: str | None = None) -> RenderResult:
    """Write the complete build context of ``variant`` into ``output`` (created; must be empty or absent).
    ``lock`` and ``tag``: the variant's lockfile and tag when the caller has them already (vlmbuild.resolve)."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise VlmbuildError(f"{output}: output directory is not empty")
    lock = lock or load_variant_lock(variant)
    tools = variant.image.build_tools_lockfile
    if not tools.is_file():
        raise VlmbuildError(f"{tools}: build-tools lockfile missing: run `vlmbuild lock`")
    tag = tag or variant.tag(lock.pins)
    base = base_image or variant.base_image
    labels = variant_labels(variant, lock, tag, base)

    chain, packages = plan_layers(variant, lock)
    builds = deepspeed_builds(variant, lock, (chain, packages))
    deepspeed = builds[0]
    from_source = source_builds(variant, lock, (chain, packages))
    wheel_files = {"deepspeed-wheel": deepspeed.lock_file, **{b.stage: b.lock_file for b in from_source}}
    toolkit = variant.family.cuda_toolkit(variant.cuda, SCRATCH) if variant.cuda else None

    # Render into a temporary sibling, then move into place: no half-written context on failure.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        (staging / "lock").mkdir()
        shutil.copy2(tools, staging / "lock" / "build-tools.txt")
        for layer, reqs in chain:
            (staging / layer.file).write_text("\n".join(r.render() for r in reqs) + "\n")
        for package, req in packages:
            (staging / wheel_files.get(package.built, package.file)).write_text(req.render() + "\n")
        (staging / deepspeed.requires_file).write_text("".join(r.render() + "\n" for r in deepspeed.requirements))
        for build in from_source:
            (staging / build.requires_file).write_text("".join(r.render() + "\n" for r in build.requirements))
        (staging / "pip").mkdir()
        (staging / "pip" / "constraint.txt").write_text(pip_constraints(lock, tag))
        shutil.copytree(BUILD_FILES, staging / "build", ignore=shutil.ignore_patterns("__pycache__"))

        smoke_dir = staging / "vlmbuild"
        stage_smoke_sources(smoke_dir)
        (smoke_dir / "bin").mkdir()
        (smoke_dir / "bin" / SMOKE_ENTRYPOINT).write_text(SMOKE_ENTRY_SH)
        (smoke_dir / "lock.txt").write_text(lock.text)
        (smoke_dir / "variant.json").write_text(variant_metadata(variant, lock, tag, (chain, packages)))

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
                chain_layers=[layer for layer, _ in chain],
                package_layers=[package for package, _ in packages],
                deepspeed=deepspeed,
                deepspeed_extra=builds[1:],
                source_builds=from_source,
                cuda_toolkit=toolkit,
                build_files=BUILD_FILES_MOUNT,
                sbom=contract.SBOM_PATH,
                pip_constraint=contract.PIP_CONSTRAINT_PATH,
                built_wheels=contract.BUILT_WHEELS_PATH,
                labels=labels,
                lock_sha256=lock.sha256,
            )
        except jinja2.TemplateError as exc:
            raise VlmbuildError(f"{variant.image.template}: cannot render: {exc}") from None
        (staging / "Dockerfile").write_text(dockerfile)
        fix_times(staging)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RenderResult(output, dockerfile, tag, lock, labels, key_versions(lock, variant.left_out), [layer for layer, _ in chain],
                        [package for package, _ in packages], [b.stage for b in builds] + [b.stage for b in from_source])
