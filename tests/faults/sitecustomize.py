"""Fault injection: make transformers behave like a broken upstream, from outside vlmbuild's code.

Put this directory on PYTHONPATH and set VLMBUILD_FAULT; Python imports ``sitecustomize`` at start-up
(in the smoke's launcher and in every rank torchrun starts). When ``transformers.modeling_utils`` is
imported, it is patched:

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

Also ``VLMBUILD_FAULT_MISSING=mod1,mod2``: those modules cannot be imported (as in an environment that lacks
them), whatever else is installed.

Targets transformers 4.49's ``_load_state_dict_into_model``; fails loudly if it is missing, so a test
cannot pass because the fault silently did nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TARGET = "transformers.modeling_utils"
FAULT = os.environ.get("VLMBUILD_FAULT", "")


def _no_gather(mu):
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
    if not hasattr(mu, "is_deepspeed_zero3_enabled"):
        raise RuntimeError(f"fault 'not-partitioned': {TARGET} has no is_deepspeed_zero3_enabled to patch")
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


FAULTS = {"zero3-no-gather": _no_gather, "silent-corruption": _silent_corruption,
          "not-partitioned": _not_partitioned, "intermittent-corruption": _intermittent_corruption}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
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
            if not hasattr(module, "_load_state_dict_into_model"):
                raise RuntimeError(f"fault {FAULT!r}: {TARGET} has no _load_state_dict_into_model to patch")
            FAULTS[FAULT](module)
            print(f"[fault armed: {FAULT}]", file=sys.stderr)

        spec.loader.exec_module = exec_and_patch
        return spec


if FAULT:
    if FAULT not in FAULTS:
        raise RuntimeError(f"VLMBUILD_FAULT={FAULT!r}: unknown fault; known: {sorted(FAULTS)}")
    sys.meta_path.insert(0, _PatchOnImport())


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
