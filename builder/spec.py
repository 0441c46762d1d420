"""Image specs: images/<name>.yaml, validated on load.

A spec describes one image repository and its variants (the build matrix). Every error names the file
and the key path and says what was expected; nothing here raises anything but SpecError.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import contract, repo_layout
from .bases import DEFAULT_FAMILY, FAMILIES, LOCAL_BASE_PREFIX, BaseFamily, split_digest
from .errors import SpecError
from .rules import KNOWN_CONDITIONS

SCHEMA = 1
TOP_KEYS = {"schema", "name", "description", "repository", "template", "default_variant", "recipe", "smoke",
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

    @property
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

    @property
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
    labels: dict[str, str]
    layers: tuple[Layer, ...]
    groups: dict[str, Group] = field(default_factory=dict)
    deepspeed_build: DeepSpeedBuildSpec = DEFAULT_DEEPSPEED_BUILD
    variants: dict[str, Variant] = field(default_factory=dict)

    @property
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


# ---------------------------------------------------------------- validation helpers


class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, message: str) -> SpecError:
        return SpecError(self.path, key, message)

    def mapping(self, value: Any, key: str, allowed: set[str] | None = None, required: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            unknown = sorted(set(map(str, value)) - allowed)
            if unknown:
                raise self.fail(f"{key}.{unknown[0]}" if key else unknown[0],
                                f"unknown key; allowed keys: {', '.join(sorted(allowed))}")
        for req in sorted(required):
            if req not in value:
                raise self.fail(f"{key}.{req}" if key else req, "missing (required)")
        return value

    def string(self, value: Any, key: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string{' (' + what + ')' if what else ''}, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(key, f"expected {what or 'a value matching ' + pattern.pattern}, got {value!r}")
        return value

    def modules(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(m, str) and MODULE_RE.match(m) for m in value):
            raise self.fail(key, f"expected a list of importable module names such as [math_verify, antlr4], got {value!r}")
        return tuple(value)

    def specifier(self, name: str, value: Any, key: str) -> str:
        if value is None or value == "":
            return ""
        if not isinstance(value, str):
            raise self.fail(key, f"expected a version specifier string such as '==2.6.0', got {value!r}")
        try:
            SpecifierSet(value)
            Requirement(f"{name}{value}")
        except (InvalidSpecifier, InvalidRequirement) as exc:
            raise self.fail(key, f"invalid version specifier {value!r}: {exc}") from None
        return value

    def packages(self, value: Any, key: str) -> dict[str, str | None]:
        self.mapping(value, key)
        out: dict[str, str | None] = {}
        for name, spec in value.items():
            if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
                raise self.fail(f"{key}.{name}", "expected a package name")
            # null in a variant removes a package inherited from defaults
            out[canonicalize_name(name)] = None if spec is None else self.specifier(name, spec, f"{key}.{name}")
        return out

    def wheels(self, value: Any, key: str) -> dict[str, Wheel]:
        self.mapping(value, key)
        out = {}
        for name, raw in value.items():
            k = f"{key}.{name}"
            self.mapping(raw, k, allowed={"url", "sha256", "left_out"}, required={"url", "sha256"})
            url = self.string(raw["url"], f"{k}.url", re.compile(r"^(https|file)://\S+\.whl$"),
                              "an https:// (or file://) URL of a .whl file")
            left_out = raw.get("left_out")
            if raw["sha256"] is None:
                if not left_out:
                    raise self.fail(f"{k}.sha256", "is null: a wheel without its sha256 cannot be installed; say why "
                                                   "the build goes without it in left_out, or give the sha256")
                left_out = self.string(left_out, f"{k}.left_out", what="the reason, in words")
                sha = None
            else:
                if left_out is not None:
                    raise self.fail(f"{k}.left_out", "a wheel with a sha256 is installed: left_out goes with sha256: null")
                sha = self.string(raw["sha256"], f"{k}.sha256", SHA256_RE, "64 lowercase hex digits")
            from .lockfile import LockfileError, version_from_url

            try:
                version_from_url(url)
            except LockfileError as exc:
                raise self.fail(f"{k}.url", str(exc)) from None
            out[canonicalize_name(name)] = Wheel(canonicalize_name(name), url, sha, left_out)
        return out


def _tag_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def load_spec(path: Path) -> ImageSpec:
    path = Path(path)
    data = _read_yaml(path)
    c = _Checker(path)
    c.mapping(data, "", allowed=TOP_KEYS, required=REQUIRED_TOP)
    if data["schema"] != SCHEMA:
        raise c.fail("schema", f"expected {SCHEMA}, got {data['schema']!r}")
    name = c.string(data["name"], "name", NAME_RE, "a lowercase name ([a-z0-9._-])")
    repository = c.string(data["repository"], "repository", REPOSITORY_RE, "an image repository such as ghcr.io/org/name")
    template_name = c.string(data["template"], "template")
    template = path.resolve().parent / "templates" / template_name
    if not template.is_file():
        raise c.fail("template", f"template {template_name!r} not found (looked for {template})")
    recipe = c.mapping(data.get("recipe") or {}, "recipe", allowed={"conditions"})
    conditions = recipe.get("conditions") or []
    if not isinstance(conditions, list) or not set(conditions) <= KNOWN_CONDITIONS:
        raise c.fail("recipe.conditions", f"expected a list drawn from {sorted(KNOWN_CONDITIONS)}, got {conditions!r}")
    device, timeout, repeat = _load_smoke(c, data.get("smoke") or {})
    labels = c.mapping(data.get("labels") or {}, "labels")
    for k, v in labels.items():
        c.string(v, f"labels.{k}")
    groups = _load_groups(c, data.get("groups") or {})
    layers = _load_layers(c, data["layers"], groups)
    raw_build = data.get("deepspeed_build")
    deepspeed_build = _load_deepspeed_build(c, raw_build) if raw_build else DEFAULT_DEEPSPEED_BUILD
    defaults = c.mapping(data["defaults"], "defaults", allowed=VARIANT_KEYS - {"description", "expect"},
                         required=REQUIRED_DEFAULTS)
    image = ImageSpec(
        path=path, root=path.resolve().parent.parent, name=name, description=str(data.get("description") or ""),
        repository=repository, template=template, default_variant="", conditions=tuple(conditions),
        smoke_device=device, smoke_timeout=timeout, smoke_repeat=repeat, labels={str(k): str(v) for k, v in labels.items()},
        layers=layers, groups=groups, deepspeed_build=deepspeed_build,
    )
    raw_variants = c.mapping(data["variants"], "variants")
    if not raw_variants:
        raise c.fail("variants", "expected at least one variant")
    for vname, raw in raw_variants.items():
        image.variants[str(vname)] = _load_variant(c, image, str(vname), raw or {}, defaults)
    default_variant = c.string(data["default_variant"], "default_variant")
    if default_variant not in image.variants:
        raise c.fail("default_variant", f"names no variant; variants are {sorted(image.variants)}")
    if image.variants[default_variant].expected_rejected:
        raise c.fail("default_variant", f"{default_variant!r} is marked 'expect: rejected' and cannot be the default")
    image.default_variant = default_variant
    _check_layering(c, image)
    return image


def _check_layering(c: _Checker, image: ImageSpec) -> None:
    """What the build's shape needs of the layers, on load (so `vlmbuild check` and `lock` see it, not only a
    render): torch in a layer installed in place (every wheel is compiled against it), DeepSpeed and each package a
    variant builds from its sdist in a split layer (each is built in a stage of its own)."""
    if image.layer_of("torch").split:
        raise c.fail("layers", "torch must be in a layer installed in place (DeepSpeed and every source build are "
                     "built against it)")
    if not image.layer_of("deepspeed").split:
        raise c.fail("layers", "deepspeed must sit in a split layer (it is built from its sdist with its ops in a "
                     "stage of its own)")
    for variant in image.variants.values():
        for name in variant.source_builds:
            layer = image.layer_of(name)
            if not layer.split:
                raise c.fail(f"variants.{variant.name}.source_builds.{name}",
                             f"{name} is built from its sdist in a stage of its own and must sit in a split layer, "
                             f"not in {layer.name!r}")


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(path, "", f"cannot read spec: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(path, "", f"not valid YAML: {exc}") from None


def _load_smoke(c: _Checker, raw: Any) -> tuple[str, int, int]:
    """The smoke's device, timeout and repeat count; the one place their defaults live."""
    smoke = c.mapping(raw, "smoke", allowed={"device", "timeout", "repeat"})
    device = smoke.get("device", DEFAULT_SMOKE_DEVICE)
    if device not in DEVICES:
        raise c.fail("smoke.device", f"expected one of {DEVICES}, got {device!r}")
    timeout = smoke.get("timeout", DEFAULT_SMOKE_TIMEOUT)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise c.fail("smoke.timeout", f"expected a positive number of seconds, got {timeout!r}")
    repeat = smoke.get("repeat", DEFAULT_SMOKE_REPEAT)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= 20:
        raise c.fail("smoke.repeat", f"expected how many times the ZeRO-3 load runs, 1 to 20, got {repeat!r}")
    return device, timeout, repeat


def _load_layers(c: _Checker, raw_layers: Any, groups: dict[str, Group]) -> tuple[Layer, ...]:
    if not isinstance(raw_layers, list) or not raw_layers:
        raise c.fail("layers", "expected a non-empty list of {name, match} or {name, rest: true}")
    layers: list[Layer] = []
    for i, raw in enumerate(raw_layers):
        k = f"layers[{i}]"
        c.mapping(raw, k, allowed={"name", "match", "rest", "group", "split"}, required={"name"})
        lname = c.string(raw["name"], f"{k}.name", NAME_RE, "a lowercase name")
        match = raw.get("match") or []
        if not isinstance(match, list) or not all(isinstance(m, str) and m for m in match):
            raise c.fail(f"{k}.match", "expected a list of package names or glob patterns")
        rest = raw.get("rest", False)
        if not isinstance(rest, bool):
            raise c.fail(f"{k}.rest", f"expected true or false, got {rest!r}")
        group = raw.get("group")
        if group is not None and group not in groups:
            raise c.fail(f"{k}.group", f"names no group; groups are {sorted(groups)}")
        split = raw.get("split", False)
        if not isinstance(split, bool):
            raise c.fail(f"{k}.split", f"expected true or false, got {split!r}")
        if split and rest:
            raise c.fail(f"{k}.split", "the 'rest' layer cannot be split (it holds whatever no pattern names)")
        if not split and layers and layers[-1].split:
            raise c.fail(f"{k}", "a layer installed in place cannot come after a split layer: put split layers last")
        layers.append(Layer(lname, tuple(canonicalize_name(m) if "*" not in m else m for m in match), rest, group,
                            split))
    if sum(layer.rest for layer in layers) != 1:
        raise c.fail("layers", "exactly one layer must have 'rest: true' (it takes every package no pattern names)")
    if len({layer.name for layer in layers}) != len(layers):
        raise c.fail("layers", "layer names must be unique")
    return tuple(layers)


def _load_deepspeed_build(c: _Checker, raw: Any) -> DeepSpeedBuildSpec:
    c.mapping(raw, "deepspeed_build", allowed={"march", "simd", "ops", "requires"}, required={"march", "simd", "ops"})
    march = c.string(raw["march"], "deepspeed_build.march", MARCH_RE, "a gcc -march value such as x86-64-v3")
    simd = raw["simd"]
    if simd not in SIMD_LEVELS:
        raise c.fail("deepspeed_build.simd", f"expected one of {SIMD_LEVELS}, got {simd!r}")
    c.mapping(raw["ops"], "deepspeed_build.ops", allowed=set(ACCELERATORS))
    ops: dict[str, dict[str, str]] = {}
    for accelerator, by_name in raw["ops"].items():
        k = f"deepspeed_build.ops.{accelerator}"
        c.mapping(by_name, k)
        for op, var in by_name.items():
            if not isinstance(op, str) or not re.match(r"^[a-z0-9_]+$", op):
                raise c.fail(f"{k}.{op}", "expected a DeepSpeed op name such as cpu_adam")
            c.string(var, f"{k}.{op}", BUILD_VAR_RE, "the DS_BUILD_* variable that compiles it, e.g. DS_BUILD_CPU_ADAM")
        ops[accelerator] = dict(by_name)
    requires = DEFAULT_DEEPSPEED_REQUIRES
    if "requires" in raw:
        names = raw["requires"]
        if not isinstance(names, list) or not all(isinstance(n, str) and re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", n)
                                                  for n in names):
            raise c.fail("deepspeed_build.requires", f"expected a list of package names such as [setuptools, ninja], "
                                                     f"got {names!r}")
        requires = tuple(canonicalize_name(n) for n in names)
    return DeepSpeedBuildSpec(march, simd, ops, requires)


def _load_groups(c: _Checker, raw: Any) -> dict[str, Group]:
    c.mapping(raw, "groups")
    groups = {}
    for gname, graw in raw.items():
        k = f"groups.{gname}"
        if not isinstance(gname, str) or not NAME_RE.match(gname):
            raise c.fail(k, "expected a lowercase group name ([a-z0-9._-])")
        c.mapping(graw, k, allowed=GROUP_KEYS, required={"packages", "imports"})
        packages = c.packages(graw["packages"], f"{k}.packages")
        if not packages or any(spec is None for spec in packages.values()):
            raise c.fail(f"{k}.packages", "expected a non-empty mapping of package name to specifier ('' for any)")
        groups[gname] = Group(gname, str(graw.get("description") or ""), dict(packages),
                              c.modules(graw["imports"], f"{k}.imports"))
    return groups


def _load_variant(c: _Checker, image: ImageSpec, name: str, raw: Any, defaults: dict) -> Variant:
    k = f"variants.{name}"
    if not NAME_RE.match(name):
        raise c.fail(k, "expected a lowercase variant name ([a-z0-9._-])")
    c.mapping(raw, k, allowed=VARIANT_KEYS)

    def pick(key: str) -> tuple[Any, str]:
        if key in raw:
            return raw[key], f"{k}.{key}"
        return defaults.get(key), f"defaults.{key}"

    expect = raw.get("expect", "pass")
    if expect not in EXPECTS:
        raise c.fail(f"{k}.expect", f"expected one of {EXPECTS}, got {expect!r}")
    base_image, base_family = _variant_base(c, pick)
    python, cuda, cuda_archs = _variant_versions(c, image, k, pick)
    platform, key = pick("platform")
    platform = c.string(platform, key, PLATFORM_RE, "a target such as x86_64-manylinux_2_28")
    packages, wheels = _variant_packages(c, image, k, raw, defaults)
    source_builds = _variant_source_builds(c, k, raw.get("source_builds") or {}, packages)
    tag, key = pick("tag")
    tag = _variant_tag(c, c.string(tag, key, what="a tag template"), key, cuda, packages, wheels)
    raw_imports, key = pick("imports")
    imports = c.modules(raw_imports or [], key)
    for group in image.groups.values():
        imports += tuple(m for m in group.imports if m not in imports)
    build_disk_gb, key = pick("build_disk_gb")
    build_disk_gb = DEFAULT_BUILD_DISK_GB if build_disk_gb is None else build_disk_gb
    if not isinstance(build_disk_gb, (int, float)) or isinstance(build_disk_gb, bool) or build_disk_gb <= 0:
        raise c.fail(key, f"expected the GB of free disk a cold build takes, a positive number, got {build_disk_gb!r}")

    return Variant(
        name=name, image=image, description=str(raw.get("description") or ""), expect=expect,
        base_image=base_image, python=python, cuda=cuda, platform=platform, tag_template=tag,
        packages=packages, wheels=wheels, imports=imports, cuda_archs=cuda_archs, base_family=base_family,
        source_builds=source_builds, build_disk_gb=float(build_disk_gb),
    )


def _variant_base(c: _Checker, pick) -> tuple[str, str]:
    """The base image (pinned by digest unless made on the build machine) and its family (vlmbuild.bases)."""
    base_image, key = pick("base_image")
    base_image = c.string(base_image, key, what="an image reference")
    _, digest = split_digest(base_image)
    if digest is None and not base_image.startswith(LOCAL_BASE_PREFIX):
        raise c.fail(key, f"{base_image!r} is not pinned: a base from a registry is named with its digest "
                          "(name:tag@sha256:...), so that a build starts from exactly the image it was tested on; "
                          f"only a base made on the build machine ({LOCAL_BASE_PREFIX}...) goes without one")
    family, key = pick("base_family")
    family = DEFAULT_FAMILY if family is None else family
    if family not in FAMILIES:
        raise c.fail(key, f"unknown base family {family!r}; known: {sorted(FAMILIES)} (vlmbuild/bases)")
    return base_image, family


def _variant_versions(c: _Checker, image: ImageSpec, k: str, pick) -> tuple[str, str | None, str | None]:
    """Python, CUDA (or None) and the GPU architectures its ops are compiled for."""
    python, key = pick("python")
    if isinstance(python, (int, float)) and not isinstance(python, bool):
        raise c.fail(key, f"expected a quoted Python version such as \"3.10\": YAML reads {python!r} as a number "
                          "(3.10 becomes 3.1)")
    python = c.string(python, key, PYTHON_RE, "a Python version such as '3.10'")
    cuda, key = pick("cuda")
    if isinstance(cuda, (int, float)) and not isinstance(cuda, bool):
        raise c.fail(key, f"expected a quoted CUDA version such as \"12.4\", or null: YAML reads {cuda!r} as a number")
    if cuda is not None:
        cuda = c.string(cuda, key, CUDA_RE, "a CUDA version such as '12.4', or null")
    cuda_archs, key = pick("cuda_archs")
    if cuda_archs is not None:
        cuda_archs = c.string(cuda_archs, key, CUDA_ARCHS_RE, "a TORCH_CUDA_ARCH_LIST such as '8.0;9.0'")
    if cuda is not None and image.deepspeed_build.ops.get("cuda") and cuda_archs is None:
        raise c.fail(f"{k}.cuda_archs", "a CUDA variant with DeepSpeed ops to compile must list the GPU architectures "
                                         "(TORCH_CUDA_ARCH_LIST) to compile them for")
    return python, cuda, cuda_archs


def _variant_packages(c: _Checker, image: ImageSpec, k: str, raw: Any,
                      defaults: dict) -> tuple[dict[str, str], dict[str, Wheel]]:
    """The stack, every group and the variant's overrides (``null`` drops a package); wheels beside them."""
    packages = {n: s for n, s in c.packages(defaults["packages"], "defaults.packages").items() if s is not None}
    for group in image.groups.values():
        for n, s in group.packages.items():
            if n in packages:
                raise c.fail(f"groups.{group.name}.packages.{n}", "is also in defaults.packages: a package belongs to "
                                                                  "the stack or to one group")
            packages[n] = s
    for n, s in c.packages(raw.get("packages") or {}, f"{k}.packages").items():
        if s is None:
            packages.pop(n, None)
        else:
            packages[n] = s
    wheels = dict(c.wheels(defaults.get("wheels") or {}, "defaults.wheels"))
    wheels.update(c.wheels(raw.get("wheels") or {}, f"{k}.wheels"))
    both = sorted(set(packages) & set(wheels))
    if both:
        raise c.fail(f"{k}.wheels.{both[0]}", "is also under packages: a package comes from the index or a wheel, not both")
    for required in ("torch", "transformers", "deepspeed"):
        if required not in packages and required not in wheels:
            raise c.fail(f"{k}.packages", f"the stack must pin {required!r}")
    for n, s in packages.items():
        if s.startswith("==") and "*" not in s:
            try:
                Version(s[2:])
            except InvalidVersion:
                raise c.fail(f"{k}.packages.{n}", f"{s!r} is not a valid version") from None
    return packages, wheels


def _names(c: _Checker, value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(n, str) and NAME_OF_PACKAGE_RE.match(n) for n in value):
        raise c.fail(key, f"expected a list of package names such as [setuptools, ninja], got {value!r}")
    return tuple(canonicalize_name(n) for n in value)


def _variant_source_builds(c: _Checker, k: str, raw: Any, packages: dict[str, str]) -> dict[str, SourceBuild]:
    """Packages built from their locked sdist (vlmbuild.spec.SourceBuild): each one of the variant's packages,
    pinned with ==."""
    c.mapping(raw, f"{k}.source_builds")
    out = {}
    for name, body in raw.items():
        key = f"{k}.source_builds.{name}"
        c.mapping(body, key, allowed=SOURCE_BUILD_KEYS, required={"why", "build_requires"})
        cname = canonicalize_name(str(name))
        pin = packages.get(cname, "")
        if not pin.startswith("==") or "*" in pin or "," in pin:
            raise c.fail(key, f"builds {name} from its sdist, so the variant's packages must pin it with == (the "
                              f"resolver is told its metadata for that version); packages has {pin or 'no pin'!r}")
        env = c.mapping(body.get("env") or {}, f"{key}.env")
        for var, value in env.items():
            if not isinstance(var, str) or not ENV_NAME_RE.match(var) or not isinstance(value, str):
                raise c.fail(f"{key}.env.{var}", f"expected NAME: \"value\" (a quoted string), got {value!r}")
        out[cname] = SourceBuild(cname, pin[2:], c.string(body["why"], f"{key}.why", what="why, in words"),
                                 _names(c, body["build_requires"], f"{key}.build_requires"), dict(env))
    return out


def _variant_tag(c: _Checker, tag: str, key: str, cuda: str | None, packages: dict, wheels: dict) -> str:
    known = set(TAG_FIELDS_BUILTIN) | set(packages) | set(wheels)
    for f in _tag_fields(tag):
        if f not in known:
            raise c.fail(key, f"placeholder {{{f}}} is not one of {sorted(known)}")
    if "cuda" in _tag_fields(tag) and cuda is None:
        raise c.fail(key, "uses {cuda} but this variant has cuda: null")
    return tag


def find_spec_path(image: str, root: Path) -> Path:
    """IMAGE is a spec name under images/ or a path to a spec file."""
    candidate = Path(image)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise SpecError(candidate, "", "no such spec file")
        return candidate
    path = repo_layout.spec_path(root, image)
    if not path.is_file():
        names = sorted(p.stem for p in repo_layout.spec_paths(root))
        raise SpecError(path, "", f"no image spec named {image!r}; known: {names}")
    return path


def all_spec_paths(root: Path) -> list[Path]:
    return repo_layout.spec_paths(root)
