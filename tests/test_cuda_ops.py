"""The cuda_ops check's judgement, branch by branch, on what a probe reports and what cuobjdump lists.

The check itself runs in the built cu124 image (tests/test_cu124_docker.py): there it passes on the real ops and
fails when the spec asks for an architecture the build left out. Here every failure branch of its judgement is
reached with the shapes the real probe and the real cuobjdump produce."""

from __future__ import annotations

import pytest
from vlmbuild import contract
from vlmbuild.smoke.cuda_ops import expected_archs, judge, listed_archs

PACKAGE = "/opt/venv/lib/python3.13/site-packages/deepspeed"
# What cuobjdump 12.4 prints for fused_adam built with TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0+PTX"
LISTING = """\
ELF file    1: fused_adam_op.1.sm_80.cubin
ELF file    2: fused_adam_op.2.sm_86.cubin
ELF file    3: fused_adam_op.3.sm_90.cubin
PTX file    1: fused_adam_op.1.sm_90.ptx
"""


def probe(**fused) -> dict:
    fused_adam = {"known": True, "installed": True, "compatible": True, "device_code": True,
                  "file": f"{PACKAGE}/ops/adam/fused_adam_op.cpython-313-x86_64-linux-gnu.so", **fused}
    cpu_adam = {"known": True, "installed": True, "compatible": True, "device_code": False,
                "file": f"{PACKAGE}/ops/adam/cpu_adam_op.cpython-313-x86_64-linux-gnu.so"}
    return {"accelerator_name": "cuda", "package": PACKAGE, "ops": {"fused_adam": fused_adam, "cpu_adam": cpu_adam}}


OPS = ["cpu_adam", "fused_adam"]
ARCHS = "8.0;8.6;9.0+PTX"


def test_the_arch_list_and_the_listing_are_read_alike():
    assert expected_archs(ARCHS) == ({"sm_80", "sm_86", "sm_90"}, {"sm_90"})
    assert listed_archs(LISTING) == ({"sm_80", "sm_86", "sm_90"}, {"sm_90"})
    assert listed_archs("ELF file 1: x.1.sm_90a.cubin\n") == ({"sm_90"}, set())


def test_the_real_shape_passes():
    assert judge(OPS, probe(), {"fused_adam": LISTING}, ARCHS, []) == []


@pytest.mark.parametrize("change, expected", [
    (dict(probe=dict(installed=False)), "fused_adam: not built into DeepSpeed"),
    (dict(probe=dict(compatible=False)), "fused_adam: DeepSpeed reports it incompatible"),
    (dict(probe=dict(compatible=False, compatible_error="MissingCUDAException: nvcc not found")),
     "incompatible with this environment (MissingCUDAException: nvcc not found)"),
    (dict(probe=dict(error="the interpreter died loading it (signal 7)")), "the interpreter died loading it"),
    (dict(probe=dict(error="ImportError: libcudart.so.12: cannot open shared object file", file=None)),
     "fused_adam: does not load without a GPU: ImportError: libcudart.so.12"),
    (dict(probe=dict(file="/root/.cache/torch_extensions/fused_adam/fused_adam.so")),
     "fused_adam: loaded from /root/.cache/torch_extensions"),
    (dict(probe=dict(known=False)), "fused_adam: DeepSpeed's cuda accelerator has no such op"),
    (dict(listings={}), "fused_adam: its cubins were not listed"),
    (dict(archs="8.0;8.6;8.9;9.0+PTX"), "fused_adam: no cubin for sm_89 (TORCH_CUDA_ARCH_LIST 8.0;8.6;8.9;9.0+PTX)"),
    (dict(listings={"fused_adam": LISTING.replace("PTX file    1: fused_adam_op.1.sm_90.ptx\n", "")}),
     "fused_adam: no PTX for sm_90"),
    (dict(compiled=["fused_adam/build.ninja"]), "ops were compiled while the CUDA ops loaded: fused_adam/build.ninja"),
])
def test_each_failure_names_what_is_wrong(change, expected):
    found = probe(**change.get("probe", {}))
    problems = judge(OPS, found, change.get("listings", {"fused_adam": LISTING}), change.get("archs", ARCHS),
                     change.get("compiled", []))
    assert any(expected in p for p in problems), problems


def test_an_op_whose_probe_reported_nothing_is_named():
    found = probe()
    del found["ops"]["fused_adam"]
    assert any("fused_adam: its probe reported nothing" in p for p in judge(OPS, found, {}, ARCHS, []))


def test_a_deepspeed_built_for_the_cpu_is_refused():
    found = {**probe(), "accelerator_name": "cpu"}
    assert any("built for the cpu accelerator, not cuda" in p for p in judge(OPS, found, {"fused_adam": LISTING},
                                                                          ARCHS, []))


def test_host_code_needs_no_cubins():
    """cpu_adam of the CUDA build is host code (no .cu source): no listing is asked of it."""
    assert judge(["cpu_adam"], probe(), {}, ARCHS, []) == []


def test_the_check_runs_in_every_mode_of_a_cuda_image_only():
    for mode in ("cpu", "gpu"):
        assert "cuda_ops" in contract.checks_for(mode, flash_attention=False, cuda_ops=True)
        assert "cuda_ops" not in contract.checks_for(mode, flash_attention=False)
