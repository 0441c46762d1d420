"""Compatibility rules: data with sources, pre-releases count, conditions gate, error texts map to rules."""

from __future__ import annotations

import pytest
from vlmbuild.rules import RulesFileError, load_rules, parse_rules

SEED_ERROR = (
    "RuntimeError: Error(s) in loading state_dict for Qwen2_5_VLForConditionalGeneration:\n"
    "\tsize mismatch for visual.blocks.3.mlp.up_proj.bias: copying a param with shape torch.Size([3420]) from "
    "checkpoint, the shape in current model is torch.Size([0])."
)
RECIPE = ["zero3", "bf16", "generation", "resume", "lora", "gradient_checkpointing", "optimizer_offload", "gpu_less_host"]


@pytest.fixture(scope="module")
def rules():
    return load_rules()


def test_every_context_row_is_a_rule_with_sources(rules):
    assert len(rules.rules) >= 9
    for rule in rules.rules:
        assert rule.sources and all(s.startswith("https://") for s in rule.sources)
        assert rule.fix and rule.symptom


def test_transformers_main_prerelease_is_flagged_under_zero3(rules):
    hits = rules.evaluate({"transformers": "4.50.0.dev0", "torch": "2.6.0", "deepspeed": "0.15.4"}, ["zero3"])
    assert "tf-main-zero3-load-no-gather" in [v.rule.id for v in hits]


def test_released_transformers_is_not_flagged_by_the_main_rule(rules):
    for version in ("4.49.0", "4.50.0", "4.50.3"):
        hits = rules.evaluate({"transformers": version}, ["zero3"])
        assert "tf-main-zero3-load-no-gather" not in [v.rule.id for v in hits], version


def test_condition_gates_the_rule(rules):
    versions = {"transformers": "4.50.0.dev0"}
    assert not [v for v in rules.evaluate(versions, []) if v.rule.id == "tf-main-zero3-load-no-gather"]


def test_seed_stack_is_flagged(rules):
    seed = {"torch": "2.6.0", "deepspeed": "0.15.4", "transformers": "4.49.0", "triton": "3.2.0", "trl": "0.17.0"}
    ids = {v.rule.id for v in rules.evaluate(seed, RECIPE)}
    assert {"ds-0.15-torch-2.6-resume-weights-only", "ds-0.16.3-triton-3.2-no-gpu-import"} <= ids


def test_good_stack_is_clean(rules):
    good = {"torch": "2.6.0", "deepspeed": "0.19.8", "transformers": "4.49.0", "triton": "3.2.0", "trl": "0.17.0",
            "accelerate": "1.15.0"}
    assert [v for v in rules.evaluate(good, RECIPE) if v.rule.severity == "error"] == []


def test_alternatives_any_of(rules):
    ids = lambda vllm: {v.rule.id for v in rules.evaluate({"vllm": vllm, "torch": "2.6.0"}, [])}  # noqa: E731
    assert "vllm-pins-torch-2.5.1" in ids("0.6.6.post1")
    assert "vllm-pins-torch-2.5.1" in ids("0.7.3")
    assert "vllm-pins-torch-2.5.1" not in ids("0.8.2")


def test_package_names_are_normalized(rules):
    hits = rules.evaluate({"Flash_Attn": "2.8.3", "torch": "2.6.0"}, [])
    assert "flash-attn-2.8-torch-2.6-abi" in [v.rule.id for v in hits]


def test_error_text_maps_to_the_seed_rule(rules):
    assert [r.id for r in rules.match_error(SEED_ERROR)] == ["tf-main-zero3-load-no-gather"]
    assert [r.id for r in rules.match_error("RuntimeError: 0 active drivers ([]). There should only be one.")] == [
        "ds-0.16.3-triton-3.2-no-gpu-import"]
    assert rules.match_error("everything is fine") == []


@pytest.mark.parametrize("text, fragment", [
    ("schema: 1\nrules: [{id: x}]", "rules[0].severity: missing"),
    ("schema: 1\nrules:\n- {id: x, severity: fatal, title: t, packages: {a: '>1'}, symptom: s, fix: f, sources: [https://x]}",
     "expected one of"),
    ("schema: 1\nrules:\n- {id: x, severity: error, title: t, packages: {a: '=>1'}, symptom: s, fix: f, sources: [https://x]}",
     "invalid specifier"),
    ("schema: 1\nrules:\n- {id: x, severity: error, title: t, packages: {a: '>1'}, symptom: s, fix: f, sources: [http://x]}",
     "https:// URLs"),
    ("schema: 1\nrules:\n- {id: x, severity: error, title: t, packages: {a: '>1'}, when: [moon], symptom: s, fix: f, sources: [https://x]}",
     "when"),
    ("schema: 1\nrules:\n- {id: x, severity: error, title: t, packages: {a: '>1'}, patterns: ['('], symptom: s, fix: f, sources: [https://x]}",
     "invalid regular expression"),
])
def test_malformed_rules_are_refused(text, fragment):
    with pytest.raises(RulesFileError, match=None) as info:
        parse_rules(text, "rules.yaml")
    assert fragment in str(info.value)
    assert str(info.value).startswith("rules.yaml")


def test_pep440_bound_gotcha_is_handled_by_the_data(rules):
    """`<4.50.0` excludes 4.50.0.dev0 under PEP 440; the data must be written so the seed's version matches."""
    from packaging.specifiers import SpecifierSet

    assert not SpecifierSet("<4.50.0").contains("4.50.0.dev0", prereleases=True)
    rule = rules.get("tf-main-zero3-load-no-gather")
    assert rule.matches({"transformers": "4.50.0.dev0"}, ["zero3"]) == {"transformers": "4.50.0.dev0"}


# ------------------------------------------------------------------ the recipe's LoRA, resume and offload paths
# Each rule's matcher against the error text users reported upstream, and its version range against the release that
# fixed it (read from the released packages, see known_bad.yaml): the last bad release matches, the fix does not.

UPSTREAM_ERRORS = {
    # deepspeedai/DeepSpeed#7615
    "ds-zero3-peft-modules-to-save-grads-remaining": "AttributeError: 'Linear' object has no attribute "
                                                     "'ds_grads_remaining'",
    # huggingface/transformers#47254
    "ds-zero3-peft-non-reentrant-checkpointing": (
        "torch.utils.checkpoint.CheckpointError: torch.utils.checkpoint: Recomputed values for the following tensors "
        "have different metadata than during the forward pass.\ntensor at position 4:\nsaved metadata: {'shape': "
        "torch.Size([1024]), 'dtype': torch.bfloat16, 'device': device(type='cuda', index=0)}\nrecomputed metadata: "
        "{'shape': torch.Size([0]), 'dtype': torch.bfloat16, 'device': device(type='cuda', index=0)}"),
    # deepspeedai/DeepSpeed#7830
    "ds-0.18-zero3-checkpointing-cpu-offload-next-functions": "AttributeError: 'NoneType' object has no attribute "
                                                              "'next_functions'",
    # huggingface/trl#4098
    "tf-4.56.0-accelerate-1.10-parallelism-config": "AttributeError: 'Accelerator' object has no attribute "
                                                    "'parallelism_config'",
    # Liger-Kernel's monkey_patch.py, logged
    "liger-0.6-qwen2.5-vl-needs-transformers-4.52.4": "Qwen2.5-VL support is only compatible with transformers >= "
                                                      "4.52.4",
}


@pytest.mark.parametrize("rule_id", sorted(UPSTREAM_ERRORS))
def test_each_new_rule_recognises_the_upstream_error_text_and_only_it(rules, rule_id):
    assert [r.id for r in rules.match_error(UPSTREAM_ERRORS[rule_id])] == [rule_id]


def ids(rules, versions, conditions):
    return {v.rule.id for v in rules.evaluate(versions, conditions)}


LORA_ZERO3 = ["zero3", "lora", "gradient_checkpointing"]


@pytest.mark.parametrize("rule_id, conditions, bad, good", [
    ("ds-zero3-peft-modules-to-save-grads-remaining", LORA_ZERO3 + ["modules_to_save"],
     [{"deepspeed": "0.16.5", "peft": "0.14.0"}, {"deepspeed": "0.19.2", "peft": "0.17.1"}],
     [{"deepspeed": "0.16.4", "peft": "0.14.0"}, {"deepspeed": "0.19.3", "peft": "0.17.1"}]),
    ("peft-0.15.0-zero3-modules-to-save-empty", LORA_ZERO3 + ["modules_to_save"],
     [{"peft": "0.15.0"}], [{"peft": "0.14.0"}, {"peft": "0.15.1"}]),
    ("ds-zero3-peft-non-reentrant-checkpointing", LORA_ZERO3 + ["non_reentrant_checkpointing"],
     [{"deepspeed": "0.15.3", "peft": "0.14.0"}, {"deepspeed": "0.19.2", "peft": "0.19.1"}],
     [{"deepspeed": "0.19.3", "peft": "0.19.1"}, {"deepspeed": "0.19.8", "peft": "0.14.0"}]),
    ("ds-0.18-zero3-checkpointing-cpu-offload-next-functions", ["zero3", "gradient_checkpointing", "optimizer_offload"],
     [{"deepspeed": "0.18.5"}, {"deepspeed": "0.18.6"}], [{"deepspeed": "0.18.4"}, {"deepspeed": "0.19.8"}]),
    ("tf-4.51.0-zero3-quantized-load", ["zero3", "quantized"],
     [{"transformers": "4.51.0"}], [{"transformers": "4.51.1"}, {"transformers": "4.49.0"}]),
    ("tf-4.56.0-accelerate-1.10-parallelism-config", ["labels_loss"],
     [{"transformers": "4.56.0", "accelerate": "1.9.0"}],
     [{"transformers": "4.56.0", "accelerate": "1.10.0"}, {"transformers": "4.56.1", "accelerate": "1.9.0"}]),
    ("liger-0.6-qwen2.5-vl-needs-transformers-4.52.4", ["liger_kernel"],
     [{"liger-kernel": "0.6.0", "transformers": "4.49.0"}, {"liger-kernel": "0.8.5", "transformers": "4.52.3"}],
     [{"liger-kernel": "0.5.2", "transformers": "4.49.0"}, {"liger-kernel": "0.6.0", "transformers": "4.52.4"}]),
])
def test_each_new_rule_covers_its_releases_up_to_the_fix(rules, rule_id, conditions, bad, good):
    for versions in bad:
        assert rule_id in ids(rules, versions, conditions), versions
    for versions in good:
        assert rule_id not in ids(rules, versions, conditions), versions


@pytest.mark.parametrize("rule_id, bad, needs", [
    ("ds-zero3-peft-modules-to-save-grads-remaining", {"deepspeed": "0.18.0", "peft": "0.14.0"}, "modules_to_save"),
    ("ds-zero3-peft-non-reentrant-checkpointing", {"deepspeed": "0.18.0", "peft": "0.14.0"},
     "non_reentrant_checkpointing"),
    ("tf-4.51.0-zero3-quantized-load", {"transformers": "4.51.0"}, "quantized"),
])
def test_the_recipes_own_paths_do_not_meet_the_rules_of_the_paths_it_does_not_take(rules, rule_id, bad, needs):
    """VLM-R1's LoRA run has no modules_to_save, checkpoints reentrant and quantizes nothing: the recipe's conditions
    (the spec's) do not flag those rows; naming the condition does."""
    from conftest import REPO
    from vlmbuild.spec import load_spec

    recipe = list(load_spec(REPO / "images" / "vlm-r1.yaml").conditions)
    assert needs not in recipe and "lora" in recipe and "optimizer_offload" in recipe
    assert rule_id not in ids(rules, bad, recipe)
    assert rule_id in ids(rules, bad, recipe + [needs])


def test_deepspeed_0_19_3_to_0_19_7_cannot_be_imported_without_a_gpu_either(rules):
    """Measured here (each release from PyPI imported on this GPU-less host with torch 2.6 / triton 3.2): 0.19.3
    brought row 5's symptom back, 0.19.8 took it away again."""
    def flagged(deepspeed):
        return "ds-0.16.3-triton-3.2-no-gpu-import" in ids(rules, {"deepspeed": deepspeed, "triton": "3.2.0"},
                                                            ["gpu_less_host"])

    assert [v for v in ("0.16.3", "0.16.4", "0.19.2", "0.19.3", "0.19.7", "0.19.8") if flagged(v)] == [
        "0.16.3", "0.19.3", "0.19.7"]
