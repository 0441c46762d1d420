"""What a ``--model-dir`` must be: a Qwen2.5-VL checkpoint as the hub ships one.

Standard library only: the smoke checks it inside the image, and the builder checks it on the host before it
starts a container (so a wrong directory is a clear exit 2, never a failed smoke).
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_TYPE = "qwen2_5_vl"
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer_config.json")


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
