"""The GitHub workflows: actionlint-clean, and wired to the same commands that run locally."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO

WORKFLOWS = REPO / ".github" / "workflows"


def actionlint() -> str:
    found = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    assert Path(found).exists(), "actionlint not installed (pip install -e '.[test]')"
    return found


def test_workflows_pass_actionlint():
    proc = subprocess.run([actionlint(), "-no-color"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_does_catch_a_broken_workflow(tmp_path):
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "bad.yml").write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo ${{ matrix.nope }}\n")
    proc = subprocess.run([actionlint(), "-no-color", str(tmp_path / ".github" / "workflows" / "bad.yml")],
                          capture_output=True, text=True)
    assert proc.returncode != 0


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def test_release_builds_the_matrix_on_gpu_and_pushes_only_through_the_smoke():
    wf = load("release.yml")
    jobs = wf["jobs"]
    assert "vlmbuild matrix --release" in jobs["matrix"]["steps"][-1]["run"]
    build = jobs["build"]
    assert build["strategy"]["matrix"]["include"] == "${{ fromJSON(needs.matrix.outputs.variants) }}"
    assert "gpu" in build["runs-on"] and "self-hosted" in build["runs-on"]
    run = next(s["run"] for s in build["steps"] if "vlmbuild build" in str(s.get("run", "")))
    assert "--smoke-device gpu" in run and "--push" in run and "--allow-cpu-evidence" not in run
    assert "--sign-keyless" in run and "--unsigned" not in run and build["permissions"]["id-token"] == "write"
    # the release builds the whole image: flash-attn compiled from its sdist, the time a cold runner needs for it
    assert "--leave-out" not in run and "VLMBUILD_LEAVE_OUT" not in str(wf) and build["timeout-minutes"] >= 360
    verify = next(s["run"] for s in build["steps"] if "vlmbuild inspect" in str(s.get("run", "")))
    assert "--verify" in verify and "--certificate-identity" in verify and "token.actions.githubusercontent.com" in verify
    assert wf["concurrency"]["cancel-in-progress"] is False and "github.ref" in wf["concurrency"]["group"]
    assert any("upload-artifact" in str(s.get("uses", "")) for s in build["steps"])
    assert any("GITHUB_STEP_SUMMARY" in str(s.get("run", "")) for s in build["steps"])


def test_ci_runs_lock_check_rules_and_docker_tests():
    text = (WORKFLOWS / "ci.yml").read_text()
    for needle in ("vlmbuild lock --check", "vlmbuild check", '-m "docker and not cu124"', "-m cu124", "-m stack",
                   "ruff check", "mypy"):
        assert needle in text, needle


def test_relock_opens_a_pull_request():
    wf = load("relock.yml")
    on = wf.get("on", wf.get(True))
    assert "schedule" in on
    steps = wf["jobs"]["relock"]["steps"]
    assert any(s.get("run") == "vlmbuild lock --upgrade" for s in steps)  # the weekly relock moves pins on purpose
    assert any("create-pull-request" in str(s.get("uses", "")) for s in steps)
