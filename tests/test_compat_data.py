"""The committed sweep (compat/vlm-r1-local.json) against the rules: every rule that a CPU cell can reproduce has a
cell that fails the way the rule says, every other rule says why no CPU cell can, no failing cell is left
unexplained, and each cell's kept smoke report is the one its record hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from vlmbuild import sweep_results
from vlmbuild.rules import load_rules
from vlmbuild.sweep_verdict import is_finding

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "compat" / "vlm-r1-local.json"

# rule -> how its cell shows it: the check that fails explained by it, or the cell's result where nothing ran
REPRODUCED = {
    "ds-0.16.4-trl-0.15-generation-hooks": "grpo",
    "trl-0.16-transformers-4.52-train-sampler": "grpo",
    "tf-4.52-accelerate-1.3-keep-torch-compile": "grpo",
    "ds-zero3-lora-generation-stale-trace": "lora",
    "trl-0.15-grpo-peft-checkpointing-no-input-grads": "lora",
    "ds-cpu-accelerator-zero3-coalesced-gather-race": "zero3_load",
    "trl-0.18-needs-transformers-4.50": "unresolvable",
    "ds-0.16.3-triton-3.2-no-gpu-import": "install_failed",
}
# rule -> why no CPU cell of the local variant can reproduce it
NO_CPU_CELL = {
    "tf-main-zero3-load-no-gather": "transformers main (4.50.0.dev0) is a commit, not a release an axis can pin",
    "tf-main-zero3-load-regression-4.51": "transformers main (4.51.0.dev0) is a commit, not a release",
    "tf-4.49-fa2-bf16-rotary-dtype": "flash-attention 2 runs on a GPU only",
    "flash-attn-2.8-torch-2.6-abi": "flash-attn's CUDA build is not in the CPU variant",
    "vllm-pins-torch-2.5.1": "vllm is not a package of the variant",
    "ds-0.15-torch-2.6-resume-weights-only": "DeepSpeed 0.15 cannot be imported beside triton 3.2 without a GPU "
                                             "(ds-0.16.3-triton-3.2-no-gpu-import): no CPU cell reaches a resume",
    "ds-zero3-peft-modules-to-save-grads-remaining": "needs modules_to_save, which the recipe's LoRA run has none of",
    "peft-0.15.0-zero3-modules-to-save-empty": "needs modules_to_save, which the recipe's LoRA run has none of",
    "ds-zero3-peft-non-reentrant-checkpointing": "needs non-reentrant checkpointing; the recipe's is reentrant",
    "tf-4.51.0-zero3-quantized-load": "needs a quantized model; the gate loads none",
    "liger-0.6-qwen2.5-vl-needs-transformers-4.52.4": "needs Liger's patches applied; the recipe applies none",
    "tf-4.56.0-accelerate-1.10-parallelism-config": "needs the Trainer's loss over labels; GRPO's batches have none "
                                                    "(its cell passes: MEASURED_NOT_TO_REPRODUCE)",
    "ds-0.18-zero3-checkpointing-cpu-offload-next-functions": "on the gate's path, but not reproduced with torch 2.6 "
                                                              "(MEASURED_NOT_TO_REPRODUCE); reported on torch 2.3/2.4",
}
# A rule on (or next to) the gate's path whose cells were measured passing: the data says the rule's claim does not
# hold there. rule -> (the pins of such a cell, the check that passed).
MEASURED_NOT_TO_REPRODUCE = {
    "ds-0.18-zero3-checkpointing-cpu-offload-next-functions": ({"deepspeed": "0.18.5"}, "optimizer_offload"),
    "tf-4.56.0-accelerate-1.10-parallelism-config": ({"transformers": "4.56.0", "accelerate": "1.9.0"},
                                                     "trainer_resume"),
}


@pytest.fixture(scope="module")
def committed():
    return sweep_results.load(DATA)["cells"]


def test_every_rule_is_reproduced_by_a_cell_or_says_why_no_cpu_cell_can():
    """A new rule must be placed: given its cell, or the reason none can show it."""
    ids = {r.id for r in load_rules().rules}
    assert not (set(REPRODUCED) & set(NO_CPU_CELL))
    assert set(REPRODUCED) | set(NO_CPU_CELL) == ids, (
        f"unplaced: {sorted(ids - set(REPRODUCED) - set(NO_CPU_CELL))}; "
        f"gone: {sorted((set(REPRODUCED) | set(NO_CPU_CELL)) - ids)}")


@pytest.mark.parametrize("rule_id", sorted(REPRODUCED))
def test_each_reproducible_rule_has_a_committed_cell_that_fails_as_it_says(committed, rule_id):
    shown = REPRODUCED[rule_id]
    rule = next(r for r in load_rules().rules if r.id == rule_id)
    if shown in ("unresolvable", "install_failed"):
        cells = [c for c in committed if c["result"] == shown and rule_id in c["explained_by"]]
        assert cells, f"no committed {shown} cell explained by {rule_id}"
        return
    cells = [c for c in committed for check in c["checks"]
             if check["name"] == shown and check["status"] == "failed" and rule_id in check["explained_by"]]
    assert cells, f"no committed cell fails {shown} explained by {rule_id}"
    for cell in cells:
        check = next(c for c in cell["checks"] if c["name"] == shown)
        assert rule.matches_error(check["error"] + "\n" + (check.get("traceback") or "")), (rule_id, check["error"])
        assert rule.matches(cell["versions"] or cell["pins"], rule.when) is not None, (rule_id, cell["pins"])


@pytest.mark.parametrize("rule_id", sorted(MEASURED_NOT_TO_REPRODUCE))
def test_rules_measured_not_to_reproduce_have_cells_that_pass_their_path(committed, rule_id):
    pins, passed = MEASURED_NOT_TO_REPRODUCE[rule_id]
    cells = [c for c in committed if all(c["versions"].get(k) == v for k, v in pins.items())
             and any(ch["name"] == passed and ch["status"] == "passed" for ch in c["checks"])]
    assert cells, f"no committed cell with {pins} passes {passed}"


def test_no_committed_cell_is_an_unexplained_finding(committed):
    findings = [c["pins"] for c in committed if is_finding(c)]
    assert findings == [], f"failing cells no rule explains: {findings}"


def test_each_measured_cell_keeps_the_report_its_record_hashes(committed):
    """What a user re-checks: the kept smoke report is the bytes report_sha256 names."""
    measured = [c for c in committed if c["result"] in ("passed", "failed")]
    assert len(measured) >= 24
    for cell in measured:
        assert cell["reports"], cell["pins"]
        final = DATA.parent / cell["reports"][-1]
        assert hashlib.sha256(final.read_bytes()).hexdigest() == cell["report_sha256"], cell["pins"]
