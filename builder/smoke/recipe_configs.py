"""The DeepSpeed configurations the VLM-R1 recipe trains with, as data the ``grpo`` check hands to the HF Trainer.

They hold the settings of VLM-R1's ``src/open-r1-multimodal/local_scripts/zero3.json``, ``zero3_offload.json`` and
``zero2.json`` (https://github.com/om-ai-lab/VLM-R1): ZeRO stage 3, ``overlap_comm``, ``auto`` values that the
transformers integration resolves (batch sizes, clipping, bucket sizes, bf16), the consolidated 16-bit save.
``zero3`` has no ``optimizer`` block, so the HF Trainer makes torch's AdamW; ``zero3_offload`` asks DeepSpeed for
AdamW with the optimizer state and the parameters offloaded to the CPU (DeepSpeed's ``cpu_adam`` op); ``zero2`` (the
LoRA run's, ``run_scripts/run_grpo_rec_lora.sh``) is stage 2 without ``overlap_comm`` and asks DeepSpeed for its own
AdamW (the ``fused_adam`` op). ``benchmarks/vlm_r1_recipe.py`` compares them with a checkout of VLM-R1 so a drift
upstream shows.
"""

from __future__ import annotations

import copy
from typing import Any

from .common import with_zero_settings

_FP16_AUTO = {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
              "hysteresis": 2, "min_loss_scale": 1}

_ZERO3_COMMON = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "sub_group_size": 1e9,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
}

_TOP_AUTO = {
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}

ZERO3: dict[str, Any] = {
    "fp16": _FP16_AUTO,
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        **_ZERO3_COMMON,
        "offload_optimizer": {"device": "none", "pin_memory": True},
        "offload_param": {"device": "none", "pin_memory": True},
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "steps_per_print": 100,
    **_TOP_AUTO,
}

ZERO3_OFFLOAD: dict[str, Any] = {
    "fp16": _FP16_AUTO,
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "zero_optimization": {
        **_ZERO3_COMMON,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "gather_16bit_weights_on_model_save": True,
    },
    "steps_per_print": 1e5,
    **_TOP_AUTO,
}

ZERO2: dict[str, Any] = {
    "fp16": _FP16_AUTO,
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "none", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": False,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 100,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}

CONFIGS = {"zero3": ZERO3, "zero3_offload": ZERO3_OFFLOAD, "zero2": ZERO2}


def recipe_config(name: str) -> dict[str, Any]:
    """A fresh copy: the HF integration writes the resolved ``auto`` values into the dict it is given. With the
    ZeRO settings a sweep asked for, if any (common.with_zero_settings)."""
    return with_zero_settings(copy.deepcopy(CONFIGS[name]))
