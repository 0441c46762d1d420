"""The main job, one variant from its spec to its tags: its inputs checked (vlmbuild.resolve), its base found by the
engine, the variant resolved (vlmbuild.resolve), gated (vlmbuild.gate: build, smoke, decide, tag) and, with --push,
released (vlmbuild.release: push). One Progress carries everything said on the way."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from .engine import Engine
from .engine_api import EngineAPI
from .gate import BuildOutcome, gate
from .options import BuildOptions
from .progress import Progress
from .release import PushFailed, push_tags
from .resolve import check_inputs, resolve
from .spec import Variant


def build_variant(variant: Variant, options: BuildOptions, engine: EngineAPI | None = None) -> BuildOutcome:
    """Resolve, gate and (with --push) push one variant. Raises GateFailed (nothing tagged) or PushFailed (tagged,
    not pushed), each with the outcome. The inputs are checked before the engine is asked anything."""
    progress = Progress(f"build {variant.image.name}/{variant.name}")
    try:
        inputs = check_inputs(variant, options.ignore_rules)
        engine = engine or Engine()
        base = engine.resolve_base(options.base_image or inputs.base_ref, progress)
        with tempfile.TemporaryDirectory(prefix="vlmbuild-build-") as tmp:
            resolved = resolve(inputs, base, Path(tmp), options.repository)
            outcome = gate(engine, resolved, options, progress)
        if options.push:
            try:
                outcome.digests = push_tags(engine, resolved, outcome.tags, options.push_policy, progress)
            except PushFailed as exc:
                outcome.push_error = str(exc)
                raise PushFailed(exc, outcome) from None
        return outcome
    finally:
        progress.close()


def write_build_report(path: Path, outcomes: list[BuildOutcome]) -> None:
    payload = {"schema_version": 2, "builds": [asdict(o) for o in outcomes]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
