"""One rank of the smoke: the checks that need a process group.

Started by the launcher with the environment torchrun gives its workers, world size 2 on CPU (gloo) and
``min(2, GPUs)`` on GPU (NCCL), so ZeRO-3 really partitions across ranks. Each rank writes its own
results file; the launcher merges them. Every check ends with an all-reduce of its verdict so that all
ranks agree and none walks into the next collective alone. Every result records the world size and the
device it ran on.

Needs what a training image has: torch, transformers, deepspeed; trl, accelerate and datasets for the GRPO
checks; flash-attn for the GPU attention check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from .. import contract
from . import tiny_model
from .common import CheckProblem, all_ranks_ok, mean_over_ranks, outside_zero3, set_comm_device, with_zero_settings
from .model_dir import checkpoint_dtype
from .rank_processes import end_rank, leave_process_group
from .weights import as_model_names, checkpoint_digests, diff_params, gathered_param_digests

TRAIN_STEPS = 4
LEARNING_RATE = 1e-3


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
        self.real_model = bool(args.model_dir) and not args.tiny_model
        self.checks = tuple(args.checks.split(","))
        self.results: list[contract.CheckRecord] = []
        self.model: Any = None
        self.engine: Any = None
        self._keep_alive: Any = None

    # -- configuration

    def ds_config(self, dtype: Any = None) -> dict[str, Any]:
        import torch

        dtype = dtype or self.dtype
        half = dtype if dtype in (torch.bfloat16, torch.float16) else None

        return with_zero_settings({
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
            # On GPU DeepSpeed's own AdamW, its fused_adam op: what a DeepSpeed config with an optimizer block
            # trains with (and the op a CUDA image carries prebuilt). On the CPU torch's AdamW: the CPU
            # accelerator's fused Adam is another op, which no image carries.
            "optimizer": {"type": "AdamW", "params": {"lr": LEARNING_RATE, "torch_adam": not self.gpu}},
            "bf16": {"enabled": half == torch.bfloat16},
            "fp16": {"enabled": half == torch.float16, "initial_scale_power": 8},
        })

    # -- check runner

    def run_check(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> bool:
        if name not in self.checks:
            return False
        failed_deps = contract.failed_needs(name, self.results)
        start = time.monotonic()
        entry = contract.check_record(name, self.world, self.device_description())
        if failed_deps:
            entry["status"], entry["error"] = "skipped", f"not run: {', '.join(failed_deps)} did not pass"
            self.results.append(entry)
            return False
        ok = True
        try:
            entry["details"] = fn() or {}
        except CheckProblem as exc:
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
        else:
            entry["status"] = contract.status_of(entry["details"])
        entry["seconds"] = round(time.monotonic() - start, 3)
        self.results.append(entry)
        self.write_results()
        return agreed

    def device_description(self) -> str:
        if not self.gpu:
            return "cpu"
        import torch

        return f"cuda ({torch.cuda.get_device_name(self.local_rank)})"

    def write_results(self) -> None:
        out = Path(self.args.results_dir) / f"rank{self.rank}.json"
        out.write_text(json.dumps({"rank": self.rank, "world_size": self.world, "device": self.device_description(),
                                   "loaded_ops": loaded_ops(), "checks": self.results}, indent=2))

    # -- check 2: zero3_load

    def make_tiny_checkpoint(self, directory: Path) -> Path:
        import torch
        import torch.distributed as dist
        from transformers import Qwen2_5_VLForConditionalGeneration

        # A repeated load (--repeat) reads the checkpoint the first run saved, in fresh processes.
        if self.rank == 0 and not (directory / "config.json").is_file():
            torch.manual_seed(0)
            with outside_zero3():  # made by rank 0 alone: no ZeRO-3 collective may run in it
                model = Qwen2_5_VLForConditionalGeneration(tiny_model.tiny_config()).to(self.dtype)
                model.save_pretrained(directory, safe_serialization=True)
            del model
        dist.barrier()
        return directory

    def tiny_model_dir(self) -> Path:
        """The tiny checkpoint of this run (made when missing), also where --model-dir names a real one."""
        return self.make_tiny_checkpoint(self.workdir / "tiny-model" if self.real_model else self.model_dir)

    def load_under_zero3(self, dtype: Any = None) -> Any:
        from transformers import Qwen2_5_VLForConditionalGeneration
        from transformers.integrations import HfDeepSpeedConfig

        dtype = dtype or self.dtype
        # transformers keeps only a weak reference to this object: it must stay alive or
        # from_pretrained silently stops building the model inside deepspeed.zero.Init.
        self._keep_alive = HfDeepSpeedConfig(self.ds_config(dtype))
        # Never pass device_map or low_cpu_mem_usage under ZeRO-3.
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.model_dir, torch_dtype=dtype, attn_implementation="sdpa"
        )

    def load_dtype(self) -> Any:
        """The dtype the weights are compared in: the checkpoint's own (a bf16 release stays bf16 on the CPU too,
        where training runs in fp32: loaded in fp32, every weight would differ from its file)."""
        import torch

        return getattr(torch, checkpoint_dtype(self.model_dir).split(".")[-1]) if self.real_model else self.dtype

    def check_zero3_load(self) -> dict[str, Any]:
        import hashlib

        if not self.real_model:
            self.make_tiny_checkpoint(self.model_dir)
        reference = checkpoint_digests(self.model_dir)
        load_dtype = self.load_dtype()
        self.model = self.load_under_zero3(load_dtype)

        names = [n for n, _ in self.model.named_parameters()]
        # Partitioned: a ZeRO-3 parameter (ds_id) whose local .data is the empty placeholder and whose shard on
        # this rank is a strict part of the whole (with world size 1 the "shard" is all of it: say so).
        partitioned = [n for n, p in self.model.named_parameters()
                       if hasattr(p, "ds_id") and p.data.numel() == 0 and p.ds_tensor.numel() > 0
                       and (self.world == 1 or p.ds_tensor.numel() < p.ds_numel)]
        not_partitioned = [n for n in names if n not in set(partitioned)]
        if not_partitioned:
            raise CheckProblem(
                f"{len(not_partitioned)} of {len(names)} parameters are not ZeRO-3 partitioned "
                f"(no ds_id, full data on this rank, or the whole tensor in one shard), first: "
                f"{', '.join(not_partitioned[:5])}"
            )
        loaded = gathered_param_digests(self.model)
        reference = as_model_names(reference, self.model)
        problems = diff_params(reference, loaded, "the checkpoint")
        if problems:
            raise CheckProblem(
                f"{len(problems)} parameter(s) differ from the saved checkpoint; first ones:\n  "
                + "\n  ".join(problems[:8])
            )
        vision = sum(1 for n in names if n.startswith("visual.") or ".visual." in n)  # model.visual.: 4.52+
        weights = hashlib.sha256("".join(f"{n}:{d['sha256']}\n" for n, d in sorted(loaded.items())).encode())
        if load_dtype != self.dtype:
            # Compared in the checkpoint's dtype; the training checks need the dtype this device trains in.
            del self.model
            self.model = self.load_under_zero3(self.dtype)
        return {"parameters": len(names), "vision_parameters": vision, "partitioned": len(partitioned),
                "tensors_compared": len(reference), "dtype": str(load_dtype), "weights_sha256": weights.hexdigest()}

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
        return self.batch_for(self.model.config)

    def batch_for(self, config: Any) -> dict[str, Any]:
        """The smoke's image+text sample for a model of ``config``. A real checkpoint gets a short sequence; its own
        token ids (vision start, image) are used."""
        text_tokens = 8 if self.real_model else 12
        return tiny_model.image_text_batch(self.device, self.dtype, config=config, text_tokens=text_tokens)

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
            raise CheckProblem(f"loss not finite: {losses}")
        if not losses[-1] < losses[0]:
            raise CheckProblem(f"loss did not fall over {TRAIN_STEPS} steps: {losses}")
        return {"steps": TRAIN_STEPS, "losses": losses}

    # -- check 4: checkpoint_resume

    def check_checkpoint_resume(self) -> dict[str, Any]:
        from .checkpoint_resume import check_checkpoint_resume

        return check_checkpoint_resume(self)

    # -- checks 5 and 6: grpo, optimizer_offload

    def processor(self) -> Any:
        return tiny_model.load_processor(self.model_dir) if self.real_model else tiny_model.tiny_processor()

    def check_grpo(self) -> dict[str, Any]:
        from . import grpo

        output = self.workdir / "grpo"
        try:
            trainer, initial = grpo.train_grpo(self.model_dir, self.processor(), output, "zero3", grpo.GRPO_STEPS,
                                               self.world, self.gpu, self.dtype)
            facts = grpo.grpo_facts(trainer, initial, grpo.GRPO_STEPS, self.world)
            facts["consolidated_save"] = grpo.verify_consolidated_save(trainer, output / "final")
        except grpo.GrpoProblem as exc:
            raise CheckProblem(str(exc)) from None
        return facts

    def check_optimizer_offload(self) -> dict[str, Any]:
        from . import grpo

        try:
            trainer, initial = grpo.train_grpo(self.model_dir, self.processor(), self.workdir / "grpo-offload",
                                               "zero3_offload", grpo.OFFLOAD_STEPS, self.world, self.gpu, self.dtype)
            # Where DeepSpeed holds the optimizer, as it holds it after the step, before anything else is judged.
            state = grpo.offload_state(trainer)
            problems = grpo.offload_problems(state, grpo.OFFLOAD_STEPS, self.gpu)
            if problems:
                raise CheckProblem("; ".join(problems) + f" (observed: {json.dumps(state)})")
            facts = grpo.grpo_facts(trainer, initial, grpo.OFFLOAD_STEPS, self.world)
        except grpo.GrpoProblem as exc:
            raise CheckProblem(str(exc)) from None
        facts["offload"] = state
        facts["placement"] = ("judged: fp32 partitions, Adam moments and parameter shards on the CPU" if self.gpu else
                              "not judged on the CPU, where every tensor is on the CPU offloaded or not; this pass "
                              "proves DeepSpeed's CPU Adam (the cpu_adam op) took the step with the recipe's "
                              "offload config and wrote its moments")
        return facts

    # -- check 7 (GPU): attention

    def check_attention(self) -> dict[str, Any]:
        from . import attention

        try:
            return attention.compare_attention(self.model_dir, self.device, self.dtype, "flash_attention_2", "sdpa")
        except attention.AttentionProblem as exc:
            raise CheckProblem(str(exc)) from None

    def run(self) -> None:
        """The rank checks of the registry (vlmbuild.contract), in its order; each skipped when what it needs
        did not pass."""
        for check in contract.REGISTRY.values():
            if check.runs_in == "ranks":
                run = contract.entry_point(check.run)
                ran = self.run_check(check.name, partial(run, self))
                if check.name == "nodes" and check.name in self.checks and not ran:
                    return  # not the world the nodes make: nothing after it would say anything about them


def loaded_ops() -> dict[str, str | None]:
    """The DeepSpeed ops this process has loaded through their op builders (OpBuilder.load caches each one it
    loads, prebuilt or JIT-compiled, by name), each with the file it came from."""
    try:
        from deepspeed.ops.op_builder.builder import OpBuilder
    except Exception:  # noqa: BLE001 - no DeepSpeed to ask: no op was loaded through it
        return {}
    return {name: getattr(module, "__file__", None) for name, module in sorted(OpBuilder._loaded_ops.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmbuild.smoke.worker")
    parser.add_argument("--device", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--results-dir", required=True)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--tiny-model", action="store_true", help="--model-dir holds the tiny model a first run saved")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--checks", required=True, help="comma-separated check names, in the contract's order")
    parser.add_argument("--expect-world", type=int, default=0, help="check nodes: the world size the nodes make")
    parser.add_argument("--expect-nodes", type=int, default=0, help="check nodes: how many nodes (hosts) it spans")
    parser.add_argument("--resume-run", action="store_true",
                        help="trainer_resume's second half: resume the Trainer run the smoke's ranks saved")
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    results_file = Path(args.results_dir) / f"rank{rank}.json"
    try:
        import datetime

        import deepspeed

        if args.device == "gpu":
            set_comm_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
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
    leave_process_group()
    return 0 if all(contract.check_passed(r) for r in smoke.results) else 1


if __name__ == "__main__":
    # The registry names rank checks as vlmbuild.smoke.worker:Smoke.check_*; run as `python -m`, this module is
    # __main__, and importing it by name again would make a second copy (with a second CheckProblem class).
    sys.modules.setdefault("vlmbuild.smoke.worker", sys.modules[__name__])
    end_rank(main())
