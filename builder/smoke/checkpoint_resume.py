"""Check checkpoint_resume: a ZeRO-3 checkpoint saved and loaded into fresh ranks' state, compared whole (and the
optimizer snapshot trainer_resume compares with)."""

from __future__ import annotations

import math
from typing import Any

from .common import CheckProblem
from .weights import diff_params, gathered_param_digests

CHECKPOINT_TAG = "smoke"


def optimizer_snapshot(engine: Any) -> dict[str, Any]:
    """This rank's share of the ZeRO-3 optimizer: fp32 master partitions and the inner optimizer's state."""
    import torch

    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    # Stage 3 keeps one fp32 flat partition per parameter group; Adam's moments are keyed by it.
    flats = list(getattr(zero_opt, "fp32_partitioned_groups_flat", None) or [])
    if not flats:
        flats = [p for group in inner.param_groups for p in group["params"]]
    snap: dict[str, Any] = {}
    for i, flat in enumerate(flats):
        snap[f"fp32_partition.{i}"] = flat.detach().to("cpu").clone()
        for key, value in inner.state.get(flat, {}).items():
            snap[f"adam.{i}.{key}"] = value.detach().to("cpu").clone() if torch.is_tensor(value) else value
    return snap


def compare_snapshots(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    import torch

    problems = []
    if not before:
        problems.append("no optimizer state was found to compare (expected ZeRO-3 fp32 partitions and Adam moments)")
    elif not any(name.endswith(".exp_avg") for name in before):
        problems.append("no Adam moments (exp_avg) were found in the optimizer state: nothing to prove a resume with")
    for name in sorted(set(before) | set(after)):
        if name not in after:
            problems.append(f"{name}: saved but missing after load")
        elif name not in before:
            problems.append(f"{name}: present after load but not saved")
        else:
            a, b = before[name], after[name]
            if torch.is_tensor(a):
                same = torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            else:
                same = float(a) == float(b)
            if not same:
                problems.append(f"{name}: differs after load")
    return problems


def check_checkpoint_resume(smoke: Any) -> dict[str, Any]:
    """save_checkpoint, then a fresh model loaded under ZeRO-3 and a fresh engine load it: every parameter, fp32
    partition and Adam moment equal to what was saved; one more step with a finite loss."""
    ckpt = smoke.workdir / "ds-checkpoint"
    smoke.engine.save_checkpoint(str(ckpt), tag=CHECKPOINT_TAG)
    saved_params = gathered_param_digests(smoke.engine.module)
    saved_optimizer = optimizer_snapshot(smoke.engine)

    fresh = smoke.load_under_zero3()
    fresh.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fresh.config.use_cache = False
    engine = smoke.initialize_engine(fresh)
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=CHECKPOINT_TAG)
    if load_path is None:
        raise CheckProblem(f"load_checkpoint found no checkpoint under {ckpt} (tag {CHECKPOINT_TAG})")

    problems = diff_params(saved_params, gathered_param_digests(engine.module), "the saved engine")
    problems += compare_snapshots(saved_optimizer, optimizer_snapshot(engine))
    if problems:
        raise CheckProblem(
            f"{len(problems)} difference(s) between the saved and the resumed state; first ones:\n  "
            + "\n  ".join(problems[:8])
        )
    losses = smoke.train_steps(engine, 1)
    if not math.isfinite(losses[0]):
        raise CheckProblem(f"loss after resume not finite: {losses[0]}")
    return {
        "optimizer_tensors_compared": sum(1 for v in saved_optimizer.values() if hasattr(v, "shape")),
        "parameters_compared": len(saved_params),
        "loss_after_resume": losses[0],
    }
