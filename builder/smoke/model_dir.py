"""What a ``--model-dir`` must be: a Qwen2.5-VL checkpoint as the hub ships one.

Standard library only: the smoke checks it inside the image, and the builder checks it on the host before it
starts a container (so a wrong directory is a clear exit 2, never a failed smoke).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

MODEL_TYPE = "qwen2_5_vl"
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer_config.json")
# safetensors' dtype names against torch's
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class ModelDirProblem(ValueError):
    pass


def validate_model_dir(path: Path) -> dict:
    """The checkpoint's config; raises ModelDirProblem naming what is missing or wrong."""
    where = f"--model-dir {path}"
    if not path.is_dir():
        raise ModelDirProblem(f"{where}: no such directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirProblem(f"{where}: no config.json there (a Qwen2.5-VL checkpoint directory?)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirProblem(f"{where}: config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ModelDirProblem(f"{where}: config.json says model_type {found!r}; the smoke checks Qwen2.5-VL "
                              f"checkpoints (model_type {MODEL_TYPE!r})")
    if not any(path.glob("*.safetensors")):
        raise ModelDirProblem(f"{where}: no *.safetensors weights (the smoke compares them byte for byte)")
    missing = [name for name in PROCESSOR_FILES if not (path / name).is_file()]
    if missing:
        raise ModelDirProblem(f"{where}: no {' or '.join(missing)} (the grpo check feeds image+text prompts "
                              "through the checkpoint's own processor)")
    return config


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file (an 8-byte little-endian length, then the JSON) and the offset where
    the tensors' data starts."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length)), 8 + length


def torch_dtype_name(stored: str) -> str:
    return "torch." + SAFETENSORS_DTYPES.get(stored, stored.lower())


def checkpoint_dtype(path: Path) -> str:
    """The dtype most of a checkpoint's floating-point tensors are stored in, as torch names it (the dtype the
    smoke loads and compares it in), from the safetensors headers alone."""
    counts: dict[str, int] = {}
    for f in sorted(path.glob("*.safetensors")):
        for name, info in safetensors_header(f)[0].items():
            dtype = torch_dtype_name(info["dtype"]) if name != "__metadata__" else None
            if dtype in ("torch.float32", "torch.float16", "torch.bfloat16", "torch.float64"):
                counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=lambda d: counts[d]) if counts else "torch.float32"


def describe_checkpoint(path: Path, shown_as: str | None = None) -> dict:
    """What the report says of the checkpoint that ran: its path as the user gave it (``shown_as``: the path on
    the host when it is mounted into a container), where it was read, the dtype the smoke compares it in and its
    parameter count (from the safetensors headers, without reading the weights)."""
    parameters = tensors = 0
    for f in sorted(path.glob("*.safetensors")):
        for name, info in safetensors_header(f)[0].items():
            if name != "__metadata__":
                tensors += 1
                parameters += math.prod(info["shape"])
    return {"path": shown_as or str(path), "read_at": str(path), "dtype": checkpoint_dtype(path),
            "parameters": parameters, "tensors": tensors}
