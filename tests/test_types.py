"""The type checker passes over the tool's source (configured in pyproject.toml's [tool.mypy])."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_mypy_passes_over_builder(tmp_path):
    # a cache of its own: a result that holds only with a warm cache is not a result
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Success" in proc.stdout
