"""Checks ``grpo`` and ``optimizer_offload``: GRPO under ZeRO-3 with the recipe's DeepSpeed configs, on trl from the image.

What runs: trl's ``GRPOTrainer`` (the class most GRPO recipes train with), subclassed as ``SmokeGRPOTrainer``.
trl's own code does the rest of the run: its ``__init__`` loads the reference model and wraps it in its own
ZeRO-3 engine with trl's ``prepare_deepspeed``, its sampler repeats each prompt ``num_generations`` times, and
the HF Trainer underneath resolves the recipe's DeepSpeed config, makes the engine and optimizer and runs the
steps with gradient checkpointing. Two parts are replaced by the subclass: ``_prepare_inputs`` (trl's
``_generate_and_score_completions``: generation, rewards, advantages; ours feeds images, which trl 0.17's text
path does not) and ``compute_loss`` (GRPO's loss with the image; one iteration per generation). Generation goes
through trl's ZeRO-3 path, ``unwrap_model_for_generation`` on the DeepSpeed engine: gather, remove the ZeRO-3
hooks, generate, put them back (https://github.com/huggingface/trl/issues/2962 is what breaks there).

Which of VLM-R1's paths that covers: VLM-R1's ``VLMGRPOTrainer`` is not a ``GRPOTrainer`` subclass. It
subclasses transformers' ``Trainer`` and takes from trl ``GRPOConfig``, ``prepare_deepspeed`` and
``unwrap_model_for_generation``, the very functions this run goes through, with the same HF Trainer DeepSpeed
integration, the recipe's configs and the consolidated save. trl's own GRPO scoring and loss (which VLM-R1 does
not use either) are not what this check proves; ``benchmarks/vlm_r1_recipe.py`` runs VLM-R1's own script.

One run: ``GRPO_STEPS`` optimizer steps, then ``save_model`` writes the consolidated 16-bit safetensors, which
is read back byte for byte and compared with the gathered parameters.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import tiny_model
from .recipe_configs import recipe_config

GRPO_STEPS = 2
OFFLOAD_STEPS = 1
NUM_GENERATIONS = 2
MAX_COMPLETION_TOKENS = 8
LEARNING_RATE = 1e-3  # the tiny model must move measurably in two steps (bf16 rounds away the recipe's 1e-6)
BETA = 0.04  # trl's and VLM-R1's default KL weight: the reference model (its own ZeRO-3 engine) takes part
QUESTIONS = ("How many squares are in the image?", "What is 3+4?", "Name the colour.", "Count the dots.")
ANSWERS = ("4", "7", "red", "9")
ANSWER_RE = re.compile(r"<answer>.*?</answer>", re.S)


class GrpoProblem(Exception):
    """The GRPO run produced something wrong (raised during the run or after it)."""


# ---------------------------------------------------------------- rule-based rewards (as the recipe's are)


def format_reward(completions: list[str], **_: Any) -> list[float]:
    """1.0 when the completion wraps an answer in <answer>...</answer> (VLM-R1's format reward, in spirit)."""
    return [1.0 if ANSWER_RE.search(c) else 0.0 for c in completions]


def answer_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """Similarity to the expected answer, plus a dense term from the characters themselves, so that two
    different completions practically never tie and the policy gradient is not zero."""
    out = []
    for text, expected in zip(completions, answer, strict=True):
        similarity = difflib.SequenceMatcher(None, text, expected).ratio()
        dense = (sum(map(ord, text)) / max(1, len(text))) / 256.0 if text else 0.0
        out.append(similarity + 0.1 * dense)
    return out


# ---------------------------------------------------------------- the trainer


def make_trainer_class() -> type:
    """``SmokeGRPOTrainer``, made at run time: trl is imported only when the check runs."""
    import torch
    from accelerate.utils import gather, is_peft_model
    from transformers import AutoModelForCausalLM, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from trl import GRPOTrainer
    from trl.models import unwrap_model_for_generation

    # trl loads the reference model under ZeRO-3 with AutoModelForCausalLM, which in transformers 4.49 has no
    # Qwen2.5-VL entry ("Unrecognized configuration class ... Qwen2_5_VLConfig"). Registering the class through
    # the public Auto API lets trl's own code load it and wrap it with its prepare_deepspeed, in every trl version.
    AutoModelForCausalLM.register(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, exist_ok=True)

    class SmokeGRPOTrainer(GRPOTrainer):
        def __init__(self, *, model: Any, processor: Any, args: Any, **kwargs: Any) -> None:
            super().__init__(model=model, args=args, processing_class=processor.tokenizer, **kwargs)
            self.processor = processor
            self.generation_calls = 0
            self.completion_lengths: list[int] = []
            self.losses: list[float] = []
            self.rewards: list[list[float]] = []
            # What each optimizer step of this process took, as the run saw it: the step's number, the learning
            # rate it ran with, the dataset rows it got and the tokens it sampled (trainer_resume compares them).
            self.step_log: list[dict[str, Any]] = []

        # -- generation and scoring (trl's _generate_and_score_completions, with images)

        def _prepare_inputs(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            device = self.accelerator.device
            encoded = self.processor(text=[x["prompt"] for x in inputs], images=[x["image"] for x in inputs],
                                     return_tensors="pt", padding=True, padding_side="left")
            encoded = {k: v.to(device) for k, v in encoded.items()}
            encoded["pixel_values"] = encoded["pixel_values"].to(self.model.dtype)
            tokenizer = self.processor.tokenizer
            # The engine, not the module: trl gathers the ZeRO-3 shards and takes the engine's hooks off and
            # back on around generate(); that is the path that broke (trl#2962, deepspeed >= 0.16.4).
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
                out = unwrapped.generate(**encoded, max_new_tokens=MAX_COMPLETION_TOKENS, do_sample=True,
                                         temperature=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id)
            self.generation_calls += 1
            prompt_len = encoded["input_ids"].size(1)
            completion_ids = out[:, prompt_len:]
            self.step_log.append({"step": self.state.global_step + 1, "rows": [x["row"] for x in inputs],
                                  "learning_rate": self.optimizer.param_groups[0]["lr"],
                                  "completions": completion_ids.tolist()})
            if completion_ids.size(1) == 0:
                # Every completion empty: nothing to score and no token to take a gradient on.
                raise GrpoProblem(f"generation under ZeRO-3 returned no new token for any of {len(inputs)} prompt(s) "
                                  f"(max_new_tokens {MAX_COMPLETION_TOKENS}): every completion is empty")
            is_eos = completion_ids == tokenizer.eos_token_id
            first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.size(1))
            completion_mask = (torch.arange(completion_ids.size(1), device=device)[None, :] <= first_eos[:, None]).int()
            # Each row has at least its first new token (up to and with its first EOS): every length is > 0.
            self.completion_lengths += completion_mask.sum(1).tolist()

            texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            rewards = torch.zeros(len(inputs), device=device)
            for func in self.reward_funcs:
                rewards += torch.tensor(func(completions=texts, answer=[x["answer"] for x in inputs]),
                                        dtype=torch.float32, device=device)
            # Groups of NUM_GENERATIONS completions of one prompt span the ranks: normalise over all of them.
            all_rewards = gather(rewards)
            self.rewards.append(all_rewards.tolist())
            grouped = all_rewards.view(-1, self.num_generations)
            advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
            rank = self.accelerator.process_index
            advantages = advantages.reshape(-1)[rank * len(inputs):(rank + 1) * len(inputs)]

            batch = {
                "input_ids": torch.cat([encoded["input_ids"], completion_ids], 1),
                "attention_mask": torch.cat([encoded["attention_mask"], completion_mask], 1),
                "pixel_values": encoded["pixel_values"],
                "image_grid_thw": encoded["image_grid_thw"],
                "completion_mask": completion_mask,
                "advantages": advantages,
            }
            with torch.no_grad():
                if self.ref_model is not None:
                    batch["ref_logps"] = self.completion_logps(self.ref_model, batch)
                elif is_peft_model(self.model):
                    # A LoRA run has no reference model of its own: the base model is the policy with its adapter
                    # disabled (what trl and VLM-R1 do).
                    with self.accelerator.unwrap_model(self.model).disable_adapter():
                        batch["ref_logps"] = self.completion_logps(self.model, batch)
            return batch

        def completion_logps(self, model: Any, batch: dict[str, Any]) -> Any:
            keep = batch["completion_mask"].size(1)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).logits
            logits = logits[:, -keep - 1:-1, :].float()
            targets = batch["input_ids"][:, -keep:]
            return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            # GRPO with one iteration per generation: the ratio is 1 in value, its gradient the policy gradient.
            logps = self.completion_logps(model, inputs)
            per_token = -torch.exp(logps - logps.detach()) * inputs["advantages"].unsqueeze(1)
            if "ref_logps" in inputs:
                delta = inputs["ref_logps"] - logps
                per_token = per_token + self.beta * (torch.exp(delta) - delta - 1)
            mask = inputs["completion_mask"]
            loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
            self.losses.append(float(loss.detach()))
            return loss

    return SmokeGRPOTrainer


# ---------------------------------------------------------------- one run


def prompt_dataset(count: int) -> Any:
    from datasets import Dataset

    images = tiny_model.tiny_images(count)
    return Dataset.from_list([
        {"row": i, "prompt": tiny_model.chat_prompt(QUESTIONS[i % len(QUESTIONS)]), "image": images[i],
         "answer": ANSWERS[i % len(ANSWERS)]}
        for i in range(count)
    ])


# Gradient checkpointing as the smoke's full fine-tuning runs it. A LoRA run takes the recipe's own (VLM-R1 passes no
# gradient_checkpointing_kwargs: transformers 4.49's default, reentrant), the one PEFT under ZeRO-3 needs before
# DeepSpeed 0.19.3 (non-reentrant recomputes partitioned frozen weights as [0]: huggingface/transformers#47254).
NON_REENTRANT = {"use_reentrant": False}


def training_args(output_dir: Path, config_name: str, steps: int, world: int, gpu: bool, bf16: bool,
                  seed: int, checkpointing: dict[str, Any] | None = NON_REENTRANT, save_steps: int = 0) -> Any:
    """The run's GRPOConfig; ``save_steps`` > 0 saves a Trainer checkpoint every that many steps (else none)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        deepspeed=recipe_config(config_name),
        # NUM_GENERATIONS completions of each prompt per optimizer step, spread over the ranks.
        per_device_train_batch_size=max(1, NUM_GENERATIONS // world),
        gradient_accumulation_steps=1,
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_TOKENS,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        beta=BETA,
        bf16=bf16,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=checkpointing,
        remove_unused_columns=False,
        logging_steps=1,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        # With no GPU and only `deepspeed=`, accelerate picks no backend and counts one process
        # ("train_batch_size ... 1 != 1 * 1 * 2"). use_cpu with gloo makes it count the process group the smoke
        # set up; the Accelerator still runs DeepSpeed because the TrainingArguments carry its plugin.
        **({} if gpu else {"use_cpu": True, "ddp_backend": "gloo"}),
    )


def load_model(model_dir: Path, dtype: Any) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    # Built inside deepspeed.zero.Init: the TrainingArguments made just before hold the live HfDeepSpeedConfig.
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), torch_dtype=dtype,
                                                               attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def resolved_config_facts(trainer: Any) -> dict[str, Any]:
    """What the HF integration made of the recipe's config (its ``auto`` values resolved: DeepSpeed's config
    model refuses an ``auto`` left in any of these keys, so a leftover never gets this far)."""
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    zero = config["zero_optimization"]
    return {
        "stage": zero.get("stage"),
        "overlap_comm": zero.get("overlap_comm"),
        "reduce_bucket_size": zero.get("reduce_bucket_size"),
        "stage3_param_persistence_threshold": zero.get("stage3_param_persistence_threshold"),
        "train_batch_size": config["train_batch_size"],
        "gradient_clipping": config["gradient_clipping"],
        "bf16": bool(config.get("bf16", {}).get("enabled")),
        "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device"),
        "offload_param": (zero.get("offload_param") or {}).get("device"),
    }


def optimizer_name(trainer: Any) -> str:
    engine = trainer.model_wrapped
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return f"{type(inner).__module__}.{type(inner).__name__}"


def train_grpo(model_dir: Path, processor: Any, output_dir: Path, config_name: str, steps: int, world: int,
               gpu: bool, dtype: Any, seed: int = 42, wrap: Callable[[Any], Any] | None = None,
               checkpointing: dict[str, Any] | None = NON_REENTRANT, save_steps: int = 0,
               resume_from: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Train ``steps`` GRPO steps: (trainer, the gathered parameter digests before training). ``wrap`` turns the
    loaded model into the one trained (the LoRA run's ``get_peft_model``); ``resume_from`` is a Trainer checkpoint
    that ``train`` resumes from, as the recipe's ``train(resume_from_checkpoint=...)`` does."""
    import torch

    from .weights import gathered_param_digests

    args = training_args(output_dir, config_name, steps, world, gpu, dtype == torch.bfloat16, seed, checkpointing,
                         save_steps)
    model = load_model(model_dir, dtype)
    if wrap is not None:
        model = wrap(model)
    initial = gathered_param_digests(model)
    trainer = make_trainer_class()(
        model=model, processor=processor, args=args,
        reward_funcs=[format_reward, answer_reward],
        train_dataset=prompt_dataset(max(4, steps * NUM_GENERATIONS)),
    )
    resume = str(resume_from) if resume_from is not None else None
    trainer.smoke_train_loss = float(trainer.train(resume_from_checkpoint=resume).training_loss)
    return trainer, initial


def grpo_facts(trainer: Any, initial: dict[str, Any], steps: int, world: int) -> dict[str, Any]:
    """What the run did, from the trainer and the engine after it; raises GrpoProblem when that is wrong."""
    import torch.distributed as dist

    from .weights import gathered_param_digests

    if trainer.state.global_step != steps:
        raise GrpoProblem(f"the trainer took {trainer.state.global_step} optimizer steps, expected {steps}")
    if not all(math.isfinite(x) for x in trainer.losses):
        raise GrpoProblem(f"loss not finite: {trainer.losses}")
    engine = trainer.model_wrapped
    partitioned = sum(1 for p in engine.module.parameters() if hasattr(p, "ds_id"))
    if partitioned == 0:
        raise GrpoProblem("the trained model carries no ZeRO-3 parameters (ds_id): it was not trained under ZeRO-3 "
                          f"(the resolved config says stage {resolved_config_facts(trainer)['stage']})")
    trained = gathered_param_digests(engine.module)
    moved = [n for n, d in trained.items() if n in initial and d["sha256"] != initial[n]["sha256"]]
    if not moved:
        raise GrpoProblem(f"no parameter changed in {steps} optimizer step(s): the update did not reach the weights "
                          f"(rewards {trainer.rewards}, losses {trainer.losses})")
    facts = {
        "steps": trainer.state.global_step,
        "world_size": world,
        "generations": trainer.generation_calls,
        "completion_lengths": trainer.completion_lengths,
        "rewards": trainer.rewards,
        "losses": trainer.losses,
        "train_loss": trainer.smoke_train_loss,
        "parameters_changed": len(moved),
        "parameters": len(trained),
        "partitioned_parameters": partitioned,
        "optimizer": optimizer_name(trainer),
        "reference_model": trainer.ref_model is not None,
        "deepspeed_config": resolved_config_facts(trainer),
    }
    dist.barrier()
    return facts


def offload_state(trainer: Any) -> dict[str, Any]:
    """Where DeepSpeed holds the optimizer after the step, read from the engine: the ZeRO-3 optimizer's fp32
    partitions, the inner optimizer's Adam moments and step count, every parameter's ZeRO-3 shard (ds_tensor)."""
    import torch

    engine = trainer.model_wrapped
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    flats = list(getattr(zero_opt, "fp32_partitioned_groups_flat", None) or [])
    moments, steps = [], []
    for state in inner.state.values():
        moments += [state[k] for k in ("exp_avg", "exp_avg_sq") if torch.is_tensor(state.get(k))]
        if state.get("step") is not None:
            steps.append(int(state["step"]))
    shards = [p.ds_tensor for p in engine.module.parameters() if hasattr(p, "ds_tensor")]
    return {
        "optimizer": optimizer_name(trainer),
        "fp32_partitions": {"count": len(flats), "devices": sorted({str(t.device) for t in flats})},
        "adam_moments": {"count": len(moments), "devices": sorted({str(t.device) for t in moments}),
                         "written": any(bool(t.abs().sum() > 0) for t in moments)},
        "parameter_shards": {"count": len(shards), "devices": sorted({str(t.device) for t in shards})},
        "adam_step": max(steps, default=0),
    }


def offload_problems(state: dict[str, Any], steps: int, gpu: bool) -> list[str]:
    """What is wrong with ``offload_state`` after ``steps`` offloaded optimizer step(s). Placement is judged on a
    GPU only: on the CPU every tensor is on the CPU whether it was offloaded or not."""
    problems = []
    if "CPUAdam" not in state["optimizer"]:
        problems.append(f"the offload config trained with {state['optimizer']}, not DeepSpeed's CPU Adam (cpu_adam)")
    if state["adam_moments"]["count"] == 0:
        problems.append(f"{state['optimizer']} holds no Adam moments after {steps} step(s): the step never ran "
                        "through it")
    elif state["adam_step"] < steps:
        problems.append(f"{state['optimizer']} counts {state['adam_step']} step(s) after {steps} optimizer step(s)")
    elif not state["adam_moments"]["written"]:
        problems.append(f"the Adam moments of {state['optimizer']} are all zero after {steps} step(s)")
    if gpu:
        for part, what in (("fp32_partitions", "fp32 master partitions"), ("adam_moments", "Adam moments"),
                           ("parameter_shards", "parameter shards (ds_tensor)")):
            devices = state[part]["devices"]
            if state[part]["count"] == 0 or devices != ["cpu"]:
                problems.append(f"the {what} are on {', '.join(devices) or 'no device (none found)'}, not the CPU "
                                "the offload config asks for")
    return problems


def verify_consolidated_save(trainer: Any, output_dir: Path) -> dict[str, Any]:
    """``save_model`` under ZeRO-3 writes the consolidated 16-bit weights; they must be the gathered parameters."""
    import torch.distributed as dist

    from .weights import as_model_names, checkpoint_digests, diff_params, gathered_param_digests

    trainer.save_model(str(output_dir))
    dist.barrier()
    files = sorted(p.name for p in output_dir.glob("*.safetensors"))
    if not files:
        present = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
        raise GrpoProblem(f"save_model wrote no consolidated .safetensors into {output_dir} (found {present}); "
                          "is stage3_gather_16bit_weights_on_model_save on?")
    live_model = trainer.model_wrapped.module
    saved = as_model_names(checkpoint_digests(output_dir), live_model)  # 4.52+ saves the old names back
    live = gathered_param_digests(live_model)
    problems = diff_params(saved, live, "the consolidated save")
    if problems:
        raise GrpoProblem(f"{len(problems)} tensor(s) of the consolidated save differ from the trained parameters; "
                          "first ones:\n  " + "\n  ".join(problems[:8]))
    return {"files": files, "tensors_compared": len(saved), "dtype": sorted({d["dtype"] for d in saved.values()})}
