"""Build → smoke → tag (→ push): the one path from a spec variant to a released image.

1. Refuse up front (exit 1) a variant that violates a rule (unless ignore_rules) or whose lockfile is stale.
2. Render the context, build it: the candidate carries no tag of ours.
3. Run the smoke inside the candidate, in a container (GPU through device requests, CPU otherwise).
4. Pass: the candidate plus its evidence (report file and labels) is tagged: the variant tag, an immutable
   ``<tag>-<lock hash prefix>``, and ``latest`` for the default variant. Fail: nothing is tagged, no tag
   moves, the candidate is removed (unless keep_failed), exit 1 with the failing check explained.
5. Push only tags whose image says it passed; CPU evidence needs an explicit allow.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checks import check_variant
from .engine import Engine, SmokeRun
from .engine_setup import STATE
from .errors import CheckFailed, VlmbuildError
from .localbase import ensure_local_base, is_local_base
from .lock import require_fresh
from .progress import Progress
from .render import IMAGE_REPORT_PATH, LABEL_PREFIX, render
from .rules import load_rules
from .smoke import report as report_mod
from .spec import Variant

SMOKE_LABEL = f"{LABEL_PREFIX}.smoke"
IMMUTABLE_HASH_CHARS = 12


@dataclass
class BuildOptions:
    smoke_device: str = "auto"
    base_image: str | None = None
    push: bool = False
    keep_failed: bool = False
    smoke_timeout: int | None = None
    ignore_rules: bool = False
    repository: str | None = None
    allow_cpu_push: bool = False
    nocache: bool = False


@dataclass
class BuildOutcome:
    image: str
    variant: str
    passed: bool
    repository: str
    tags: list[str] = field(default_factory=list)
    image_id: str | None = None
    candidate_id: str | None = None
    smoke_device: str | None = None
    build_seconds: float = 0.0
    smoke_seconds: float = 0.0
    failing_checks: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    smoke_report: dict | None = None


def echo(message: str) -> None:
    print(message, flush=True)


def tags_for(variant: Variant, variant_tag: str, lock_sha256: str) -> list[str]:
    tags = [variant_tag, f"{variant_tag}-{lock_sha256[:IMMUTABLE_HASH_CHARS]}"]
    if variant.is_default:
        tags.append("latest")
    return tags


@contextmanager
def tag_lock(repository: str, variant: str) -> Iterator[None]:
    """Serialise the tagging of one variant: two concurrent builds move its tags as a set, one after the other,
    so the variant tag, the immutable tag and latest always name the same image, and only a passed one."""
    locks = STATE / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{repository}-{variant}")
    with open(locks / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def refuse_up_front(variant: Variant, options: BuildOptions) -> None:
    require_fresh(variant)
    if options.ignore_rules:
        return
    verdict = check_variant(variant, load_rules())
    if verdict.errors:
        explained = "\n".join(v.explain(indent="    ") for v in verdict.errors)
        raise CheckFailed(f"{variant.image.name}/{variant.name} violates known-bad rules; not building "
                          f"(--ignore-rules builds it anyway, and the smoke will judge it):\n{explained}")


def resolve_device(engine: Engine, requested: str) -> str:
    if requested == "auto":
        return "gpu" if engine.gpu_available() else "cpu"
    if requested == "gpu" and not engine.gpu_available():
        raise VlmbuildError("--smoke-device gpu, but this Docker engine has no NVIDIA runtime to give a GPU")
    return requested


def evidence_labels(run: SmokeRun, report_bytes: bytes, device: str) -> dict[str, str]:
    report = run.report or {}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    checks = {c["name"]: c["status"] for c in report.get("checks", [])}
    return {
        f"{SMOKE_LABEL}.result": "passed",
        f"{SMOKE_LABEL}.device": device,
        f"{SMOKE_LABEL}.validated-on": "cpu-only (not a GPU validation)" if device == "cpu" else
        f"gpu: {report.get('device_name') or 'unknown'}",
        f"{SMOKE_LABEL}.report-path": IMAGE_REPORT_PATH,
        f"{SMOKE_LABEL}.report-sha256": hashlib.sha256(report_bytes).hexdigest(),
        f"{SMOKE_LABEL}.checks": json.dumps(checks, separators=(",", ":")),
        f"{SMOKE_LABEL}.seconds": f"{run.seconds:.1f}",
        f"{SMOKE_LABEL}.at": now,
        "org.opencontainers.image.created": now,
    }


def describe_failure(run: SmokeRun) -> tuple[str, list[str]]:
    if run.timed_out:
        return f"the smoke hung and was killed at the timeout ({run.seconds:.0f}s)", ["timeout"]
    if run.report is None:
        tail = "\n".join(run.logs.splitlines()[-25:])
        return f"the smoke wrote no report (exit {run.exit_code}); its last output:\n{tail}", ["no-report"]
    failing = [c["name"] for c in run.report["checks"] if c["status"] == "failed"]
    return report_mod.summary(run.report), failing


def build_variant(variant: Variant, options: BuildOptions, engine: Engine | None = None) -> BuildOutcome:
    refuse_up_front(variant, options)
    engine = engine or Engine()
    repository = options.repository or variant.image.repository
    base = options.base_image or variant.base_image
    outcome = BuildOutcome(variant.image.name, variant.name, False, repository)
    if is_local_base(base):
        ensure_local_base(engine.client, base, echo=echo)
    device = resolve_device(engine, options.smoke_device)
    timeout = options.smoke_timeout or variant.image.smoke_timeout

    progress = Progress(f"build {variant.image.name}/{variant.name}")
    candidate = None
    context_parent = Path(tempfile.mkdtemp(prefix="vlmbuild-context-"))
    try:
        result = render(variant, context_parent / "context", base_image=base)
        progress.info(f"building {variant.image.name}/{variant.name} on {base} "
                      f"({len(result.layers)} lock layers, candidate untagged)")
        candidate = engine.build(result.context, progress, nocache=options.nocache)
        outcome.candidate_id = candidate
        outcome.build_seconds = progress.elapsed()
        progress.info(f"built candidate {candidate[:19]} in {outcome.build_seconds:.0f}s; smoke on {device.upper()}")

        run = engine.run_smoke(candidate, device, timeout, progress)
        outcome.smoke_seconds, outcome.smoke_device, outcome.smoke_report = run.seconds, device, run.report
        passed = run.exit_code == 0 and run.report is not None and run.report.get("passed") is True
        if not passed:
            message, outcome.failing_checks = describe_failure(run)
            if options.keep_failed:
                progress.info(f"kept the failed candidate {candidate[:19]} (untagged) for inspection")
            else:
                engine.remove_image(candidate)
            candidate = None
            progress.close()
            echo(message)
            raise SmokeFailed(f"{variant.image.name}/{variant.name}: the smoke failed on {device.upper()} "
                              f"({', '.join(outcome.failing_checks)}); nothing was tagged", outcome)
        echo(report_mod.summary(run.report))

        report_bytes = report_mod.dumps(run.report).encode()
        final = engine.add_evidence(candidate, {IMAGE_REPORT_PATH: report_bytes},
                                    evidence_labels(run, report_bytes, device), progress)
        tags = tags_for(variant, result.tag, result.lock.sha256)
        with tag_lock(repository, variant.name):
            for tag in tags:
                engine.tag(final, repository, tag)
        outcome.passed, outcome.image_id, outcome.tags = True, final, tags
        candidate = None  # now the tested parent of a released image: keep
        progress.info(f"tagged {final[:19]} as " + ", ".join(f"{repository}:{t}" for t in tags)
                      + (" (CPU-validated)" if device == "cpu" else ""))
    except BaseException:
        # Ctrl-C, a lost daemon, a failed build: nothing of ours is tagged; drop the candidate.
        if candidate is not None and not options.keep_failed:
            engine.remove_image(candidate)
        raise
    finally:
        progress.close()
        shutil.rmtree(context_parent, ignore_errors=True)

    if options.push:
        outcome.digests = push_tags(engine, variant, repository, outcome.tags, options.allow_cpu_push)
    return outcome


class SmokeFailed(CheckFailed):
    def __init__(self, message: str, outcome: BuildOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


def push_tags(engine: Engine, variant: Variant, repository: str, tags: list[str], allow_cpu: bool) -> dict[str, str]:
    """Push tags whose image passed the smoke. Each pushed digest is printed."""
    from .render import load_variant_lock

    lock_sha = load_variant_lock(variant).sha256
    progress = Progress(f"push {variant.image.name}/{variant.name}")
    digests = {}
    try:
        for tag in tags:
            ref = f"{repository}:{tag}"
            if engine.image_id(ref) is None:
                raise VlmbuildError(f"{ref}: no such local image; build it first (`vlmbuild build`)")
            labels = engine.labels(ref)
            if labels.get(f"{SMOKE_LABEL}.result") != "passed":
                raise CheckFailed(f"{ref}: carries no passing smoke evidence; refusing to push")
            if labels.get(f"{LABEL_PREFIX}.lock-sha256") != lock_sha:
                raise CheckFailed(f"{ref}: was built from another lockfile than the current one; rebuild before pushing")
            if labels.get(f"{SMOKE_LABEL}.device") != "gpu" and not allow_cpu:
                raise CheckFailed(f"{ref}: its smoke ran on CPU only; pushing it needs --allow-cpu-evidence")
            digest = engine.push(repository, tag, progress)
            digests[tag] = digest
            echo(f"pushed {ref} {digest}")
    finally:
        progress.close()
    return digests


def smoke_image(ref: str, device: str, report: Path | None, timeout: int) -> int:
    """`vlmbuild smoke IMAGE_REF`: re-run the gate on any built image."""
    engine = Engine()
    if engine.image_id(ref) is None:
        raise VlmbuildError(f"{ref}: no such image in this engine")
    device = resolve_device(engine, device)
    progress = Progress(f"smoke {ref}")
    try:
        run = engine.run_smoke(ref, device, timeout, progress)
    finally:
        progress.close()
    if run.report is not None:
        if report:
            Path(report).write_text(report_mod.dumps(run.report))
        echo(report_mod.summary(run.report))
    else:
        echo(describe_failure(run)[0])
    passed = run.exit_code == 0 and run.report is not None and run.report.get("passed") is True
    return 0 if passed else 1


def write_build_report(path: Path, outcomes: list[BuildOutcome]) -> None:
    payload = {"schema_version": 1, "builds": [asdict(o) for o in outcomes]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")

