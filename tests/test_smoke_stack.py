"""The smoke run for real on CPU: torch 2.6.0, DeepSpeed, transformers 4.49.0 from the committed lockfile.

Faults are injected the way a broken upstream behaves, from outside the smoke's code: a sitecustomize
(tests/faults) that patches transformers at import, and DeepSpeed 0.15.4 (the seed's) laid over the venv.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CACHE, FAULTS, REPO, Result, smoke_ranks_running

pytestmark = pytest.mark.stack
LOCK = REPO / "lockfiles" / "vlm-r1" / "local.txt"


def smoke(cli, python: Path, tmp_path: Path, *extra: str, env: dict | None = None):
    report = tmp_path / "report.json"
    result = cli("smoke", "--local", "--python", str(python), "--device", "cpu", "--report", str(report),
                 "--timeout", "400", *extra, env=env)
    data = json.loads(report.read_text()) if report.is_file() else None
    return result, data


def by_name(report) -> dict:
    return {c["name"]: c for c in report["checks"]}


def image_smoke_command(python: Path, tmp_path: Path, *extra: str, env: dict | None = None):
    """The smoke as an image runs it: its own entry point with the lockfile and the variant's metadata, the ops its
    DeepSpeed was built with included (the stack venv's DeepSpeed carries the CPU ops, as the local image's does).
    Returns (command, environment, report path)."""
    from vlmbuild.lockfile import read_lockfile
    from vlmbuild.plan import make_plan
    from vlmbuild.render import stage_smoke_sources
    from vlmbuild.spec import load_spec

    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("local")
    lock = read_lockfile(LOCK)
    staged = tmp_path / "src"
    stage_smoke_sources(staged)
    (tmp_path / "variant.json").write_text(make_plan(variant, lock).variant_json)
    report = tmp_path / "report.json"
    env = dict(env or {})
    path = os.pathsep.join([str(staged / "lib")] + ([env.pop("PYTHONPATH")] if "PYTHONPATH" in env else []))
    cmd = [str(python), "-m", "vlmbuild.smoke", "--device", "cpu", "--timeout", "600", "--lockfile", str(LOCK),
           "--variant-json", str(tmp_path / "variant.json"), "--report", str(report), *extra]
    return cmd, {**os.environ, **env, "PYTHONPATH": path}, report


def image_smoke(python: Path, tmp_path: Path, *extra: str, env: dict | None = None):
    cmd, environment, report = image_smoke_command(python, tmp_path, *extra, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=environment, cwd=tmp_path)
    return Result(proc.returncode, proc.stdout, proc.stderr), (json.loads(report.read_text()) if report.is_file()
                                                               else None)


def deepspeed_shm_buffers() -> set[Path]:
    return set(Path("/dev/shm").glob("deepspeed_*"))


@pytest.fixture(scope="module")
def good_run(stack_python, tmp_path_factory):
    """One smoke of the good stack as its image runs it; several tests read its report (and what it left in
    /dev/shm: ``result.shm_left``)."""
    before = deepspeed_shm_buffers()
    result, report = image_smoke(stack_python, tmp_path_factory.mktemp("good"))
    result.shm_left = sorted(deepspeed_shm_buffers() - before)
    return result, report


def test_good_stack_passes_every_check(good_run):
    result, report = good_run
    assert result.code == 0, result.out + result.err
    assert report["schema_version"] == 2 and report["mode"] == "cpu" and report["world_size"] == 2
    assert report["passed"] is True
    checks = by_name(report)
    assert list(checks) == ["stack", "zero3_load", "train_step", "checkpoint_resume", "grpo", "optimizer_offload",
                            "lora", "trainer_resume", "prebuilt_ops"]
    for name, check in checks.items():  # every check says where it ran and on how many ranks
        assert (check["device"], check["world_size"]) == ("cpu", 1 if name == "stack" else 2), name
    stack = checks["stack"]["details"]
    assert stack["lock"]["mismatches"] == 0 and stack["lock"]["unlocked"] == 0
    assert stack["files"]["checked"] > 10_000 and stack["files"]["mismatches"] == 0  # every file of every package
    # the stack check imported the recipe's modules (the spec's list, through the lockfile's environment)
    assert {"math_verify", "Levenshtein", "json_repair", "wandb", "pip"} <= set(checks["stack"]["details"]["imports"])
    load = checks["zero3_load"]["details"]
    assert load["partitioned"] == load["parameters"] > 0 and load["vision_parameters"] > 0
    losses = checks["train_step"]["details"]["losses"]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert checks["checkpoint_resume"]["details"]["optimizer_tensors_compared"] >= 2
    # the ops the image declares, each loaded on both ranks from DeepSpeed's own package, nothing compiled
    ops = checks["prebuilt_ops"]["details"]
    assert set(ops["loaded"]) == {"cpu_adam", "deepspeed_shm_comm", "fused_adam"} and ops["compiled_at_run_time"] == []
    for op, ranks in ops["loaded"].items():
        assert set(ranks) == {"0", "1"} and all(f.startswith(ops["package"] + "/ops/") for f in ranks.values()), op
    assert "RESULT: PASS on CPU (CPU only: not a GPU validation)" in result.out


def test_grpo_runs_the_recipe_path_under_zero3(good_run):
    """trl's GRPOTrainer with the recipe's zero3 config: generation, reference model, steps, consolidated save."""
    result, report = good_run
    assert result.code == 0, result.out[-3000:] + result.err[-2000:]
    grpo = by_name(report)["grpo"]["details"]
    assert grpo["steps"] == 2 and grpo["generations"] >= 2 and min(grpo["completion_lengths"]) > 0
    assert grpo["reference_model"] is True and grpo["parameters_changed"] > 0
    assert grpo["optimizer"] == "torch.optim.adamw.AdamW"  # made by the HF Trainer: the recipe's config has none
    ds = grpo["deepspeed_config"]
    assert ds["stage"] == 3 and ds["overlap_comm"] is True and ds["train_batch_size"] == 2
    assert isinstance(ds["reduce_bucket_size"], (int, float))  # an "auto" the HF integration resolved
    save = grpo["consolidated_save"]
    assert save["files"] == ["model.safetensors"] and save["tensors_compared"] == grpo["parameters"]
    offload = by_name(report)["optimizer_offload"]["details"]
    assert offload["steps"] == 1 and offload["deepspeed_config"]["offload_optimizer"] == "cpu"
    # as DeepSpeed holds the optimizer after the step: its CPU Adam, with one step counted and moments written
    state = offload["offload"]
    assert state["optimizer"] == "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam" and state["adam_step"] == 1
    assert state["adam_moments"]["written"] and state["adam_moments"]["count"] >= 2
    assert state["parameter_shards"]["count"] == grpo["parameters"]
    assert offload["placement"].startswith("not judged on the CPU")


def test_lora_runs_the_recipes_lora_on_its_zero2_config_and_under_zero3(good_run):
    """What the lora check ran, read from its report: the recipe's targets and settings, ZeRO-2 with DeepSpeed's own
    AdamW from zero2.json's optimizer block (its CPU fused_adam, prebuilt) and the adapter disabled as the reference,
    ZeRO-3 with torch's AdamW and trl's reference model; reentrant checkpointing as the recipe runs; the adapter
    reproduced the trained logits exactly on the CPU."""
    result, report = good_run
    lora = by_name(report)["lora"]
    assert lora["status"] == "passed" and (lora["device"], lora["world_size"]) == ("cpu", 2)
    assert lora["details"]["settings"] == {"r": 64, "lora_alpha": 128, "lora_dropout": 0.05, "task_type": "CAUSAL_LM"}
    zero2, zero3 = lora["details"]["legs"]["zero2"], lora["details"]["legs"]["zero3"]
    assert (zero2["stage"], zero2["optimizer"]) == (2, "deepspeed.ops.adam.fused_adam.FusedAdam")
    assert (zero3["stage"], zero3["optimizer"]) == (3, "torch.optim.adamw.AdamW")
    assert zero2["reference"] == "the adapter disabled" and zero3["reference"] == "trl's reference model"
    for leg in (zero2, zero3):
        # 2 layers x 7 projections + lm_head; A and B of each; the base model's 56 tensors untouched
        assert (leg["targets"], leg["lora_parameters"], leg["trainable"], leg["base_parameters"]) == (15, 30, 30, 56)
        assert leg["use_reentrant"] is True and leg["steps"] == 2
        assert leg["adapter"]["logits_relative_error"] == 0.0 and "adapter_model.safetensors" in leg["adapter"]["files"]


def test_trainer_resume_resumes_in_fresh_processes_to_the_uninterrupted_run(good_run):
    result, report = good_run
    resume = by_name(report)["trainer_resume"]
    assert resume["status"] == "passed" and (resume["device"], resume["world_size"]) == ("cpu", 2)
    run, resumed = resume["details"]["run"], resume["details"]["resume"]
    assert run["checkpoint"] == "checkpoint-2" and {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt",
                                                    "trainer_state.json", "global_step2"} <= set(run["checkpoint_files"])
    assert run["optimizer"] == "torch.optim.adamw.AdamW"
    assert resumed["resumed_steps"] == [3] and resumed["global_step"] == 3 and resumed["compared"] == "bit for bit"
    assert resumed["optimizer_tensors_compared"] >= 4 and resumed["parameters_compared"] == 56
    assert resumed["torch_load_weights_only_by_default"] is True


def test_a_finished_smoke_leaves_no_deepspeed_buffers_in_dev_shm(good_run):
    """DeepSpeed's CPU comm leaves a 32-70 MB buffer per rank in /dev/shm after a run that passed; in Docker's
    default 64 MB /dev/shm the next run segfaults. The launcher removes the ones its ranks made."""
    result, report = good_run
    assert report["passed"] is True
    assert result.shm_left == []


def running(pid: int) -> bool:
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_launcher_that_is_killed_takes_its_ranks_with_it(stack_python, tmp_path, sig):
    """An outer timeout kills the launcher: its ranks must not live on (an orphaned rank spins in DeepSpeed's shm
    wait at 100 % of a core and starves every later smoke). SIGTERM is answered by stopping the ranks; a SIGKILL
    cannot be, and the ranks' parent-death signal ends them."""
    cmd, env, _ = image_smoke_command(stack_python, tmp_path, "--checks", "zero3_load,train_step")
    launcher = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(smoke_ranks_running()) < 2:
        assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.05)
    ranks = smoke_ranks_running()
    launcher.send_signal(sig)
    code = launcher.wait(timeout=60)
    gone_by = time.monotonic() + 5  # the ranks are still importing torch: left alone they would run on for long
    while [p for p in ranks if running(p)]:
        assert time.monotonic() < gone_by, f"ranks {ranks} outlived their launcher ({sig.name})"
        time.sleep(0.05)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)


def test_transformers_main_regression_fails_zero3_load_and_is_explained(cli, stack_python, tmp_path):
    env = {"PYTHONPATH": str(FAULTS), "VLMBUILD_FAULT": "zero3-no-gather"}
    result, report = smoke(cli, stack_python, tmp_path, env=env)
    assert result.code == 1
    checks = by_name(report)
    assert checks["stack"]["status"] == "passed"  # versions are fine: only running the path finds it
    assert checks["zero3_load"]["status"] == "failed"
    assert "the shape in current model is torch.Size([0])" in checks["zero3_load"]["error"]
    assert "size mismatch for visual." in checks["zero3_load"]["error"]
    assert [e["id"] for e in checks["zero3_load"]["explanations"]] == ["tf-main-zero3-load-no-gather"]
    assert "https://github.com/huggingface/transformers/pull/36455" in result.out


def test_silent_weight_corruption_fails_zero3_load(cli, stack_python, tmp_path):
    env = {"PYTHONPATH": str(FAULTS), "VLMBUILD_FAULT": "silent-corruption"}
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load", env=env)
    assert result.code == 1
    check = by_name(report)["zero3_load"]
    assert check["status"] == "failed"
    assert "visual.blocks.0.mlp.up_proj.weight: not bit-identical to the checkpoint" in check["error"]
    assert "shape [128, 64]" in check["error"]


def test_a_model_loaded_whole_on_every_rank_fails_zero3_load(cli, stack_python, tmp_path):
    """Right weights, no error, but no ZeRO-3: the partition test itself must catch it."""
    env = {"PYTHONPATH": str(FAULTS), "VLMBUILD_FAULT": "not-partitioned"}
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load", env=env)
    assert result.code == 1
    check = by_name(report)["zero3_load"]
    assert check["status"] == "failed"
    assert "parameters are not ZeRO-3 partitioned" in check["error"], check["error"]


def overlay(requirement: str) -> Path:
    """One package at another version, laid over the good venv with PYTHONPATH (made once, kept in the cache)."""
    from vlmbuild.lock import resolver_environment, uv_binary

    path = CACHE / f"overlay-{requirement.replace('==', '-')}"
    if not (path / ".complete").is_file():
        subprocess.run([uv_binary(), "pip", "install", "-q", "--target", str(path), "--no-deps",
                        "--python-version", "3.11", requirement], check=True, env=resolver_environment())
        (path / ".complete").write_text("ok")
    return path


def test_an_intermittent_corruption_is_caught_by_repeating_the_load(cli, stack_python, tmp_path):
    """A loader that corrupts one run in two: a single run passes it; --repeat 2 fails it."""
    def run(repeat: str, name: str):
        env = {"PYTHONPATH": str(FAULTS), "VLMBUILD_FAULT": "intermittent-corruption",
               "VLMBUILD_FAULT_STATE": str(tmp_path / f"{name}.launches")}
        (tmp_path / name).mkdir()
        return smoke(cli, stack_python, tmp_path / name, "--checks", "zero3_load", "--repeat", repeat, env=env)

    once, report = run("1", "once")
    assert once.code == 0 and [c["name"] for c in report["checks"]] == ["zero3_load"]
    twice, report = run("2", "twice")
    assert twice.code == 1
    checks = by_name(report)
    assert checks["zero3_load"]["status"] == "passed"  # the first launch is clean
    repeat = checks["zero3_repeat"]
    assert repeat["status"] == "failed" and "run 2" in repeat["error"] and "not bit-identical" in repeat["error"]


@pytest.fixture(scope="module")
def seed_deepspeed_overlay() -> Path:
    """DeepSpeed 0.15.4, the seed's."""
    return overlay("deepspeed==0.15.4")


def test_trl_015_with_new_deepspeed_fails_at_generation_because_it_ran(cli, stack_python, tmp_path):
    """Rule row 3 for real: trl 0.15.2 beside DeepSpeed 0.19.8. Loading, training and resuming pass; GRPO's
    generation under ZeRO-3 dies with the upstream error, which the rule then explains."""
    # the checks up to the one it fails and the one that needs that one (the stack check would fail the overlay, a
    # second copy of trl)
    result, report = smoke(cli, stack_python, tmp_path, "--checks",
                           "zero3_load,train_step,checkpoint_resume,grpo,optimizer_offload",
                           env={"PYTHONPATH": str(overlay("trl==0.15.2"))})
    assert result.code == 1
    checks = by_name(report)
    assert [checks[n]["status"] for n in ("zero3_load", "train_step", "checkpoint_resume")] == ["passed"] * 3
    grpo = checks["grpo"]
    assert grpo["status"] == "failed"
    assert "'DeepSpeedZeRoOffload' object has no attribute '_register_hooks_recursively'" in grpo["error"]
    assert "unwrap_model_for_generation" in grpo["traceback"]  # it got there by running, not by a version
    assert [e["id"] for e in grpo["explanations"]] == ["ds-0.16.4-trl-0.15-generation-hooks"]
    assert checks["optimizer_offload"]["status"] == "skipped"


def test_seed_stack_fails_where_it_really_breaks_on_cpu(cli, stack_python, tmp_path, seed_deepspeed_overlay):
    """On a host with no GPU, DeepSpeed 0.15.4 with triton 3.2 cannot even be imported (rule row 5).
    (On a GPU it imports and fails at checkpoint_resume instead: benchmarks/results/gpu-smoke-h200-seed-*.json.)"""
    result, report = smoke(cli, stack_python, tmp_path, env={"PYTHONPATH": str(seed_deepspeed_overlay)})
    assert result.code == 1
    checks = by_name(report)
    assert "import deepspeed failed: RuntimeError: 0 active drivers" in checks["stack"]["error"]
    assert checks["zero3_load"]["status"] == "failed" and "0 active drivers" in checks["zero3_load"]["error"]
    assert checks["train_step"]["status"] == "skipped"
    ids = [e["id"] for e in checks["zero3_load"]["explanations"]]
    assert ids == ["ds-0.16.3-triton-3.2-no-gpu-import"]


def test_deepspeed_0_19_7_cannot_even_be_imported_without_a_gpu_and_the_rule_says_why(cli, stack_python, tmp_path):
    """DeepSpeed 0.19.3-0.19.7 import triton's inference kernels whenever triton is installed, and triton 3.2's
    autotune decorator asks for a GPU driver at import (rule row 5 again, measured for each release)."""
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "stack,zero3_load",
                           env={"PYTHONPATH": str(overlay("deepspeed==0.19.7"))})
    assert result.code == 1
    checks = by_name(report)
    assert "import deepspeed failed: RuntimeError: 0 active drivers" in checks["stack"]["error"]
    assert "ds-0.16.3-triton-3.2-no-gpu-import" in checks["stack"]["error"]  # the stack check's own rule finding
    assert [e["id"] for e in checks["zero3_load"]["explanations"]] == ["ds-0.16.3-triton-3.2-no-gpu-import"]
    assert "triton_matmul_kernel" in checks["zero3_load"]["traceback"]  # where it broke, by running


def test_peft_under_zero3_with_non_reentrant_checkpointing_trains_on_deepspeed_0_19_8(cli, stack_python, tmp_path):
    """The good side of rule ds-zero3-peft-non-reentrant-checkpointing, measured: with every checkpointing asked to
    be non-reentrant (what later trl made its default), the recipe's LoRA run passes on the image's DeepSpeed, which
    releases no frozen weight during a recompute since 0.19.3. (Its bad side cannot be run on the CPU: every
    DeepSpeed before 0.19.3 corrupts ZeRO-3 partitions on the CPU accelerator, measured 0.16.4 to 0.19.2, so the
    smoke stops at zero3_load; the rule's matcher is tested on the upstream error text.)"""
    env = {"PYTHONPATH": str(FAULTS), "VLMBUILD_FAULT": "non-reentrant-checkpointing"}
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load,lora", env=env)
    assert result.code == 0, result.out[-3000:]
    legs = by_name(report)["lora"]["details"]["legs"]
    assert legs["zero3"]["stage"] == 3 and legs["zero3"]["use_reentrant"] is False  # the fault took: it ran so


RESUME_COMPARISON = """
import json, torch
from vlmbuild.smoke.trainer_resume import resume_problems

def state(scale=1.0, shape=(4, 4), extra=False):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    optimizer = {"fp32_partition.0": weight.flatten() * scale, "adam.0.exp_avg": weight.flatten() * 0.1 * scale,
                 "adam.0.step": 3}
    if extra:
        optimizer["adam.1.exp_avg"] = torch.zeros(2)
    return {"global_step": 3, "next_learning_rate": 0.0, "optimizer": optimizer, "parameters": {"w": weight * scale},
            "steps": [{"step": 3, "learning_rate": 3e-4, "rows": [2], "completions": [[5, 6]]}]}

straight = state()
out = {}
for name, resumed in {"same": state(), "last_bits": state(1 + 1e-4), "far": state(1.05), "shape": state(shape=(2, 8)),
                      "one_run_only": state(extra=True)}.items():
    out[name] = {"cpu": resume_problems(straight, resumed, exact=True),
                 "gpu": resume_problems(straight, resumed, exact=False)}
print(json.dumps(out))
"""


def test_the_resume_comparison_is_exact_on_the_cpu_and_within_its_stated_tolerance_on_a_gpu(stack_python, tmp_path):
    """trainer_resume's comparison itself, on states made here (no GPU here: the GPU pass's tolerance is reached this
    way only): bit for bit on the CPU; on a GPU within 1e-2 of each tensor's largest value, so a last-bits difference
    passes there and a 5% one does not; a tensor of another shape, or one only one run has, fails on both."""
    from vlmbuild.render import stage_smoke_sources

    stage_smoke_sources(tmp_path / "src")
    proc = subprocess.run([str(stack_python), "-c", RESUME_COMPARISON], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "src" / "lib")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["same"] == {"cpu": [], "gpu": []}
    assert found["last_bits"]["gpu"] == [] and "adam.0.exp_avg: not bit-identical" in found["last_bits"]["cpu"][0]
    assert "w: not bit-identical to the uninterrupted run" in found["last_bits"]["cpu"][1]
    far = "; ".join(found["far"]["gpu"])
    assert "adam.0.exp_avg: differs by 0.05 of its largest value" in far and "w: differs by 0.05 of" in far
    for kind in ("cpu", "gpu"):
        assert "fp32_partition.0: another shape or dtype after resume" not in "; ".join(found["shape"][kind])
        assert "w: another shape or dtype after resume" in "; ".join(found["shape"][kind])
        assert "adam.1.exp_avg: in one run only" in "; ".join(found["one_run_only"][kind])


def test_gpu_mode_without_a_gpu_is_a_usage_error(cli, stack_python, tmp_path):
    result = cli("smoke", "--local", "--python", str(stack_python), "--device", "gpu")
    assert result.code == 2
    assert "torch sees no CUDA device" in result.err


def test_verify_install_compares_the_environment_with_the_lock(stack_python, tmp_path):
    env = dict(os.environ)
    from vlmbuild.render import stage_smoke_sources

    staged = tmp_path / "src"
    stage_smoke_sources(staged)
    env["PYTHONPATH"] = str(staged / "lib")
    ok = subprocess.run([str(stack_python), "-m", "vlmbuild.smoke", "verify-install", "--lockfile", str(LOCK)],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    bad_lock = tmp_path / "bad.txt"
    bad_lock.write_text(LOCK.read_text().replace("transformers==4.49.0", "transformers==4.50.0"))
    bad = subprocess.run([str(stack_python), "-m", "vlmbuild.smoke", "verify-install", "--lockfile", str(bad_lock)],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "transformers: locked 4.50.0, installed 4.49.0" in bad.stderr


MAKE_CHECKPOINT = """
import sys, torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from vlmbuild.smoke.tiny_model import tiny_processor
# A 'real' checkpoint as far as the smoke can tell: its own token ids, not the tiny model's (a real
# Qwen2.5-VL uses 151652 for <vision_start> and 151655 for the image token).
cfg = Qwen2_5_VLConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_window_layers=2, tie_word_embeddings=False,
    rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]}, bos_token_id=250, eos_token_id=251,
    pad_token_id=252, vision_start_token_id=253, image_token_id=254, video_token_id=255,
    vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                       spatial_merge_size=2, fullatt_block_indexes=[1]))
torch.manual_seed(1)
Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(sys.argv[1], safe_serialization=True)
ids = {"<|endoftext|>": 250, "<|im_end|>": 251, "<|pad|>": 252, "<|vision_start|>": 253, "<|image_pad|>": 254,
       "<|video_pad|>": 255, "<|vision_end|>": 248, "<|im_start|>": 249}
tiny_processor(256, ids).save_pretrained(sys.argv[1])  # a checkpoint ships its tokenizer and image processor
"""


def make_checkpoint(python: Path, where: Path) -> Path:
    from vlmbuild.render import stage_smoke_sources

    staged = where.parent / "src"
    stage_smoke_sources(staged)
    subprocess.run([str(python), "-c", MAKE_CHECKPOINT, str(where)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(staged / "lib")})
    return where


def test_model_dir_runs_the_checks_on_a_given_checkpoint(cli, stack_python, tmp_path):
    model = make_checkpoint(stack_python, tmp_path / "model")
    # the checks that read the checkpoint (every check on a model dir, in the image: test_pipeline_docker's bf16 one)
    result, report = smoke(cli, stack_python, tmp_path, "--model-dir", str(model),
                           "--checks", "zero3_load,train_step,checkpoint_resume,grpo")
    assert result.code == 0, result.out[-3000:] + result.err[-2000:]
    checks = by_name(report)
    assert report["model"] == str(model)
    # the checkpoint as the user gave it, its dtype and size, read from its safetensors headers
    checkpoint = report["checkpoint"]
    assert checkpoint["path"] == str(model) and checkpoint["dtype"] == "torch.float32"
    assert checkpoint["tensors"] == checks["zero3_load"]["details"]["parameters"] and checkpoint["parameters"] > 0
    assert f"checkpoint {model}: torch.float32, {checkpoint['parameters']:,} parameters" in result.out
    assert checks["zero3_load"]["details"]["parameters"] > 56  # untied lm_head: not the tiny built-in model
    assert checks["checkpoint_resume"]["status"] == "passed"
    assert checks["grpo"]["details"]["parameters"] == checks["zero3_load"]["details"]["parameters"]


@pytest.mark.parametrize("break_it, message", [
    (lambda d: None, "no config.json"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "model_type 'llama'"),
    (lambda d: (d / "config.json").write_text('{"model_type": "qwen2_5_vl"}'), "no *.safetensors"),
])
def test_model_dir_that_is_not_a_qwen25vl_checkpoint_is_a_usage_error(cli, stack_python, tmp_path, break_it, message):
    break_it(tmp_path)
    result = cli("smoke", "--local", "--python", str(stack_python), "--device", "cpu", "--model-dir", str(tmp_path))
    assert result.code == 2 and message in result.err, result.err
    assert "Traceback" not in result.err


ATTENTION = """
import sys, torch
from pathlib import Path
from transformers import Qwen2_5_VLForConditionalGeneration
from vlmbuild.smoke import attention, tiny_model
torch.manual_seed(0)
model_dir = Path(sys.argv[1])
Qwen2_5_VLForConditionalGeneration(tiny_model.tiny_config()).save_pretrained(model_dir)
# The comparison the GPU check makes (flash_attention_2 vs sdpa in bf16), here eager vs sdpa on the CPU.
details = attention.compare_attention(model_dir, torch.device("cpu"), torch.float32, "eager", "sdpa")
assert "workaround" not in details, details
assert details["language_model"]["relative_error"] < 1e-4 and details["vision_tower"]["cosine"] > 0.9999, details
# A candidate that computes something else must fail it: the candidate's side alone gets perturbed weights
# (one vision block's attention projection, by SCALE), as a kernel that is wrong by that much would be.
scale = float(sys.argv[2])
load_plain = attention.load_plain
def perturbed(model_dir, device, dtype, implementation):
    model = load_plain(model_dir, device, dtype, implementation)
    if implementation == "eager":
        with torch.no_grad():
            model.visual.blocks[0].attn.qkv.weight.mul_(scale)
    return model
attention.load_plain = perturbed
try:
    attention.compare_attention(model_dir, torch.device("cpu"), torch.float32, "eager", "sdpa")
    print("agreed")
except attention.AttentionProblem as exc:
    print("FAILED:", exc)
"""


def attention_run(python: Path, tmp_path: Path, scale: float) -> str:
    from vlmbuild.render import stage_smoke_sources

    for made in ("model", "src"):
        shutil.rmtree(tmp_path / made, ignore_errors=True)
    stage_smoke_sources(tmp_path / "src")
    proc = subprocess.run([str(python), "-c", ATTENTION, str(tmp_path / "model"), str(scale)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "src" / "lib")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_attention_comparison_runs_on_cpu_with_eager_against_sdpa(stack_python, tmp_path):
    """The GPU-only attention check cannot run here (no GPU, no flash-attn); its comparison code runs with two
    attention implementations the CPU has, module by module. The same weights agree; a candidate 3% off in one vision block's
    attention projection is beyond the tolerance; 0.1% off is within it (bf16 rounds away more than that)."""
    assert attention_run(stack_python, tmp_path, 1.001) == "agreed"
    failed = attention_run(stack_python, tmp_path, 1.03)
    assert failed.startswith("FAILED: visual.blocks.0.attn: eager differs from sdpa beyond tolerance"), failed


ROTARY = """
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling
from vlmbuild.smoke import attention

def flash_attn_apply_rotary_emb(x, cos, sin, *args, **kwargs):
    # A stand-in for flash-attn's rotary kernel (flash-attn cannot be installed here: no GPU, no wheel), with
    # its dtype assertion: flash_attn/ops/triton/rotary.py, "Input and cos/sin must have the same dtype".
    assert x.dtype == cos.dtype, f"Input and cos/sin must have the same dtype, got {x.dtype} and {cos.dtype}"
    return x

modeling.apply_rotary_emb = flash_attn_apply_rotary_emb
q = k = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
cos = sin = torch.zeros(4, 8, dtype=torch.bfloat16)  # what 4.49 hands over under bf16
try:
    modeling.apply_rotary_pos_emb_flashatt(q, k, cos, sin)
    raise SystemExit("the stand-in kernel did not assert: the test proves nothing")
except AssertionError as exc:
    assert attention.ROTARY_DTYPE_ASSERTION.search(str(exc))
with attention.fp32_vision_rotary():
    modeling.apply_rotary_pos_emb_flashatt(q, k, cos, sin)  # the stand-in asserts as flash-attn does: no error
assert modeling.apply_rotary_pos_emb_flashatt.__name__ == "apply_rotary_pos_emb_flashatt"  # undone on exit
print("ok")
"""


def test_the_recipes_fp32_rotary_fix_meets_flash_attns_dtype_assertion(stack_python, tmp_path):
    from vlmbuild.render import stage_smoke_sources

    stage_smoke_sources(tmp_path / "src")
    proc = subprocess.run([str(stack_python), "-c", ROTARY], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "src" / "lib")})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


WORKAROUND = """
import sys, torch
from pathlib import Path
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling
from vlmbuild.smoke import attention, tiny_model
from vlmbuild import contract

def flash_attn_apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False):
    # flash-attn's rotary kernel (flash_attn/ops/triton/rotary.py), as torch code with its dtype assertion: the
    # real one cannot be installed here (no GPU, no wheel). x: (batch, seq, heads, dim); cos, sin: (seq, dim/2).
    assert x.dtype == cos.dtype, f"Input and cos/sin must have the same dtype, got {x.dtype} and {cos.dtype}"
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, x[..., 2 * half:]], dim=-1)

def rotate_as_flash_attention_2(q, k, cos, sin):
    # The FA2 vision attention's rotary path of transformers 4.49, for the eager candidate only.
    q, k = modeling.apply_rotary_pos_emb_flashatt(q.unsqueeze(0), k.unsqueeze(0), cos, sin)
    return q.squeeze(0), k.squeeze(0)

modeling.apply_rotary_emb = flash_attn_apply_rotary_emb
eager_forward = modeling.Qwen2_5_VLVisionAttention.forward
def forward(self, *args, **kwargs):
    stock = modeling.apply_rotary_pos_emb_vision
    modeling.apply_rotary_pos_emb_vision = rotate_as_flash_attention_2
    try:
        return eager_forward(self, *args, **kwargs)
    finally:
        modeling.apply_rotary_pos_emb_vision = stock
modeling.Qwen2_5_VLVisionAttention.forward = forward

# The condition of transformers#36257: the vision rotary's inv_freq buffer in bf16 too, as DeepSpeed before 0.19's
# blanket module.bfloat16() left it (from_pretrained, and DeepSpeed 0.19.8's cast, keep buffers in fp32).
load_plain = attention.load_plain
attention.load_plain = lambda *args: load_plain(*args).to(torch.bfloat16)

torch.manual_seed(0)
model_dir = Path(sys.argv[1])
Qwen2_5_VLForConditionalGeneration(tiny_model.tiny_config()).to(torch.bfloat16).save_pretrained(model_dir)
details = attention.compare_attention(model_dir, torch.device("cpu"), torch.bfloat16, "eager", "sdpa")
assert contract.status_of(details) == contract.PASSED_WITH_WORKAROUND, details
print(details["workaround"]["rule"], details["workaround"]["stock_error"], sep="|")
"""


def test_attention_that_passes_only_with_the_recipes_rotary_fix_says_so(stack_python, tmp_path):
    """transformers 4.49's FA2 vision rotary in bf16 against flash-attn's dtype assertion (on CPU: the FA2 rotary
    path and a torch copy of flash-attn's kernel, in the eager candidate): the stock code fails, the recipe's fp32
    cos/sin fix agrees with sdpa within bf16's tolerance, and the check's status is not a plain pass."""
    from vlmbuild.render import stage_smoke_sources

    stage_smoke_sources(tmp_path / "src")
    proc = subprocess.run([str(stack_python), "-c", WORKAROUND, str(tmp_path / "model")], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "src" / "lib")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rule, stock_error = proc.stdout.strip().splitlines()[-1].split("|")
    assert rule == "tf-4.49-fa2-bf16-rotary-dtype"
    assert stock_error == ("AssertionError: Input and cos/sin must have the same dtype, got torch.float32 and "
                           "torch.bfloat16")


def test_without_a_lockfile_the_stack_check_names_every_missing_module(cli, stack_python, tmp_path):
    """An environment that lacks trl, peft and Pillow: the stack check names all three (the default variant's
    imports and the smoke's own), before any later check trips over one of them."""
    env = {"PYTHONPATH": str(FAULTS), "VLMBUILD_FAULT_MISSING": "trl,peft,PIL"}
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "stack", env=env)
    assert result.code == 1
    stack = by_name(report)["stack"]
    assert stack["status"] == "failed"
    for module in ("trl", "peft", "PIL"):
        assert f"import {module} failed: ModuleNotFoundError" in stack["error"], stack["error"]
    assert {"math_verify", "wandb", "liger_kernel"} <= set(stack["details"]["imports"])  # the default variant's list


def test_ops_are_jit_compiled_into_a_directory_of_this_environment_only(cli, stack_python, tmp_path):
    """PyPI's DeepSpeed (no ops built in) JIT-compiles deepspeed_shm_comm at the first CPU run. torch's default
    directory is shared with every other environment of the same Python: here another environment is in the middle
    of building that op there (its lock file held, its half-built module present). The smoke builds and loads its
    own copy in a directory keyed by its environment and is not held up or misled."""
    shared = tmp_path / "torch_extensions"
    other = shared / "deepspeed_shm_comm"
    other.mkdir(parents=True)
    (other / "lock").write_text("")  # torch's FileBaton: whoever uses this directory waits for it forever
    (other / "deepspeed_shm_comm.so").write_bytes(b"not an ELF file: another environment's build")
    env = {"PYTHONPATH": str(overlay("deepspeed==0.19.8")), "TORCH_EXTENSIONS_DIR": str(shared)}
    # (not the stack check: the overlay is a second copy of deepspeed, which it fails)
    result, report = smoke(cli, stack_python, tmp_path, "--checks", "zero3_load", env=env)
    assert result.code == 0, result.out[-3000:] + result.err[-2000:]
    own = Path(report["environment"]["torch_extensions_dir"])
    assert own.parent == shared and own.name.startswith("vlmbuild-py311-torch2.6.0-deepspeed0.19.8-")
    assert list(own.glob("deepspeed_shm_comm/*.so")), sorted(own.rglob("*"))  # it really compiled, there
    assert sorted(p.name for p in other.iterdir()) == ["deepspeed_shm_comm.so", "lock"]  # the other's untouched
