"""One rank of the smoke: the ZeRO-3 checks that need a process group.

Started by the launcher through ``torch.distributed.run`` (torchrun), world size 2 on CPU (gloo) and
``min(2, GPUs)`` on GPU (NCCL), so ZeRO-3 really partitions across ranks. Each rank writes its own
results file; the launcher merges them. Every check ends with an all-reduce of its verdict so that all
ranks agree and none walks into the next collective alone.

Needs only what a training image has: torch, transformers, deepspeed, safetensors' file format (parsed
here with the standard library, so a broken ``safetensors`` cannot vouch for itself).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import tiny_model

TRAIN_STEPS = 4
LEARNING_RATE = 1e-3
CHECKPOINT_TAG = "smoke"


class CheckFailed(Exception):
    """A check ran to the end and found the environment wrong (as opposed to crashing)."""


# ---------------------------------------------------------------- helpers


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
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            fh.seek(data_start + begin)
            out[name] = {
                "sha256": hashlib.sha256(fh.read(end - begin)).hexdigest(),
                "shape": list(info["shape"]),
                "dtype": info["dtype"],
            }
    return out


def checkpoint_digests(model_dir: Path) -> dict[str, dict[str, Any]]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckFailed(f"no .safetensors files in {model_dir}")
    digests: dict[str, dict[str, Any]] = {}
    for f in files:
        digests.update(safetensors_digests(f))
    return digests


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


_DEVICE = "cpu"


def comm_device() -> str:
    return _DEVICE


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


# ---------------------------------------------------------------- the checks


class Smoke:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world = int(os.environ["WORLD_SIZE"])
        self.workdir = Path(args.workdir)
        self.gpu = args.device == "gpu"
        if self.gpu:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.device = torch.device("cpu")
            self.dtype = torch.float32
        self.model_dir = Path(args.model_dir) if args.model_dir else self.workdir / "tiny-model"
        self.real_model = bool(args.model_dir)
        self.results: list[dict[str, Any]] = []
        self.model: Any = None
        self.engine: Any = None
        self._keep_alive: Any = None

    # -- configuration

    def ds_config(self) -> dict[str, Any]:
        half = self.dtype if self.gpu else None
        import torch

        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "steps_per_print": 10**9,
            "zero_optimization": {
                "stage": 3,
                # 0: partition every parameter. The default (1e5 elements) would keep all of a tiny
                # model's parameters whole on every rank and test nothing.
                "stage3_param_persistence_threshold": 0,
                "overlap_comm": False,
                "contiguous_gradients": True,
            },
            # torch's AdamW: no fused CUDA/CPU Adam op to JIT-build, same on CPU and GPU.
            "optimizer": {"type": "AdamW", "params": {"lr": LEARNING_RATE, "torch_adam": True}},
            "bf16": {"enabled": half == torch.bfloat16},
            "fp16": {"enabled": half == torch.float16, "initial_scale_power": 8},
        }

    # -- check runner

    def run_check(self, name: str, fn: Callable[[], dict[str, Any] | None], needs: tuple[str, ...] = ()) -> bool:
        failed_deps = [r["name"] for r in self.results if r["name"] in needs and r["status"] != "passed"]
        start = time.monotonic()
        entry: dict[str, Any] = {"name": name, "status": "passed", "seconds": 0.0, "error": None, "details": {}}
        if failed_deps:
            entry.update(status="skipped", error=f"not run: {', '.join(failed_deps)} did not pass")
            self.results.append(entry)
            return False
        ok = True
        try:
            entry["details"] = fn() or {}
        except CheckFailed as exc:
            ok = False
            entry["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - any crash of the checked stack is a finding, reported verbatim
            ok = False
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=12)
        try:
            agreed = all_ranks_ok(ok)
        except Exception as exc:  # noqa: BLE001 - the process group itself is broken; report, stop
            agreed = False
            entry["error"] = (entry["error"] or "") + f"\n(ranks could not agree: {type(exc).__name__}: {exc})"
        if not agreed:
            entry["status"] = "failed"
            if ok:
                entry["error"] = "failed on another rank"
        entry["seconds"] = round(time.monotonic() - start, 3)
        self.results.append(entry)
        self.write_results()
        return agreed

    def write_results(self) -> None:
        out = Path(self.args.results_dir) / f"rank{self.rank}.json"
        out.write_text(json.dumps({"rank": self.rank, "world_size": self.world, "checks": self.results}, indent=2))

    # -- check 2: zero3_load

    def make_tiny_checkpoint(self) -> None:
        import torch
        import torch.distributed as dist
        from transformers import Qwen2_5_VLForConditionalGeneration

        if self.rank == 0:
            torch.manual_seed(0)
            model = Qwen2_5_VLForConditionalGeneration(tiny_model.tiny_config()).to(self.dtype)
            model.save_pretrained(self.model_dir, safe_serialization=True)
            del model
        dist.barrier()

    def load_under_zero3(self) -> Any:
        from transformers import Qwen2_5_VLForConditionalGeneration
        from transformers.integrations import HfDeepSpeedConfig

        # transformers keeps only a weak reference to this object: it must stay alive or
        # from_pretrained silently stops building the model inside deepspeed.zero.Init.
        self._keep_alive = HfDeepSpeedConfig(self.ds_config())
        # Never pass device_map or low_cpu_mem_usage under ZeRO-3.
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.model_dir, torch_dtype=self.dtype, attn_implementation="sdpa"
        )

    def check_zero3_load(self) -> dict[str, Any]:
        if not self.real_model:
            self.make_tiny_checkpoint()
        reference = checkpoint_digests(self.model_dir)
        self.model = self.load_under_zero3()

        names = [n for n, _ in self.model.named_parameters()]
        not_partitioned = [
            n for n, p in self.model.named_parameters() if not hasattr(p, "ds_id") or p.data.numel() != 0
        ]
        if not_partitioned:
            raise CheckFailed(
                f"{len(not_partitioned)} of {len(names)} parameters are not ZeRO-3 partitioned "
                f"(no ds_id or full data on this rank), first: {', '.join(not_partitioned[:5])}"
            )
        loaded = gathered_param_digests(self.model)
        problems = diff_params(reference, loaded, "the checkpoint")
        if problems:
            raise CheckFailed(
                f"{len(problems)} parameter(s) differ from the saved checkpoint; first ones:\n  "
                + "\n  ".join(problems[:8])
            )
        vision = sum(1 for n in names if n.startswith("visual."))
        return {"parameters": len(names), "vision_parameters": vision, "partitioned": len(names), "bit_identical": True}

    # -- check 3: train_step

    def initialize_engine(self, model: Any) -> Any:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config(),
        )
        return engine

    def batch(self) -> dict[str, Any]:
        # A real checkpoint gets a short sequence; its own token ids (vision start, image) are used.
        text_tokens = 8 if self.real_model else 12
        return tiny_model.image_text_batch(self.device, self.dtype, config=self.model.config, text_tokens=text_tokens)

    def train_steps(self, engine: Any, steps: int) -> list[float]:
        losses = []
        batch = self.batch()
        for _ in range(steps):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(mean_over_ranks(float(loss.detach().float().item())))
        return losses

    def check_train_step(self) -> dict[str, Any]:
        # Gradient checkpointing on, as VLM-R1 trains: its recomputation under ZeRO-3 is a path of its own.
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        self.engine = self.initialize_engine(self.model)
        losses = self.train_steps(self.engine, TRAIN_STEPS)
        if not all(math.isfinite(x) for x in losses):
            raise CheckFailed(f"loss not finite: {losses}")
        if not losses[-1] < losses[0]:
            raise CheckFailed(f"loss did not fall over {TRAIN_STEPS} steps: {losses}")
        return {"steps": TRAIN_STEPS, "losses": losses}

    # -- check 4: checkpoint_resume

    def check_checkpoint_resume(self) -> dict[str, Any]:
        ckpt = self.workdir / "ds-checkpoint"
        self.engine.save_checkpoint(str(ckpt), tag=CHECKPOINT_TAG)
        saved_params = gathered_param_digests(self.engine.module)
        saved_optimizer = optimizer_snapshot(self.engine)

        fresh = self.load_under_zero3()
        fresh.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fresh.config.use_cache = False
        engine = self.initialize_engine(fresh)
        load_path, _ = engine.load_checkpoint(str(ckpt), tag=CHECKPOINT_TAG)
        if load_path is None:
            raise CheckFailed(f"load_checkpoint found no checkpoint under {ckpt} (tag {CHECKPOINT_TAG})")

        problems = diff_params(saved_params, gathered_param_digests(engine.module), "the saved engine")
        problems += compare_snapshots(saved_optimizer, optimizer_snapshot(engine))
        if problems:
            raise CheckFailed(
                f"{len(problems)} difference(s) between the saved and the resumed state; first ones:\n  "
                + "\n  ".join(problems[:8])
            )
        losses = self.train_steps(engine, 1)
        if not math.isfinite(losses[0]):
            raise CheckFailed(f"loss after resume not finite: {losses[0]}")
        return {
            "optimizer_tensors_compared": sum(1 for v in saved_optimizer.values() if hasattr(v, "shape")),
            "parameters_compared": len(saved_params),
            "loss_after_resume": losses[0],
        }

    def run(self) -> None:
        self.run_check("zero3_load", self.check_zero3_load)
        self.run_check("train_step", self.check_train_step, needs=("zero3_load",))
        self.run_check("checkpoint_resume", self.check_checkpoint_resume, needs=("train_step",))


def main(argv: list[str] | None = None) -> int:
    global _DEVICE
    parser = argparse.ArgumentParser(prog="vlmbuild.smoke.worker")
    parser.add_argument("--device", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--results-dir", required=True)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    results_file = Path(args.results_dir) / f"rank{rank}.json"
    try:
        import datetime

        import deepspeed

        if args.device == "gpu":
            _DEVICE = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=args.timeout))
    except Exception as exc:  # noqa: BLE001 - an import or init crash is the finding
        results_file.write_text(
            json.dumps(
                {
                    "rank": rank,
                    "fatal": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=12),
                    "checks": [],
                }
            )
        )
        return 1
    smoke = Smoke(args)
    smoke.run()
    smoke.write_results()
    return 0 if all(r["status"] == "passed" for r in smoke.results) else 1


if __name__ == "__main__":
    sys.exit(main())
