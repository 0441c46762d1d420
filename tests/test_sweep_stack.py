"""`vlmbuild sweep` for real: cells locked by uv, installed into environments of their own, smoked with the smoke
code images ship, recorded; re-runs measure nothing; shards merge into the whole; bad input and SIGTERM.

The measured sweep is two cells (the release pins, and trl 0.15.2 beside them, which fails grpo as its rule
says); the shard and interruption tests use cells that cannot resolve or are stopped while installing, which
cost seconds. The DeepSpeed wheel with its ops is the one the stack venv built (one key, one build)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SWEEP_WORK

pytestmark = pytest.mark.stack
HOOKS_RULE = "ds-0.16.4-trl-0.15-generation-hooks"


def sweep(cli, results: Path, *args: str, timeout: int = 1800):
    return cli("sweep", "vlm-r1", "--variant", "local", "--results", str(results), "--work", str(SWEEP_WORK), *args,
               timeout=timeout)


def shm_buffers() -> set[str]:
    """DeepSpeed's shared-memory buffers that no running process maps: what a finished run left behind (a smoke
    running beside the suite maps its own)."""
    names = {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("deepspeed")}
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        mapped |= {n for n in names if f"/dev/shm/{n}" in text}
    return names - mapped


def test_a_two_cell_sweep_measures_explains_and_is_not_measured_twice(cli, tmp_path, stack_python):
    results = tmp_path / "compat" / "vlm-r1-local.json"
    buffers = shm_buffers()
    # grpo and what it needs: the check trl 0.15's rule is about, in a cell of under a minute
    result = sweep(cli, results, "--axis", "deepspeed=0.19.8", "--axis", "trl=0.15.2,0.17.0", "--checks", "zero3_load,grpo")
    assert result.code == 0, result.out[-4000:] + result.err[-4000:]
    assert "[2/2]" in result.out and "ETA" in result.out
    data = json.loads(results.read_text())
    cells = {c["pins"]["trl"]: c for c in data["cells"]}
    release, old_trl = cells["0.17.0"], cells["0.15.2"]
    assert release["result"] == "passed", release
    assert {c["name"] for c in release["checks"]} >= {"zero3_load", "grpo"}
    assert all(c["status"] == "passed" for c in release["checks"])
    assert release["versions"]["trl"] == "0.17.0" and release["versions"]["deepspeed"] == "0.19.8"
    assert release["jit_compiled"] == []  # DeepSpeed's prebuilt ops served: nothing compiled in the cell
    assert old_trl["result"] == "failed" and old_trl["first_failure"]["check"] == "grpo"
    assert "_register_hooks_recursively" in old_trl["first_failure"]["error"]
    assert old_trl["explained_by"] == [HOOKS_RULE] and old_trl["versions"]["trl"] == "0.15.2"
    for cell in data["cells"]:
        assert len(cell["lock_sha256"]) == 64 and cell["host"]["cores"]
        # the smoke's report kept beside the results, the bytes the record's sha256 names
        report = results.parent / cell["reports"][0]
        assert hashlib.sha256(report.read_bytes()).hexdigest() == cell["report_sha256"]
        assert json.loads(report.read_text())["environment"]["lockfile"].endswith("lock.txt")
    assert not list((SWEEP_WORK / "envs").glob("*")), "a cell's environment was left behind"
    assert shm_buffers() <= buffers, "a cell left DeepSpeed's shared-memory buffers behind"

    before = results.read_bytes()
    again = sweep(cli, results, "--axis", "deepspeed=0.19.8", "--axis", "trl=0.15.2,0.17.0", "--checks", "zero3_load,grpo")
    assert again.code == 0 and "2 already measured" in again.out and "0 to measure" in again.out, again.out
    assert results.read_bytes() == before

    shown = cli("sweep", "report", str(results))
    assert shown.code == 0 and f"explained by {HOOKS_RULE}" in shown.out and "PASS" in shown.out
    grid = cli("sweep", "report", "--markdown", str(results))
    assert f"| 0.19.8 | FAIL grpo ({HOOKS_RULE}) | PASS |" in grid.out, grid.out


UNRESOLVABLE = ("--axis", "trl=0.18.0,0.18.1", "--axis", "transformers=4.49.0")  # trl 0.18 needs transformers >= 4.50


def test_shards_merged_equal_the_whole(cli, tmp_path):
    from vlmbuild.sweep_results import outcome

    whole, one, two, merged = (tmp_path / f"{n}.json" for n in ("whole", "one", "two", "merged"))
    assert sweep(cli, whole, *UNRESOLVABLE).code == 0
    assert sweep(cli, one, *UNRESOLVABLE, "--shard", "1/2").code == 0
    assert sweep(cli, two, *UNRESOLVABLE, "--shard", "2/2").code == 0
    parts = [json.loads(p.read_text())["cells"] for p in (one, two)]
    assert len(parts[0]) == len(parts[1]) == 1 and not {c["id"] for c in parts[0]} & {c["id"] for c in parts[1]}
    result = cli("sweep", "merge", str(one), str(two), "-o", str(merged))
    assert result.code == 0, result.err
    got, want = json.loads(merged.read_text()), json.loads(whole.read_text())
    assert [outcome(c) for c in got["cells"]] == [outcome(c) for c in want["cells"]]
    assert {a["package"]: sorted(a["versions"]) for a in got["axes"]} == \
        {a["package"]: sorted(a["versions"]) for a in want["axes"]}
    cell = want["cells"][0]
    assert cell["result"] == "unresolvable" and "transformers>=4.50" in cell["reason"], cell


@pytest.mark.parametrize("axis, says", [
    ("deepspeed=0.99.0", "the index has no deepspeed 0.99.0"),
    ("vllm=0.8.5", "has no package of that name"),
])
def test_bad_axes_exit_2_before_anything_is_installed(cli, tmp_path, axis, says):
    results = tmp_path / "r.json"
    result = sweep(cli, results, "--axis", axis, "--axis", "trl=0.17.0")
    assert result.code == 2 and says in result.err and "Traceback" not in result.err, result.err
    assert not results.exists()


def test_sigterm_keeps_finished_cells_and_leaves_nothing_running(tmp_path):
    """The first cell cannot resolve (seconds); the second is stopped while uv installs it. Then the next run goes
    on from the finished cell."""
    results = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "vlmbuild", "sweep", "vlm-r1", "--variant", "local", "--results", str(results),
           "--work", str(tmp_path / "work"), "--axis", "trl=0.18.0,0.17.0", "--axis", "transformers=4.49.0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "NO_COLOR": "1"})
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[2/2]" in line and "measuring" in line:
            break
    time.sleep(4)  # inside the second cell's install (uv venv, then ~30 s of uv pip install)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, "".join(lines) + rest
    data = json.loads(results.read_text())
    assert [c["pins"]["trl"] for c in data["cells"]] == ["0.18.0"]
    assert not list((tmp_path / "work" / "envs").glob("*"))
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the interrupted cell still run: {left}"
