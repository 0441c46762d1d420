"""The smoke run for real on CPU: torch 2.6.0, DeepSpeed, transformers 4.49.0 from the committed lockfile.

Faults are injected the way a broken upstream behaves, from outside the smoke's code: a sitecustomize
(tests/faults) that patches transformers at import, and DeepSpeed 0.15.4 (the seed's) laid over the venv.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import CACHE, FAULTS, REPO

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


def test_good_stack_passes_every_check(cli, stack_python, tmp_path):
    result, report = smoke(cli, stack_python, tmp_path, "--lockfile", str(LOCK))
    assert result.code == 0, result.out + result.err
    assert report["schema_version"] == 1 and report["mode"] == "cpu" and report["world_size"] == 2
    assert report["passed"] is True
    checks = by_name(report)
    assert list(checks) == ["stack", "zero3_load", "train_step", "checkpoint_resume"]
    assert checks["stack"]["details"]["lock"]["mismatches"] == 0
    load = checks["zero3_load"]["details"]
    assert load["partitioned"] == load["parameters"] > 0 and load["vision_parameters"] > 0
    losses = checks["train_step"]["details"]["losses"]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert checks["checkpoint_resume"]["details"]["optimizer_tensors_compared"] >= 2
    assert "RESULT: PASS on CPU (CPU only: not a GPU validation)" in result.out


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
    result, report = smoke(cli, stack_python, tmp_path, env=env)
    assert result.code == 1
    check = by_name(report)["zero3_load"]
    assert check["status"] == "failed"
    assert "visual.blocks.0.mlp.up_proj.weight: not bit-identical to the checkpoint" in check["error"]
    assert "shape [128, 64]" in check["error"]


@pytest.fixture(scope="module")
def seed_deepspeed_overlay() -> Path:
    """DeepSpeed 0.15.4, the seed's, laid over the good venv with PYTHONPATH."""
    from vlmbuild.lock import uv_binary

    overlay = CACHE / "overlay-deepspeed-0.15.4"
    if not (overlay / ".complete").is_file():
        subprocess.run([uv_binary(), "pip", "install", "-q", "--target", str(overlay), "--no-deps",
                        "--python-version", "3.11", "deepspeed==0.15.4"], check=True)
        (overlay / ".complete").write_text("ok")
    return overlay


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
"""


def test_model_dir_runs_the_checks_on_a_given_checkpoint(cli, stack_python, tmp_path):
    model = tmp_path / "model"
    subprocess.run([str(stack_python), "-c", MAKE_CHECKPOINT, str(model)], check=True, capture_output=True)
    result, report = smoke(cli, stack_python, tmp_path, "--model-dir", str(model))
    assert result.code == 0, result.out[-3000:] + result.err[-2000:]
    checks = by_name(report)
    assert report["model"] == str(model)
    assert checks["zero3_load"]["details"]["parameters"] > 56  # untied lm_head: not the tiny built-in model
    assert checks["checkpoint_resume"]["status"] == "passed"


def test_model_dir_without_a_config_is_a_usage_error(cli, stack_python, tmp_path):
    result = cli("smoke", "--local", "--python", str(stack_python), "--device", "cpu", "--model-dir", str(tmp_path))
    assert result.code == 2 and "no config.json" in result.err
