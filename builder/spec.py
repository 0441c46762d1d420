"""Image specs: images/<name>.yaml, validated on load.

A spec describes one image repository and its variants (the build matrix), as the values of vlmbuild.spec_model.
Every error names the file and the key path and says what was expected; nothing here raises anything but SpecError.
Everything a spec can be wrong about is refused here, layering included, so `vlmbuild check` and `lock` see it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import contract, repo_layout
from .bases import DEFAULT_FAMILY, FAMILIES, LOCAL_BASE_PREFIX, split_digest
from .engine_api import SmokeLimits
from .errors import SpecError, VlmbuildError
from .rules import KNOWN_CONDITIONS
from .spec_checker import SpecChecker, tag_fields
from .spec_model import (  # noqa: F401 - the model is imported from here by the rest of vlmbuild
    ACCELERATORS,
    BUILD_VAR_RE,
    CUDA_ARCHS_RE,
    CUDA_RE,
    DEFAULT_BUILD_DISK_GB,
    DEFAULT_DEEPSPEED_BUILD,
    DEFAULT_DEEPSPEED_REQUIRES,
    DEFAULT_SMOKE_DEVICE,
    DEFAULT_SMOKE_REPEAT,
    DEFAULT_SMOKE_TIMEOUT,
    DEVICES,
    ENV_NAME_RE,
    EXPECTS,
    GROUP_KEYS,
    MARCH_RE,
    MODULE_RE,
    NAME_OF_PACKAGE_RE,
    NAME_RE,
    PLATFORM_RE,
    PYTHON_RE,
    REPOSITORY_RE,
    REQUIRED_DEFAULTS,
    REQUIRED_TOP,
    SCHEMA,
    SHA256_RE,
    SIMD_LEVELS,
    SOURCE_BUILD_KEYS,
    TAG_FIELDS_BUILTIN,
    TAG_RE,
    TOP_KEYS,
    VARIANT_KEYS,
    DeepSpeedBuildSpec,
    Group,
    ImageSpec,
    Layer,
    SourceBuild,
    SweepSpec,
    Variant,
    Wheel,
)


def load_spec(path: Path) -> ImageSpec:
    path = Path(path)
    data = _read_yaml(path)
    c = SpecChecker(path)
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
    device, timeout, repeat, limits, nodes = _load_smoke(c, data.get("smoke") or {})
    labels = c.mapping(data.get("labels") or {}, "labels")
    for k, v in labels.items():
        c.string(v, f"labels.{k}")
    groups = _load_groups(c, data.get("groups") or {})
    layers = _load_layers(c, data["layers"], groups)
    raw_build = data.get("deepspeed_build")
    deepspeed_build = _load_deepspeed_build(c, raw_build) if raw_build else DEFAULT_DEEPSPEED_BUILD
    defaults = c.mapping(data["defaults"], "defaults", allowed=VARIANT_KEYS - {"description", "expect"},
                         required=REQUIRED_DEFAULTS)
    sweep = _load_sweep(c, data.get("sweep") or {})
    image = ImageSpec(
        path=path, root=path.resolve().parent.parent, name=name, description=str(data.get("description") or ""),
        repository=repository, template=template, default_variant="", conditions=tuple(conditions),
        smoke_device=device, smoke_timeout=timeout, smoke_repeat=repeat, smoke_limits=limits, smoke_nodes=nodes,
        labels={str(k): str(v) for k, v in labels.items()},
        layers=layers, groups=groups, deepspeed_build=deepspeed_build, sweep=sweep,
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


def _check_layering(c: SpecChecker, image: ImageSpec) -> None:
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


def _load_smoke(c: SpecChecker, raw: Any) -> tuple[str, int, int, SmokeLimits, int]:
    """The smoke's device, timeout, repeat count, container limits and nodes; the one place their defaults live."""
    smoke = c.mapping(raw, "smoke", allowed={"device", "timeout", "repeat", "memory_gb", "pids", "nodes"})
    device = smoke.get("device", DEFAULT_SMOKE_DEVICE)
    if device not in DEVICES:
        raise c.fail("smoke.device", f"expected one of {DEVICES}, got {device!r}")
    timeout = smoke.get("timeout", DEFAULT_SMOKE_TIMEOUT)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise c.fail("smoke.timeout", f"expected a positive number of seconds, got {timeout!r}")
    repeat = smoke.get("repeat", DEFAULT_SMOKE_REPEAT)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= 20:
        raise c.fail("smoke.repeat", f"expected how many times the ZeRO-3 load runs, 1 to 20, got {repeat!r}")
    memory_gb = smoke.get("memory_gb", contract.DEFAULT_SMOKE_MEMORY_GB)
    if not isinstance(memory_gb, (int, float)) or isinstance(memory_gb, bool) or not 1 <= memory_gb <= 4096:
        raise c.fail("smoke.memory_gb", f"expected the smoke container's memory limit in GB, 1 to 4096, got "
                                        f"{memory_gb!r}")
    pids = smoke.get("pids", contract.DEFAULT_SMOKE_PIDS)
    if not isinstance(pids, int) or isinstance(pids, bool) or not 256 <= pids <= 1_000_000:
        raise c.fail("smoke.pids", f"expected the smoke container's process (task) limit, 256 or more, got {pids!r}")
    nodes = smoke.get("nodes", 1)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= 8:
        raise c.fail("smoke.nodes", f"expected how many nodes (containers) a further smoke pass spans, 1 to 8 (1: "
                                    f"none), got {nodes!r}")
    return device, timeout, repeat, SmokeLimits(float(memory_gb), pids), nodes


def _load_sweep(c: SpecChecker, raw: Any) -> SweepSpec:
    """`sweep:` {axes: {package: [versions]}, repeat, checks}; whether each package is in the variant swept is
    checked when a variant is chosen (`vlmbuild sweep`), each version against the index then too."""
    from .sweep_axes import parse_axis

    sweep = c.mapping(raw, "sweep", allowed={"axes", "repeat", "checks"})
    axes = c.mapping(sweep.get("axes") or {}, "sweep.axes")
    parsed = []
    for name, versions in axes.items():
        if not isinstance(versions, list) or not versions:
            raise c.fail(f"sweep.axes.{name}", f"expected a list of versions, got {versions!r}")
        try:
            parsed.append(parse_axis(f"{name}={','.join(str(v) for v in versions)}", "axis"))
        except VlmbuildError as exc:
            raise c.fail(f"sweep.axes.{name}", str(exc)) from None
    repeat = sweep.get("repeat", 1)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= 20:
        raise c.fail("sweep.repeat", f"expected how many times each cell's ZeRO-3 load runs, 1 to 20, got {repeat!r}")
    checks = sweep.get("checks")
    if checks is not None and not isinstance(checks, str):
        raise c.fail("sweep.checks", f"expected check names, comma-separated, got {checks!r}")
    return SweepSpec(tuple(parsed), repeat, checks)


def _load_layers(c: SpecChecker, raw_layers: Any, groups: dict[str, Group]) -> tuple[Layer, ...]:
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


def _load_deepspeed_build(c: SpecChecker, raw: Any) -> DeepSpeedBuildSpec:
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
    requires: tuple[str, ...] = DEFAULT_DEEPSPEED_REQUIRES
    if "requires" in raw:
        names = raw["requires"]
        if not isinstance(names, list) or not all(isinstance(n, str) and re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", n)
                                                  for n in names):
            raise c.fail("deepspeed_build.requires", f"expected a list of package names such as [setuptools, ninja], "
                                                     f"got {names!r}")
        requires = tuple(canonicalize_name(n) for n in names)
    return DeepSpeedBuildSpec(march, simd, ops, requires)


def _load_groups(c: SpecChecker, raw: Any) -> dict[str, Group]:
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
        groups[gname] = Group(gname, str(graw.get("description") or ""),
                              {n: s for n, s in packages.items() if s is not None},
                              c.modules(graw["imports"], f"{k}.imports"))
    return groups


def _load_variant(c: SpecChecker, image: ImageSpec, name: str, raw: Any, defaults: dict) -> Variant:
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


def _variant_base(c: SpecChecker, pick) -> tuple[str, str]:
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


def _variant_versions(c: SpecChecker, image: ImageSpec, k: str, pick) -> tuple[str, str | None, str | None]:
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


def _variant_packages(c: SpecChecker, image: ImageSpec, k: str, raw: Any,
                      defaults: dict) -> tuple[dict[str, str], dict[str, Wheel]]:
    """The stack, every group and the variant's overrides (``null`` drops a package); wheels beside them."""
    packages = {n: s for n, s in c.packages(defaults["packages"], "defaults.packages").items() if s is not None}
    for group in image.groups.values():
        for n, s in group.packages.items():
            if n in packages:
                raise c.fail(f"groups.{group.name}.packages.{n}", "is also in defaults.packages: a package belongs to "
                                                                  "the stack or to one group")
            packages[n] = s
    for n, override in c.packages(raw.get("packages") or {}, f"{k}.packages").items():
        if override is None:
            packages.pop(n, None)
        else:
            packages[n] = override
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


def _names(c: SpecChecker, value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(n, str) and NAME_OF_PACKAGE_RE.match(n) for n in value):
        raise c.fail(key, f"expected a list of package names such as [setuptools, ninja], got {value!r}")
    return tuple(canonicalize_name(n) for n in value)


def _variant_source_builds(c: SpecChecker, k: str, raw: Any, packages: dict[str, str]) -> dict[str, SourceBuild]:
    """Packages built from their locked sdist (vlmbuild.spec.SourceBuild): each one of the variant's packages,
    pinned with ==."""
    c.mapping(raw, f"{k}.source_builds")
    out: dict[str, SourceBuild] = {}
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


def _variant_tag(c: SpecChecker, tag: str, key: str, cuda: str | None, packages: dict, wheels: dict) -> str:
    known = set(TAG_FIELDS_BUILTIN) | set(packages) | set(wheels)
    for f in tag_fields(tag):
        if f not in known:
            raise c.fail(key, f"placeholder {{{f}}} is not one of {sorted(known)}")
    if "cuda" in tag_fields(tag) and cuda is None:
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
