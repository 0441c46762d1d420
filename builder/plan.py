"""A variant's build plan: everything the spec and its lockfile decide about an image, computed once.

``make_plan(variant, lock)`` cuts the lock into layers, decides how DeepSpeed and every source build are compiled
(on which layer, with which requirements, in which environment), finds the CUDA toolkit, and writes what the image
says of itself (variant.json, the pip constraints, the key versions). The result is frozen: the renderer writes it
out, the gate, the build cache and the release read it, and `vlmbuild matrix`, `check` and `smoke IMAGE` ask it
instead of deriving the same facts again. Nothing here writes a file or talks to the engine.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import contract
from .bases import CudaToolkit
from .build_layout import BUILD_EPOCH, BUILD_FILES_MOUNT, SCRATCH
from .errors import VlmbuildError
from .lockfile import Lockfile, Requirement
from .spec import Layer, SourceBuild, Variant


@dataclass(frozen=True)
class LayerFile:
    """A lock layer installed in place (``stage`` derives from ``parent``)."""

    name: str
    file: str
    count: int
    summary: str
    stage: str = ""
    parent: str = ""


@dataclass(frozen=True)
class PackageLayer:
    """One package in a build stage of its own, COPYed into the image as one layer."""

    name: str
    version: str
    stage: str
    file: str
    built: str = ""  # the stage whose wheel it is installed from (deepspeed-wheel, a source build's), if any


@dataclass(frozen=True)
class WheelBuild:
    """A wheel built from its locked sdist in a stage of its own, on the lock layer that holds torch: DeepSpeed with
    its ops (once per accelerator the image serves), or a package the spec builds from source."""

    name: str
    version: str
    stage: str
    lock_file: str
    env: str  # the build environment, as shell assignments
    parent: str  # the stage it builds on: the lock layer that holds torch
    parent_file: str  # that layer's lock file, part of the wheel's cache key
    requires_file: str
    requirements: tuple[Requirement, ...] = ()  # its build requirements outside that layer
    accelerator: str = ""  # DeepSpeed: the accelerator its ops are for
    ops: tuple[str, ...] = ()  # DeepSpeed: the ops compiled
    # DeepSpeed: where the image holds it: "" for the venv (the variant's own accelerator); a directory of its own
    # for the CPU build beside a CUDA one (the smoke's CPU pass puts it first on the path)
    target: str = ""
    why: str = ""  # a source build: the spec's reason

    @property
    def requires(self) -> list[str]:
        return [r.name for r in self.requirements]


def source_stage(name: str) -> str:
    return f"{name}-wheel"


@dataclass(frozen=True)
class BuildPlan:
    """What a build of ``variant`` makes, from its spec and lockfile alone (the base image is the renderer's)."""

    variant: Variant
    lock: Lockfile
    tag: str
    chain: tuple[tuple[LayerFile, tuple[Requirement, ...]], ...]  # the layers installed in place, bottom to top
    packages: tuple[tuple[PackageLayer, Requirement], ...]  # the per-package layers, in order
    deepspeed: tuple[WheelBuild, ...]  # the variant's own accelerator first
    source_builds: tuple[WheelBuild, ...]
    cuda_toolkit: CudaToolkit | None
    key_version_items: tuple[tuple[str, str], ...]  # the key packages the image holds, as locked
    variant_json: str
    pip_constraints: str

    @property
    def key_versions(self) -> dict[str, str]:
        return dict(self.key_version_items)

    @property
    def layers(self) -> list[LayerFile]:
        return [layer for layer, _ in self.chain]

    @property
    def package_layers(self) -> list[PackageLayer]:
        return [package for package, _ in self.packages]

    @property
    def wheel_stages(self) -> list[str]:
        """The stages that build a wheel from source (DeepSpeed's ops: minutes of compile), which a cache must carry
        although the image holds none of their layers (vlmbuild.build_cache)."""
        return [b.stage for b in (*self.deepspeed, *self.source_builds)]

    def labels(self, base_image: str) -> dict[str, str]:
        """The image's labels when built on ``base_image``."""
        variant, image = self.variant, self.variant.image
        labels = dict(image.labels)
        labels.update({
            "org.opencontainers.image.title": image.name,
            "org.opencontainers.image.description": variant.description or image.description,
            "org.opencontainers.image.version": self.tag,
            "org.opencontainers.image.base.name": base_image,
        })
        revision = git_revision(image.root)
        if revision:
            labels["org.opencontainers.image.revision"] = revision
        labels.update({
            f"{contract.LABEL_PREFIX}.image": image.name,
            f"{contract.LABEL_PREFIX}.variant": variant.name,
            f"{contract.LABEL_PREFIX}.python": variant.python,
            f"{contract.LABEL_PREFIX}.cuda": variant.cuda or "none",
            contract.LABEL_LOCK_SHA256: self.lock.sha256,
            contract.LABEL_VERSIONS: json.dumps(self.key_versions, sort_keys=True, separators=(",", ":")),
            contract.LABEL_SMOKE_ENTRYPOINT: contract.SMOKE_ENTRYPOINT,
        })
        if variant.left_out:
            labels[contract.LABEL_LEFT_OUT] = json.dumps(variant.left_out, sort_keys=True, separators=(",", ":"))
        return labels


def make_plan(variant: Variant, lock: Lockfile) -> BuildPlan:
    """The plan of ``variant`` with its lockfile ``lock`` (read once by the caller)."""
    chain, packages = plan_layers(variant, lock)
    torch_layer = torch_layer_of(variant, chain)
    deepspeed = deepspeed_builds(variant, lock, torch_layer)
    from_source = source_builds(variant, lock, torch_layer)
    tag = variant.tag(lock.pins)
    toolkit = variant.family.cuda_toolkit(variant.cuda, SCRATCH) if variant.cuda else None
    held = key_versions(lock, variant.left_out)
    return BuildPlan(variant, lock, tag, chain, packages, tuple(deepspeed), tuple(from_source), toolkit,
                     tuple(held.items()), variant_metadata(variant, lock, tag, chain, packages, held),
                     pip_constraints(lock, tag))


def git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def key_versions(lock: Lockfile, left_out: dict[str, str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The locked versions of the key packages the image holds (``left_out``: those it goes without)."""
    return {name: lock.pins[name] for name in contract.KEY_PACKAGES if name in lock.pins and name not in left_out}


def variant_metadata(variant: Variant, lock: Lockfile, tag: str, chain, packages, held: dict[str, str]) -> str:
    """variant.json, what the smoke reads of the variant it runs in: CUDA, conditions, the modules to import."""
    info: contract.VariantInfo = {
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
        "key_versions": held,
        "lock_sha256": lock.sha256,
    }
    return json.dumps(info, indent=2) + "\n"


def pip_constraints(lock: Lockfile, tag: str) -> str:
    """The image's pip constraints: the locked version of each key package of the validated stack it holds (and of
    one it goes without: a flash-attn built in the image later is the locked one, not a 2.8 that fails to load
    beside torch 2.6)."""
    pins = [f"{name}=={version}" for name, version in key_versions(lock).items()]
    return (f"# vlmbuild: the stack validated in this image ({tag}); pip and uv read this file through\n"
            "# PIP_CONSTRAINT / UV_CONSTRAINT. To replace one of these on purpose, unset it for that command:\n"
            "#   PIP_CONSTRAINT= pip install ...   (the image's smoke evidence then no longer covers it)\n"
            + "".join(p + "\n" for p in pins))


def split_order(layer: Layer, reqs: list[Requirement], variant: Variant) -> list[Requirement]:
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
    accelerator_name with the running one), so the CPU pass would JIT-compile its comm op and cpu_adam."""
    own: list[tuple[str, str | None]] = [(variant.accelerator, None)]
    if variant.accelerator != "cpu" and variant.image.deepspeed_build.ops.get("cpu"):
        own.append(("cpu", contract.DEEPSPEED_CPU_PATH))
    return own


def wheel_build_env(variant: Variant, build_files: str, accelerator: str | None = None,
                    source: SourceBuild | None = None) -> dict[str, str]:
    """The environment build_files/build-sdist-wheel.sh compiles a wheel in (``build_files``: where the helpers lie):
    DeepSpeed's for ``accelerator`` (the variant's own unless given: the ops to compile, the CUDA archs, the
    parallel build), or ``source``'s (the spec's own switches last). Both: the CUDA toolkit and its host compiler
    (the base family's), the portable compiler, the fixed time and hash seed."""
    how = variant.image.deepspeed_build
    env: dict[str, str] = {}
    if source is None:
        accelerator = accelerator or variant.accelerator
        ops = how.ops.get(accelerator, {})
        env.update({"DS_ACCELERATOR": accelerator, "DS_BUILD_OPS": "0", **{var: "1" for var in ops.values()}})
    if (accelerator == "cuda") if source is None else bool(variant.cuda):
        # nvcc needs no GPU to compile for these architectures; the base family says where the toolkit lies.
        toolkit = variant.family.cuda_toolkit(variant.cuda or "", SCRATCH)
        if source is None:
            env["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(variant.cuda_archs or "")
        env["CUDA_HOME"] = toolkit.home
        if toolkit.host_compiler:
            # torch hands $CC to nvcc as its host compiler (-ccbin): the wrapper must call one nvcc accepts
            env["VLMBUILD_REAL_CXX"] = toolkit.host_compiler
    env.update({"CC": f"{build_files}/portable-cxx", "CXX": f"{build_files}/portable-cxx",
                "VLMBUILD_MARCH": how.march, "VLMBUILD_SIMD": how.simd})
    if source is None:
        # the parallel build of the ops (build_ext.cfg)
        env.update({"DIST_EXTRA_CONFIG": f"{build_files}/build_ext.cfg", "MAX_JOBS": "4"})
    # the wheel's zip entries carry this time, not the build's; its METADATA lists extras from a set, in the order
    # of the string hashes (PYTHONHASHSEED fixes it)
    env.update({"SOURCE_DATE_EPOCH": str(BUILD_EPOCH), "PYTHONHASHSEED": "0"})
    if source is not None:
        env.update(source.env)
    return env


def shell_env(env: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def deepspeed_builds(variant: Variant, lock: Lockfile, torch_layer: tuple[LayerFile, set[str]]) -> list[WheelBuild]:
    """How DeepSpeed is built: on the lock layer that holds torch, with the spec's build requirements (as locked)
    installed beside it, and nothing else of the lock; once for the variant's accelerator and, in a CUDA image,
    once more for the CPU accelerator (its ops served to the CPU pass without compiling)."""
    req = lock.get("deepspeed")
    if req is None or req.url is not None:
        raise VlmbuildError(f"{variant.lockfile_path}: deepspeed must be locked from the index (name==version with "
                            "its sdist hash) to be built with its ops")
    layer, in_torch_layer = torch_layer
    how = variant.image.deepspeed_build
    missing = [name for name in how.requires if lock.get(name) is None]
    if missing:
        raise VlmbuildError(f"{variant.lockfile_path}: deepspeed_build.requires names {', '.join(missing)}, which the "
                            f"lockfile does not hold (add it to the spec's packages and run `vlmbuild lock`)")
    requirements = tuple(lock.require(name) for name in how.requires if name not in in_torch_layer)
    return [WheelBuild("deepspeed", req.version, f"deepspeed-wheel-{accelerator}" if target else "deepspeed-wheel",
                       "lock/sdist-deepspeed.txt", shell_env(wheel_build_env(variant, BUILD_FILES_MOUNT, accelerator)),
                       layer.stage, layer.file, "lock/deepspeed-build.txt", requirements, accelerator,
                       tuple(sorted(how.ops.get(accelerator, {}))), target or "")
            for accelerator, target in deepspeed_targets(variant)]


def deepspeed_ops(variant: Variant) -> list[contract.DeepSpeedBuildInfo]:
    """What variant.json says of the image's DeepSpeed builds: accelerator, ops, and where the image holds it
    (None: the venv's own)."""
    ops = variant.image.deepspeed_build.ops
    return [contract.DeepSpeedBuildInfo(accelerator=accelerator, path=target, ops=sorted(ops.get(accelerator, {})))
            for accelerator, target in deepspeed_targets(variant)]


def torch_layer_of(variant: Variant, chain) -> tuple[LayerFile, set[str]]:
    """The lock layer installed in place that holds torch (what wheels are built against), and its packages."""
    found = next(((layer, {r.name for r in reqs}) for layer, reqs in chain if any(r.name == "torch" for r in reqs)),
                 None)
    if found is None:
        raise VlmbuildError(f"{variant.lockfile_path}: torch is not locked, and DeepSpeed and every source build are "
                            "built against it: run `vlmbuild lock`")
    return found


def source_builds(variant: Variant, lock: Lockfile, torch_layer: tuple[LayerFile, set[str]]) -> list[WheelBuild]:
    """The source builds this build makes (the spec's, less --leave-out): each on the torch layer with its build
    requirements (as locked) beside it, from the sdist the lockfile pins."""
    layer, in_torch_layer = torch_layer
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
        builds.append(WheelBuild(name, req.version, source_stage(name), f"lock/sdist-{name}.txt",
                                 shell_env(wheel_build_env(variant, BUILD_FILES_MOUNT, source=how)),
                                 layer.stage, layer.file, f"lock/{name}-build.txt",
                                 tuple(lock.require(n) for n in how.build_requires if n not in in_torch_layer),
                                 why=how.why))
    return builds


def plan_layers(variant: Variant, lock: Lockfile):
    """The lock cut into layers installed in place (in order) and per-package layers (in order). Where each
    package may sit (torch in place, what is built from its sdist split) the spec checked on load."""
    chain: list[tuple[LayerFile, tuple[Requirement, ...]]] = []
    packages: list[tuple[PackageLayer, Requirement]] = []
    buckets: dict[str, list[Requirement]] = {layer.name: [] for layer in variant.image.layers}
    for req in lock.requirements:
        buckets[variant.image.layer_of(req.name).name].append(req)
    parent = "python-base"
    built = {"deepspeed": "deepspeed-wheel", **{name: source_stage(name) for name in variant.source_builds}}
    for layer in variant.image.layers:
        reqs = [r for r in buckets[layer.name] if r.name not in variant.leave_out]
        if not reqs:
            continue
        if layer.split:
            for req in split_order(layer, reqs, variant):
                packages.append((PackageLayer(req.name, req.version, f"pkg-{req.name}", f"lock/pkg-{req.name}.txt",
                                              built=built.get(req.name, "")), req))
            continue
        names = [r.name for r in reqs]
        summary = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        stage = f"layer-{layer.name}"
        chain.append((LayerFile(layer.name, f"lock/layer-{len(chain) + 1}-{layer.name}.txt", len(reqs), summary, stage,
                                parent), tuple(reqs)))
        parent = stage
    if not chain:
        raise VlmbuildError(f"{variant.image.path}: layers: no layer installed in place holds a package (torch?)")
    return tuple(chain), tuple(packages)
