"""What every check of the smoke shares: the failure type and the collectives all ranks take part in."""

from __future__ import annotations


class CheckProblem(Exception):
    """A check ran to the end and found the environment wrong (as opposed to crashing)."""


_DEVICE = "cpu"


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
