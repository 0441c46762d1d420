"""A variant resolved once, into the one value a build carries from the freshness check to the last tag.

Two steps, with the engine's between them: ``check_inputs`` reads the lockfile once and refuses a stale one and a
rules violation, before anything touches Docker (a bad input costs no daemon, no debootstrap); the caller then has
the engine find the base image (made or pulled when missing, checked against its pin), and ``resolve`` renders the
build context and derives the image's identity from everything that decides its bytes: the lockfile, the base
image, the rendered context (Dockerfile, lock layers, build helpers, the smoke code that ships in the image). The
immutable tag is ``<variant tag>-<identity prefix>``: the same inputs give the same tag, different inputs another
one. Nothing here talks to the engine.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .checks import check_variant
from .engine_api import Base, EngineAPI
from .errors import CheckFailed
from .lock import LockStatus, read_fresh_lock
from .lockfile import Lockfile
from .plan import BuildPlan, make_plan
from .render import RenderResult, render
from .spec import Variant

IDENTITY_CHARS = 12
# Recorded in the image, but not part of what decides its bytes: a commit that changes nothing of the image
# must not make a new one.
VOLATILE_LABELS = ("org.opencontainers.image.revision",)


@dataclass(frozen=True)
class Resolved:
    plan: BuildPlan
    repository: str
    base: Base
    rendered: RenderResult
    identity: str
    warnings: tuple[str, ...] = ()

    @property
    def variant(self) -> Variant:
        return self.plan.variant

    @property
    def lock(self) -> Lockfile:
        return self.plan.lock

    @property
    def tag(self) -> str:
        return self.plan.tag

    @property
    def immutable_tag(self) -> str:
        return f"{self.tag}-{self.identity[:IDENTITY_CHARS]}"

    @property
    def tags(self) -> list[str]:
        """The tag set a passing build moves, as one unit: variant tag, immutable tag, latest (default only)."""
        tags = [self.tag, self.immutable_tag]
        if self.variant.is_default:
            tags.append("latest")
        return tags

    @property
    def context(self) -> Path:
        return self.rendered.context


def refuse_up_front(variant: Variant, lock: Lockfile, status: LockStatus, ignore_rules: bool) -> list[str]:
    """Exit 1 before any build (unless ignored): a rule the locked versions violate. Returns the warnings the
    rules raise."""
    verdict = check_variant(variant, None, lock, status)
    if verdict.errors and not ignore_rules:
        explained = "\n".join(v.explain(indent="    ") for v in verdict.errors)
        raise CheckFailed(f"{variant.image.name}/{variant.name} violates known-bad rules; not building "
                          f"(--ignore-rules builds it anyway, and the smoke will judge it):\n{explained}")
    return [v.explain(indent="    ") for v in verdict.violations if v.rule.severity == "warning"]


def context_digest(context: Path) -> str:
    """sha256 over every file of the context (path and bytes), the Dockerfile without its volatile labels."""
    h = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        rel = path.relative_to(context).as_posix()
        data = path.read_bytes()
        if rel == "Dockerfile":
            pattern = "|".join(re.escape(label) for label in VOLATILE_LABELS)
            data = re.sub(rf"^LABEL (?:{pattern})=.*\n".encode(), b"", data, flags=re.M)
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode() + b"\n")
    return h.hexdigest()


def identity(lock: Lockfile, base: Base, context: Path) -> str:
    h = hashlib.sha256()
    for part in ("vlmbuild-identity-1", lock.sha256, base.image_id, base.digest or "", context_digest(context)):
        h.update(part.encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class CheckedInputs:
    """A variant whose lockfile was read once, is fresh and passes the rules (or they were ignored), planned."""

    plan: BuildPlan
    warnings: tuple[str, ...]

    @property
    def variant(self) -> Variant:
        return self.plan.variant

    @property
    def base_ref(self) -> str:
        return self.plan.variant.base_image


def check_inputs(variant: Variant, ignore_rules: bool = False) -> CheckedInputs:
    """The first step, before any engine call: the lockfile read once, refused when stale or against the rules, and
    the build planned (a spec whose layers cannot hold the lock fails here, not after the base is made)."""
    lock, status = read_fresh_lock(variant)
    warnings = refuse_up_front(variant, lock, status, ignore_rules)
    return CheckedInputs(make_plan(variant, lock), tuple(warnings))


def resolve(inputs: CheckedInputs, base: Base, workdir: Path, repository: str | None = None) -> Resolved:
    """Everything a build needs, decided once, on the ``base`` the engine found (or made) and checked."""
    plan = inputs.plan
    rendered = render(plan, base.ref, Path(workdir) / "context")
    return Resolved(plan, repository or plan.variant.image.repository, base, rendered,
                    identity(plan.lock, base, rendered.context), inputs.warnings)


def resolve_for_tags(variant: Variant, engine: EngineAPI, base_override: str | None = None,
                     repository: str | None = None) -> Resolved:
    """Resolve in a temporary directory that is gone afterwards (for ``plan`` and ``push``)."""
    inputs = check_inputs(variant, ignore_rules=True)
    base = engine.resolve_base(base_override or inputs.base_ref)
    with tempfile.TemporaryDirectory(prefix="vlmbuild-resolve-") as tmp:
        return resolve(inputs, base, Path(tmp), repository)

