"""The smoke's logic that needs no torch: merging ranks, reports, explanations, GPU facts."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

from conftest import smoke_ranks_running
from vlmbuild import contract
from vlmbuild.lockfile import parse_lockfile
from vlmbuild.smoke import report as report_mod
from vlmbuild.smoke.__main__ import select_checks
from vlmbuild.smoke.launcher_checks import UsageProblem
from vlmbuild.smoke.ranks import fail_on_bad_exit, merge_rank_results, read_rank_files
from vlmbuild.smoke.stack import _gpu_facts, lock_mismatches, modules_to_import

CPU_WORKER_CHECKS = contract.checks_for("cpu", flash_attention=False)[1:]

H = " --hash=sha256:" + "a" * 64


def write_rank(d: Path, rank: int, checks=None, fatal=None) -> None:
    payload = {"rank": rank, "checks": checks or []}
    if fatal:
        payload["fatal"] = fatal
    (d / f"rank{rank}.json").write_text(json.dumps(payload))


def check(name, status="passed", error=None):
    return {"name": name, "status": status, "seconds": 1.0, "error": error, "details": {}}


def test_a_fatal_start_fails_the_first_check_and_skips_the_rest(tmp_path):
    write_rank(tmp_path, 0, fatal="RuntimeError: 0 active drivers ([]). There should only be one.")
    out = merge_rank_results(read_rank_files(tmp_path, 2), False, 3.0, 60, "log", CPU_WORKER_CHECKS)
    assert [c["status"] for c in out] == ["failed"] + ["skipped"] * (len(CPU_WORKER_CHECKS) - 1)
    assert "0 active drivers" in out[0]["error"]


def test_a_failure_on_any_rank_wins_and_keeps_its_own_message(tmp_path):
    write_rank(tmp_path, 0, [check("zero3_load", "failed", "failed on another rank")])
    write_rank(tmp_path, 1, [check("zero3_load", "failed", "size mismatch ... torch.Size([0])")])
    out = merge_rank_results(read_rank_files(tmp_path, 2), False, 3.0, 60, "log", CPU_WORKER_CHECKS)
    assert out[0]["error"] == "size mismatch ... torch.Size([0])"


def test_a_timeout_is_a_failure_not_a_pass(tmp_path):
    write_rank(tmp_path, 0, [check("zero3_load")])
    out = merge_rank_results(read_rank_files(tmp_path, 2), True, 61.0, 60, "log", CPU_WORKER_CHECKS)
    assert out[0]["status"] == "passed" and out[1]["status"] == "failed" and "timed out" in out[1]["error"]
    assert out[2]["status"] == "skipped"


def test_a_rank_that_dies_after_its_last_result_fails_the_run():
    checks = [check(name) for name in CPU_WORKER_CHECKS]
    assert fail_on_bad_exit([dict(c) for c in checks], 0, "log") == checks
    out = fail_on_bad_exit([dict(c) for c in checks], -11, "Segmentation fault")
    assert out[-1]["status"] == "failed" and "exited with status -11" in out[-1]["error"]
    assert not contract.report_passed({"checks": out})


def test_the_checks_each_mode_runs():
    assert contract.checks_for("cpu", flash_attention=True) == (
        "stack", "zero3_load", "train_step", "checkpoint_resume", "grpo", "optimizer_offload", "lora",
        "trainer_resume")
    assert contract.checks_for("gpu", flash_attention=False)[-1] == "trainer_resume"
    assert contract.checks_for("gpu", flash_attention=True)[-1] == "attention"


def test_the_pass_test_needs_every_check_passed():
    assert contract.report_passed({"checks": [check("stack"), check("grpo")]})
    assert not contract.report_passed({"checks": [check("stack"), check("grpo", "skipped")]})
    assert not contract.report_passed({"checks": []}) and not contract.report_passed(None)


def test_the_stack_check_imports_what_the_variant_names_and_flash_attn_when_installed():
    variant = {"imports": ["trl", "math_verify", "torch"]}
    # the smoke's own modules first (its checks need each of them), then the variant's, each once
    assert modules_to_import(variant, {}) == ["torch", "transformers", "deepspeed", "accelerate", "trl", "PIL",
                                              "math_verify"]
    assert modules_to_import(None, {"flash-attn": "2.7.4.post1"})[-1] == "flash_attn"


def test_report_explains_failures_with_the_rules_and_never_calls_cpu_a_gpu_pass():
    report = report_mod.finalize({
        "mode": "cpu", "world_size": 2, "seconds": 10.0,
        "checks": [check("stack"), check("zero3_load", "failed",
                                         "size mismatch for visual.blocks.3.mlp.up_proj.bias: copying a param with "
                                         "shape torch.Size([3420]) from checkpoint, the shape in current model is "
                                         "torch.Size([0]).")],
    })
    assert report["passed"] is False
    assert [e["id"] for e in report["checks"][1]["explanations"]] == ["tf-main-zero3-load-no-gather"]
    text = report_mod.summary(report)
    assert "RESULT: FAIL on CPU (CPU only: not a GPU validation)" in text
    assert "https://github.com/huggingface/transformers/pull/36455" in text


def test_an_empty_report_does_not_pass():
    assert report_mod.finalize({"mode": "cpu", "checks": []})["passed"] is False


def test_lock_mismatches_name_each_package():
    lock = parse_lockfile("torch==2.6.0" + H + "\ntransformers==4.49.0" + H + "\n")
    assert lock_mismatches(lock, {"torch": "2.6.0", "transformers": "4.49.0"}) == []
    assert lock_mismatches(lock, {"torch": "2.5.1"}) == [
        "torch: locked 2.6.0, installed 2.5.1", "transformers: locked 4.49.0, not installed"]


def test_a_left_out_package_must_be_absent_not_present():
    """A build that left flash-attn out (--leave-out) holds its lock line but not the package: its absence is what
    the image says; finding it installed anyway is a problem (something the labels deny is in the image)."""
    lock = parse_lockfile("torch==2.6.0" + H + "\nflash-attn==2.7.4.post1" + H + "\n")
    assert lock_mismatches(lock, {"torch": "2.6.0"}, left_out=["flash-attn"]) == []
    assert lock_mismatches(lock, {"torch": "2.6.0"}) == ["flash-attn: locked 2.7.4.post1, not installed"]
    assert lock_mismatches(lock, {"torch": "2.6.0", "flash-attn": "2.7.4.post1"}, left_out={"flash-attn": "why"}) == [
        "flash-attn: the image says it goes without it (left out), but 2.7.4.post1 is installed"]


class FakeCuda:
    """A stand-in for torch.cuda: no GPU exists on this machine, so the GPU path's decisions are tested
    against the values a real device reports (a mock only for what cannot exist here)."""

    def __init__(self, capability, arch_list, bf16=True, count=1):
        self.capability, self.arch_list, self.bf16, self.count = capability, arch_list, bf16, count

    def device_count(self):
        return self.count

    def get_device_capability(self, i):
        return self.capability

    def get_arch_list(self):
        return self.arch_list

    def get_device_name(self, i):
        return "Fake GPU"

    def is_bf16_supported(self):
        return self.bf16


def fake_torch(cuda, nccl=True):
    return SimpleNamespace(cuda=cuda, distributed=SimpleNamespace(is_nccl_available=lambda: nccl))


TORCH_26_ARCHES = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def test_gpu_facts_accept_an_h100_on_torch_26():
    facts, problems = _gpu_facts(fake_torch(FakeCuda((9, 0), TORCH_26_ARCHES)))
    assert problems == [] and facts["capability"] == "9.0"


def test_gpu_facts_refuse_a_blackwell_gpu_on_torch_26_without_ptx():
    _, problems = _gpu_facts(fake_torch(FakeCuda((12, 0), TORCH_26_ARCHES)))
    assert any("sm_120" in p for p in problems)


def test_gpu_facts_accept_ptx_fallback():
    _, problems = _gpu_facts(fake_torch(FakeCuda((12, 0), TORCH_26_ARCHES + ["compute_90"])))
    assert problems == []


def test_gpu_facts_refuse_no_nccl_no_bf16_and_no_device():
    _, problems = _gpu_facts(fake_torch(FakeCuda((7, 0), TORCH_26_ARCHES, bf16=False), nccl=False))
    assert any("NCCL" in p for p in problems) and any("bf16" in p for p in problems)
    _, problems = _gpu_facts(fake_torch(FakeCuda((9, 0), TORCH_26_ARCHES, count=0)))
    assert problems == ["GPU mode but torch sees no CUDA device"]


def test_a_subset_of_checks_needs_what_it_depends_on():
    applicable = contract.checks_for("cpu", flash_attention=False, prebuilt_ops=True, repeat=3)
    assert select_checks(applicable, None, "cpu") == applicable
    assert select_checks(applicable, "zero3_load,stack", "cpu") == ("stack", "zero3_load", "zero3_repeat")  # --repeat
    import pytest

    with pytest.raises(UsageProblem, match="train_step needs zero3_load"):
        select_checks(applicable, "train_step", "cpu")
    with pytest.raises(UsageProblem, match="does not run in cpu mode"):
        select_checks(applicable, "attention,zero3_load", "cpu")
    with pytest.raises(UsageProblem, match="unknown check"):
        select_checks(applicable, "nope", "cpu")
    with pytest.raises(UsageProblem, match="prebuilt_ops needs train_step; prebuilt_ops needs optimizer_offload; "
                                           "prebuilt_ops needs lora"):
        select_checks(applicable, "prebuilt_ops", "cpu")


# ---------------------------------------------------------------- optimizer_offload's verdict

def offload_state(optimizer="deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam", device="cpu", moments=2, step=1,
                  written=True) -> dict:
    return {"optimizer": optimizer, "fp32_partitions": {"count": 1, "devices": [device]},
            "adam_moments": {"count": moments, "devices": [device] if moments else [], "written": written},
            "parameter_shards": {"count": 56, "devices": [device]}, "adam_step": step}


def test_offload_placement_is_judged_on_a_gpu_pass():
    """Stand-in data for what only a GPU pass can observe (no GPU here: on the CPU every tensor is on the CPU, so
    the real runs in test_smoke_faults reach the other branches): the placement DeepSpeed reports after the step."""
    from vlmbuild.smoke.grpo import offload_problems

    assert offload_problems(offload_state(), 1, gpu=True) == []
    problems = offload_problems(offload_state(device="cuda:0"), 1, gpu=True)
    assert problems == [f"the {what} are on cuda:0, not the CPU the offload config asks for"
                        for what in ("fp32 master partitions", "Adam moments", "parameter shards (ds_tensor)")]
    assert offload_problems(offload_state(device="cuda:0"), 1, gpu=False) == []  # the CPU pass cannot judge it


def test_offload_needs_a_counted_step_with_written_moments():
    from vlmbuild.smoke.grpo import offload_problems

    assert offload_problems(offload_state(step=0), 1, gpu=False) == [
        "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam counts 0 step(s) after 1 optimizer step(s)"]
    assert offload_problems(offload_state(written=False), 1, gpu=False) == [
        "the Adam moments of deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam are all zero after 1 step(s)"]


# ---------------------------------------------------------------- a pass with the recipe's workaround

def test_a_workaround_makes_a_status_of_its_own_that_counts_as_passing_and_shows():
    details = {"workaround": {"rule": "tf-4.49-fa2-bf16-rotary-dtype", "applied": "fp32 cos/sin",
                              "stock_error": "AssertionError: Input and cos/sin must have the same dtype"}}
    assert contract.status_of({}) == "passed" and contract.status_of(details) == "passed_with_workaround"
    checks = [check("stack"), {**check("attention", status=contract.status_of(details)), "details": details}]
    report = {"mode": "gpu", "world_size": 2, "seconds": 1.0, "checks": checks}
    assert contract.report_passed(report)
    assert contract.checks_label([report]) == {"stack": "passed", "attention": "passed_with_workaround"}
    text = report_mod.summary(report_mod.finalize(report))
    assert "  PASS* attention" in text and "passed only with the recipe's workaround (tf-4.49-fa2-bf16-rotary-dtype)" in text
    assert "the stock code failed: AssertionError: Input and cos/sin must have the same dtype" in text


# ---------------------------------------------------------------- the environment against its RECORDs and lock

FLASH_URL = ("https://github.com/Dao-AILab/flash-attention/releases/download/v2.7.4.post1/"
             "flash_attn-2.7.4.post1+cu12torch2.6cxx11abiFALSE-cp313-cp313-linux_x86_64.whl")


def installed_dist(site: Path, name: str, version: str, files: dict[str, bytes], direct_url: dict | None = None):
    """A distribution as an installer leaves it: its files, a dist-info with METADATA and a RECORD of sha256s."""
    import base64
    import hashlib
    from importlib import metadata

    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    rows = []
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{rel},sha256={digest},{len(data)}")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    (info / "RECORD").write_text("\n".join(rows + [f"{info.name}/RECORD,,"]) + "\n")
    return metadata.PathDistribution(info)


def test_record_hashes_catch_a_changed_and_a_missing_file(tmp_path):
    from vlmbuild.smoke.stack import record_problems

    dist = installed_dist(tmp_path, "tiny", "1.0", {"tiny/__init__.py": b"x = 1\n", "tiny/data.bin": b"\0" * 10,
                                                    "tiny/__pycache__/__init__.cpython-311.pyc": b"cache"})
    assert record_problems([dist]) == (2, [])  # a bytecode cache is Python's to check, not ours
    (tmp_path / "tiny" / "__init__.py").write_text("x = 2\n")
    (tmp_path / "tiny" / "data.bin").unlink()
    (tmp_path / "tiny" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"rewritten by Python")
    assert record_problems([dist]) == (2, [
        f"tiny 1.0: {tmp_path}/tiny/__init__.py differs from its RECORD hash (changed after install)",
        f"tiny 1.0: {tmp_path}/tiny/data.bin is listed in its RECORD but missing"])


def test_a_direct_url_wheel_must_come_from_the_locked_url_and_file(tmp_path):
    from vlmbuild.smoke.stack import direct_url_problems

    lock = parse_lockfile(f"flash-attn @ {FLASH_URL} --hash=sha256:{'a' * 64}\n")

    def found(direct_url):
        site = tmp_path / str(len(list(tmp_path.iterdir())))
        return {"flash-attn": [installed_dist(site, "flash-attn", "2.7.4.post1", {}, direct_url)]}

    assert direct_url_problems(lock, found({"url": FLASH_URL, "archive_info": {"hash": f"sha256={'a' * 64}"}})) == []
    assert direct_url_problems(lock, found({"url": FLASH_URL, "archive_info": {}})) == []  # no hash recorded
    other_build = FLASH_URL.replace("cxx11abiFALSE", "cxx11abiTRUE")
    assert direct_url_problems(lock, found({"url": other_build, "archive_info": {}})) == [
        f"flash-attn: locked as {FLASH_URL}, installed from {other_build}"]
    assert direct_url_problems(lock, found({"url": FLASH_URL, "archive_info": {"hashes": {"sha256": "b" * 64}}})) == [
        f"flash-attn: installed from a file with sha256 {'b' * 64}, the lock pins {'a' * 64}"]
    assert direct_url_problems(lock, found(None)) == [
        f"flash-attn: locked as {FLASH_URL}, installed from an index (no direct_url.json)"]


def test_a_record_hash_that_is_not_sha256_cannot_vouch_for_its_file(tmp_path):
    from vlmbuild.smoke.stack import record_problems

    dist = installed_dist(tmp_path, "tiny", "1.0", {})
    (tmp_path / "tiny.py").write_text("x = 1\n")
    record = dist._path / "RECORD"
    record.write_text("tiny.py,md5=kFJ0nkc0Y1Mi6V4K1qPkHA,6\n" + record.read_text())
    assert record_problems([dist]) == (0, ["tiny 1.0: tiny.py has a md5 hash in RECORD, not sha256"])


def test_prebuilt_ops_is_skipped_when_a_check_that_loads_the_ops_did_not_pass(tmp_path):
    from argparse import Namespace

    from vlmbuild.smoke.launcher_checks import Launch, run_launcher_check

    launch = Launch(Namespace(), "cpu", 2, tmp_path, tmp_path, None, None, ["cpu_adam"],
                    records=[check("train_step"), check("optimizer_offload", status="failed")])
    entry = run_launcher_check(launch, "prebuilt_ops")
    assert entry["status"] == "skipped" and entry["error"] == "not run: optimizer_offload did not pass"


def test_each_pass_takes_the_deepspeed_built_for_its_accelerator(tmp_path, monkeypatch):
    """A CUDA image declares two DeepSpeed builds: the venv's for cuda, /opt/deepspeed-cpu for the CPU pass. The CPU
    pass puts the CPU build first on the path (this process and the ranks'), the GPU pass leaves the path alone,
    and an image whose declared build is missing is a usage problem, not a silent JIT compile."""
    import sys

    from vlmbuild.smoke.launcher_checks import prebuilt_ops_for, use_deepspeed_build

    cpu_dir = tmp_path / "deepspeed-cpu"
    cpu_dir.mkdir()
    variant = {"deepspeed_builds": [
        {"accelerator": "cuda", "path": None, "ops": ["cpu_adam", "fused_adam"]},
        {"accelerator": "cpu", "path": str(cpu_dir), "ops": ["cpu_adam", "deepspeed_shm_comm"]}]}
    assert prebuilt_ops_for(variant, "gpu") == ["cpu_adam", "fused_adam"]
    assert prebuilt_ops_for(variant, "cpu") == ["cpu_adam", "deepspeed_shm_comm"]
    assert prebuilt_ops_for({"deepspeed_builds": variant["deepspeed_builds"][:1]}, "cpu") == []
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert use_deepspeed_build(variant, "gpu") is None and sys.path[0] != str(cpu_dir)
    assert use_deepspeed_build(variant, "cpu") == str(cpu_dir)
    assert sys.path[0] == str(cpu_dir)
    import os

    assert os.environ["PYTHONPATH"] == f"{cpu_dir}:/elsewhere"
    cpu_dir.rmdir()
    try:
        use_deepspeed_build(variant, "cpu")
    except UsageProblem as exc:
        assert "which this image lacks" in str(exc)
    else:
        raise AssertionError("a missing declared build must be refused")


def test_the_declared_second_deepspeed_is_no_duplicate(tmp_path):
    """Two copies of deepspeed are a problem (the first shadows the second), unless the first is the image's
    declared build for this accelerator at the same version."""
    from vlmbuild.smoke.stack import declared_alternate

    def dist(version: str, where: Path):
        return SimpleNamespace(version=version, _path=where / "deepspeed-0.19.8.dist-info")

    cpu, venv = tmp_path / "deepspeed-cpu", tmp_path / "venv"
    pair = [dist("0.19.8", cpu), dist("0.19.8", venv)]
    assert declared_alternate("deepspeed", pair, {"deepspeed": str(cpu)})
    assert not declared_alternate("deepspeed", pair, {})
    assert not declared_alternate("deepspeed", [dist("0.15.4", cpu), dist("0.19.8", venv)], {"deepspeed": str(cpu)})
    assert not declared_alternate("deepspeed", [dist("0.19.8", venv), dist("0.19.8", cpu)], {"deepspeed": str(cpu)})
    assert not declared_alternate("deepspeed", pair + [dist("0.19.8", tmp_path)], {"deepspeed": str(cpu)})


def test_the_orphan_check_sees_this_sessions_ranks_only():
    """Each test fails (and kills them) when this session's smoke ranks are left running; a smoke of another test
    session on the same machine is not this session's to kill (one beside a CI run once killed its fault tests)."""
    rank_like = ["bash", "-c", "sleep 60; :", "vlmbuild.smoke.worker"]  # a rank's cmdline mark, nothing imported
    ours = subprocess.Popen(rank_like)
    theirs = subprocess.Popen(rank_like, env={**os.environ, "VLMBUILD_TEST_SESSION": "another"})
    try:
        deadline = time.monotonic() + 10
        while ours.pid not in smoke_ranks_running():
            assert time.monotonic() < deadline, "this session's rank-like process was never seen"
            time.sleep(0.05)
        assert theirs.pid not in smoke_ranks_running()
    finally:
        for proc in (ours, theirs):
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- lora and trainer_resume, the parts without torch

def test_lora_cannot_judge_what_trained_when_deepspeed_no_longer_names_its_optimizer_groups():
    """What trained is read from DeepSpeed's ZeRO optimizer (bit16_groups for ZeRO-1/2, fp16_groups for ZeRO-3). An
    optimizer that holds neither (a DeepSpeed that renamed them) is a finding, not a vacuous pass. Stand-ins for the
    engine: only what the function reads of it."""
    import pytest
    from vlmbuild.smoke.common import CheckProblem
    from vlmbuild.smoke.lora import optimized_names

    a, b = object(), object()
    module = SimpleNamespace(named_parameters=lambda: [("x.lora_A.default.weight", a), ("x.base_layer.weight", b)])
    zero2 = SimpleNamespace(optimizer=SimpleNamespace(bit16_groups=[[a]]), module=module)
    zero3 = SimpleNamespace(optimizer=SimpleNamespace(fp16_groups=[[a]]), module=module)
    assert optimized_names(zero2) == optimized_names(zero3) == ["x.lora_A.default.weight"]
    with pytest.raises(CheckProblem, match="cannot tell which parameters SimpleNamespace updates"):
        optimized_names(SimpleNamespace(optimizer=SimpleNamespace(), module=module))
