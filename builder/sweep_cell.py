"""Measuring one cell of a sweep: lock it, install it into an environment of its own, smoke it, record it.

- Locked with uv for the variant's Python and platform, the variant's own lockfile as preferences: a cell differs
  from the release lock only where its pins force it to. A cell that cannot resolve is a result
  (``unresolvable``, with the resolver's reason).
- Installed hash-locked with uv into ``<work>/envs/<cell>`` (uv's shared download cache makes that seconds).
- DeepSpeed rebuilt from its locked sdist with the CPU ops compiled in, by the image's own helper
  (build_files/build-sdist-wheel.sh), whose wheel cache is keyed by everything that decides the wheel's bytes:
  the key leaves out what else a cell moves, so every cell of one DeepSpeed version reuses one build and no cell
  JIT-compiles an op. Each cell still has its own TORCH_EXTENSIONS_DIR, and what lands there is recorded.
- Smoked with `vlmbuild smoke --local` on the cell's interpreter (the smoke code images ship), its report kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build_layout import BUILD_FILES
from .errors import VlmbuildError
from .lock import LockError, compile_lock_text, uv_binary
from .lockfile import Lockfile, parse_lockfile
from .plan import wheel_build_env
from .smoke.common import ZERO_SETTINGS_ENV
from .smoke.stack import RULES_ENV
from .smoke_command import run_local
from .spec import Variant
from .sweep_axes import Cell, first_line

CELL_SMOKE_TIMEOUT = 1200


@dataclass(frozen=True)
class Workdir:
    """Where a sweep keeps what it makes: cell locks and reports (kept), environments (removed after each cell
    unless kept), the DeepSpeed wheels (kept across sweeps, by key)."""
    root: Path

    def cell(self, cell: Cell) -> Path:
        return self.root / "cells" / cell.id

    def env(self, cell: Cell) -> Path:
        return self.root / "envs" / cell.id

    @property
    def wheels(self) -> Path:
        return self.root / "deepspeed-wheels"


@dataclass
class Measured:
    """What measuring a cell gave: a state, and what the smoke reported (None when it never ran)."""
    state: str  # measured | unresolvable | install_failed
    reason: str = ""
    lock_sha256: str | None = None
    report: dict[str, Any] | None = None
    report_sha256: str | None = None
    seconds: dict[str, float] | None = None
    jit_compiled: tuple[str, ...] = ()
    pins: dict[str, str] = field(default_factory=dict)  # what the cell's lock pins
    zero_settings: dict[str, Any] | None = None  # the settings this smoke ran with (a CPU route), if any
    first_run: Measured | None = None  # the smoke without them, when a route made a second one


def lock_cell(cell: Cell, work: Workdir) -> Path:
    """The cell's lockfile, or LockError with the resolver's reason."""
    variant = cell.variant
    text = compile_lock_text(variant, cell.requirement_lines(), {"cell": cell.label(), "cell-id": cell.id})
    path = work.cell(cell) / "lock.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def install_env(cell: Cell, lock_path: Path, work: Workdir) -> Path:
    env = work.env(cell)
    shutil.rmtree(env, ignore_errors=True)
    env.parent.mkdir(parents=True, exist_ok=True)
    uv = uv_binary()
    log = work.cell(cell) / "install.log"
    log.unlink(missing_ok=True)
    run([uv, "venv", "-q", "--python", cell.variant.python, str(env)], "uv venv", log=log)
    python = env / "bin" / "python"
    # No --compile-bytecode: of ~30,000 modules a smoke imports a few thousand, compiled once by its first process
    # into the cell's own environment (smoke_cell lets it write them), which is removed with it.
    run([uv, "pip", "install", "-q", "--python", str(python), "--require-hashes", "--no-deps", "-r", str(lock_path)],
        "uv pip install", log=log)
    return python


def deepspeed_build_inputs(variant: Variant, lock: Lockfile) -> str:
    """What DeepSpeed's ops are built against: the lock's torch layer and the spec's build requirements, as locked,
    and nothing else of the lock (the helper's cache key, as the image build keys it: a cell that moves trl or
    transformers reuses the wheel; the tests' stack venv and the sweep's cells share it)."""
    torch_layer = variant.image.layer_of("torch")
    requires = set(variant.image.deepspeed_build.requires)
    return "".join(r.render() + "\n" for r in lock.requirements
                   if r.name in requires or variant.image.layer_of(r.name) == torch_layer)


def install_deepspeed_with_ops(cell: Cell, python: Path, lock: Lockfile, work: Workdir) -> str:
    """DeepSpeed rebuilt with the CPU ops (or taken from the helper's cache) and installed over the index one;
    returns the helper's last line (built or reused, with its key)."""
    scratch = work.cell(cell) / "deepspeed-build"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "in").mkdir(parents=True)
    (scratch / "in" / "deepspeed.txt").write_text(lock.require("deepspeed").render() + "\n")
    (scratch / "in" / "build-inputs.txt").write_text(deepspeed_build_inputs(cell.variant, lock))
    env = {**os.environ, **wheel_build_env(cell.variant, str(BUILD_FILES), accelerator="cpu"),
           "VLMBUILD_PYTHON": str(python), "VLMBUILD_UV": uv_binary(), "VLMBUILD_SRC": str(scratch / "src"),
           "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # ninja, from the cell's env
    out = run(["bash", str(BUILD_FILES / "build-sdist-wheel.sh"), "deepspeed", str(scratch / "in" / "deepspeed.txt"),
               str(scratch / "out"), str(work.wheels), str(scratch / "in" / "build-inputs.txt")],
              "building DeepSpeed with its CPU ops", env=env, log=work.cell(cell) / "install.log")
    wheel = next((scratch / "out").glob("deepspeed-*.whl"))
    run([uv_binary(), "pip", "install", "-q", "--python", str(python), "--no-deps", "--reinstall", str(wheel)],
        "installing the DeepSpeed wheel", log=work.cell(cell) / "install.log")
    shutil.rmtree(scratch, ignore_errors=True)
    return out.strip().splitlines()[-1] if out.strip() else ""


def run(cmd: list[str], what: str, env: dict[str, str] | None = None, log: Path | None = None) -> str:
    """A step of the cell's install in a process group of its own: Ctrl-C or SIGTERM of the sweep kills the
    whole group (uv, the DeepSpeed build and its compilers), not only the process it started. Its whole output
    is appended to ``log``; a failure says which step, with the log's path."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"==== {what}: {' '.join(cmd)} (exit {proc.returncode})\n{out}{err}\n")
    if proc.returncode != 0:
        where = f" (whole output: {log})" if log is not None else ""
        raise CellInstallError(f"{what} failed (exit {proc.returncode}): {build_error(err or out)}{where}")
    return out


def build_error(text: str) -> str:
    """The line of a failed build that says why: a compiler's or Python's error, else uv's own summary."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker in ("error:", "Error:", "ERROR", "Traceback"):
        hits = [line for line in lines if marker in line and not line.startswith(("error: Failed to build",
                                                                                "hint:"))]
        if hits:
            return hits[0][:300] if marker != "Traceback" else lines[-1][:300]
    return first_line(text)


class CellInstallError(VlmbuildError):
    """A cell could not be installed: its environment, not its stack, failed."""


def measure_cell(cell: Cell, work: Workdir, root: Path, keep_env: bool = False,
                 timeout: int = CELL_SMOKE_TIMEOUT,
                 reroute: Callable[[Measured], dict[str, Any] | None] | None = None) -> Measured:
    """Lock, install and smoke ``cell``. ``reroute`` sees the smoke's result and may name ZeRO settings to smoke
    the cell once more with (a CPU-accelerator defect a setting routes around): the second run is the cell's
    result, the first kept in it (``first_run``)."""
    seconds: dict[str, float] = {}
    started = time.monotonic()
    try:
        lock_path = lock_cell(cell, work)
    except LockError as exc:
        return Measured("unresolvable", first_line(str(exc)), seconds={"lock": round(time.monotonic() - started, 1)})
    text = lock_path.read_bytes()
    lock_sha = hashlib.sha256(text).hexdigest()
    lock = parse_lockfile(text.decode(), lock_path)  # read once: its pins, DeepSpeed's build inputs
    pins = lock.pins
    seconds["lock"] = round(time.monotonic() - started, 1)
    try:
        step = time.monotonic()
        python = install_env(cell, lock_path, work)
        seconds["install"] = round(time.monotonic() - step, 1)
        if cell.measure.device == "cpu":
            step = time.monotonic()
            install_deepspeed_with_ops(cell, python, lock, work)
            seconds["deepspeed_ops"] = round(time.monotonic() - step, 1)
        # On a GPU runner DeepSpeed's CUDA ops are JIT-compiled by the smoke into the cell's own extensions
        # directory (the runner's CUDA toolkit), and recorded as such (jit_compiled).
        measured = smoke_cell(cell, python, lock_path, work, root, timeout, {})
        measured = Measured(measured.state, measured.reason, lock_sha, measured.report, measured.report_sha256,
                            {**seconds, **(measured.seconds or {})}, measured.jit_compiled, pins)
        settings = reroute(measured) if reroute is not None else None
        if settings:
            again = smoke_cell(cell, python, lock_path, work, root, timeout, settings)
            return Measured(again.state, again.reason, lock_sha, again.report, again.report_sha256,
                            {**(measured.seconds or {}), "smoke_with_setting": (again.seconds or {})["smoke"]},
                            tuple(sorted({*measured.jit_compiled, *again.jit_compiled})), pins, settings, measured)
        return measured
    except CellInstallError as exc:
        return Measured("install_failed", str(exc), lock_sha, seconds=seconds, pins=pins)
    finally:
        if not keep_env:
            shutil.rmtree(work.env(cell), ignore_errors=True)


def smoke_cell(cell: Cell, python: Path, lock_path: Path, work: Workdir, root: Path, timeout: int,
               zero_settings: dict[str, Any]) -> Measured:
    """One smoke of the cell's environment, in an extensions directory of its own, ``zero_settings`` laid over
    every DeepSpeed config it builds (smoke/common.py)."""
    suffix = "-with-setting" if zero_settings else ""
    extensions = work.cell(cell) / f"torch_extensions{suffix}"
    shutil.rmtree(extensions, ignore_errors=True)
    report_path = work.cell(cell) / f"smoke-report{suffix}.json"
    report_path.unlink(missing_ok=True)
    # bytecode written into the cell's environment by the first process that imports a module (a CI shell's
    # PYTHONDONTWRITEBYTECODE would have every rank compile every module again)
    # The rules' matches recorded, not enforced: a cell is measured by what its checks observe (sweep_verdict
    # explains failures with the rules afterwards).
    env = {"TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONDONTWRITEBYTECODE": "", RULES_ENV: "record"}
    if zero_settings:
        env[ZERO_SETTINGS_ENV] = json.dumps(zero_settings, sort_keys=True)
    step = time.monotonic()
    measure = cell.measure
    run_local(str(python), measure.device, report_path, None, lock_path, timeout, root, measure.repeat,
              measure.checks, extra_env=env, log=work.cell(cell) / f"smoke{suffix}.log")
    seconds = {"smoke": round(time.monotonic() - step, 1)}
    # the smoke compiles into <dir>/vlmbuild-<environment>/<op>: the ops this cell had to JIT-compile
    compiled = tuple(sorted(p.name for p in extensions.glob("*/*") if p.is_dir()))
    if not report_path.is_file():
        return Measured("measured", "the smoke wrote no report", seconds=seconds, jit_compiled=compiled)
    data = report_path.read_bytes()
    try:
        report = json.loads(data)
    except ValueError:
        return Measured("measured", "the smoke's report is not JSON", seconds=seconds, jit_compiled=compiled)
    return Measured("measured", "", None, report, hashlib.sha256(data).hexdigest(), seconds, compiled)
