"""A build cache that crosses machines: `vlmbuild build --cache-from REF --cache-to REF`.

Every hosted CI run and every fresh release runner is a cold build; BuildKit's own cache (and the cache mount that
keeps the DeepSpeed wheel) lives on one machine. What crosses is BuildKit's *inline* cache: a build with
``BUILDKIT_INLINE_CACHE=1`` writes the cache keys of its layers into the image's config, and a later build on any
machine given that image with ``--cache-from`` reuses every layer whose key matches, pulling it instead of running
its step. It is the only cache export Debian's 20.10 CLI has (registry and ``gha`` exports need buildx with a
docker-container builder), and it covers the final stage only (mode=min).

The final stage misses what matters most: the wheel stages (DeepSpeed's ops, minutes of compile) are bind-mounted
into the image's last step, not part of it, so a change of the smoke's code would compile them again. So each wheel
stage is built as an image of its own, with its inline cache, and pushed beside the image under
``REF-<stage>``: its key in that cache is BuildKit's key of the stage, every input of the wheel (the sdist's hash, the
locked torch layer, the build requirements, the ops and arch flags), so a second machine with ``--cache-from REF``
finds the wheel by that key and compiles nothing. The cache tags are caches, never releases: ``REF`` names the
candidate as built, before its smoke (a cache of layers is as good whether the smoke passed or not; nothing is
tagged or pushed as a release from it, and nothing is signed).

The engine pulls each cache image it lacks before the build and removes it after (Engine.pull_caches): dockerd
20.10's BuildKit, importing a cache straight from the registry, keeps the layers it took past every prune.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .engine_api import EngineAPI, split_ref
from .errors import VlmbuildError
from .progress import Progress


def stage_ref(ref: str, stage: str) -> str:
    """Where the cache of one wheel stage lives beside ``ref``."""
    repository, tag = split_ref(ref)
    return f"{repository}:{tag}-{stage}"


@dataclass(frozen=True)
class BuildCache:
    """Images to reuse layers from, and where to push this build's cache (None: nowhere)."""

    cache_from: tuple[str, ...] = ()
    cache_to: str | None = None

    def __post_init__(self) -> None:
        for ref in (*self.cache_from, *([self.cache_to] if self.cache_to else [])):
            if "@" in ref or not ref.strip():
                raise VlmbuildError(f"--cache-from/--cache-to {ref!r}: give a repository:tag (a cache moves; a digest "
                                    "cannot be pushed to)")

    def import_refs(self, wheel_stages: list[str]) -> tuple[str, ...]:
        """Every image BuildKit may take layers from: each ref, and beside it each wheel stage's cache."""
        return tuple(r for ref in self.cache_from for r in (ref, *(stage_ref(ref, s) for s in wheel_stages)))


def export(engine: EngineAPI, context: Path, cache: BuildCache, wheel_stages: list[str], candidate: str,
           progress: Progress) -> list[str]:
    """Push the candidate's inline cache to ``cache.cache_to`` and each wheel stage's beside it; the refs pushed.
    The wheel stages were just built: building them as targets runs nothing, it only makes their images."""
    assert cache.cache_to is not None
    pushed = []
    for stage in wheel_stages:
        image = engine.build(context, progress, cache_from=cache.import_refs(wheel_stages), inline_cache=True,
                             target=stage)
        pushed.append(tag_and_push(engine, image, stage_ref(cache.cache_to, stage), progress))
        engine.remove_image(image)  # a build stage: its layers stay in BuildKit's cache, no image of it stays here
    pushed.append(tag_and_push(engine, candidate, cache.cache_to, progress))
    return pushed


def tag_and_push(engine: EngineAPI, image: str, ref: str, progress: Progress) -> str:
    """Push ``image`` as ``ref``. The local tag stays: removing an image's only tag removes the image (the candidate,
    before its smoke); the gate removes a failed candidate with its tags."""
    repository, tag = split_ref(ref)
    engine.tag(image, repository, tag)
    digest = engine.push(repository, tag, progress)
    progress.say(f"build cache pushed: {ref} {digest}")
    return ref
