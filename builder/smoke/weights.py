"""Weights compared bit for bit: sha256 of every tensor of a .safetensors file (parsed here with the standard
library, so a broken ``safetensors`` cannot vouch for itself) and of every gathered ZeRO-3 parameter."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .common import CheckProblem
from .model_dir import safetensors_header, torch_dtype_name


def tensor_digest(tensor: Any) -> str:
    import torch

    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def safetensors_digests(path: Path) -> dict[str, dict[str, Any]]:
    """sha256, shape and dtype of every tensor in a .safetensors file, read byte for byte.

    The format is an 8-byte little-endian header length, a JSON header, then raw little-endian data.
    """
    out: dict[str, dict[str, Any]] = {}
    header, data_start = safetensors_header(path)
    with open(path, "rb") as fh:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            fh.seek(data_start + begin)
            out[name] = {
                "sha256": hashlib.sha256(fh.read(end - begin)).hexdigest(),
                "shape": list(info["shape"]),
                "dtype": torch_dtype_name(info["dtype"]),
            }
    return out


def checkpoint_digests(model_dir: Path) -> dict[str, dict[str, Any]]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CheckProblem(f"no .safetensors files in {model_dir}")
    digests: dict[str, dict[str, Any]] = {}
    for f in files:
        digests.update(safetensors_digests(f))
    return digests


@contextmanager
def gathered(module: Any) -> Iterator[None]:
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def gathered_param_digests(module: Any) -> dict[str, dict[str, Any]]:
    with gathered(module):
        return {
            name: {"sha256": tensor_digest(p.data), "shape": list(p.data.shape), "dtype": str(p.data.dtype)}
            for name, p in module.named_parameters()
        }


def as_model_names(digests: dict[str, dict[str, Any]], model: Any) -> dict[str, dict[str, Any]]:
    """A checkpoint's tensors under the names the model gives them. transformers 4.52 renamed Qwen2.5-VL's modules
    (``model.language_model.*``, ``model.visual.*``) and maps a checkpoint's old names on load, and back on save,
    with the class's ``_checkpoint_conversion_mapping`` (huggingface/transformers#37033): the names are compared
    through the very mapping it loads with (first matching pattern wins, as in its loader), so the comparison
    stays bit-exact on every version. Before 4.52 the model has no mapping and the names are the checkpoint's."""
    import re

    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    out: dict[str, dict[str, Any]] = {}
    for name, digest in digests.items():
        for pattern, replacement in mapping.items():
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                name = renamed
                break
        out[name] = digest
    return out


def diff_params(reference: dict[str, dict[str, Any]], loaded: dict[str, dict[str, Any]], what: str) -> list[str]:
    problems = []
    for name in sorted(set(reference) | set(loaded)):
        if name not in loaded:
            problems.append(f"{name}: in {what} but not in the model")
        elif name not in reference:
            problems.append(f"{name}: in the model but not in {what}")
        elif reference[name]["sha256"] != loaded[name]["sha256"]:
            problems.append(
                f"{name}: not bit-identical to {what} ("
                f"{what} shape {reference[name]['shape']} {reference[name]['dtype']}, "
                f"model shape {loaded[name]['shape']} {loaded[name]['dtype']})"
            )
    return problems
