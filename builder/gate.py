"""The gate: resolve a variant, build an untagged candidate, smoke it inside a container, decide.

1. Resolve once (vlmbuild.resolve): a stale lockfile or a violated rule is refused before anything is built; the
   base is checked against its pin; the immutable tag is derived from the image's inputs. An immutable tag that
   already names an image with passing evidence of the same inputs means there is nothing to do (--rebuild).
2. Build the candidate with BuildKit; check it starts from the checked base.
3. Smoke it in a container: on a GPU when asked and given, with a CPU pass of world size 2 added when the GPU pass
   had one rank only (ZeRO-3 partitioning across ranks is always proven).
4. Passed: vlmbuild.release adds the evidence and moves the tag set. Failed: nothing is tagged, no tag moves,
   the candidate is removed (unless kept), exit 1 with the failing check explained.
Ctrl-C and SIGTERM take the same way out as a failure.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import contract
from .engine import BuildFailed, Engine, SmokeRun
from .errors import CheckFailed, VlmbuildError
from .progress import Progress
from .release import evidence, publish, push_tags, tags_naming, validated_image
from .resolve import Resolved, resolve
from .rules import explain_rule, load_rules
from .smoke import report as report_mod
from .smoke.model_dir import ModelDirProblem, validate_model_dir
from .spec import Variant


@dataclass
class BuildOptions:
    smoke_device: str | None = None  # None: the spec's smoke.device
    base_image: str | None = None
    push: bool = False
    keep_failed: bool = False
    smoke_timeout: int | None = None
    ignore_rules: bool = False
    repository: str | None = None
    allow_cpu_push: bool = False
    nocache: bool = False
    rebuild: bool = False
    repeat: int | None = None  # None: the spec's smoke.repeat
    model_dir: Path | None = None


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
    identity: str | None = None
    immutable_tag: str | None = None
    base_image_id: str | None = None
    reused: bool = False  # the immutable tag named a validated image of the same inputs: nothing was built
    rebuilt_image: str | None = None  # a rebuild of inputs already validated under the immutable tag: dropped
    passes: list[str] = field(default_factory=list)  # "mode xWORLD" of every smoke pass
    push_error: str | None = None
    warnings: list[str] = field(default_factory=list)


class GateFailed(CheckFailed):
    """The candidate did not build or did not pass the smoke: nothing was tagged (exit 1)."""

    def __init__(self, message: str, outcome: BuildOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class PushFailed(VlmbuildError):
    def __init__(self, error: VlmbuildError, outcome: BuildOutcome) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code
        self.outcome = outcome


def echo(message: str) -> None:
    print(message, flush=True)


def resolve_device(engine: Engine, requested: str) -> str:
    if requested == "auto":
        return "gpu" if engine.gpu_available() else "cpu"
    if requested == "gpu" and not engine.gpu_available():
        raise VlmbuildError("--smoke-device gpu, but this Docker engine has no NVIDIA runtime to give a GPU")
    return requested


def checked_model_dir(model_dir: Path | None) -> Path | None:
    if model_dir is None:
        return None
    try:
        validate_model_dir(Path(model_dir))
    except ModelDirProblem as exc:
        raise VlmbuildError(str(exc)) from None
    return Path(model_dir).absolute()


def describe_failure(run: SmokeRun) -> tuple[str, list[str]]:
    if run.timed_out:
        return f"the smoke hung and was killed at the timeout ({run.seconds:.0f}s)", ["timeout"]
    if run.report is None:
        tail = "\n".join(run.logs.splitlines()[-25:])
        return f"the smoke wrote no report (exit {run.exit_code}); its last output:\n{tail}", ["no-report"]
    failing = [c["name"] for c in run.report["checks"] if c["status"] == "failed"]
    if not failing and run.exit_code != 0:
        failing = ["exit-status"]
    return report_mod.summary(run.report), failing


def explain_build_failure(message: str) -> str:
    """A failed build step's output goes through the rules too (DeepSpeed <= 0.16.3 dies in its own setup.py on a
    GPU-less builder with triton's "0 active drivers", rule row 5)."""
    return "\n".join([message] + [
        explain_rule(rule, indent="    ", header=f"  explained by known-bad combination [{rule.severity}] {rule.id}")
        for rule in load_rules().match_error(message)])


def smoke_passes(engine: Engine, image: str, device: str, timeout: int, repeat: int, model_dir: Path | None,
                 progress: Progress, checks: str | None = None) -> list[SmokeRun]:
    """The smoke on ``device``; when it ran on one GPU only, a CPU pass of world size 2 in the same image, so that
    ZeRO-3 partitioning across ranks is proven on every image."""
    extra = {"checks": checks} if checks else {}
    runs = [engine.run_smoke(image, device, timeout, progress, repeat=repeat, model_dir=model_dir, **extra)]
    first = runs[0]
    if device == "gpu" and first.passed and (first.report or {}).get("world_size", 0) < 2:
        progress.info("the GPU pass ran with world size 1 (one GPU): adding a CPU pass with world size 2")
        runs.append(engine.run_smoke(image, "cpu", timeout, progress, repeat=repeat, model_dir=model_dir, **extra))
    return runs


def reuse(engine: Engine, resolved: Resolved, image_id: str, outcome: BuildOutcome) -> BuildOutcome:
    outcome.passed, outcome.reused, outcome.image_id = True, True, image_id
    outcome.tags = tags_naming(engine, resolved, image_id)
    echo(f"{resolved.repository}:{resolved.immutable_tag} already names {image_id[:19]}, built from these exact "
         "inputs and validated: nothing to build, no tag moved (--rebuild builds it again)")
    return outcome


def build_variant(variant: Variant, options: BuildOptions, engine: Engine | None = None) -> BuildOutcome:
    engine = engine or Engine()
    model_dir = checked_model_dir(options.model_dir)
    spec = variant.image
    with tempfile.TemporaryDirectory(prefix="vlmbuild-build-") as tmp:
        resolved = resolve(variant, engine, Path(tmp), options.base_image, options.repository, options.ignore_rules)
        outcome = BuildOutcome(spec.name, variant.name, False, resolved.repository, identity=resolved.identity,
                               immutable_tag=resolved.immutable_tag, base_image_id=resolved.base.image_id,
                               warnings=resolved.warnings)
        for warning in resolved.warnings:
            echo(f"warning: a known-bad rule matches (a workaround exists):\n{warning}")
        existing = validated_image(engine, resolved)
        if existing and not options.rebuild:
            outcome = reuse(engine, resolved, existing, outcome)
        else:
            run_gate(engine, resolved, options, outcome, model_dir)
    if options.push:
        try:
            outcome.digests = push_tags(engine, resolved, outcome.tags, options.allow_cpu_push)
        except VlmbuildError as exc:
            outcome.push_error = str(exc)
            raise PushFailed(exc, outcome) from None
    return outcome


def run_gate(engine: Engine, resolved: Resolved, options: BuildOptions, outcome: BuildOutcome,
             model_dir: Path | None) -> None:
    variant, spec = resolved.variant, resolved.variant.image
    device = resolve_device(engine, options.smoke_device or spec.smoke_device)
    timeout = options.smoke_timeout or spec.smoke_timeout
    repeat = options.repeat or spec.smoke_repeat
    progress = Progress(f"build {spec.name}/{variant.name}")
    candidate = None
    try:
        progress.info(f"building {spec.name}/{variant.name} on {resolved.base.ref} ({resolved.base.image_id[:19]}), "
                      f"identity {resolved.identity[:12]}, candidate untagged")
        try:
            candidate = engine.build(resolved.context, progress, nocache=options.nocache)
        except BuildFailed as exc:
            outcome.failing_checks, outcome.build_seconds = ["build"], progress.elapsed()
            raise GateFailed(explain_build_failure(str(exc)) + "\nnothing was tagged", outcome) from None
        outcome.candidate_id = candidate
        outcome.build_seconds = progress.elapsed()
        engine.check_built_on(candidate, resolved.base)
        progress.info(f"built candidate {candidate[:19]} in {outcome.build_seconds:.0f}s; smoke on {device.upper()}"
                      + (f" with {model_dir}" if model_dir else ""))
        runs = smoke_passes(engine, candidate, device, timeout, repeat, model_dir, progress)
        outcome.smoke_seconds = sum(r.seconds for r in runs)
        outcome.smoke_device, outcome.smoke_report = device, runs[0].report
        outcome.passes = [f"{(r.report or {}).get('mode', r.device)} x{(r.report or {}).get('world_size', '?')}"
                          for r in runs]
        failed = next((r for r in runs if not r.passed), None)
        if failed is not None:
            message, outcome.failing_checks = describe_failure(failed)
            if options.keep_failed:
                progress.info(f"kept the failed candidate {candidate[:19]} (untagged) for inspection")
            else:
                engine.remove_image(candidate)
            candidate = None
            progress.close()
            echo(message)
            raise GateFailed(f"{spec.name}/{variant.name}: the smoke failed on {failed.device.upper()} "
                              f"({', '.join(outcome.failing_checks)}); nothing was tagged", outcome)
        for run in runs:
            echo(report_mod.summary(run.report))
        sbom = engine.read_image_file(candidate, contract.SBOM_PATH)
        files, labels = evidence(resolved, runs, sbom)
        final = engine.add_evidence(candidate, files, labels)
        image_id, tags, tagged = publish(engine, resolved, final)
        outcome.passed, outcome.image_id, outcome.tags = True, image_id, tags
        if tagged:
            candidate = None  # now the tested parent of a released image: keep
            progress.info(f"tagged {final[:19]} as " + ", ".join(f"{resolved.repository}:{t}" for t in tags)
                          + (" (CPU-validated)" if device == "cpu" else ""))
        else:
            outcome.rebuilt_image = final
            engine.remove_image(final)
            engine.remove_image(candidate)
            candidate = None
            progress.info(f"rebuilt and validated again; {resolved.repository}:{resolved.immutable_tag} already names "
                          f"{image_id[:19]}, validated from the same inputs, and never moves: no tag moved, the "
                          "rebuilt image was dropped")
    except BaseException:
        # Ctrl-C, SIGTERM, a lost daemon, a failed build: nothing of ours is tagged; drop the candidate.
        if candidate is not None and not options.keep_failed:
            engine.remove_image(candidate)
        raise
    finally:
        progress.close()


def write_build_report(path: Path, outcomes: list[BuildOutcome]) -> None:
    import json

    payload = {"schema_version": 2, "builds": [asdict(o) for o in outcomes]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def smoke_image(ref: str, device: str, report: Path | None, timeout: int, repeat: int = 1,
                model_dir: Path | None = None, checks: str | None = None) -> int:
    """`vlmbuild smoke IMAGE_REF`: re-run the gate on any built image (with a real checkpoint, read-only)."""
    engine = Engine()
    model_dir = checked_model_dir(model_dir)
    if engine.image_id(ref) is None:
        raise VlmbuildError(f"{ref}: no such image in this engine")
    if contract.LABEL_SMOKE_ENTRYPOINT not in engine.labels(ref):
        raise VlmbuildError(f"{ref}: not an image vlmbuild built (no {contract.LABEL_SMOKE_ENTRYPOINT} label): "
                            "it has no smoke to run")
    device = resolve_device(engine, device)
    progress = Progress(f"smoke {ref}")
    try:
        runs = smoke_passes(engine, ref, device, timeout, repeat, model_dir, progress, checks)
    finally:
        progress.close()
    reports = [r.report for r in runs if r.report is not None]
    if report and reports:
        Path(report).write_text(report_mod.dumps(reports[0] if len(reports) == 1 else report_mod.combine(reports)))
    for run in runs:
        echo(report_mod.summary(run.report) if run.report is not None else describe_failure(run)[0])
    return 0 if all(r.passed for r in runs) else 1
