"""Every failure branch of the smoke's checks, reached for real: the good stack with one fault injected from outside
the smoke's code (tests/faults/sitecustomize.py patches transformers, trl's trainer underneath, torch or DeepSpeed
at import, as a broken upstream would behave), or with a broken environment laid over it. Each fault must fail
its check with that check's own message and no other check's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import FAULTS
from test_smoke_stack import LOCK, by_name, image_smoke, overlay, smoke

pytestmark = pytest.mark.stack


def faulty(fault: str) -> dict:
    return {"PYTHONPATH": str(FAULTS), "VLMBUILD_FAULT": fault}


# ------------------------------------------------------------------ grpo

GRPO_FAULTS = {
    "generate-nothing": "generation under ZeRO-3 returned no new token for any of",
    "trainer-stops-early": "the trainer took 1 optimizer steps, expected 2",
    "nan-loss": "loss not finite: [nan",
    "zero-stage-2": "the trained model carries no ZeRO-3 parameters (ds_id): it was not trained under ZeRO-3 "
                    "(the resolved config says stage 2)",
    "no-16bit-save": "save_model wrote no consolidated .safetensors into",
    "save-corrupts": "1 tensor(s) of the consolidated save differ from the trained parameters",
    "no-update": "no parameter changed in 2 optimizer step(s): the update did not reach the weights",
}


@pytest.mark.parametrize("fault", sorted(GRPO_FAULTS))
def test_each_broken_part_of_the_grpo_run_fails_grpo_with_its_own_message(cli, stack_python, tmp_path, fault):
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load,grpo", env=faulty(fault))
    assert result.code == 1, result.out[-3000:]
    checks = by_name(report)
    assert checks["zero3_load"]["status"] == "passed"
    grpo = checks["grpo"]
    assert grpo["status"] == "failed" and GRPO_FAULTS[fault] in grpo["error"], grpo["error"]
    assert not [m for f, m in GRPO_FAULTS.items() if f != fault and m in grpo["error"]]
    assert "Traceback" not in grpo["error"] and grpo.get("traceback") is None  # the check's finding, not a crash


# ------------------------------------------------------------------ optimizer_offload

OFFLOAD_FAULTS = {
    "offload-dropped": "the offload config trained with torch.optim.adamw.AdamW, not DeepSpeed's CPU Adam (cpu_adam)",
    "cpu-adam-no-step": "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam holds no Adam moments after 1 step(s): the "
                        "step never ran through it",
}


@pytest.mark.parametrize("fault", sorted(OFFLOAD_FAULTS))
def test_an_offload_that_did_not_happen_fails_optimizer_offload(cli, stack_python, tmp_path, fault):
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load,grpo,optimizer_offload",
                           env=faulty(fault))
    assert result.code == 1, result.out[-3000:]
    checks = by_name(report)
    assert checks["grpo"]["status"] == "passed"  # the zero3 config has no offload: untouched by either fault
    offload = checks["optimizer_offload"]
    assert offload["status"] == "failed" and OFFLOAD_FAULTS[fault] in offload["error"], offload["error"]
    assert not [m for f, m in OFFLOAD_FAULTS.items() if f != fault and m in offload["error"]]
    assert '"adam_step": 0' in offload["error"] or fault == "offload-dropped"  # what was observed is in the message


# ------------------------------------------------------------------ prebuilt_ops


PREBUILT_RUN = ("--checks", "zero3_load,train_step,grpo,optimizer_offload,prebuilt_ops")


def test_an_op_deepspeed_silently_goes_without_fails_prebuilt_ops(stack_python, tmp_path):
    """DeepSpeed finds deepspeed_shm_comm incompatible: build_shm_op returns None, the ranks run on plain gloo and
    every other check passes. Only prebuilt_ops, which asks what was loaded, sees the op the image declares missing."""
    proc, report = image_smoke(stack_python, tmp_path, *PREBUILT_RUN, env=faulty("shm-incompatible"))
    assert proc.code == 1, proc.out[-3000:] + proc.err[-2000:]
    checks = by_name(report)
    assert [checks[n]["status"] for n in ("zero3_load", "train_step", "grpo", "optimizer_offload")] == ["passed"] * 4
    ops = checks["prebuilt_ops"]
    assert ops["status"] == "failed"
    for rank in (0, 1):
        assert f"deepspeed_shm_comm: not loaded on rank {rank}" in ops["error"], ops["error"]
    assert "cpu_adam" not in ops["error"] and ops["details"]["loaded"]["cpu_adam"].keys() == {"0", "1"}
    assert ops["device"] == "cpu" and ops["world_size"] == 2


def test_an_op_compiled_at_run_time_fails_prebuilt_ops(stack_python, tmp_path):
    """DeepSpeed's metadata says deepspeed_shm_comm is not built in: it is JIT-compiled at the ranks' start and
    loaded from torch's extensions directory. The run works; prebuilt_ops names both what it loaded and where."""
    proc, report = image_smoke(stack_python, tmp_path, *PREBUILT_RUN, env=faulty("shm-jit"))
    assert proc.code == 1, proc.out[-3000:] + proc.err[-2000:]
    checks = by_name(report)
    assert checks["optimizer_offload"]["status"] == "passed"
    error = checks["prebuilt_ops"]["error"]
    assert "deepspeed_shm_comm: not built into DeepSpeed" in error, error
    assert "deepspeed_shm_comm: loaded on rank 0 from" in error and "not from DeepSpeed's package" in error
    assert "ops were compiled at run time into" in error and "deepspeed_shm_comm" in error.split("compiled")[-1]


# ------------------------------------------------------------------ stack


def broken_overlay(tmp_path: Path) -> Path:
    """A directory laid over the good venv: a second copy of a locked package (idna, at its locked version), a
    package the lock does not have (iniconfig), one of whose files is changed after its installation."""
    target = tmp_path / "overlay"
    shutil.copytree(overlay("idna==3.20"), target, ignore=shutil.ignore_patterns(".complete"))
    shutil.copytree(overlay("iniconfig==2.1.0"), target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
    init = target / "iniconfig" / "__init__.py"
    init.write_text(init.read_text() + "\n# patched in place\n")
    return target


def test_a_patched_file_an_unlocked_package_and_a_duplicate_each_fail_the_stack_check(cli, stack_python, tmp_path):
    layer = broken_overlay(tmp_path)
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "stack", "--lockfile", str(LOCK),
                           env={"PYTHONPATH": str(layer)})
    assert result.code == 1
    stack = by_name(report)["stack"]
    assert stack["status"] == "failed"
    problems = [line.strip() for line in stack["error"].splitlines()[1:]]
    assert sorted(problems) == sorted([
        f"idna: 2 installed copies, the first shadows the rest: 3.20 at {layer}/idna-3.20.dist-info, 3.20 at "
        f"{stack_python.parent.parent}/lib/python3.11/site-packages/idna-3.20.dist-info",
        f"iniconfig 2.1.0: {layer}/iniconfig/__init__.py differs from its RECORD hash (changed after install)",
        f"iniconfig 2.1.0 ({layer}/iniconfig-2.1.0.dist-info): installed but not in the lockfile",
    ]), problems
    assert stack["details"]["files"]["mismatches"] == 1 and stack["details"]["lock"]["unlocked"] == 1


# ------------------------------------------------------------------ the ranks' end

def test_a_rank_whose_teardown_would_abort_ends_with_the_status_its_checks_earned(cli, stack_python, tmp_path):
    """gloo's worker threads can abort a rank in the interpreter's teardown after it reported every check
    (pytorch/pytorch#179291; it failed a CI run once). The ranks end before that teardown, so the run's verdict is
    its checks'. The fault is first seen to abort a plain process with RANK set, so it is not idle here."""
    fault = faulty("teardown-abort")
    plain = subprocess.run([str(stack_python), "-c", "import torch.distributed"], capture_output=True, text=True,
                           env={**os.environ, **fault, "RANK": "0"}, timeout=300)
    assert plain.returncode == -signal.SIGABRT, plain.stderr[-2000:]
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load", env=fault)
    assert result.code == 0, result.out[-3000:]
    assert by_name(report)["zero3_load"]["status"] == "passed"
