"""Check "cuda_ops": the CUDA ops compiled into the image are what a GPU host needs, proven where no GPU is.

In a fresh interpreter with ``DS_ACCELERATOR=cuda`` (the accelerator the image's own DeepSpeed was built for, never
the CPU build a CPU pass puts first on the path) and an empty read-only torch extensions directory, each op the
image declares for CUDA must be reported installed and compatible by DeepSpeed, and load through its own op
builder from DeepSpeed's package (a shared object that needs a symbol the image lacks fails here, GPU or not).
Each op with device code (a .cu source) must carry a cubin for every architecture of the spec's
``TORCH_CUDA_ARCH_LIST`` and the PTX it asks for (``+PTX``: the newest, so a newer GPU JIT-compiles from it
instead of failing with "no kernel image"), as the toolkit's ``cuobjdump`` lists them. Judged from what was
loaded and listed, never from the build's settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import contract
from .stack import deepspeed_build_for

# Run in a fresh interpreter per op: the launcher may run a CPU pass with the CPU build of DeepSpeed imported, and a
# shared object that crashes the interpreter as it loads (a truncated one does) must name its op, not hide the rest.
# What is known before the load is printed first, so that a crash still leaves it.
PROBE = r"""
import importlib.util, json, os, sys
name = sys.argv[1]
from deepspeed.git_version_info import accelerator_name, installed_ops
from deepspeed.ops.op_builder.all_ops import ALL_OPS
import deepspeed
builder = ALL_OPS.get(name)
record = {"accelerator_name": accelerator_name, "package": os.path.dirname(deepspeed.__file__),
          "installed": bool(installed_ops.get(name)), "known": builder is not None}
if builder is not None:
    record["device_code"] = any(str(s).endswith(".cu") for s in builder.sources())
    spec = importlib.util.find_spec(builder.absolute_name())  # where the op's shared object lies, loaded or not
    record["shared_object"] = spec.origin if spec else None
    try:  # what ds_report shows as "compatible", judged here and now (nvcc, torch's CUDA, the toolkit)
        record["compatible"] = bool(builder.is_compatible(verbose=False))
    except BaseException as exc:
        record["compatible"], record["compatible_error"] = False, f"{type(exc).__name__}: {exc}"
print("VLMBUILD-CUDA-OP-BEFORE-LOAD " + json.dumps(record), flush=True)
if builder is not None:
    try:
        record["file"] = getattr(builder.load(verbose=False), "__file__", None)
    except BaseException as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
print("VLMBUILD-CUDA-OP " + json.dumps(record), flush=True)
"""

ARCH_RE = re.compile(r"\.sm_(\d+)a?\.(cubin|ptx)\b")


def expected_archs(arch_list: str) -> tuple[set[str], set[str]]:
    """({sm_XY cubins}, {sm_XY PTX}) a TORCH_CUDA_ARCH_LIST such as "8.0;8.6;9.0+PTX" asks for."""
    cubins: set[str] = set()
    ptx: set[str] = set()
    for entry in filter(None, arch_list.split(";")):
        arch = "sm_" + entry.removesuffix("+PTX").replace(".", "")
        cubins.add(arch)
        if entry.endswith("+PTX"):
            ptx.add(arch)
    return cubins, ptx


def listed_archs(listing: str) -> tuple[set[str], set[str]]:
    """({sm_XY cubins}, {sm_XY PTX}) that ``cuobjdump --list-elf --list-ptx`` lists."""
    cubins: set[str] = set()
    ptx: set[str] = set()
    for match in ARCH_RE.finditer(listing):
        (cubins if match.group(2) == "cubin" else ptx).add(f"sm_{match.group(1)}")
    return cubins, ptx


def judge(ops: list[str], probe: dict[str, Any], listings: dict[str, str], arch_list: str,
          compiled: list[str]) -> list[str]:
    """Every problem with the image's CUDA ops: ``probe`` is what the fresh interpreter reported, ``listings``
    cuobjdump's output per op with device code, ``compiled`` what appeared in the extensions directory."""
    problems = []
    if probe.get("accelerator_name") != "cuda":
        problems.append(f"DeepSpeed at {probe.get('package')} was built for the {probe.get('accelerator_name')} "
                        "accelerator, not cuda: a GPU host would compile every op at first use")
    want_cubins, want_ptx = expected_archs(arch_list)
    package = os.path.realpath(probe.get("package") or "?")
    for op in ops:
        record = probe.get("ops", {}).get(op)
        if record is None:
            problems.append(f"{op}: its probe reported nothing (DeepSpeed did not import there)")
            continue
        if not record.get("known"):
            problems.append(f"{op}: DeepSpeed's cuda accelerator has no such op")
            continue
        if not record.get("installed"):
            problems.append(f"{op}: not built into DeepSpeed (installed_ops says no: it would be compiled at first use)")
        elif not record.get("compatible"):
            why = f" ({record['compatible_error']})" if record.get("compatible_error") else ""
            problems.append(f"{op}: DeepSpeed reports it incompatible with this environment{why}")
        if record.get("error"):
            problems.append(f"{op}: does not load without a GPU: {record['error']}")
        elif not os.path.realpath(record.get("file") or "?").startswith(package + os.sep):
            problems.append(f"{op}: loaded from {record.get('file')}, not from DeepSpeed's package {package}")
        if not record.get("device_code"):
            continue
        if op not in listings:
            problems.append(f"{op}: its cubins were not listed (DeepSpeed's package holds no shared object of it)")
            continue
        have_cubins, have_ptx = listed_archs(listings[op])
        for arch in sorted(want_cubins - have_cubins):
            problems.append(f"{op}: no cubin for {arch} (TORCH_CUDA_ARCH_LIST {arch_list}); it has "
                            f"{', '.join(sorted(have_cubins)) or 'none'}")
        for arch in sorted(want_ptx - have_ptx):
            problems.append(f"{op}: no PTX for {arch} (+PTX in {arch_list}): a GPU newer than every cubin fails with "
                            "'no kernel image'")
    if compiled:
        problems.append(f"ops were compiled while the CUDA ops loaded: {', '.join(compiled[:8])}")
    return problems


def cuobjdump() -> str | None:
    home = os.environ.get("CUDA_HOME")
    candidates = [shutil.which("cuobjdump")] + ([os.path.join(home, "bin", "cuobjdump")] if home else [])
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def probe_env(extensions: Path) -> dict[str, str]:
    """The image as a GPU user runs it: the venv's DeepSpeed (no CPU build on the path), the CUDA accelerator,
    nothing compiled."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    lib = str(Path(__file__).absolute().parent.parent.parent)
    cpu_build = contract.DEEPSPEED_CPU_PATH
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != cpu_build] + [lib]
    env.update(PYTHONPATH=os.pathsep.join(path), DS_ACCELERATOR="cuda", TORCH_EXTENSIONS_DIR=str(extensions))
    return env


def run_probe(op: str, extensions: Path, timeout: float = 300) -> tuple[dict[str, Any] | None, str]:
    """What a fresh interpreter reports of ``op`` (None when DeepSpeed did not even import), and its output's tail."""
    proc = subprocess.run([sys.executable, "-c", PROBE, op], capture_output=True, text=True,
                          env=probe_env(extensions), timeout=timeout)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines()
             if ln.startswith("VLMBUILD-CUDA-OP")}
    if "VLMBUILD-CUDA-OP" in lines:
        return lines["VLMBUILD-CUDA-OP"], tail
    if "VLMBUILD-CUDA-OP-BEFORE-LOAD" in lines:  # the interpreter died loading the shared object
        died = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return {**lines["VLMBUILD-CUDA-OP-BEFORE-LOAD"], "error": f"the interpreter died loading it ({died})"}, tail
    return None, tail


def probe_ops(ops: list[str], extensions: Path) -> tuple[dict[str, Any] | None, str]:
    """Every op probed at once, each in its own interpreter: the probe ``judge`` reads (None when DeepSpeed did not
    import at all), and the output of the first that failed to report."""
    with ThreadPoolExecutor(max_workers=max(1, len(ops))) as pool:
        results = dict(zip(ops, pool.map(lambda op: run_probe(op, extensions), ops), strict=True))
    reported = {op: record for op, (record, _) in results.items() if record is not None}
    if not reported:
        return None, next(iter(results.values()))[1] if results else ""
    first = next(iter(reported.values()))
    return {"accelerator_name": first["accelerator_name"], "package": first["package"], "ops": reported}, ""


def check_cuda_ops(launch: Any) -> contract.CheckRecord:
    started = time.monotonic()
    build = deepspeed_build_for(launch.variant, "gpu")
    assert build is not None, "cuda_ops runs only where variant.json declares the CUDA DeepSpeed build"
    ops, arch_list = list(build["ops"]), launch.variant.get("cuda_archs") or ""
    details: dict[str, Any] = {"ops": ops, "cuda_archs": arch_list}

    def record(problems: list[str]) -> contract.CheckRecord:
        return contract.check_record("cuda_ops", 1, "cpu (no GPU needed)", "failed" if problems else "passed",
                                     "\n".join(problems) or None, details, time.monotonic() - started)

    tool = cuobjdump()
    if tool is None:
        return record(["cuobjdump not found (PATH, $CUDA_HOME/bin): the image's CUDA toolkit is missing or "
                       "incomplete, and the ops' cubins cannot be read"])
    with tempfile.TemporaryDirectory(prefix="vlmbuild-cuda-ops-") as tmp:
        extensions = Path(tmp) / "torch_extensions"
        extensions.mkdir(mode=0o555)
        try:
            probe, tail = probe_ops(ops, extensions)
        except subprocess.TimeoutExpired:
            return record(["the CUDA ops probe did not finish in 300 s"])
        compiled = sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*"))
    if probe is None:
        return record([f"DeepSpeed with DS_ACCELERATOR=cuda did not import or report its ops:\n{tail}"])
    listings = {}
    for op, info in probe["ops"].items():
        if info.get("device_code") and info.get("shared_object"):
            out = subprocess.run([tool, "--list-elf", "--list-ptx", info["shared_object"]], capture_output=True,
                                 text=True)
            listings[op] = out.stdout + out.stderr
    details.update(package=probe.get("package"), accelerator_name=probe.get("accelerator_name"),
                   loaded={op: info.get("file") for op, info in probe["ops"].items()},
                   cubins={op: sorted(listed_archs(text)[0]) for op, text in listings.items()},
                   ptx={op: sorted(listed_archs(text)[1]) for op, text in listings.items()},
                   host_code_only=sorted(op for op, info in probe["ops"].items() if not info.get("device_code")))
    return record(judge(ops, probe, listings, arch_list, compiled))
