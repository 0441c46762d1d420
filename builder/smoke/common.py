"""What every check of the smoke shares: the failure type, the collectives all ranks take part in, and a way out of
the ZeRO-3 model construction transformers follows."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class CheckProblem(Exception):
    """A check ran to the end and found the environment wrong (as opposed to crashing)."""


_DEVICE = "cpu"

# ZeRO settings laid over every DeepSpeed config the smoke builds (its own and the recipe's), as a JSON object:
# how `vlmbuild sweep` measures the rest of a cell with a setting users could equally write in their config when
# a defect of DeepSpeed's CPU accelerator would void it (docs/sweep.md). The report says which settings ran.
ZERO_SETTINGS_ENV = "VLMBUILD_SMOKE_ZERO_SETTINGS"


def zero_settings() -> dict[str, Any]:
    raw = os.environ.get(ZERO_SETTINGS_ENV, "").strip()
    if not raw:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"{ZERO_SETTINGS_ENV} must be a JSON object of zero_optimization keys, got {raw!r}")
    return value


def with_zero_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the settings of ZERO_SETTINGS_ENV in its zero_optimization block (in place, returned)."""
    settings = zero_settings()
    if settings and "zero_optimization" in config:
        config["zero_optimization"].update(settings)
    return config


def set_comm_device(device: str) -> None:
    """Where the small tensors of the smoke's own collectives live: cpu under gloo, the rank's GPU under NCCL."""
    global _DEVICE
    _DEVICE = device


def comm_device() -> str:
    return _DEVICE


def all_ranks_ok(ok: bool) -> bool:
    """True only if every rank says ok (MIN all-reduce)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


@contextmanager
def outside_zero3() -> Iterator[None]:
    """Build or load models as a plain program would: not inside ``deepspeed.zero.Init``, whose collectives would
    hang a model made on one rank alone, and as a user loads an adapter afterwards. transformers follows the
    HfDeepSpeedConfig that the newest TrainingArguments (or the smoke) made, through a weak reference; it is taken
    away here and put back afterwards."""
    from transformers.integrations import deepspeed as hf_deepspeed

    # transformers keeps no public getter of the object, only of its config dict; the weak reference it holds is
    # read to put it back (absent: nothing was set, nothing to restore).
    reference = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    held = reference() if reference is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if held is not None:
            hf_deepspeed.set_hf_deepspeed_config(held)
