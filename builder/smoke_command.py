"""`vlmbuild smoke`: the image's smoke code on any built image (IMAGE_REF), or run by any interpreter (--local: a
user's conda env, say).

For --local the smoke sources are staged exactly as they lie in an image (lib/vlmbuild/...), so the environment
under test needs nothing of vlmbuild installed and runs the very code that ships in images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO

from . import contract
from .engine_api import SmokeLimits
from .errors import VlmbuildError
from .lockfile import LockfileError, read_lockfile
from .options import checked_model_dir
from .plan import make_plan
from .progress import Progress
from .render import stage_smoke_sources
from .spec import all_spec_paths, find_spec_path, load_spec


def variant_for_lockfile(lockfile: Path, root: Path) -> str | None:
    """variant.json for the variant a vlmbuild lockfile names in its header (image, variant), so that a local
    smoke imports what that variant's image would; None for a lockfile that names none."""
    try:
        lock = read_lockfile(lockfile)
    except LockfileError as exc:
        raise VlmbuildError(str(exc)) from None
    image, name = lock.header.get("image"), lock.header.get("variant")
    if not image or not name:
        return None
    variant = load_spec(find_spec_path(image, root)).variant(name)
    metadata = json.loads(make_plan(variant, lock).variant_json)
    # Not the image: this environment's DeepSpeed was not built with the image's ops.
    metadata.pop("deepspeed_builds", None)
    return json.dumps(metadata, indent=2) + "\n"


def default_variant_imports(root: Path) -> str | None:
    """Without a lockfile: variant.json naming the modules the default variant's image imports (and its training
    conditions), so the stack check names every one this environment lacks before a later check trips on it."""
    paths = all_spec_paths(root)
    if len(paths) != 1:
        return None
    image = load_spec(paths[0])
    variant = image.variant(image.default_variant)
    return json.dumps({"schema": 1, "image": image.name, "variant": variant.name,
                       "source": "the spec's default variant (no --lockfile)", "imports": list(variant.imports),
                       "conditions": list(image.conditions)}, indent=2) + "\n"


def run_local(python: str, device: str, report: Path | None, model_dir: Path | None, lockfile: Path | None,
              timeout: int, root: Path, repeat: int = 1, checks: str | None = None,
              extra_env: dict[str, str] | None = None, log: Path | None = None) -> int:
    """The smoke in the environment of ``python``; ``extra_env`` on top of this process's, its output to ``log``
    when given (a sweep's cell) instead of this terminal."""
    if shutil.which(python) is None and not Path(python).is_file():
        raise VlmbuildError(f"--python {python}: no such interpreter")
    staging = Path(tempfile.mkdtemp(prefix="vlmbuild-smoke-src-"))
    try:
        stage_smoke_sources(staging)
        env = {**os.environ, **(extra_env or {})}
        lib = str(staging / "lib")
        env["PYTHONPATH"] = lib + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [python, "-m", "vlmbuild.smoke", "--device", device, "--timeout", str(timeout), "--repeat", str(repeat)]
        if checks:
            cmd += ["--checks", checks]
        if report:
            cmd += ["--report", str(Path(report).absolute())]
        if model_dir:
            cmd += ["--model-dir", str(Path(model_dir).absolute())]
        if lockfile:
            cmd += ["--lockfile", str(Path(lockfile).absolute())]
        metadata = variant_for_lockfile(Path(lockfile), root) if lockfile else default_variant_imports(root)
        if metadata:
            (staging / "variant.json").write_text(metadata)
            cmd += ["--variant-json", str(staging / "variant.json")]
        if log is None:
            return run_launcher(cmd, env, timeout + 120)  # slack over the smoke's own timeout, which stops its ranks
        with open(log, "w") as out:
            return run_launcher(cmd, env, timeout + 120, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_launcher(cmd: list[str], env: dict[str, str], limit: int, output: IO[str] | None = None) -> int:
    """The smoke's launcher, given ``limit`` seconds; past that (or on Ctrl-C) it gets SIGTERM, which it answers by
    stopping its ranks and removing their buffers, then SIGKILL if it has not gone in 30 s (its ranks then die
    with it: vlmbuild.smoke.rank_processes)."""
    proc = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT if output else None)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise VlmbuildError(f"the smoke did not finish within {limit} s") from None
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def smoke_image(ref: str, device: str, report: Path | None, timeout: int, repeat: int = 1,
                model_dir: Path | None = None, checks: str | None = None, limits: SmokeLimits = SmokeLimits(),
                nodes: int = 1) -> int:
    """`vlmbuild smoke IMAGE_REF`: re-run the gate's smoke on any built image (with a real checkpoint, read-only);
    ``nodes`` > 1: the smoke over that many containers instead (engine_nodes)."""
    from .engine import Engine
    from .gate import choose_device, run_smoke_passes
    from .smoke import report as report_mod

    engine = Engine()
    model_dir = checked_model_dir(model_dir)
    if engine.image_id(ref) is None:
        raise VlmbuildError(f"{ref}: no such image in this engine")
    if contract.LABEL_SMOKE_ENTRYPOINT not in engine.labels(ref):
        raise VlmbuildError(f"{ref}: not an image vlmbuild built (no {contract.LABEL_SMOKE_ENTRYPOINT} label): "
                            "it has no smoke to run")
    device = choose_device(engine, device)
    progress = Progress(f"smoke {ref}")
    try:
        runs = run_smoke_passes(engine, ref, device, timeout, repeat, model_dir, progress, checks, limits, nodes,
                                nodes_only=True)
    finally:
        progress.close()
    reports = [r.report for r in runs if r.report is not None]
    if report and reports:
        Path(report).write_text(report_mod.dumps(reports[0] if len(reports) == 1 else report_mod.combine(reports)))
    return 0 if all(r.passed for r in runs) else 1
