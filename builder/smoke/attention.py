"""Check ``attention`` (GPU only, where flash-attn is installed): the recipe's ``flash_attention_2`` against
``sdpa``, same weights, same bf16 batch, for the vision tower and for the whole model's logits.

transformers 4.49 feeds the vision tower's rotary cos/sin to flash-attn's rotary kernel in the model's dtype
while the queries are cast to fp32, and flash-attn asserts ("Input and cos/sin must have the same dtype":
https://github.com/huggingface/transformers/issues/36257, fixed in 4.50 by PR 36188; rule
tf-4.49-fa2-bf16-rotary-dtype). It takes a bf16 cos/sin, i.e. the vision rotary's ``inv_freq`` buffer cast to
bf16, as DeepSpeed before 0.19 cast a module it trains in bf16 (``module.bfloat16()``); ``from_pretrained`` and
DeepSpeed 0.19's own cast keep buffers in fp32, and so does this check's load. VLM-R1 casts cos/sin to fp32 at
import (its qwen2_5vl_monkey_patch). What the
image does about it: nothing is patched in the image's transformers; this check runs the stock code first and,
when it hits exactly that assertion, runs it again with the recipe's fp32 cos/sin (``fp32_vision_rotary``), which
must then agree with sdpa. Such a pass is not a plain one: the details carry a ``workaround`` (the rule, the
stock failure) and the check's status is ``passed_with_workaround``, in the report, the labels and the summary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import tiny_model

# bf16 keeps 8 bits of mantissa; two attention kernels summing in different orders differ by a few ulps of
# the largest activations, never by a different result. Relative to the reference's largest magnitude:
MAX_RELATIVE_ERROR = 2e-2
MIN_COSINE = 0.999
ROTARY_DTYPE_ASSERTION = re.compile(r"Input and cos/sin must have the same dtype")
ROTARY_RULE = "tf-4.49-fa2-bf16-rotary-dtype"


class AttentionProblem(Exception):
    pass


@contextmanager
def fp32_vision_rotary() -> Iterator[None]:
    """The recipe's workaround for transformers 4.49: hand flash-attn's rotary kernel fp32 cos/sin, as the
    queries it rotates are fp32 (transformers#36257). Our own wrapper of the module-level function, undone on exit."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    original = modeling.apply_rotary_pos_emb_flashatt

    def with_fp32_cos_sin(q: Any, k: Any, cos: Any, sin: Any) -> Any:
        return original(q, k, cos.float(), sin.float())

    modeling.apply_rotary_pos_emb_flashatt = with_fp32_cos_sin
    try:
        yield
    finally:
        modeling.apply_rotary_pos_emb_flashatt = original


def load_plain(model_dir: Path, device: Any, dtype: Any, implementation: str) -> Any:
    """The model whole on one device (no ZeRO-3: a live HfDeepSpeedConfig of an earlier check is dropped)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), torch_dtype=dtype,
                                                               attn_implementation=implementation)
    return model.to(device).eval()


def is_attention(name: str) -> bool:
    """The attention modules, by their path in Qwen2.5-VL (the same in every attention implementation): the vision
    blocks' ``attn`` and the language model's ``self_attn``."""
    return name.endswith(".attn") or name.endswith(".self_attn")


def forward(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The vision tower's output, the whole model's logits and the output of every attention module in the
    model's forward. The modules are compared one by one because a residual stream dilutes them: in the tiny
    random model an attention twice off moves the logits by 0.5% only."""
    import torch

    modules: dict[str, Any] = {}

    def keep(name: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            modules[name] = (output[0] if isinstance(output, tuple) else output).detach().float()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if is_attention(n)]
    try:
        with torch.no_grad():
            vision = model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            modules.clear()  # the modules as the whole model's forward runs them
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).logits
    finally:
        for handle in handles:
            handle.remove()
    return {"vision_tower": vision.float(), "language_model": logits.float(), "modules": modules}


def agreement(candidate: Any, reference: Any) -> dict[str, float]:
    import torch

    scale = reference.abs().max().clamp(min=1e-6)
    max_abs = (candidate - reference).abs().max()
    cosine = torch.nn.functional.cosine_similarity(candidate.flatten(), reference.flatten(), dim=0)
    return {"max_abs_error": float(max_abs), "relative_error": float(max_abs / scale), "cosine": float(cosine)}


def compare_attention(model_dir: Path, device: Any, dtype: Any, candidate: str, reference: str) -> dict[str, Any]:
    """Outputs of ``candidate`` attention against ``reference`` attention; raises AttentionProblem beyond tolerance."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    batch = tiny_model.image_text_batch(device, dtype, config=config)
    reference_out = forward(load_plain(model_dir, device, dtype, reference), batch)
    model = load_plain(model_dir, device, dtype, candidate)
    details: dict[str, Any] = {
        "candidate": candidate, "reference": reference, "dtype": str(dtype),
        "tolerance": {"max_relative_error": MAX_RELATIVE_ERROR, "min_cosine": MIN_COSINE},
    }
    try:
        out = forward(model, batch)
    except AssertionError as exc:
        if not ROTARY_DTYPE_ASSERTION.search(str(exc)):
            raise
        # Known-bad in this transformers with this attention: record the stock failure, then prove the recipe's fix.
        details["workaround"] = {"rule": ROTARY_RULE, "stock_error": f"AssertionError: {exc}",
                                 "applied": "fp32 cos/sin for flash-attn's rotary kernel in the vision tower "
                                            "(VLM-R1's qwen2_5vl_monkey_patch)"}
        with fp32_vision_rotary():
            out = forward(model, batch)
    problems = []

    def judge(part: str, found: dict[str, float]) -> None:
        if found["relative_error"] > MAX_RELATIVE_ERROR or found["cosine"] < MIN_COSINE:
            problems.append(f"{part}: {candidate} differs from {reference} beyond tolerance: {found}")

    for part in ("vision_tower", "language_model"):
        details[part] = agreement(out[part], reference_out[part])
        judge(part, details[part])
    if sorted(out["modules"]) != sorted(reference_out["modules"]) or not out["modules"]:
        problems.append(f"the attention modules that ran differ: {candidate} {sorted(out['modules'])}, "
                        f"{reference} {sorted(reference_out['modules'])}")
    else:
        per_module = {name: agreement(out["modules"][name], reference_out["modules"][name]) for name in out["modules"]}
        for name, found in sorted(per_module.items()):
            judge(name, found)
        worst = max(per_module, key=lambda n: per_module[n]["relative_error"])
        details["attention_modules"] = {"compared": len(per_module), "worst": worst, **per_module[worst]}
    if problems:
        raise AttentionProblem("; ".join(problems))
    return details
