"""The gate: a resolved variant built into an untagged candidate, smoked inside a container, decided.

1. An immutable tag that already names an image with passing evidence of the same inputs means there is nothing
   to do (unless --rebuild).
2. Build the candidate with BuildKit; check it starts from the checked base.
3. Smoke it in a container: on a GPU when asked and given, with a CPU pass of world size 2 added when the GPU pass
   had one rank only (ZeRO-3 partitioning across ranks is always proven).
4. Passed: vlmbuild.release adds the evidence and moves the tag set. Failed: nothing is tagged, no tag moves,
   the candidate is removed (unless kept), exit 1 with the failing check explained.
Ctrl-C and SIGTERM take the same way out as a failure. Resolving comes before (vlmbuild.resolve), pushing after
(vlmbuild.release); vlmbuild.pipeline runs the three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import build_cache, contract, engine_disk
from .build_cache import BuildCache
from .buildkit import BuildFailed
from .engine_api import EngineAPI, SmokeLimits, SmokeRun
from .errors import CheckFailed, VlmbuildError
from .options import BuildOptions
from .progress import Progress
from .release import release_candidate, tags_naming, validated_image
from .resolve import Resolved
from .rules import explain_rule, load_rules
from .smoke import report as report_mod


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
    cache_pushed: list[str] = field(default_factory=list)  # --cache-to: the cache refs pushed (vlmbuild.build_cache)


class GateFailed(CheckFailed):
    """The candidate did not build or did not pass the smoke: nothing was tagged (exit 1)."""

    def __init__(self, message: str, outcome: BuildOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


def export_cache(engine: EngineAPI, resolved: Resolved, cache: BuildCache, candidate: str, outcome: BuildOutcome,
                 progress: Progress) -> None:
    """Push the build's cache (--cache-to). A cache that cannot be pushed slows the next machine down and decides
    nothing about this image: a warning, and the gate goes on."""
    try:
        outcome.cache_pushed = build_cache.export(engine, resolved.context, cache, resolved.rendered.wheel_stages,
                                                  candidate, progress)
    except VlmbuildError as exc:
        warning = f"the build cache was not pushed to {cache.cache_to}: {exc}"
        outcome.warnings.append(warning)
        progress.say(f"warning: {warning}")
        progress.annotate(warning, title="build cache not pushed", level="warning")


class NotEnoughDisk(VlmbuildError):
    """The engine's disk cannot hold the build: refused before it starts (exit 2), nothing built or tagged."""


def check_room(engine: EngineAPI, resolved: Resolved, options: BuildOptions, progress: Progress) -> None:
    """A build that would run out of disk fails in the middle of a layer, hours in for a CUDA variant, with an
    error that names no cause. Refuse it before it starts, with the numbers, and name the leak when there is one.

    The variant's build_disk_gb is what a cold build takes. What BuildKit's cache holds may serve part of it (a
    warm rebuild takes next to nothing), so the free disk must hold the rest; with --no-cache, all of it
    (engine_disk.required_free)."""
    disk = engine.disk()
    variant = resolved.variant
    need = int(variant.build_disk_gb * 1e9)
    required = engine_disk.required_free(disk, need, options.nocache)
    progress.info(engine_disk.describe(disk))
    if not options.disk_check or disk.free >= required:
        return
    cache = ("" if options.nocache else f"; BuildKit's cache of {engine_disk.gb(disk.build_cache)} may serve part "
             f"of it, so at least {engine_disk.gb(required)} must be free")
    leak = (f" {engine_disk.gb(disk.unaccounted)} of the engine's storage belongs to no image, container or cache "
            "record (`vlmbuild doctor` shows it; no prune reaches it)." if (disk.unaccounted or 0) > 1e9 else "")
    raise NotEnoughDisk(
        f"{variant.image.name}/{variant.name}: a cold build takes about {variant.build_disk_gb:g} GB of free disk "
        f"({variant.image.path}, key build_disk_gb){cache}; {disk.storage} has {engine_disk.gb(disk.free)} free. "
        f"The build was not started and nothing was tagged.{leak} Free some, or pass --no-disk-check to try anyway.")


def choose_device(engine: EngineAPI, requested: str) -> str:
    if requested == "auto":
        return "gpu" if engine.gpu_available() else "cpu"
    if requested == "gpu" and not engine.gpu_available():
        raise VlmbuildError("--smoke-device gpu, but this Docker engine has no NVIDIA runtime to give a GPU")
    return requested


# What a process says when it cannot fork or start a thread: the container's task limit reached.
OUT_OF_TASKS = ("Resource temporarily unavailable", "Cannot fork", "can't start new thread", "fork: retry")


def describe_failure(run: SmokeRun) -> tuple[str, list[str]]:
    if run.timed_out:
        return f"the smoke hung and was killed at the timeout ({run.seconds:.0f}s)", ["timeout"]
    limits = run.limits
    if run.oom_killed:
        return (f"the smoke was killed at its container's memory limit of {limits.memory_gb:g} GB (the kernel's OOM "
                f"killer; spec key smoke.memory_gb, or --memory-gb): it, or the image's code, wanted more"),\
            ["out-of-memory"]
    if run.failed_node is not None:
        return describe_node_failure(run, run.failed_node)
    if run.report is None:
        tail = "\n".join(run.logs.splitlines()[-25:])
        if any(marker in run.logs for marker in OUT_OF_TASKS):
            return (f"the smoke ran out of processes: its container may run {limits.pids} tasks (spec key smoke.pids, "
                    f"or --pids), and a fork or a thread failed (exit {run.exit_code}); its last output:\n{tail}"),\
                ["process-limit"]
        return f"the smoke wrote no report (exit {run.exit_code}); its last output:\n{tail}", ["no-report"]
    failing = [c["name"] for c in run.report["checks"] if c["status"] == "failed"]
    if not failing and run.exit_code != 0:
        failing = ["exit-status"]
    return report_mod.summary(run.report), failing


def describe_node_failure(run: SmokeRun, first: int) -> tuple[str, list[str]]:
    """A smoke over several nodes where one (``first``) ended badly first: node 0's report if it wrote one, and the
    last output of every node that failed, first the one that failed first."""
    lines = [f"node {first} of the smoke's {run.nodes} nodes ended first, with status {run.node_exit[first]} (its "
             "container died, was killed, or its smoke failed); the other nodes were stopped"]
    failing = ["node-failed"]
    if run.report is not None:
        lines.append(report_mod.summary(run.report))
        failing = [c["name"] for c in run.report["checks"] if c["status"] == "failed"] or failing
    for node in sorted((n for n, code in enumerate(run.node_exit) if code != 0), key=lambda n: n != first):
        if node == 0 and run.report is not None:
            continue  # its report says it
        section = run.logs.split(f"==== node {node} ", 1)[-1].split("\n==== node ", 1)[0]
        lines.append(f"node {node} (status {run.node_exit[node]}), its last output:")
        lines.extend(section.splitlines()[1:][-20:])
    return "\n".join(lines), failing


def explain_build_failure(message: str) -> str:
    """A failed build step's output goes through the rules too (DeepSpeed <= 0.16.3 dies in its own setup.py on a
    GPU-less builder with triton's "0 active drivers", rule row 5)."""
    return "\n".join([message] + [
        explain_rule(rule, indent="    ", header=f"  explained by known-bad combination [{rule.severity}] {rule.id}")
        for rule in load_rules().match_error(message)])


def run_smoke_passes(engine: EngineAPI, image: str, device: str, timeout: int, repeat: int, model_dir: Path | None,
                     progress: Progress, checks: str | None = None,
                     limits: SmokeLimits = SmokeLimits(), nodes: int = 1, nodes_only: bool = False) -> list[SmokeRun]:
    """The smoke on ``device``; when it ran on one GPU only, a CPU pass of world size 2 in the same image, so that
    ZeRO-3 partitioning across ranks is proven on every image; with ``nodes`` > 1, a pass over that many nodes
    after them (the checks that cross nodes; the first passes ran every check), or alone (``nodes_only``: `vlmbuild
    smoke IMAGE --nodes N`). Each pass is one fold of the output, with its summary; each failing check an error
    naming it."""
    extra: dict = {"checks": checks} if checks else {}

    def one_pass(on: str, over: int = 1) -> SmokeRun:
        where = f" over {over} nodes" if over > 1 else ""
        with progress.group(f"smoke pass on {on.upper()}{where} in {image[:19]}"):
            run = engine.run_smoke(image, on, timeout, progress, repeat=repeat, model_dir=model_dir, limits=limits,
                                   nodes=over, **extra)
            message, failing = describe_failure(run) if not run.passed else ("", [])
            progress.say(report_mod.summary(run.report) if run.report is not None else message)
        by_name = {c["name"]: c for c in (run.report or {}).get("checks", [])}
        for name in failing:
            error = (by_name.get(name) or {}).get("error") or message
            progress.annotate("\n".join(str(error).splitlines()[:20]), title=f"smoke check {name} failed on {on.upper()}")
        return run

    if nodes > 1 and nodes_only:
        return [one_pass(device, nodes)]
    runs = [one_pass(device)]
    first = runs[0]
    if device == "gpu" and first.passed and (first.report or {}).get("world_size", 0) < 2:
        progress.info("the GPU pass ran with world size 1 (one GPU): adding a CPU pass with world size 2")
        runs.append(one_pass("cpu"))
    if nodes > 1 and all(r.passed for r in runs):
        runs.append(one_pass(device, nodes))
    return runs


def reuse(engine: EngineAPI, resolved: Resolved, image_id: str, outcome: BuildOutcome, progress: Progress) -> BuildOutcome:
    outcome.passed, outcome.reused, outcome.image_id = True, True, image_id
    outcome.tags = tags_naming(engine, resolved, image_id)
    progress.info(f"{resolved.repository}:{resolved.immutable_tag} already names {image_id[:19]}, built from these "
                  "exact inputs and validated: nothing to build, no tag moved (--rebuild builds it again)")
    return outcome


def gate(engine: EngineAPI, resolved: Resolved, options: BuildOptions, progress: Progress) -> BuildOutcome:
    """Build, smoke and decide (or reuse what the immutable tag already names); tagged only when it passed."""
    variant, spec = resolved.variant, resolved.variant.image
    outcome = BuildOutcome(spec.name, variant.name, False, resolved.repository, identity=resolved.identity,
                           immutable_tag=resolved.immutable_tag, base_image_id=resolved.base.image_id,
                           warnings=list(resolved.warnings))
    for warning in resolved.warnings:
        progress.say(f"warning: a known-bad rule matches (a workaround exists):\n{warning}")
    existing = validated_image(engine, resolved)
    if existing and not options.rebuild:
        return reuse(engine, resolved, existing, outcome, progress)
    run_gate(engine, resolved, options, outcome, progress)
    return outcome


def run_gate(engine: EngineAPI, resolved: Resolved, options: BuildOptions, outcome: BuildOutcome,
             progress: Progress) -> None:
    variant, spec = resolved.variant, resolved.variant.image
    device = choose_device(engine, options.smoke_device)
    model_dir = options.model_dir
    candidate = None
    check_room(engine, resolved, options, progress)
    try:
        progress.info(f"building {spec.name}/{variant.name} on {resolved.base.ref} ({resolved.base.image_id[:19]}), "
                      f"identity {resolved.identity[:12]}, candidate untagged")
        try:
            candidate = engine.build(resolved.context, progress, nocache=options.nocache,
                                     cache_from=options.cache.import_refs(resolved.rendered.wheel_stages),
                                     inline_cache=options.cache.cache_to is not None)
        except BuildFailed as exc:
            outcome.failing_checks, outcome.build_seconds = ["build"], progress.elapsed()
            message = explain_build_failure(str(exc))
            progress.annotate(message, title=f"build of {spec.name}/{variant.name} failed")
            raise GateFailed(message + "\nnothing was tagged", outcome) from None
        outcome.candidate_id = candidate
        outcome.build_seconds = progress.elapsed()
        engine.check_built_on(candidate, resolved.base)
        if options.cache.cache_to:
            export_cache(engine, resolved, options.cache, candidate, outcome, progress)
        progress.info(f"built candidate {candidate[:19]} in {outcome.build_seconds:.0f}s; smoke on {device.upper()}"
                      + (f" with {model_dir}" if model_dir else ""))
        runs = run_smoke_passes(engine, candidate, device, options.smoke_timeout, options.smoke_repeat, model_dir,
                                progress, limits=options.smoke_limits, nodes=options.smoke_nodes)
        outcome.smoke_seconds = sum(r.seconds for r in runs)
        outcome.smoke_device, outcome.smoke_report = device, runs[0].report
        outcome.passes = [contract.pass_name(r.report, r.device) for r in runs]
        failed = next((r for r in runs if not r.passed), None)
        if failed is not None:
            message, outcome.failing_checks = describe_failure(failed)
            if options.keep_failed:
                progress.info(f"kept the failed candidate {candidate[:19]} (untagged) for inspection")
            else:
                engine.remove_image(candidate)
            candidate = None
            raise GateFailed(f"{spec.name}/{variant.name}: the smoke failed on {failed.device.upper()} "
                             f"({', '.join(outcome.failing_checks)}); nothing was tagged", outcome)
        final, image_id, tags, tagged = release_candidate(engine, resolved, candidate, runs)
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
