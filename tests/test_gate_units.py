"""The gate's decisions that need a GPU host to happen for real: tested against a stand-in engine.

No GPU exists on these machines, so a one-GPU smoke pass is what an engine with the NVIDIA runtime would return:
a report with mode gpu and world size 1 (its shape is the one benchmarks/results/gpu-smoke-h200.json records).
The stand-in is a mock only of that engine; the reports, evidence and labels are the real code's.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from vlmbuild import contract
from vlmbuild.engine import EngineError, SmokeRun
from vlmbuild.gate import describe_failure, explain_build_failure, smoke_passes
from vlmbuild.release import evidence, move_tags
from vlmbuild.smoke import report as report_mod


def smoke_report(mode: str, world: int, device_name: str | None = None, failed: str | None = None) -> dict:
    checks = [{"name": name, "status": "failed" if name == failed else "passed", "seconds": 1.0, "error": None,
               "details": {}, "world_size": 1 if name == "stack" else world, "device": mode}
              for name in contract.checks_for(mode, flash_attention=mode == "gpu")]
    return report_mod.finalize({"schema_version": report_mod.SCHEMA_VERSION, "mode": mode, "world_size": world,
                                "device_name": device_name, "seconds": 30.0, "checks": checks})


class OneGpuEngine:
    """An engine whose host has one GPU: the GPU pass runs on one rank."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run_smoke(self, image, device, timeout, progress, repeat=1, model_dir=None) -> SmokeRun:
        self.calls.append(device)
        report = smoke_report("gpu", 1, "NVIDIA H100") if device == "gpu" else smoke_report("cpu", 2)
        return SmokeRun(0, report, "", 30.0, False, device)


class Silent:
    def info(self, message: str) -> None:
        pass


def test_a_one_gpu_pass_is_followed_by_a_two_rank_cpu_pass():
    engine = OneGpuEngine()
    runs = smoke_passes(engine, "img", "gpu", 600, 3, None, Silent())
    assert engine.calls == ["gpu", "cpu"]
    assert [(r.report["mode"], r.report["world_size"]) for r in runs] == [("gpu", 1), ("cpu", 2)]


def test_two_gpus_need_no_cpu_pass():
    class TwoGpuEngine(OneGpuEngine):
        def run_smoke(self, image, device, timeout, progress, repeat=1, model_dir=None):
            self.calls.append(device)
            return SmokeRun(0, smoke_report("gpu", 2, "NVIDIA H100"), "", 30.0, False, device)

    engine = TwoGpuEngine()
    assert len(smoke_passes(engine, "img", "gpu", 600, 1, None, Silent())) == 1 and engine.calls == ["gpu"]


def test_evidence_of_both_passes_says_what_was_proven_where():
    runs = smoke_passes(OneGpuEngine(), "img", "gpu", 600, 3, None, Silent())
    resolved = SimpleNamespace(identity="f" * 64, base=SimpleNamespace(image_id="sha256:" + "b" * 64,
                                                                       digest="sha256:" + "c" * 64))
    files, labels = evidence(resolved, runs, b"{}")
    assert labels[contract.LABEL_DEVICE] == "gpu" and labels[contract.LABEL_VALIDATED_ON] == "gpu: NVIDIA H100"
    assert labels[contract.LABEL_WORLD_SIZE] == "1,2"
    assert labels["io.vlmbuild.smoke.passes"] == "gpu x1 (NVIDIA H100); cpu x2 (cpu)"
    payload = json.loads(files[contract.REPORT_PATH])
    assert payload["passed"] and [p["world_size"] for p in payload["passes"]] == [1, 2]
    assert contract.evidence_passed(payload)
    assert json.loads(labels[contract.LABEL_CHECKS])["attention"] == "passed"


def test_a_failing_cpu_pass_fails_the_gate():
    class CpuPassFails(OneGpuEngine):
        def run_smoke(self, image, device, timeout, progress, repeat=1, model_dir=None):
            self.calls.append(device)
            if device == "gpu":
                return SmokeRun(0, smoke_report("gpu", 1, "NVIDIA H100"), "", 30.0, False, device)
            return SmokeRun(1, smoke_report("cpu", 2, failed="zero3_load"), "", 30.0, False, device)

    runs = smoke_passes(CpuPassFails(), "img", "gpu", 600, 1, None, Silent())
    failed = next(r for r in runs if not r.passed)
    assert failed.device == "cpu" and describe_failure(failed)[1] == ["zero3_load"]


def test_a_passing_report_with_a_bad_exit_status_fails():
    run = SmokeRun(3, smoke_report("cpu", 2), "", 1.0, False, "cpu")
    assert not run.passed and describe_failure(run)[1] == ["exit-status"]


def test_a_build_failure_is_explained_by_the_rules():
    text = explain_build_failure("build failed at [deepspeed-wheel 1/1]\n RuntimeError: 0 active drivers ([]). "
                                 "There should only be one.")
    assert "ds-0.16.3-triton-3.2-no-gpu-import" in text


class TagRecorder:
    """An engine of tags only (the real engine's version of this runs in test_pipeline_docker.py)."""

    def __init__(self, fail_on: int) -> None:
        self.tags: dict[str, str] = {"repo:a": "old"}
        self.calls, self.fail_on = 0, fail_on

    def image_id(self, ref):
        return self.tags.get(ref)

    def tag(self, image_id, repository, tag):
        self.calls += 1
        if self.calls == self.fail_on:
            raise EngineError("refused")
        self.tags[f"{repository}:{tag}"] = image_id

    def untag(self, repository, tag):
        self.tags.pop(f"{repository}:{tag}", None)


def test_the_tag_set_moves_as_a_unit():
    engine = TagRecorder(fail_on=3)
    with pytest.raises(EngineError):
        move_tags(engine, "new", "repo", ["a", "b", "c"])
    assert engine.tags == {"repo:a": "old"}  # a put back, b removed, c never set
    engine = TagRecorder(fail_on=0)
    assert move_tags(engine, "new", "repo", ["a", "b"]) == ["a", "b"]
    assert engine.tags == {"repo:a": "new", "repo:b": "new"}


def test_model_dir_validation_is_a_usage_error(tmp_path: Path):
    from vlmbuild.errors import VlmbuildError
    from vlmbuild.gate import checked_model_dir

    with pytest.raises(VlmbuildError, match="no such directory"):
        checked_model_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(VlmbuildError, match="model_type 'qwen2_vl'"):
        checked_model_dir(tmp_path)
