"""The release side: evidence on a candidate that passed, the tag set moved as one unit, pushes.

Nothing here decides whether an image is good (vlmbuild.gate does); everything here refuses to publish what
lacks passing evidence, and never moves an immutable tag to different content, locally or in a registry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

from . import contract
from .engine_api import EngineAPI, SmokeRun
from .engine_setup import STATE
from .errors import CheckFailed, VlmbuildError
from .options import PushPolicy
from .progress import Progress
from .resolve import Resolved
from .signing import sign_and_attest
from .smoke import report as report_mod

# Labels a passing build adds to the tested candidate, beside the report file (the contract names them).
LABEL_IDENTITY = f"{contract.LABEL_PREFIX}.identity"
LABEL_BASE_ID = f"{contract.LABEL_PREFIX}.base.image-id"
LABEL_BASE_DIGEST = "org.opencontainers.image.base.digest"
LABEL_SBOM_SHA256 = f"{contract.LABEL_PREFIX}.sbom-sha256"
LABEL_PASSES = f"{contract.SMOKE_LABEL}.passes"


def pass_summary(run: SmokeRun) -> str:
    name = (run.report or {}).get("device_name") or "cpu"
    return f"{contract.pass_name(run.report, run.device)} ({name})"


def evidence_report(runs: list[SmokeRun]) -> bytes:
    """The report file: every smoke pass of this build, refused unless together they pass."""
    payload = report_mod.combine([r.report for r in runs if r.report is not None])
    if not payload["passed"]:
        # The labels state what the report says; a report that did not pass gets no labels to vouch for it.
        raise CheckFailed("the smoke reports did not pass: no evidence is made for them, nothing is tagged")
    return report_mod.dumps(payload).encode()


def evidence(resolved: Resolved, runs: list[SmokeRun], report_bytes: bytes,
             sbom: bytes | None) -> tuple[dict[str, bytes], dict[str, str]]:
    """The report file and the labels that vouch for it."""
    primary = runs[0]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    reports = [r.report or {} for r in runs]
    device = primary.device
    labels = {
        contract.LABEL_RESULT: "passed",  # the payload's verdict: a failing one was refused above
        contract.LABEL_DEVICE: device,
        contract.LABEL_VALIDATED_ON: ("cpu-only (not a GPU validation)" if device == "cpu" else
                                      f"gpu: {(primary.report or {}).get('device_name') or 'unknown'}"),
        contract.LABEL_WORLD_SIZE: contract.world_size_label(reports),
        contract.LABEL_NODES: contract.nodes_label(reports),
        LABEL_PASSES: "; ".join(pass_summary(r) for r in runs),
        contract.LABEL_REPORT_PATH: contract.REPORT_PATH,
        contract.LABEL_REPORT_SHA256: hashlib.sha256(report_bytes).hexdigest(),
        contract.LABEL_CHECKS: json.dumps(contract.checks_label(reports), separators=(",", ":")),
        contract.LABEL_SECONDS: f"{sum(r.seconds for r in runs):.1f}",
        f"{contract.SMOKE_LABEL}.at": now,
        "org.opencontainers.image.created": now,
        LABEL_IDENTITY: resolved.identity,
        LABEL_BASE_ID: resolved.base.image_id,
    }
    if resolved.base.digest:
        labels[LABEL_BASE_DIGEST] = resolved.base.digest
    if sbom is not None:
        labels[LABEL_SBOM_SHA256] = hashlib.sha256(sbom).hexdigest()
    return {contract.REPORT_PATH: report_bytes}, labels


@contextmanager
def tag_lock(repository: str, variant: str) -> Iterator[None]:
    """Serialise the tagging of one variant on this host: two concurrent builds move its tags as a set, one after
    the other, so the tags always name the same image, and only a passed one."""
    locks = STATE / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{repository}-{variant}")
    with open(locks / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def move_tags(engine: EngineAPI, image_id: str, repository: str, tags: list[str]) -> list[str]:
    """Point ``tags`` at ``image_id`` as one unit: on any failure (Ctrl-C and SIGTERM included) every tag moved
    so far goes back where it was, or is removed if it named nothing before."""
    moved: list[str] = []
    before = {t: engine.image_id(f"{repository}:{t}") for t in tags}
    try:
        for tag in tags:
            engine.tag(image_id, repository, tag)
            moved.append(tag)
    except BaseException:
        for tag in moved:
            try:
                previous = before[tag]
                if previous is None:
                    engine.untag(repository, tag)
                else:
                    engine.tag(previous, repository, tag)
            except VlmbuildError:
                pass  # the engine is gone: nothing more can be put back
        raise
    return moved


def tags_naming(engine: EngineAPI, resolved: Resolved, image_id: str) -> list[str]:
    """The variant's tags that name ``image_id`` now."""
    return [t for t in resolved.tags if engine.image_id(f"{resolved.repository}:{t}") == image_id]


def evidence_problem(engine: EngineAPI, image: str, labels: dict[str, str]) -> str | None:
    """Why the image's evidence does not hold, or None: its result label says passed, the report file inside hashes
    to the label that vouches for it, and that report passes the contract's pass test. Labels alone are not
    evidence: a report edited after tagging (or a label edited alone) fails here."""
    if labels.get(contract.LABEL_RESULT) != "passed":
        return "its result label does not say passed"
    path = labels.get(contract.LABEL_REPORT_PATH) or contract.REPORT_PATH
    data = engine.read_image_file(image, path)
    if data is None:
        return f"it has no smoke report at {path}"
    if hashlib.sha256(data).hexdigest() != labels.get(contract.LABEL_REPORT_SHA256):
        return f"its smoke report {path} does not hash to the label that vouches for it (edited after tagging?)"
    try:
        report = json.loads(data)
    except ValueError:
        return f"its smoke report {path} is not JSON"
    if not contract.evidence_passed(report):
        return f"its smoke report {path} does not pass the contract's pass test"
    return None


def validated_image(engine: EngineAPI, resolved: Resolved) -> str | None:
    """The image the immutable tag names, when it carries passing evidence of exactly this identity."""
    image_id = engine.image_id(f"{resolved.repository}:{resolved.immutable_tag}")
    if image_id is None:
        return None
    labels = engine.labels(image_id)
    if labels.get(LABEL_IDENTITY) != resolved.identity or evidence_problem(engine, image_id, labels):
        return None
    return image_id


def publish(engine: EngineAPI, resolved: Resolved, final: str) -> tuple[str, list[str], bool]:
    """Tag ``final`` with the variant's tag set, unless the immutable tag is taken: (image the tags name, tags that
    name it, whether ``final`` was tagged). An immutable tag never moves: when it already names a validated image
    of the same inputs (a --rebuild, or a concurrent build that tagged first) no tag moves at all and ``final``
    is dropped; when it names anything else, that is an error."""
    with tag_lock(resolved.repository, resolved.variant.name):
        taken = engine.image_id(f"{resolved.repository}:{resolved.immutable_tag}")
        if taken is None or taken == final:
            return final, move_tags(engine, final, resolved.repository, resolved.tags), True
        if validated_image(engine, resolved) != taken:
            raise CheckFailed(f"{resolved.repository}:{resolved.immutable_tag} already names {taken[:19]}, which is "
                              "not a validated image of these inputs; an immutable tag is never moved: nothing was "
                              "tagged")
        return taken, tags_naming(engine, resolved, taken), False


class PushFailed(VlmbuildError):
    """A push refused or failed (its exit code is the cause's); ``outcome``: the build it followed, when one did."""

    def __init__(self, error: VlmbuildError, outcome=None) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code
        self.outcome = outcome


def release_candidate(engine: EngineAPI, resolved: Resolved, candidate: str,
                      runs: list[SmokeRun]) -> tuple[str, str, list[str], bool]:
    """The tested candidate with its evidence added (the report and its labels, one layer) and the tag set moved
    to it: (the image with the evidence, the image the tags name, the tags, whether they moved)."""
    report_bytes = evidence_report(runs)  # before the engine is asked anything: a failing report stops here
    sbom = engine.read_image_file(candidate, contract.SBOM_PATH)
    files, labels = evidence(resolved, runs, report_bytes, sbom)
    final = engine.add_evidence(candidate, files, labels)
    image_id, tags, tagged = publish(engine, resolved, final)
    return final, image_id, tags, tagged


def push_tags(engine: EngineAPI, resolved: Resolved, tags: list[str], policy: PushPolicy,
              progress: Progress | None = None) -> dict[str, str]:
    """push_tags_or_fail, with every refusal a PushFailed."""
    own = progress is None
    progress = progress or Progress(f"push {resolved.variant.image.name}/{resolved.variant.name}")
    try:
        return push_tags_or_fail(engine, resolved, tags, policy, progress)
    except VlmbuildError as exc:
        raise PushFailed(exc) from None
    finally:
        if own:
            progress.close()


def push_tags_or_fail(engine: EngineAPI, resolved: Resolved, tags: list[str], policy: PushPolicy,
                      progress: Progress) -> dict[str, str]:
    """Push tags whose image passed the smoke, each digest printed. Every tag is checked before any is pushed, so a
    refusal leaves the registry as it was. An immutable tag the registry already serves with other content is
    never overwritten: that is an error, and nothing of it is pushed."""
    repository = resolved.repository
    already: dict[str, str] = {}
    for tag in tags:
        ref = f"{repository}:{tag}"
        image_id = engine.image_id(ref)
        if image_id is None:
            raise VlmbuildError(f"{ref}: no such local image; build it first (`vlmbuild build`)")
        labels = engine.labels(ref)
        problem = evidence_problem(engine, image_id, labels)
        if problem:
            raise CheckFailed(f"{ref}: carries no passing smoke evidence ({problem}); refusing to push")
        if labels.get(contract.LABEL_LOCK_SHA256) != resolved.lock.sha256:
            raise CheckFailed(f"{ref}: was built from another lockfile than the current one; rebuild before pushing")
        if labels.get(contract.LABEL_DEVICE) != "gpu" and not policy.allow_cpu:
            raise CheckFailed(f"{ref}: its smoke ran on CPU only; pushing it needs --allow-cpu-evidence")
        if labels.get(contract.LABEL_LEFT_OUT) and not policy.allow_left_out:
            left_out = ", ".join(json.loads(labels[contract.LABEL_LEFT_OUT]))
            raise CheckFailed(f"{ref}: goes without {left_out}, which its spec names (label {contract.LABEL_LEFT_OUT}); "
                              "pushing it needs --allow-left-out")
        if tag == resolved.immutable_tag:
            remote = engine.remote_digest(repository, tag)
            local = engine.local_repo_digest(image_id, repository)
            if remote is not None and remote != local:
                raise CheckFailed(f"{ref}: the registry already serves this immutable tag as {remote}, other "
                                  "content than this image; an immutable tag is never overwritten")
            if remote is not None:
                already[tag] = remote
    # The immutable tag first: it names these bytes forever and never moves. Its digest is signed and attested
    # before any other tag is pushed, so a moving tag (latest, the variant's) never names an unsigned image; a
    # signing failure stops here (exit 1) with only the immutable tag in the registry, and a retry signs it.
    ordered = sorted(tags, key=lambda t: t != resolved.immutable_tag)
    digests: dict[str, str] = {}
    for tag in ordered:
        ref = f"{repository}:{tag}"
        if tag in already:
            digests[tag] = already[tag]
            progress.say(f"already in the registry: {ref} {already[tag]}")
        else:
            digests[tag] = engine.push(repository, tag, progress)
            progress.say(f"pushed {ref} {digests[tag]}")
        if tag == ordered[0] and policy.signer is not None:  # the immutable tag, whenever it is pushed
            image_id = engine.image_id(ref)
            if image_id is None:
                raise CheckFailed(f"{ref}: just pushed, but not in this engine any more; refusing to move its tags")
            files = engine.read_image_files(image_id, [contract.REPORT_PATH, contract.SBOM_PATH])
            report, sbom = files[contract.REPORT_PATH], files[contract.SBOM_PATH]
            if not sbom:
                raise CheckFailed(f"{ref}: has no SBOM at {contract.SBOM_PATH} to attest; refusing to move its tags")
            if not report:
                raise CheckFailed(f"{ref}: has no smoke report at {contract.REPORT_PATH} to attest; refusing to move "
                                  "its tags")
            sign_and_attest(f"{repository}@{digests[tag]}", report, sbom, policy.signer, progress)
    return digests
