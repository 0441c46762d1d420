"""What the pipeline asks of a container engine, as types: the Protocol gate, release, resolve and inspect are
written against, the base a build starts from and one smoke run's result. vlmbuild.engine implements it with the
Docker SDK and BuildKit; the gate's unit tests hand in stand-ins of it.

Standing alone (no docker import) so that resolve sits below the engine, not beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import contract
from .engine_disk import EngineDisk
from .progress import Progress


@dataclass(frozen=True)
class Base:
    ref: str  # what FROM names
    image_id: str  # the engine's image id of it: what the build really starts from
    digest: str | None  # the registry digest the spec pins (sha256:...), None for a base made on this machine
    layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class SmokeLimits:
    """What a smoke container may take of its host: the smoke runs whatever code the image holds (an image pulled
    from elsewhere included), so a runaway or hostile one ends at these instead of taking the host's memory or
    process table (spec keys smoke.memory_gb, smoke.pids)."""

    memory_gb: float = contract.DEFAULT_SMOKE_MEMORY_GB
    pids: int = contract.DEFAULT_SMOKE_PIDS


@dataclass
class SmokeRun:
    exit_code: int | None  # None: killed at the timeout
    report: dict | None
    logs: str
    seconds: float
    timed_out: bool
    device: str = "cpu"
    limits: SmokeLimits = SmokeLimits()  # what the container was held to
    oom_killed: bool = False  # the kernel killed the container at its memory limit
    nodes: int = 1  # containers the smoke ran over (engine_nodes), one per node
    failed_node: int | None = None  # over several nodes: the first that ended badly (the others were stopped)
    node_exit: tuple[int | None, ...] = ()  # over several nodes: each node's exit status

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and contract.report_passed(self.report)


def split_ref(ref: str) -> tuple[str, str]:
    """repository and tag of ``registry/repo:tag`` (no tag: latest)."""
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return ref, "latest"
    return name, tag


class EngineAPI(Protocol):
    # images
    def image_id(self, ref: str) -> str | None: ...
    def image_size(self, ref: str) -> int: ...
    def labels(self, ref: str) -> dict[str, str]: ...
    def history(self, image: str) -> list[dict]: ...
    def read_image_file(self, image: str, path: str) -> bytes | None: ...
    def read_image_files(self, image: str, paths: list[str]) -> dict[str, bytes | None]: ...
    def run_in_image(self, image: str, command: list[str], timeout: int = 300) -> tuple[int, str]: ...
    def remove_image(self, image_id: str) -> None: ...

    # building on a checked base, with room for it
    def disk(self) -> EngineDisk: ...
    def resolve_base(self, ref: str, progress: Progress | None = None) -> Base: ...
    def build(self, context: Path, progress: Progress, nocache: bool = False, cache_from: tuple[str, ...] = (),
              inline_cache: bool = False, target: str | None = None) -> str: ...
    def check_built_on(self, image_id: str, base: Base) -> None: ...

    # the smoke and the evidence
    def gpu_available(self) -> bool: ...
    def run_smoke(self, image: str, device: str, timeout: int, progress: Progress, repeat: int = 1,
                  model_dir: Path | None = None, checks: str | None = None,
                  limits: SmokeLimits = SmokeLimits(), nodes: int = 1) -> SmokeRun: ...
    def add_evidence(self, image_id: str, files: dict[str, bytes], labels: dict[str, str]) -> str: ...

    # tags and the registry
    def tag(self, image_id: str, repository: str, tag: str) -> None: ...
    def untag(self, repository: str, tag: str) -> None: ...
    def push(self, repository: str, tag: str, progress: Progress) -> str: ...
    def remote_digest(self, repository: str, tag: str) -> str | None: ...
    def local_repo_digest(self, image_id: str, repository: str) -> str | None: ...
