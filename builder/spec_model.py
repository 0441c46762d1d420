"""What an image spec says, as values: the image, its layers and groups, its variants (vlmbuild.spec loads and
validates them from images/<name>.yaml; the keys and patterns it checks against are here, beside what they shape).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from packaging.utils import canonicalize_name

from . import contract, repo_layout
from .bases import DEFAULT_FAMILY, FAMILIES, BaseFamily
from .engine_api import SmokeLimits
from .errors import SpecError

SCHEMA = 1
TOP_KEYS = {"schema", "name", "description", "repository", "template", "default_variant", "recipe", "smoke", "sweep",
            "labels", "defaults", "groups", "layers", "deepspeed_build", "variants"}
REQUIRED_TOP = {"schema", "name", "repository", "template", "default_variant", "defaults", "layers", "variants"}
VARIANT_KEYS = {"description", "expect", "base_image", "base_family", "python", "cuda", "platform", "tag", "packages",
                "wheels", "imports", "cuda_archs", "source_builds", "build_disk_gb"}
SOURCE_BUILD_KEYS = {"why", "build_requires", "env"}
ENV_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
NAME_OF_PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ACCELERATORS = ("cpu", "cuda")
CUDA_ARCHS_RE = re.compile(r"^\d+\.\d+(\+PTX)?(;\d+\.\d+(\+PTX)?)*$")
BUILD_VAR_RE = re.compile(r"^DS_BUILD_[A-Z0-9_]+$")
MARCH_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
SIMD_LEVELS = ("AVX512", "AVX256", "SCALAR")
GROUP_KEYS = {"description", "packages", "imports"}
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
REQUIRED_DEFAULTS = {"base_image", "python", "platform", "tag", "packages"}
EXPECTS = ("pass", "rejected")
DEVICES = ("auto", "gpu", "cpu")
# The smoke's settings when the spec says nothing (the CLI's flags default to the spec's value, never to their own).
DEFAULT_SMOKE_DEVICE, DEFAULT_SMOKE_TIMEOUT, DEFAULT_SMOKE_REPEAT = "auto", contract.DEFAULT_SMOKE_TIMEOUT, 1
# A variant that says nothing of its disk: what a cold build of the `local` variant took at its peak here (14.1 GB:
# torch's CUDA wheels unpacked into /opt/venv, BuildKit's snapshot of each stage, uv's cache mount), rounded up;
# benchmarks/engine_disk.py measures it (benchmarks/results/engine-disk.txt).
DEFAULT_BUILD_DISK_GB = 15.0
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
PYTHON_RE = re.compile(r"^3\.\d{1,2}$")
CUDA_RE = re.compile(r"^\d{2}\.\d$")
PLATFORM_RE = re.compile(r"^(x86_64|aarch64)-manylinux_2_\d+$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
REPOSITORY_RE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:\d+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*$")
TAG_FIELDS_BUILTIN = ("cuda", "python", "variant")


@dataclass(frozen=True)
class DeepSpeedBuildSpec:
    """How DeepSpeed is built from its sdist: the ops compiled in per accelerator (op name as ds_report shows
    it -> the DS_BUILD_* variable), and the x86 level the CPU ops target instead of the build machine's own."""

    march: str
    simd: str
    ops: dict[str, dict[str, str]]
    # What the wheel is built against besides the torch layer, taken with their hashes from the lockfile:
    # nothing else, so a change in the libraries layer does not recompile the ops.
    requires: tuple[str, ...] = ()


# What DeepSpeed's setup.py imports besides torch (its op builders: setuptools, ninja, packaging, psutil,
# py-cpuinfo) and what `import torch` itself needs outside the torch layer.
DEFAULT_DEEPSPEED_REQUIRES = ("setuptools", "ninja", "packaging", "psutil", "py-cpuinfo", "numpy",
                              "typing-extensions", "filelock", "jinja2", "markupsafe", "fsspec")
# A spec without deepspeed_build: a portable x86 level, no op compiled in.
DEFAULT_DEEPSPEED_BUILD = DeepSpeedBuildSpec("x86-64-v3", "AVX256", {}, DEFAULT_DEEPSPEED_REQUIRES)


@dataclass(frozen=True)
class Wheel:
    """A package installed from a direct wheel URL (no index has it, e.g. flash-attn), checked by sha256."""

    name: str
    url: str
    sha256: str | None
    # why this build goes without it (no sha256 from two independent public records yet, say): not locked, not
    # installed, and named as left out by the labels, the smoke report and `vlmbuild inspect`
    left_out: str | None = None


@dataclass(frozen=True)
class SourceBuild:
    """A package built from the sdist the lockfile pins by sha256, where no index has a wheel that fits and no
    wheel's sha256 could be pinned (flash-attn for cp313 and torch 2.6): in a stage of its own on the lock layer
    that holds torch (and the CUDA toolkit), its wheel cached like DeepSpeed's, installed in a layer of its own.
    A build given ``--leave-out NAME`` goes without it (its CUDA kernels take hours on a 2-core machine), and its
    labels, report and `vlmbuild inspect` say so."""

    name: str
    version: str  # the == pin of the variant's packages
    why: str
    # what its setup.py imports to build, taken with their hashes from the lockfile, beside the torch layer
    build_requires: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # its own build switches (arch list, jobs)


@dataclass(frozen=True)
class SweepSpec:
    """The spec's `sweep:` section: the axes `vlmbuild sweep IMAGE` measures when given none, and how."""

    axes: tuple = ()  # of sweep_axes.Axis
    repeat: int = 1
    checks: str | None = None


@dataclass(frozen=True)
class Layer:
    """A group of locked packages installed together. ``split``: one image layer per package, each built in a
    stage of its own, so that bumping one re-ships that package alone."""

    name: str
    match: tuple[str, ...]
    rest: bool
    group: str | None = None
    split: bool = False


@dataclass(frozen=True)
class Group:
    """Packages installed beside the stack for a purpose (the recipe's run-time imports), with the modules the
    smoke's stack check imports to prove them usable."""

    name: str
    description: str
    packages: dict[str, str]
    imports: tuple[str, ...]


@dataclass
class Variant:
    name: str
    image: ImageSpec
    description: str
    expect: str
    base_image: str
    python: str
    cuda: str | None
    platform: str
    tag_template: str
    packages: dict[str, str]  # canonical name -> specifier ("" = any): the stack and every group
    wheels: dict[str, Wheel]
    imports: tuple[str, ...] = ()  # modules the stack check imports: the stack's, then each group's
    cuda_archs: str | None = None  # TORCH_CUDA_ARCH_LIST for the CUDA ops compiled into the image
    base_family: str = DEFAULT_FAMILY  # vlmbuild.bases: the distribution family of base_image
    source_builds: dict[str, SourceBuild] = field(default_factory=dict)
    # the source builds this build goes without (--leave-out): named as left out like a wheel without its sha256
    leave_out: frozenset[str] = frozenset()
    # the free disk a cold build takes on the engine's storage (layers, BuildKit's snapshots and cache mounts):
    # a build that finds less fails before it starts (vlmbuild.gate.check_room)
    build_disk_gb: float = DEFAULT_BUILD_DISK_GB

    @cached_property
    def family(self) -> BaseFamily:
        return FAMILIES[self.base_family]

    @property
    def accelerator(self) -> str:
        """The DeepSpeed accelerator the image's ops are compiled for."""
        return "cuda" if self.cuda else "cpu"

    @property
    def installed_wheels(self) -> dict[str, Wheel]:
        """The direct wheels the image holds: those the spec does not leave out."""
        return {n: w for n, w in self.wheels.items() if w.left_out is None}

    @property
    def left_out(self) -> dict[str, str]:
        """What the spec names but this variant's image goes without: package -> 'where from: why'."""
        out = {n: f"{w.url}: {w.left_out}" for n, w in self.wheels.items() if w.left_out is not None}
        for name in self.leave_out:
            build = self.source_builds[name]
            out[name] = (f"{name}=={build.version} from its sdist (sha256 in the lockfile), built from source because "
                         f"{build.why}: left out of this build (--leave-out {name}); the release runner builds it")
        return dict(sorted(out.items()))

    @property
    def built_from_source(self) -> dict[str, SourceBuild]:
        """The source builds this build makes: the spec's, less those left out."""
        return {n: b for n, b in self.source_builds.items() if n not in self.leave_out}

    @property
    def expected_rejected(self) -> bool:
        return self.expect == "rejected"

    @cached_property
    def lockfile_path(self) -> Path:
        return repo_layout.variant_lockfile(self.image.root, self.image.name, self.name)

    @property
    def is_default(self) -> bool:
        return self.name == self.image.default_variant

    def requirement_lines(self) -> list[str]:
        """The top-level requirements handed to the resolver (wheels are locked separately)."""
        return [f"{name}{spec}" for name, spec in sorted(self.packages.items())]

    def tag(self, versions: Mapping[str, str]) -> str:
        """The variant tag, from the versions really pinned (the lockfile), never from wishes."""
        values = {"cuda": self.cuda or "none", "python": self.python, "variant": self.name}
        values.update({k: v for k, v in versions.items()})
        try:
            tag = self.tag_template.format_map(values)
        except KeyError as exc:
            raise SpecError(self.image.path, f"variants.{self.name}.tag",
                            f"placeholder {exc} has no version: the lockfile does not pin it") from None
        if not TAG_RE.match(tag):
            raise SpecError(self.image.path, f"variants.{self.name}.tag", f"renders to {tag!r}, not a valid docker tag")
        return tag


@dataclass
class ImageSpec:
    path: Path
    root: Path
    name: str
    description: str
    repository: str
    template: Path
    default_variant: str
    conditions: tuple[str, ...]
    smoke_device: str
    smoke_timeout: int
    smoke_repeat: int
    smoke_limits: SmokeLimits
    smoke_nodes: int  # > 1: the gate's further smoke pass over that many nodes
    labels: dict[str, str]
    layers: tuple[Layer, ...]
    groups: dict[str, Group] = field(default_factory=dict)
    deepspeed_build: DeepSpeedBuildSpec = DEFAULT_DEEPSPEED_BUILD
    sweep: SweepSpec = SweepSpec()
    variants: dict[str, Variant] = field(default_factory=dict)

    @cached_property
    def build_tools_lockfile(self) -> Path:
        """The hash-locked build tools (uv, cyclonedx-py) every image of this repository builds with."""
        return repo_layout.build_tools_lockfile(self.root)

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            raise SpecError(self.path, "variants", f"no variant {name!r}; this spec has {sorted(self.variants)}")
        return self.variants[name]

    def layer_of(self, package: str) -> Layer:
        """The first layer whose patterns (or group) match the package; else the layer marked ``rest``."""
        for layer in self.layers:
            if self.position_in(layer, package) is not None:
                return layer
        return next(layer for layer in self.layers if layer.rest)

    def position_in(self, layer: Layer, package: str) -> int | None:
        """Where the layer names the package: the index of its first matching pattern (or of the package in the
        layer's group), None when it does not. The one place a package is matched to a layer: layer_of places
        it, and a split layer's packages are ordered by it."""
        from fnmatch import fnmatchcase

        cname = canonicalize_name(package)
        names = list(self.groups[layer.group].packages) if layer.group is not None else list(layer.match)
        return next((i for i, pattern in enumerate(names) if fnmatchcase(cname, pattern)), None)
