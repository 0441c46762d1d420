"""Fault injection: make transformers behave like a broken upstream, from outside vlmbuild's code.

Put this directory on PYTHONPATH and set VLMBUILD_FAULT; Python imports ``sitecustomize`` at start-up
(in the smoke's launcher and in every rank torchrun starts). When the fault's target module is imported, it is
patched. Faults of ``transformers.modeling_utils`` (the loader):

- ``zero3-no-gather``: the loader of transformers main between PR 36335 and PR 36455 (4.50.0.dev0): the
  state dict is copied with plain ``_load_from_state_dict``, without ``deepspeed.zero.GatheredParameters``,
  so every ZeRO-3 placeholder of shape [0] meets a full checkpoint tensor:
  ``size mismatch for ...: copying a param with shape torch.Size([3420]) from checkpoint, the shape in
  current model is torch.Size([0])``.
- ``silent-corruption``: the loader quietly loads a wrong tensor for one vision-tower weight (as a key
  mix-up would): no error, wrong weights.
- ``not-partitioned``: ``from_pretrained`` no longer sees ZeRO-3 (as when the ``HfDeepSpeedConfig`` it holds
  only weakly is collected): the model is built whole on every rank, its weights load without an error, and
  nothing is partitioned.
- ``intermittent-corruption``: the same, but only in the second torchrun launch the smoke makes (launches are
  told apart by their MASTER_PORT, recorded in the file VLMBUILD_FAULT_STATE names): one run of the ZeRO-3
  load is clean, the next is not.

Faults of the GRPO run (check grpo), each what a broken trainer, integration or optimizer does:

- ``generate-nothing``: ``generate()`` returns the prompt alone, no new token.
- ``trainer-stops-early``: the Trainer's flow callback stops training after the first step.
- ``nan-loss``: the model's logits turn NaN whenever a gradient is taken (generation and the reference model,
  which run without one, are untouched).
- ``zero-stage-2``: the Trainer's DeepSpeed config loses ZeRO-3 (stage 2), as a config merge gone wrong would.
- ``no-16bit-save``: the Trainer's DeepSpeed config loses ``stage3_gather_16bit_weights_on_model_save``.
- ``save-corrupts``: ``save_pretrained`` with a given state dict (the consolidated save) writes one tensor wrong.
- ``no-update``: torch's AdamW ``step()`` does nothing: the update never reaches the weights.

Faults of the offload (check optimizer_offload) and of the prebuilt ops (check prebuilt_ops):

- ``offload-dropped``: the Trainer's DeepSpeed config loses its offload (and asks for torch's AdamW).
- ``cpu-adam-no-step``: DeepSpeed's CPU Adam ``step()`` does nothing.
- ``shm-incompatible``: DeepSpeed finds its ``deepspeed_shm_comm`` op incompatible and silently goes without it.
- ``shm-jit``: DeepSpeed's build metadata says ``deepspeed_shm_comm`` is not built in: it is JIT-compiled.

Faults of the LoRA run (check lora), each what a broken peft or a broken save does:

- ``lora-wrong-targets``: peft puts the adapter on the vision tower's first linear layer in place of the first of
  the targets it was given.
- ``lora-trains-base``: peft leaves one base weight of the language model trainable beside the adapter.
- ``adapter-saved-empty``: under ZeRO-3 only, the adapter is saved with every ``lora_B`` zero (what
  huggingface/peft#2450 did to ``modules_to_save`` under ZeRO-3): files and names are all there, the trained update
  is not.
- ``adapter-drops-tensor``: the saved adapter lacks one LoRA tensor.

- ``non-reentrant-checkpointing``: every ``gradient_checkpointing_enable`` asks for non-reentrant checkpointing (what
  trl made its default later; VLM-R1's own runs are reentrant): not broken by itself, it meets DeepSpeed before 0.19.3
  under ZeRO-3 with PEFT (rule ds-zero3-peft-non-reentrant-checkpointing).

Faults of the Trainer's resume (check trainer_resume), each a part of the resume that does not happen:

- ``resume-no-optimizer``: the DeepSpeed checkpoint is loaded without its optimizer state (the weights are).
- ``resume-restarts-step``: the trainer state loaded from the checkpoint starts again at step 0.
- ``resume-restarts-scheduler``: a learning-rate scheduler's ``load_state_dict`` does nothing.
- ``resume-no-skip``: the batches the run already took are not skipped (accelerate's ``skip_first_batches``).
- ``resume-no-rng``: the checkpoint's RNG states are not loaded (what the Trainer does, silently, when a rank's
  ``rng_state_<rank>.pth`` is missing).
- ``checkpoint-no-rng``: the Trainer's checkpoint is saved without the RNG states.
- ``trainer-sgd``: the HF Trainer makes SGD instead of the AdamW its arguments name (no Adam moments to resume).

A fault of the ranks' end:

- ``teardown-abort``: a rank (a process with ``RANK`` set) that imported torch.distributed aborts (SIGABRT) in
  the interpreter's teardown, after everything it did: what gloo's worker threads can do to it
  (pytorch/pytorch#179291, "terminate called without an active exception").

Also ``VLMBUILD_FAULT_MISSING=mod1,mod2``: those modules cannot be imported (as in an environment that lacks
them), whatever else is installed.

Each fault fails loudly when what it patches is missing (transformers 4.49, DeepSpeed 0.19, trl 0.17, peft 0.14,
accelerate 1.x), so a test cannot pass because the fault silently did nothing.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import os
import sys

FAULT = os.environ.get("VLMBUILD_FAULT", "")


def _require(module, *names):
    for name in names:
        if not hasattr(module, name):
            raise RuntimeError(f"fault {FAULT!r}: {module.__name__} has no {name} to patch")


def _no_gather(mu):
    _require(mu, "_load_state_dict_into_model", "is_deepspeed_zero3_enabled")
    original = mu._load_state_dict_into_model

    def load_without_gathering(*args, **kwargs):
        real = mu.is_deepspeed_zero3_enabled
        mu.is_deepspeed_zero3_enabled = lambda: False  # as if the ZeRO-3 branch had been deleted
        try:
            return original(*args, **kwargs)
        finally:
            mu.is_deepspeed_zero3_enabled = real

    mu._load_state_dict_into_model = load_without_gathering


def _silent_corruption(mu):
    _require(mu, "_load_state_dict_into_model")
    original = mu._load_state_dict_into_model

    def load_corrupted(model_to_load, state_dict, *args, **kwargs):
        keys = sorted(k for k in state_dict if k.startswith("visual.") and k.endswith("mlp.up_proj.weight"))
        if keys:
            state_dict = dict(state_dict)
            t = state_dict[keys[0]]
            state_dict[keys[0]] = t.flip(0).contiguous()  # same shape and dtype, other values
        return original(model_to_load, state_dict, *args, **kwargs)

    mu._load_state_dict_into_model = load_corrupted


def _not_partitioned(mu):
    _require(mu, "is_deepspeed_zero3_enabled")
    mu.is_deepspeed_zero3_enabled = lambda: False


def _launch_index() -> int:
    """Which torchrun launch this process belongs to: 0 for the first MASTER_PORT seen, 1 for the second..."""
    import fcntl

    port = os.environ.get("MASTER_PORT", "")
    with open(os.environ["VLMBUILD_FAULT_STATE"], "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        seen = fh.read().split()
        if port not in seen:
            fh.write(port + "\n")
            seen.append(port)
        return seen.index(port)


def _intermittent_corruption(mu):
    if _launch_index() == 1:
        _silent_corruption(mu)


def _generate_nothing(gu):
    _require(gu, "GenerationMixin")

    def generate(self, input_ids=None, **kwargs):
        return input_ids  # the prompt, and not one new token

    gu.GenerationMixin.generate = generate


def _trainer_stops_early(tc):
    _require(tc, "DefaultFlowCallback")
    original = tc.DefaultFlowCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        control = original(self, args, state, control, **kwargs)
        control.should_training_stop = True
        return control

    tc.DefaultFlowCallback.on_step_end = on_step_end


def _nan_loss(modeling):
    _require(modeling, "Qwen2_5_VLForConditionalGeneration")
    import torch

    cls = modeling.Qwen2_5_VLForConditionalGeneration
    original = cls.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if torch.is_grad_enabled() and self.training:
            out.logits = out.logits * float("nan")
        return out

    cls.forward = forward


def _trainer_config(change):
    """A fault of the DeepSpeed config the HF Trainer hands to DeepSpeed (HfTrainerDeepSpeedConfig is made by the
    TrainingArguments only; the smoke's own ZeRO-3 checks use its base class)."""
    def patch(integration):
        _require(integration, "HfTrainerDeepSpeedConfig")
        cls = integration.HfTrainerDeepSpeedConfig
        original = cls.__init__

        def __init__(self, config_file_or_dict, *args, **kwargs):
            if isinstance(config_file_or_dict, dict):
                change(config_file_or_dict)
            original(self, config_file_or_dict, *args, **kwargs)

        cls.__init__ = __init__

    return patch


def _stage_2(config):
    config["zero_optimization"]["stage"] = 2
    for key in [k for k in config["zero_optimization"] if k.startswith("stage3_")]:
        del config["zero_optimization"][key]


def _no_16bit_save(config):
    zero = config["zero_optimization"]
    for key in ("stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save"):
        zero.pop(key, None)
    zero["stage3_gather_16bit_weights_on_model_save"] = False


def _offload_dropped(config):
    zero = config["zero_optimization"]
    if (zero.get("offload_optimizer") or {}).get("device") == "cpu":
        zero["offload_optimizer"] = {"device": "none"}
        zero["offload_param"] = {"device": "none"}
        config["optimizer"]["params"]["torch_adam"] = True


def _save_corrupts(mu):
    _require(mu, "PreTrainedModel")
    original = mu.PreTrainedModel.save_pretrained

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        if state_dict:
            state_dict = dict(state_dict)
            key = sorted(k for k in state_dict if k.endswith("mlp.up_proj.weight"))[0]
            state_dict[key] = state_dict[key].flip(0).contiguous()
        return original(self, save_directory, *args, state_dict=state_dict, **kwargs)

    mu.PreTrainedModel.save_pretrained = save_pretrained


def _no_update(adamw):
    _require(adamw, "AdamW")

    def step(self, closure=None):
        return None

    adamw.AdamW.step = step


def _cpu_adam_no_step(cpu_adam):
    _require(cpu_adam, "DeepSpeedCPUAdam")

    def step(self, closure=None):
        return None

    cpu_adam.DeepSpeedCPUAdam.step = step


def _shm_incompatible(ops):
    _require(ops, "_probe_compatible_ops")
    compatible = ops._probe_compatible_ops()
    if "deepspeed_shm_comm" not in compatible:
        raise RuntimeError(f"fault {FAULT!r}: DeepSpeed knows no deepspeed_shm_comm op")
    compatible["deepspeed_shm_comm"] = False
    ops.__compatible_ops__ = compatible


def _shm_jit(info):
    _require(info, "installed_ops")
    if not info.installed_ops.get("deepspeed_shm_comm"):
        raise RuntimeError(f"fault {FAULT!r}: deepspeed_shm_comm is not built in: nothing to take away")
    info.installed_ops["deepspeed_shm_comm"] = False


def _lora_wrong_targets(mapping):
    _require(mapping, "get_peft_model")
    original = mapping.get_peft_model

    def get_peft_model(model, peft_config, *args, **kwargs):
        import torch

        vision = next(n for n, m in model.named_modules() if "visual" in n and isinstance(m, torch.nn.Linear))
        targets = sorted(peft_config.target_modules)
        peft_config.target_modules = [vision, *targets[1:]]
        return original(model, peft_config, *args, **kwargs)

    mapping.get_peft_model = get_peft_model


def _lora_trains_base(mapping):
    _require(mapping, "get_peft_model")
    original = mapping.get_peft_model

    def get_peft_model(model, peft_config, *args, **kwargs):
        wrapped = original(model, peft_config, *args, **kwargs)
        _, param = next((n, p) for n, p in wrapped.named_parameters()
                           if n.endswith("mlp.up_proj.base_layer.weight") and "visual" not in n)
        param.requires_grad = True
        return wrapped

    mapping.get_peft_model = get_peft_model


def _adapter_state(change):
    """A fault of the adapter's state dict as peft saves it (get_peft_model_state_dict, which save_pretrained
    calls)."""
    def patch(save_and_load):
        _require(save_and_load, "get_peft_model_state_dict")
        original = save_and_load.get_peft_model_state_dict

        def get_peft_model_state_dict(*args, **kwargs):
            return change(dict(original(*args, **kwargs)))

        save_and_load.get_peft_model_state_dict = get_peft_model_state_dict

    return patch


def _zero_lora_b_under_zero3(state):
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return state
    return {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in state.items()}


def _drop_one_lora_tensor(state):
    state.pop(sorted(k for k in state if ".lora_A." in k)[0])
    return state


def _non_reentrant_checkpointing(modeling):
    _require(modeling, "PreTrainedModel")
    original = modeling.PreTrainedModel.gradient_checkpointing_enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        return original(self, gradient_checkpointing_kwargs={**(gradient_checkpointing_kwargs or {}),
                                                              "use_reentrant": False})

    modeling.PreTrainedModel.gradient_checkpointing_enable = gradient_checkpointing_enable


def _resume_no_optimizer(integration):
    _require(integration, "deepspeed_load_checkpoint")
    original = integration.deepspeed_load_checkpoint

    def deepspeed_load_checkpoint(engine, checkpoint_path, *args, **kwargs):
        load = engine.load_checkpoint
        engine.load_checkpoint = lambda path, **kw: load(path, **{**kw, "load_optimizer_states": False})
        try:
            return original(engine, checkpoint_path, *args, **kwargs)
        finally:
            del engine.load_checkpoint

    integration.deepspeed_load_checkpoint = deepspeed_load_checkpoint


def _resume_restarts_step(callbacks):
    _require(callbacks, "TrainerState")
    original = callbacks.TrainerState.load_from_json.__func__

    def load_from_json(cls, json_path):
        state = original(cls, json_path)
        state.global_step = 0
        return state

    callbacks.TrainerState.load_from_json = classmethod(load_from_json)


def _resume_restarts_scheduler(schedulers):
    _require(schedulers, "LambdaLR", "LRScheduler")
    for cls in (schedulers.LRScheduler, schedulers.LambdaLR):
        cls.load_state_dict = lambda self, state_dict: None


def _resume_no_skip(data_loader):
    _require(data_loader, "skip_first_batches")
    data_loader.skip_first_batches = lambda dataloader, num_batches=0: dataloader


def _trainer_method(name, replacement):
    def patch(trainer):
        _require(trainer, "Trainer")
        _require(trainer.Trainer, name)
        setattr(trainer.Trainer, name, replacement)

    return patch


def _sgd(args, model=None):
    import torch

    return torch.optim.SGD, {"lr": args.learning_rate}


def _teardown_abort(_dist):
    if "RANK" in os.environ:
        atexit.register(os.abort)


LOADER = "transformers.modeling_utils"
FAULTS = {"zero3-no-gather": (LOADER, _no_gather), "silent-corruption": (LOADER, _silent_corruption),
          "not-partitioned": (LOADER, _not_partitioned), "intermittent-corruption": (LOADER, _intermittent_corruption),
          "generate-nothing": ("transformers.generation.utils", _generate_nothing),
          "trainer-stops-early": ("transformers.trainer_callback", _trainer_stops_early),
          "nan-loss": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", _nan_loss),
          "zero-stage-2": ("transformers.integrations.deepspeed", _trainer_config(_stage_2)),
          "no-16bit-save": ("transformers.integrations.deepspeed", _trainer_config(_no_16bit_save)),
          "save-corrupts": (LOADER, _save_corrupts),
          "no-update": ("torch.optim.adamw", _no_update),
          "offload-dropped": ("transformers.integrations.deepspeed", _trainer_config(_offload_dropped)),
          "cpu-adam-no-step": ("deepspeed.ops.adam.cpu_adam", _cpu_adam_no_step),
          "shm-incompatible": ("deepspeed.ops", _shm_incompatible),
          "shm-jit": ("deepspeed.git_version_info", _shm_jit),
          "teardown-abort": ("torch.distributed", _teardown_abort),
          "lora-wrong-targets": ("peft.mapping", _lora_wrong_targets),
          "lora-trains-base": ("peft.mapping", _lora_trains_base),
          "adapter-saved-empty": ("peft.utils.save_and_load", _adapter_state(_zero_lora_b_under_zero3)),
          "adapter-drops-tensor": ("peft.utils.save_and_load", _adapter_state(_drop_one_lora_tensor)),
          "non-reentrant-checkpointing": (LOADER, _non_reentrant_checkpointing),
          "resume-no-optimizer": ("transformers.integrations.deepspeed", _resume_no_optimizer),
          "resume-restarts-step": ("transformers.trainer_callback", _resume_restarts_step),
          "resume-restarts-scheduler": ("torch.optim.lr_scheduler", _resume_restarts_scheduler),
          "resume-no-skip": ("accelerate.data_loader", _resume_no_skip),
          "resume-no-rng": ("transformers.trainer", _trainer_method("_load_rng_state", lambda self, checkpoint: None)),
          "checkpoint-no-rng": ("transformers.trainer", _trainer_method("_save_rng_state", lambda self, output_dir: None)),
          "trainer-sgd": ("transformers.trainer", _trainer_method("get_optimizer_cls_and_kwargs", staticmethod(_sgd)))}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, target: str, patch) -> None:
        self.target, self.patch = target, patch

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            self.patch(module)
            print(f"[fault armed: {FAULT}]", file=sys.stderr)

        spec.loader.exec_module = exec_and_patch
        return spec


if FAULT:
    if FAULT not in FAULTS:
        raise RuntimeError(f"VLMBUILD_FAULT={FAULT!r}: unknown fault; known: {sorted(FAULTS)}")
    sys.meta_path.insert(0, _PatchOnImport(*FAULTS[FAULT]))


class _Missing(importlib.abc.MetaPathFinder):
    """Modules this environment pretends not to have."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


MISSING = {m for m in os.environ.get("VLMBUILD_FAULT_MISSING", "").split(",") if m}
if MISSING:
    sys.meta_path.insert(0, _Missing(MISSING))
