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


# ------------------------------------------------------------------ lora

# Each fault's own findings (the check lists every one it makes, in one message).
LORA_FAULTS = {
    "lora-wrong-targets": ["LoRA under zero2.json: 1 of the recipe's 15 LoRA targets have no adapter, first: lm_head",
                           "2 LoRA parameter(s) in the vision tower, first: base_model.model.visual.blocks.0.attn.qkv",
                           "2 LoRA parameter(s) were not trained",
                           "2 of 30 LoRA parameter(s) did not move in 2 steps"],
    "lora-trains-base": ["LoRA under zero2.json: 1 parameter(s) besides the LoRA ones were trained, first: "
                         "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight",
                         "1 base weight(s) changed in a LoRA run (not bit-identical to the checkpoint as loaded)"],
    # ZeRO-3 only, as huggingface/peft#2450 was: the zero2 leg passes, the ZeRO-3 leg's reload gives other logits
    "adapter-saved-empty": ["LoRA under zero3.json: the saved adapter loaded onto a fresh base model does not give the "
                            "trained model's logits"],
    "adapter-drops-tensor": ["LoRA under zero2.json: 1 of 30 LoRA parameter(s) are not in the adapter save_model "
                             "wrote", "first: base_model.model.lm_head.lora_A.default.weight"],
}


@pytest.mark.parametrize("fault", sorted(LORA_FAULTS))
def test_each_broken_part_of_the_lora_run_fails_lora_with_its_own_message(cli, stack_python, tmp_path, fault):
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load,lora", env=faulty(fault))
    assert result.code == 1, result.out[-3000:]
    lora = by_name(report)["lora"]
    assert lora["status"] == "failed", lora
    for message in LORA_FAULTS[fault]:
        assert message in lora["error"], (message, lora["error"])
    others = {m for f, ms in LORA_FAULTS.items() if f != fault for m in ms[:1]}
    assert not [m for m in others if m in lora["error"]], lora["error"]
    assert lora.get("traceback") is None  # the check's finding, not a crash


# ------------------------------------------------------------------ trainer_resume

# Each fault's own finding. A resume that went wrong also ends with other Adam moments and parameters (and, where
# the optimizer's state was not loaded, another learning rate: it lives in the optimizer's param groups): those are
# consequences, allowed beside it; another fault's own finding is not.
RESUME_FAULTS = {
    # the rate a step runs with lives in the optimizer's param groups: it comes back with the optimizer's state
    "resume-no-optimizer": "the learning rate was not restored: step 3 ran with 0.001, the uninterrupted run's with "
                           "0.000333333; the optimizer state is not the uninterrupted run's (8 of 8 entries)",
    "resume-restarts-step": "the step count was not restored: the resumed run took steps [1, 2, 3] and ended at global "
                            "step 3; the uninterrupted run took [3] after step 2 and ended at 3",
    "resume-restarts-scheduler": "the scheduler was not restored: after step 3 it set learning rate 0.000666667 for the "
                                 "next step, the uninterrupted run's 0",
    "resume-no-skip": "the data order was not restored: step 3 took dataset rows [0], the uninterrupted run's [2]",
    "resume-no-rng": "the random state was not restored: step 3 sampled other completions",
    # the first half's own findings: the run that is to be resumed
    "checkpoint-no-rng": "the Trainer's checkpoint at step 2 lacks rng_state_0.pth",
    "trainer-sgd": "the run's optimizer (torch.optim.sgd.SGD) holds no Adam moments: resuming its state would prove "
                   "nothing",
    "trainer-stops-early": "the uninterrupted run took 1 steps, expected 3; the Trainer's checkpoint at step 2 lacks",
}
# The words that open each fault's own finding, where no other fault's run makes them too (the optimizer state and
# the parameters differ after any resume that went another way: resume-no-optimizer's finding has none of its own).
OPENINGS = {"resume-restarts-step": "the step count was not restored", "resume-no-skip": "the data order was not",
            "resume-restarts-scheduler": "the scheduler was not restored", "resume-no-rng": "the random state was not",
            "checkpoint-no-rng": "lacks rng_state", "trainer-sgd": "holds no Adam moments",
            "trainer-stops-early": "steps, expected 3"}
# A step count that restarted also takes the first rows again.
ALSO_SEEN = {"resume-restarts-step": {"resume-no-skip"}}


@pytest.mark.parametrize("fault", sorted(RESUME_FAULTS))
def test_each_part_of_the_resume_that_does_not_happen_fails_trainer_resume(cli, stack_python, tmp_path, fault):
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load,trainer_resume", env=faulty(fault))
    assert result.code == 1, result.out[-3000:]
    resume = by_name(report)["trainer_resume"]
    assert resume["status"] == "failed" and RESUME_FAULTS[fault] in resume["error"], resume["error"]
    if fault.startswith("resume-"):  # a resume that went another way than the uninterrupted run ends elsewhere
        assert ("the parameters are not the uninterrupted run's" in resume["error"]) == (
            fault != "resume-restarts-scheduler"), resume["error"]  # the scheduler shows only in the next step's rate
    allowed = ALSO_SEEN.get(fault, set()) | {fault}
    assert not [m for f, m in OPENINGS.items() if f not in allowed and m in resume["error"]], resume["error"]
    assert resume.get("traceback") is None


def test_a_resume_with_torch_loads_weights_only_default_turned_off_fails_trainer_resume(cli, stack_python, tmp_path):
    """torch 2.6's weights_only default is the path users' resumes take (and where DeepSpeed 0.15 broke): a run with
    it turned off (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) resumes fine and proves nothing of it, so it fails."""
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load,trainer_resume",
                           env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert result.code == 1, result.out[-3000:]
    error = by_name(report)["trainer_resume"]["error"]
    assert "loaded a pickled object with torch.load's defaults: weights_only is off in this run" in error, error
    assert "not restored" not in error and "not the uninterrupted run's" not in error


# ------------------------------------------------------------------ prebuilt_ops


PREBUILT_RUN = ("--checks", "zero3_load,train_step,grpo,optimizer_offload,lora,prebuilt_ops")


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
