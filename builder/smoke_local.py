"""`vlmbuild smoke --local`: the image's smoke code, run by any interpreter (a user's conda env, say).

The smoke sources are staged exactly as they lie in an image (lib/vlmbuild/...), so the environment
under test needs nothing of vlmbuild installed and runs the very code that ships in images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import VlmbuildError
from .render import stage_smoke_sources


def run_local(python: str, device: str, report: Path | None, model_dir: Path | None, lockfile: Path | None,
              timeout: int) -> int:
    if shutil.which(python) is None and not Path(python).is_file():
        raise VlmbuildError(f"--python {python}: no such interpreter")
    staging = Path(tempfile.mkdtemp(prefix="vlmbuild-smoke-src-"))
    try:
        stage_smoke_sources(staging)
        env = dict(os.environ)
        lib = str(staging / "lib")
        env["PYTHONPATH"] = lib + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [python, "-m", "vlmbuild.smoke", "--device", device, "--timeout", str(timeout)]
        if report:
            cmd += ["--report", str(Path(report).absolute())]
        if model_dir:
            cmd += ["--model-dir", str(Path(model_dir).absolute())]
        if lockfile:
            cmd += ["--lockfile", str(Path(lockfile).absolute())]
        try:
            # A little slack over the smoke's own timeout, which kills its ranks first.
            return subprocess.run(cmd, env=env, timeout=timeout + 120).returncode
        except subprocess.TimeoutExpired:
            raise VlmbuildError(f"the smoke did not finish within {timeout + 120} s") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
