"""One build's settings, resolved once: the command line's flags, then the spec, then the defaults (the spec
loader holds the one default of each smoke setting). The pipeline reads this frozen value and nothing else."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from .build_cache import BuildCache
from .engine_api import SmokeLimits
from .errors import VlmbuildError
from .signing import Signer
from .smoke.model_dir import ModelDirProblem, validate_model_dir
from .spec import ImageSpec, Variant


@dataclass(frozen=True)
class PushPolicy:
    """What a push accepts beyond passing evidence of the current lockfile."""

    allow_cpu: bool = False  # evidence from a CPU-only smoke (no GPU proved the CUDA path)
    allow_left_out: bool = False  # an image that goes without something its spec names (io.vlmbuild.left-out)
    # who signs the pushed digest and attests its report and SBOM; None: unsigned (--unsigned, said out loud)
    signer: Signer | None = None


@dataclass(frozen=True)
class BuildOptions:
    smoke_device: str  # auto | gpu | cpu, as asked (the engine decides what auto means)
    smoke_timeout: int  # seconds before a smoke pass is killed
    smoke_repeat: int  # ZeRO-3 loads in fresh processes
    smoke_limits: SmokeLimits = SmokeLimits()  # what each smoke container may take (memory, tasks)
    smoke_nodes: int = 1  # > 1: a further smoke pass over that many nodes (containers), torchrun's rendezvous
    base_image: str | None = None  # None: the variant's
    repository: str | None = None  # None: the spec's
    push: bool = False
    push_policy: PushPolicy = PushPolicy()  # what a push accepts, and who signs it
    cache: BuildCache = BuildCache()  # images to reuse layers from, where to push this build's cache
    keep_failed: bool = False
    nocache: bool = False
    rebuild: bool = False
    ignore_rules: bool = False
    model_dir: Path | None = None  # a checked Qwen2.5-VL checkpoint, absolute
    disk_check: bool = True  # refuse to start a build the engine's free disk cannot hold (vlmbuild.gate.check_room)


def checked_model_dir(model_dir: Path | None) -> Path | None:
    if model_dir is None:
        return None
    try:
        validate_model_dir(Path(model_dir))
    except ModelDirProblem as exc:
        raise VlmbuildError(str(exc)) from None
    return Path(model_dir).absolute()


def build_options(spec: ImageSpec, smoke_device: str | None = None, smoke_timeout: int | None = None,
                  repeat: int | None = None, model_dir: Path | None = None, smoke_nodes: int | None = None,
                  **flags: object) -> BuildOptions:
    """The flags given (None: not given) over the spec's smoke settings."""
    return BuildOptions(smoke_device=smoke_device or spec.smoke_device, smoke_timeout=smoke_timeout or spec.smoke_timeout,
                        smoke_repeat=repeat or spec.smoke_repeat, smoke_limits=spec.smoke_limits,
                        smoke_nodes=smoke_nodes or spec.smoke_nodes,
                        model_dir=checked_model_dir(model_dir),
                        **flags)  # type: ignore[arg-type]


def leaving_out(variants: list[Variant], names: Iterable[str]) -> list[Variant]:
    """Each of ``variants`` built without those of the source builds ``names`` it has (--leave-out: a machine that
    cannot afford hours of nvcc). A name that is a source build of none of them is refused (exit 2), never
    ignored."""
    names = frozenset(canonicalize_name(n) for n in names)
    known = {n for v in variants for n in v.source_builds}
    unknown = sorted(names - known)
    if unknown:
        where = "; ".join(f"{v.image.name}/{v.name}: {', '.join(sorted(v.source_builds)) or 'none'}" for v in variants)
        raise VlmbuildError(f"--leave-out {unknown[0]}: no variant selected builds a package of that name from source "
                            f"(the specs' key variants.<name>.source_builds; {where})")
    return [dataclasses.replace(v, leave_out=names & set(v.source_builds)) if names & set(v.source_builds) else v
            for v in variants]
