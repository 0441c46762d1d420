"""Check ``trainer_resume``: the HF Trainer's own resume under ZeRO-3, with the recipe's zero3 settings.

VLM-R1's ``grpo_jsonl.py`` ends with ``trainer.train(resume_from_checkpoint=True)`` whenever its output directory holds
a ``checkpoint-*``: the Trainer then loads the DeepSpeed checkpoint (``deepspeed_load_checkpoint``), each rank's
``rng_state_<rank>.pth``, ``scheduler.pt`` and ``trainer_state.json``, all through torch 2.6's ``weights_only``
default, and skips the batches it already took. That is another path than the DeepSpeed engine's own
``load_checkpoint`` (check checkpoint_resume), and the one where torch 2.6 broke resumes
(rule ds-0.15-torch-2.6-resume-weights-only).

Two halves, in different processes, as a crashed job and its restart are:
- ``run`` (the smoke's ranks): ``STEPS`` GRPO steps straight, the Trainer saving a checkpoint at step ``SAVE_AT``;
  each rank writes what the run ended with (``straight-rank<N>.pt``);
- ``resume`` (fresh ranks, started by the launcher once the first ones ended): the same trainer and arguments,
  ``train(resume_from_checkpoint=<checkpoint-SAVE_AT>)``, to step ``STEPS``.

The resumed run must equal the run that never stopped: it takes exactly the steps after the checkpoint (numbered from
it: the step count restored), with the same learning rate (the optimizer's param groups restored) and leaves the
same rate for a next step (the scheduler restored: a step's own rate comes from the optimizer's state, so a scheduler
that restarted shows only in the rate it sets next), on the same dataset rows (the data order: the sampler and the
skipped batches), sampling the same completions (every RNG restored), and it ends with the same Adam moments and fp32
master partitions on every rank and the same gathered parameters. On the CPU
all of it bit for bit. On a GPU the tensors within ``GPU_TOLERANCE`` (relative to the tensor's largest magnitude):
CUDA's atomics make some backward kernels differ in their last bits from one run of the same step to the next.

It trains the tiny model even with ``--model-dir``: what it proves is the Trainer's resume path, which no model
changes, and a real model's ZeRO-3 checkpoint would write tens of GB for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import contract
from . import grpo
from .common import CheckProblem

STEPS = 3
SAVE_AT = 2
GPU_TOLERANCE = 1e-2
STATE_FILE = "straight-rank{rank}.pt"


def run_dir(workdir: Path) -> Path:
    return workdir / "trainer-resume"


def end_state(trainer: Any) -> dict[str, Any]:
    """What a run ended with, on this rank: its steps as it saw them, its ZeRO-3 optimizer share (fp32 partitions
    and Adam moments) and every parameter, gathered."""
    from .checkpoint_resume import optimizer_snapshot
    from .weights import gathered

    module = trainer.model_wrapped.module
    with gathered(module):
        params = {n: p.data.detach().to("cpu").clone() for n, p in module.named_parameters()}
    return {"global_step": trainer.state.global_step, "steps": trainer.step_log,
            # what the scheduler set for a next step: the steps' own rates come from the optimizer's param groups
            # (restored with its state), so a scheduler that restarted shows only here
            "next_learning_rate": trainer.lr_scheduler.get_last_lr()[0],
            "optimizer": optimizer_snapshot(trainer.model_wrapped), "parameters": params}


def load_refuses_globals() -> bool:
    """Observed, not read from a version: whether ``torch.load`` called with its defaults (as code that names no
    ``weights_only`` calls it) refuses a pickled object that is not a tensor. torch 2.6 made it the default;
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns it off."""
    import fractions
    import io
    import pickle

    import torch

    buffer = io.BytesIO()
    torch.save({"value": fractions.Fraction(1, 3)}, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer)
    except pickle.UnpicklingError:
        return True
    return False


def train(smoke: Any, output: Path, resume_from: Path | None = None) -> Any:
    from .tiny_model import tiny_processor

    trainer, _ = grpo.train_grpo(smoke.tiny_model_dir(), tiny_processor(), output, "zero3", STEPS, smoke.world,
                                 smoke.gpu, smoke.dtype, save_steps=SAVE_AT, resume_from=resume_from)
    return trainer


def run_straight(smoke: Any) -> dict[str, Any]:
    """The first half, in the smoke's ranks: STEPS steps with a checkpoint at SAVE_AT, and what they ended with."""
    import torch
    import torch.distributed as dist

    root = run_dir(smoke.workdir)
    trainer = train(smoke, root / "run")
    checkpoint = root / "run" / f"checkpoint-{SAVE_AT}"
    state = end_state(trainer)
    problems = []
    if trainer.state.global_step != STEPS:
        problems.append(f"the uninterrupted run took {trainer.state.global_step} steps, expected {STEPS}")
    expected = ["trainer_state.json", "scheduler.pt", f"rng_state_{smoke.rank}.pth", f"global_step{SAVE_AT}"]
    missing = [name for name in expected if not (checkpoint / name).exists()]
    if missing:
        present = sorted(p.name for p in checkpoint.iterdir()) if checkpoint.is_dir() else []
        problems.append(f"the Trainer's checkpoint at step {SAVE_AT} lacks {', '.join(missing)} "
                        f"(found {present or 'no ' + str(checkpoint)})")
    if not any(".exp_avg" in key for key in state["optimizer"]):
        problems.append(f"the run's optimizer ({grpo.optimizer_name(trainer)}) holds no Adam moments: resuming its "
                        "state would prove nothing")
    if problems:
        raise CheckProblem("; ".join(problems))
    torch.save(state, root / STATE_FILE.format(rank=smoke.rank))
    dist.barrier()
    return {"steps": STEPS, "checkpoint": f"checkpoint-{SAVE_AT}", "optimizer": grpo.optimizer_name(trainer),
            "checkpoint_files": sorted(p.name for p in checkpoint.iterdir())}


def tensors_differ(name: str, straight: Any, resumed: Any, exact: bool) -> str | None:
    import torch

    if not torch.is_tensor(straight):
        return None if float(straight) == float(resumed) else f"{name}: {resumed} after resume, {straight} without"
    if not torch.is_tensor(resumed) or straight.shape != resumed.shape or straight.dtype != resumed.dtype:
        return f"{name}: another shape or dtype after resume"
    if exact:
        return None if torch.equal(straight, resumed) else f"{name}: not bit-identical to the uninterrupted run"
    a, b = straight.double(), resumed.double()
    scale = float(a.abs().max()) if a.numel() else 0.0
    error = float((a - b).abs().max()) / (scale or 1.0) if a.numel() else 0.0
    return None if error <= GPU_TOLERANCE else f"{name}: differs by {error:.3g} of its largest value"


def resume_problems(straight: dict[str, Any], resumed: dict[str, Any], exact: bool) -> list[str]:
    """How the resumed run differs from the uninterrupted one (both ``end_state``); [] when it does not."""
    problems = []
    after = [s for s in straight["steps"] if s["step"] > SAVE_AT]
    taken = [s["step"] for s in resumed["steps"]]
    if taken != [s["step"] for s in after] or resumed["global_step"] != straight["global_step"]:
        problems.append(f"the step count was not restored: the resumed run took steps {taken} and ended at global "
                        f"step {resumed['global_step']}; the uninterrupted run took {[s['step'] for s in after]} "
                        f"after step {SAVE_AT} and ended at {straight['global_step']}")
    for mine, theirs in zip(resumed["steps"], after, strict=False):
        if mine["learning_rate"] != theirs["learning_rate"]:
            problems.append(f"the learning rate was not restored: step {mine['step']} ran with "
                            f"{mine['learning_rate']:.6g}, the uninterrupted run's with {theirs['learning_rate']:.6g}")
        if mine["rows"] != theirs["rows"]:
            problems.append(f"the data order was not restored: step {mine['step']} took dataset rows {mine['rows']}, "
                            f"the uninterrupted run's {theirs['rows']}")
        elif mine["completions"] != theirs["completions"]:
            problems.append(f"the random state was not restored: step {mine['step']} sampled other completions from "
                            "the same prompts than the uninterrupted run")
    if resumed["next_learning_rate"] != straight["next_learning_rate"]:
        problems.append(f"the scheduler was not restored: after step {resumed['global_step']} it set learning rate "
                        f"{resumed['next_learning_rate']:.6g} for the next step, the uninterrupted run's "
                        f"{straight['next_learning_rate']:.6g}")
    optimizer = [d for k in sorted(set(straight["optimizer"]) | set(resumed["optimizer"]))
                 if (d := (tensors_differ(k, straight["optimizer"][k], resumed["optimizer"][k], exact)
                           if k in straight["optimizer"] and k in resumed["optimizer"] else f"{k}: in one run only"))]
    if optimizer:
        problems.append(f"the optimizer state is not the uninterrupted run's ({len(optimizer)} of "
                        f"{len(straight['optimizer'])} entries): {'; '.join(optimizer[:4])}")
    params = [d for k in sorted(straight["parameters"])
              if (d := tensors_differ(k, straight["parameters"][k], resumed["parameters"].get(k), exact))]
    if params:
        problems.append(f"the parameters are not the uninterrupted run's ({len(params)} of "
                        f"{len(straight['parameters'])}): {'; '.join(params[:4])}")
    return problems


def run_resumed(smoke: Any) -> dict[str, Any]:
    """The second half, in fresh ranks: resume from the first half's checkpoint, compare with what it ended with."""
    import torch
    from packaging.version import Version

    root = run_dir(smoke.workdir)
    # torch 2.6's default, under which users' resumes run (where code names no weights_only): observed before the
    # resume, since a run that turned it off would not prove the path that broke (rule
    # ds-0.15-torch-2.6-resume-weights-only).
    weights_only = load_refuses_globals()
    trainer = train(smoke, root / "resumed", resume_from=root / "run" / f"checkpoint-{SAVE_AT}")
    resumed = end_state(trainer)
    # The first half's file, written by this rank's predecessor: plain tensors, lists and numbers.
    straight = torch.load(root / STATE_FILE.format(rank=smoke.rank), weights_only=True)
    problems = resume_problems(straight, resumed, exact=not smoke.gpu)
    if not weights_only and Version(torch.__version__.split("+")[0]) >= Version("2.6"):
        problems.append(f"torch {torch.__version__} loaded a pickled object with torch.load's defaults: weights_only "
                        "is off in this run (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD?), so the resume did not run as users' "
                        "does")
    if problems:
        raise CheckProblem("; ".join(problems))
    return {"resumed_steps": [s["step"] for s in resumed["steps"]], "global_step": resumed["global_step"],
            "learning_rate": [s["learning_rate"] for s in resumed["steps"]],
            "rows": [s["rows"] for s in resumed["steps"]],
            "optimizer_tensors_compared": sum(1 for v in resumed["optimizer"].values() if torch.is_tensor(v)),
            "parameters_compared": len(resumed["parameters"]),
            "compared": "bit for bit" if not smoke.gpu else f"within {GPU_TOLERANCE:g} of each tensor's largest value",
            "torch_load_weights_only_by_default": weights_only}


def check_trainer_resume(smoke: Any) -> dict[str, Any]:
    """The registry's ``trainer_resume`` (a rank check): the first half in the smoke's ranks, the second in the
    fresh ranks the launcher starts with ``--resume-run`` (``finish_trainer_resume``)."""
    try:
        return run_resumed(smoke) if smoke.args.resume_run else run_straight(smoke)
    except grpo.GrpoProblem as exc:
        raise CheckProblem(str(exc)) from None


def finish_trainer_resume(launch: Any, record: contract.CheckRecord) -> contract.CheckRecord:
    """The launcher's half: start fresh ranks that resume the run the smoke's ranks saved, and make their verdict the
    check's (with both halves' details and seconds)."""
    from .ranks import run_workers

    resumed = run_workers(launch.args, launch.mode, launch.world, launch.workdir, ("trainer_resume",),
                          launch.extensions, results="results-resume", model_dir=launch.workdir / "tiny-model",
                          extra=("--resume-run",))[0]
    resumed["details"] = {"run": record.get("details") or {}, "resume": resumed.get("details") or {}}
    resumed["seconds"] = round(record.get("seconds", 0.0) + resumed.get("seconds", 0.0), 3)
    return resumed
