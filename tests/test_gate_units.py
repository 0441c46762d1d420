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
from vlmbuild.engine_disk import EngineDisk
from vlmbuild.errors import CheckFailed
from vlmbuild.gate import (
    BuildOutcome,
    GateFailed,
    NotEnoughDisk,
    describe_failure,
    explain_build_failure,
    run_gate,
    run_smoke_passes,
)
from vlmbuild.options import BuildOptions
from vlmbuild.progress import Progress
from vlmbuild.release import evidence, evidence_report, move_tags
from vlmbuild.smoke import report as report_mod


def smoke_report(mode: str, world: int, device_name: str | None = None, failed: str | None = None,
                 workaround: str | None = None) -> dict:
    def status(name: str) -> str:
        return "failed" if name == failed else "passed_with_workaround" if name == workaround else "passed"

    checks = [{"name": name, "status": status(name), "seconds": 1.0, "error": None,
               "details": {}, "world_size": 1 if name == "stack" else world, "device": mode}
              for name in contract.checks_for(mode, flash_attention=mode == "gpu")]
    return report_mod.finalize({"schema_version": report_mod.SCHEMA_VERSION, "mode": mode, "world_size": world,
                                "device_name": device_name, "seconds": 30.0, "checks": checks})


class OneGpuEngine:
    """An engine whose host has one GPU: the GPU pass runs on one rank."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run_smoke(self, image, device, timeout, progress, repeat=1, model_dir=None, limits=None, nodes=1) -> SmokeRun:
        self.calls.append(device)
        # flash-attn's FA2 passed on this GPU only with the recipe's rotary fix (transformers 4.49)
        report = (smoke_report("gpu", 1, "NVIDIA H100", workaround="attention") if device == "gpu"
                  else smoke_report("cpu", 2))
        return SmokeRun(0, report, "", 30.0, False, device)


def Silent() -> Progress:  # noqa: N802 - what the stand-in engines are handed as progress
    return Progress("test", tty=False, github=False)


def test_a_one_gpu_pass_is_followed_by_a_two_rank_cpu_pass():
    engine = OneGpuEngine()
    runs = run_smoke_passes(engine, "img", "gpu", 600, 3, None, Silent())
    assert engine.calls == ["gpu", "cpu"]
    assert [(r.report["mode"], r.report["world_size"]) for r in runs] == [("gpu", 1), ("cpu", 2)]


def test_two_gpus_need_no_cpu_pass():
    class TwoGpuEngine(OneGpuEngine):
        def run_smoke(self, image, device, timeout, progress, repeat=1, model_dir=None, limits=None, nodes=1):
            self.calls.append(device)
            return SmokeRun(0, smoke_report("gpu", 2, "NVIDIA H100"), "", 30.0, False, device)

    engine = TwoGpuEngine()
    assert len(run_smoke_passes(engine, "img", "gpu", 600, 1, None, Silent())) == 1 and engine.calls == ["gpu"]


def test_evidence_of_both_passes_says_what_was_proven_where():
    runs = run_smoke_passes(OneGpuEngine(), "img", "gpu", 600, 3, None, Silent())
    resolved = SimpleNamespace(identity="f" * 64, base=SimpleNamespace(image_id="sha256:" + "b" * 64,
                                                                       digest="sha256:" + "c" * 64))
    files, labels = evidence(resolved, runs, evidence_report(runs), b"{}")
    assert labels[contract.LABEL_DEVICE] == "gpu" and labels[contract.LABEL_VALIDATED_ON] == "gpu: NVIDIA H100"
    assert labels[contract.LABEL_WORLD_SIZE] == "1,2"
    assert labels["io.vlmbuild.smoke.passes"] == "gpu x1 (NVIDIA H100); cpu x2 (cpu)"
    payload = json.loads(files[contract.REPORT_PATH])
    assert payload["passed"] and [p["world_size"] for p in payload["passes"]] == [1, 2]
    assert contract.evidence_passed(payload)
    # the checks label says what the report says: a pass that needed the recipe's workaround is not a plain pass
    assert json.loads(labels[contract.LABEL_CHECKS])["attention"] == "passed_with_workaround"
    assert json.loads(labels[contract.LABEL_CHECKS])["zero3_load"] == "passed"


def test_evidence_is_never_made_for_reports_that_did_not_pass():
    failing = SmokeRun(0, smoke_report("cpu", 2, failed="grpo"), "", 30.0, False, "cpu")
    with pytest.raises(CheckFailed, match="the smoke reports did not pass"):
        evidence_report([failing])


class GateEngine(OneGpuEngine):
    """The engine run_gate drives, for a host with one GPU whose CPU pass then fails: builds one candidate,
    removes images when told, and has no way to tag (a tag call would fail the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.removed: list[str] = []

    def gpu_available(self) -> bool:
        return True

    def disk(self) -> EngineDisk:
        return EngineDisk("/var/lib/docker/overlay2", 40 * 10**9, 10**9, 0, 5 * 10**9, 200 * 10**9)

    def build(self, context, progress, nocache=False, cache_from=(), inline_cache=False, target=None) -> str:
        return "sha256:candidate"

    def check_built_on(self, image, base) -> None:
        pass

    def remove_image(self, image) -> None:
        self.removed.append(image)

    def run_smoke(self, image, device, timeout, progress, repeat=1, model_dir=None, limits=None, nodes=1):
        self.calls.append(device)
        if device == "gpu":
            return SmokeRun(0, smoke_report("gpu", 1, "NVIDIA H100"), "", 30.0, False, device)
        return SmokeRun(1, smoke_report("cpu", 2, failed="zero3_load"), "", 30.0, False, device)


def gate_inputs(build_disk_gb: float = 20.0):
    spec = SimpleNamespace(name="vlm-r1", smoke_device="gpu", smoke_timeout=600, smoke_repeat=1,
                           path=Path("images/vlm-r1.yaml"))
    return spec, SimpleNamespace(variant=SimpleNamespace(name="cu124", image=spec, build_disk_gb=build_disk_gb),
                                 identity="f" * 64, context=None,
                                 base=SimpleNamespace(ref="debian:trixie-slim", image_id="sha256:" + "b" * 64),
                                 rendered=SimpleNamespace(wheel_stages=["deepspeed-wheel"]))


def test_a_failing_cpu_pass_fails_the_gate():
    engine = GateEngine()
    spec, resolved = gate_inputs()
    outcome = BuildOutcome("vlm-r1", "cu124", False, "vlmbuild/vlm-r1")
    with pytest.raises(GateFailed, match=r"the smoke failed on CPU \(zero3_load\); nothing was tagged"):
        run_gate(engine, resolved, BuildOptions(spec.smoke_device, spec.smoke_timeout, spec.smoke_repeat), outcome,
                 Silent())
    assert engine.calls == ["gpu", "cpu"] and engine.removed == ["sha256:candidate"]
    assert not outcome.passed and outcome.failing_checks == ["zero3_load"] and outcome.tags == []
    assert outcome.passes == ["gpu x1", "cpu x2"]


class FullDiskEngine(GateEngine):
    """A host whose disk has 6 GB free, 25 of its storage's 40 GB owned by nothing (the leak of issue 29)."""

    def disk(self) -> EngineDisk:
        return EngineDisk("/var/lib/docker/overlay2", 40 * 10**9, 10**9, 0, 14 * 10**9, 6 * 10**9)

    def build(self, *args, **kwargs) -> str:
        self.calls.append("build")
        return super().build(*args, **kwargs)


def test_a_build_the_disk_cannot_hold_is_refused_before_it_starts():
    engine = FullDiskEngine()
    spec, resolved = gate_inputs(build_disk_gb=30)
    outcome = BuildOutcome("vlm-r1", "cu124", False, "vlmbuild/vlm-r1")
    with pytest.raises(NotEnoughDisk) as info:
        run_gate(engine, resolved, BuildOptions(spec.smoke_device, spec.smoke_timeout, spec.smoke_repeat), outcome,
                 Silent())
    message = str(info.value)
    assert info.value.exit_code == 2 and engine.calls == [] and engine.removed == [] and not outcome.tags
    for needed in ("about 30 GB", "images/vlm-r1.yaml, key build_disk_gb", "6.0 GB free", "25.0 GB of the engine's "
                   "storage belongs to no image", "BuildKit's cache of 14.0 GB may serve part of it, so at least 16.0 "
                   "GB must be free", "--no-disk-check"):
        assert needed in message, message


def test_the_cache_counts_towards_a_build_unless_it_is_not_used():
    """6 GB free and 14 GB of cache: a 19 GB build may fit (5 GB left to find); with --no-cache it cannot."""
    spec, resolved = gate_inputs(build_disk_gb=19)
    with pytest.raises(GateFailed):  # it was built: the stand-in's CPU pass fails it
        run_gate(FullDiskEngine(), resolved, BuildOptions("gpu", 600, 1), BuildOutcome("v", "c", False, "r"),
                 Silent())
    with pytest.raises(NotEnoughDisk, match="takes about 19 GB of free disk"):
        run_gate(FullDiskEngine(), resolved, BuildOptions("gpu", 600, 1, nocache=True),
                 BuildOutcome("v", "c", False, "r"), Silent())


def test_no_disk_check_and_a_disk_that_holds_the_build_both_build():
    for engine, options in ((FullDiskEngine(), {"disk_check": False}), (GateEngine(), {})):
        spec, resolved = gate_inputs(build_disk_gb=30)
        with pytest.raises(GateFailed):  # GateEngine's CPU pass fails: the build ran, and the smoke judged it
            run_gate(engine, resolved, BuildOptions(spec.smoke_device, spec.smoke_timeout, spec.smoke_repeat,
                                                    **options), BuildOutcome("vlm-r1", "cu124", False, "r"), Silent())
        assert engine.removed == ["sha256:candidate"]


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
    from vlmbuild.options import checked_model_dir

    with pytest.raises(VlmbuildError, match="no such directory"):
        checked_model_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(VlmbuildError, match="model_type 'qwen2_vl'"):
        checked_model_dir(tmp_path)


def test_on_github_actions_each_smoke_pass_is_a_fold_and_the_failing_check_an_annotation(capsys):
    engine = GateEngine()
    runs = run_smoke_passes(engine, "sha256:candidate", "gpu", 600, 1, None, Progress("t", tty=False, github=True))
    assert [r.passed for r in runs] == [True, False]
    out = capsys.readouterr().out.splitlines()
    folds = [line for line in out if line.startswith("::group::")]
    assert len(folds) == 2 and "smoke pass on GPU" in folds[0] and "smoke pass on CPU" in folds[1]
    assert out.count("::endgroup::") == 2
    errors = [line for line in out if line.startswith("::error")]
    assert len(errors) == 1 and errors[0].startswith("::error title=smoke check zero3_load failed on CPU::")


def test_inspect_holds_the_sbom_to_the_lock_but_for_what_the_image_left_out():
    """`vlmbuild inspect` reads the SBOM against the lockfile: every locked package listed at its version, except
    one the image says it goes without (--leave-out flash-attn), which the SBOM must then not list."""
    import hashlib
    import json

    from vlmbuild import contract
    from vlmbuild.inspect_image import Inspection, check_lock_and_sbom
    from vlmbuild.release import LABEL_SBOM_SHA256

    digest = "--hash=sha256:" + "a" * 64
    lock = f"torch==2.6.0 {digest}\nflash-attn==2.7.4.post1 {digest}\n".encode()

    def findings(components, left_out):
        sbom = json.dumps({"bomFormat": "CycloneDX", "components": components}).encode()
        labels = {contract.LABEL_LOCK_SHA256: hashlib.sha256(lock).hexdigest(),
                  LABEL_SBOM_SHA256: hashlib.sha256(sbom).hexdigest()}
        result = Inspection("img", "sha256:x")
        check_lock_and_sbom(result, lock, sbom, labels, left_out)
        return {f.what: (f.ok, f.detail) for f in result.findings}

    torch = {"name": "torch", "version": "2.6.0"}
    flash = {"name": "flash-attn", "version": "2.7.4.post1"}
    everything = findings([torch, flash], ())
    assert everything["the SBOM lists the 2 locked packages the image holds at their versions"] == (True, "")
    missing = findings([torch], ())
    assert missing["the SBOM lists the 2 locked packages the image holds at their versions"][0] is False
    left = findings([torch], {"flash-attn": "why"})
    assert left["the SBOM lists the 1 locked packages the image holds at their versions (flash-attn left out, "
                "not listed)"] == (True, "")
    denied = findings([torch, flash], {"flash-attn": "why"})
    ok, detail = denied["the SBOM lists the 1 locked packages the image holds at their versions (flash-attn left "
                        "out, not listed)"]
    assert not ok and "flash-attn: left out, but the SBOM lists 2.7.4.post1" in detail
