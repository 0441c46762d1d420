"""Check ``lora``: the recipe's LoRA run, under its ZeRO-2 config and under ZeRO-3.

What VLM-R1's ``run_scripts/run_grpo_rec_lora.sh`` does: ``--use_peft true --lora_r 64 --lora_alpha 128
--lora_dropout 0.05 --lora_task_type CAUSAL_LM --freeze_vision_modules true`` with ``local_scripts/zero2.json``
(stage 2 and an ``optimizer`` block: DeepSpeed's own AdamW, its ``fused_adam`` op, on the GPU and on the CPU
accelerator alike). Its trainer finds the LoRA targets itself: every ``nn.Linear`` whose name holds none of the
vision keywords (``visual`` for Qwen2.5-VL) and is not an embedding, and wraps the model with peft's
``get_peft_model`` before freezing the vision tower. The same GRPO trainer path as ``grpo`` runs
(``grpo.train_grpo``); the reference log-probabilities come from the policy with its adapter disabled under ZeRO-2,
from trl's own reference model under ZeRO-3 (what users combine with ``--use_peft`` when the model does not fit).

Judged from what happened, each leg:
- the parameters DeepSpeed's optimizer updates are exactly the LoRA ones, on exactly the recipe's targets, none in
  the vision tower;
- every LoRA parameter moved in the steps;
- every base weight, gathered, is bit-identical to the weights as loaded from the checkpoint (zero3_load proves that
  load bit-exact; comparing with the loaded model rather than the file's names keeps a transformers that renames
  modules on load a good stack);
- the adapter ``save_model`` wrote, loaded with ``PeftModel.from_pretrained`` onto a fresh base model outside
  DeepSpeed (how it is used afterwards), gives the trained model's logits on the smoke's batch within
  ``LOGITS_TOLERANCE`` of the dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import grpo
from .common import CheckProblem, outside_zero3

# run_grpo_rec_lora.sh's flags, as peft's LoraConfig takes them
LORA_SETTINGS = {"r": 64, "lora_alpha": 128, "lora_dropout": 0.05, "task_type": "CAUSAL_LM"}
# VLM-R1's Qwen module (vlm_modules/qwen_module.py: get_vision_modules_keywords)
VISION_KEYWORDS = ("visual",)
# The recipe configs the run trains with, one leg each: the LoRA script's own, and ZeRO-3
LEGS = ("zero2", "zero3")
STEPS = 2  # B starts at zero: step 1 moves every B, step 2 every A (whose gradient needs a non-zero B)
# Largest difference between the trained model's logits and the reloaded adapter's, relative to the largest logit.
# fp32: the same weights and the same kernels, only the order of a few reductions may differ (ZeRO-3's gathered
# forward against a plain one); measured 0 on the CPU. 16-bit: the adapter is saved in the training dtype, so the
# weights are the same; bf16 matmuls accumulate in other orders across kernels (one bf16 ulp is 2^-8 = 0.4%).
LOGITS_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 1e-2}


def recipe_lora_targets(model: Any) -> list[str]:
    """The modules the recipe puts LoRA on: every ``nn.Linear`` outside the vision tower, embeddings left out."""
    import torch

    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and not any(k in name for k in VISION_KEYWORDS)
                  and "embed_tokens" not in name)


def wrap_with_lora(model: Any, seed: int) -> Any:
    """The recipe's ``get_peft_model`` on its targets, then its ``--freeze_vision_modules``."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(seed)  # the adapter's A matrices are drawn the same on every rank
    targets = recipe_lora_targets(model)
    if not targets:
        raise CheckProblem("the recipe's LoRA target search found no linear layer outside the vision tower")
    model = get_peft_model(model, LoraConfig(target_modules=targets, **LORA_SETTINGS))
    for name, param in model.named_parameters():
        if any(k in name for k in VISION_KEYWORDS):
            param.requires_grad = False
    model.smoke_lora_targets = targets
    return model


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def optimized_names(engine: Any) -> list[str]:
    """The parameters DeepSpeed's optimizer updates, by name: what trained, read from the engine (ZeRO-1/2 keep
    them as ``bit16_groups``, ZeRO-3 as ``fp16_groups``). Not ``requires_grad`` after the run: peft's
    ``disable_adapter``, which the reference log-probabilities go through, turns it back on for every adapter
    parameter (``enable_adapters`` -> ``set_adapter``), trained or not."""
    zero = engine.optimizer
    groups = getattr(zero, "bit16_groups", None) or getattr(zero, "fp16_groups", None)
    if groups is None:
        raise CheckProblem(f"cannot tell which parameters {type(zero).__name__} updates (no bit16_groups or "
                           "fp16_groups): nothing to judge the LoRA run's trainable parameters by")
    ids = {id(p) for group in groups for p in group}
    return [name for name, param in engine.module.named_parameters() if id(param) in ids]


def lora_problems(targets: list[str], initial: dict[str, Any], trained: dict[str, Any],
                  trainable: list[str]) -> list[str]:
    """What is wrong with a LoRA run, from the parameters before and after it (gathered digests) and the ones the
    optimizer updated."""
    problems = []
    lora = sorted(n for n in trained if is_lora(n))
    adapted = {n.split(".lora_")[0] for n in lora}
    missing = [t for t in targets if not any(a.endswith("." + t) for a in adapted)]
    if missing:
        problems.append(f"{len(missing)} of the recipe's {len(targets)} LoRA targets have no adapter, first: "
                        f"{', '.join(missing[:5])}")
    vision = [n for n in lora if any(k in n for k in VISION_KEYWORDS)]
    if vision:
        problems.append(f"{len(vision)} LoRA parameter(s) in the vision tower, first: {', '.join(vision[:5])}")
    extra = sorted(set(trainable) - set(lora))
    if extra:
        problems.append(f"{len(extra)} parameter(s) besides the LoRA ones were trained, first: "
                        f"{', '.join(extra[:5])}")
    frozen = sorted(set(lora) - set(trainable))
    if frozen:
        problems.append(f"{len(frozen)} LoRA parameter(s) were not trained, first: {', '.join(frozen[:5])}")
    still = [n for n in lora if n in initial and initial[n]["sha256"] == trained[n]["sha256"]]
    if still:
        problems.append(f"{len(still)} of {len(lora)} LoRA parameter(s) did not move in {STEPS} steps, first: "
                        f"{', '.join(still[:5])}")
    changed = [n for n in trained if not is_lora(n) and n in initial and initial[n]["sha256"] != trained[n]["sha256"]]
    if changed:
        problems.append(f"{len(changed)} base weight(s) changed in a LoRA run (not bit-identical to the checkpoint "
                        f"as loaded), first: {', '.join(changed[:5])}")
    return problems


def logits(model: Any, batch: dict[str, Any]) -> Any:
    import torch

    was_training = model.training
    model.eval()  # LoRA's dropout off
    try:
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float().cpu()
    finally:
        model.train(was_training)


def save_adapter(trainer: Any, adapter_dir: Path, lora: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Save the adapter as the recipe's Trainer does (``save_model``); what is wrong with what it wrote."""
    import torch.distributed as dist

    from .weights import safetensors_digests

    trainer.save_model(str(adapter_dir))
    dist.barrier()
    weights = adapter_dir / "adapter_model.safetensors"
    saved = safetensors_digests(weights) if weights.is_file() else {}
    files = sorted(p.name for p in adapter_dir.iterdir()) if adapter_dir.is_dir() else []
    # peft names a saved tensor without the adapter's name; with lm_head among the targets it saves lm_head's base
    # weight beside them ("save_embedding_layers"), which is not a LoRA tensor.
    unsaved = [n for n in lora if n.replace(".default.", ".") not in saved]
    problems = []
    if unsaved or not (adapter_dir / "adapter_config.json").is_file():
        problems.append(f"{len(unsaved)} of {len(lora)} LoRA parameter(s) are not in the adapter save_model wrote "
                        f"into {adapter_dir} (found {files}), first: {', '.join(unsaved[:5])}")
    return problems, {"files": files, "tensors": len(saved)}


def logits_problems(trainer: Any, adapter_dir: Path, model_dir: Path, batch: dict[str, Any],
                    dtype: Any) -> tuple[list[str], dict[str, Any]]:
    """The saved adapter, loaded onto a fresh base model outside DeepSpeed, against the trained model's logits."""
    import torch
    from peft import PeftModel

    trained_logits = logits(trainer.model_wrapped.module, batch)
    with outside_zero3():
        base = grpo.load_model(model_dir, dtype).to(batch["input_ids"].device)
        reloaded = logits(PeftModel.from_pretrained(base, str(adapter_dir)), batch)
    scale = float(trained_logits.abs().max()) or 1.0
    error = float((reloaded - trained_logits).abs().max()) / scale
    dtype_name = str(dtype).removeprefix("torch.")
    tolerance = LOGITS_TOLERANCE[dtype_name]
    facts = {"logits_relative_error": error, "tolerance": tolerance, "dtype": dtype_name}
    if error <= tolerance and bool(torch.isfinite(reloaded).all()):
        return [], facts
    return [f"the saved adapter loaded onto a fresh base model does not give the trained model's logits: largest "
            f"difference {error:.3g} of the largest logit (tolerance {tolerance:g} in {dtype_name})"], facts


def use_reentrant(model: Any) -> bool | None:
    """How the run's gradient checkpointing recomputed, as transformers set it on the model's layers (the partial of
    torch's checkpoint it calls); None when nothing is checkpointed."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and func is not None:
            return bool(getattr(func, "keywords", {}).get("use_reentrant", True))
    return None


def train_leg(smoke: Any, config: str) -> dict[str, Any]:
    """One leg: train, save the adapter, then judge what the run left (a save that touched the weights counts)."""
    from .weights import gathered_param_digests

    output = smoke.workdir / f"lora-{config}"
    trainer, initial = grpo.train_grpo(smoke.model_dir, smoke.processor(), output, config, STEPS, smoke.world,
                                       smoke.gpu, smoke.dtype, wrap=lambda m: wrap_with_lora(m, 42), checkpointing=None)
    module = trainer.model_wrapped.module
    lora = [n for n, _ in module.named_parameters() if is_lora(n)]
    problems, adapter = save_adapter(trainer, output / "adapter", lora)
    trainable = optimized_names(trainer.model_wrapped)
    trained = gathered_param_digests(module)
    problems += lora_problems(module.smoke_lora_targets, initial, trained, trainable)
    if not problems:
        wrong, facts = logits_problems(trainer, output / "adapter", smoke.model_dir, smoke.batch_for(module.config),
                                       smoke.dtype)
        problems += wrong
        adapter.update(facts)
    if problems:
        raise CheckProblem(f"LoRA under {config}.json: " + "; ".join(problems))
    return {"config": config, "stage": grpo.resolved_config_facts(trainer)["stage"],
            "optimizer": grpo.optimizer_name(trainer), "steps": trainer.state.global_step,
            "targets": len(module.smoke_lora_targets), "lora_parameters": len(lora),
            "base_parameters": len(trained) - len(lora), "trainable": len(trainable),
            "reference": "trl's reference model" if trainer.ref_model is not None else "the adapter disabled",
            "use_reentrant": use_reentrant(module),
            "losses": trainer.losses, "adapter": adapter}


def check_lora(smoke: Any) -> dict[str, Any]:
    """The registry's ``lora`` check (a rank check: ``fn(smoke) -> details``)."""
    try:
        legs = {config: train_leg(smoke, config) for config in LEGS}
    except grpo.GrpoProblem as exc:
        raise CheckProblem(str(exc)) from None
    return {"settings": LORA_SETTINGS, "vision_keywords": list(VISION_KEYWORDS), "legs": legs}
