"""Resolving variants into hash-locked lockfiles with uv.

``uv pip compile --generate-hashes`` resolves for the variant's target (Python version, manylinux
platform), not for this machine. Direct wheels (flash-attn: no index has it) are appended with the
sha256 the spec declares. A header records a hash of the inputs, so ``--check`` can tell a stale
lockfile without resolving. A lock run that fails leaves the old lockfile untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import repo_layout
from .errors import CheckFailed, VlmbuildError
from .lockfile import HEADER_PREFIX, Lockfile, LockfileError, parse_lockfile, read_lockfile
from .spec import Variant

LOCK_FORMAT = 1
# What installs the lock inside the image (uv) and describes it (cyclonedx-bom, the CycloneDX SBOM of /opt/venv),
# itself installed by pip from a hash-locked file into the build's tools stage; neither lands in the image.
BUILD_TOOLS = ("uv==0.13.9", "cyclonedx-bom")
BUILD_TOOLS_PYTHON = "3.10"  # uv's wheels are py3-none: one lock serves every variant


class LockError(VlmbuildError):
    """Resolution failed (network, unsatisfiable): nothing was written."""


@dataclass(frozen=True)
class LockStatus:
    path: Path
    state: str  # "fresh" | "stale" | "missing" | "invalid"
    detail: str = ""


def uv_binary() -> str:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if not found:
            raise VlmbuildError("uv not found: install vlmbuild with its dependencies (pip install -e .)") from None
        return found


def inputs_hash(python: str, platform: str, requirements: list[str], wheels: list[tuple[str, str, str]]) -> str:
    payload = {"format": LOCK_FORMAT, "python": python, "platform": platform,
               "requirements": sorted(requirements), "wheels": sorted(wheels)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def variant_inputs_hash(variant: Variant) -> str:
    wheels = [(w.name, w.url, w.sha256 or f"left out: {w.left_out}") for w in variant.wheels.values()]
    return inputs_hash(variant.python, variant.platform, variant.requirement_lines(), wheels)


def build_tools_inputs_hash() -> str:
    return inputs_hash(BUILD_TOOLS_PYTHON, "x86_64-manylinux_2_28", list(BUILD_TOOLS), [])


def _preferences(current: Path) -> str:
    """The pins of the current lockfile (index packages only: direct wheels are appended by us), which uv keeps
    wherever the new requirements allow: a bump moves what it must, not whatever was released meanwhile."""
    try:
        lock = read_lockfile(current)
    except (LockfileError, OSError):
        return ""
    return "".join(r.render() + "\n" for r in lock.requirements if r.url is None)


def resolver_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without DeepSpeed's install-time switches (DS_ACCELERATOR, DS_BUILD_*, ...).

    DeepSpeed ships only an sdist, so uv runs its setup.py to learn its requirements, in an isolated env that
    has no torch. With DS_ACCELERATOR=cpu in the caller's shell (a CPU smoke sets it) setup.py imports torch and
    the lock dies with "No module named 'torch'" (deepspeedai/DeepSpeed#4984, #2166); only a warm uv cache, which
    kept metadata built without the switch, hid it. Unset, setup.py takes its torch-less path on every machine,
    and a lock no longer depends on what the shell that ran it had exported."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if not k.startswith("DS_")}


def _compile(requirements: list[str], python: str, platform: str, current: Path | None = None,
             upgrade: bool = False, upgrade_packages: tuple[str, ...] = ()) -> str:
    with tempfile.TemporaryDirectory(prefix="vlmbuild-lock-") as tmp:
        # Relative names, run in the temp dir: the "# via -r requirements.in" notes stay identical between runs.
        Path(tmp, "requirements.in").write_text("\n".join(requirements) + "\n")
        out = Path(tmp) / "requirements.txt"
        # uv reads an existing output file as its preferences (as pip-compile does): the current pins stay.
        if current is not None and current.is_file() and not upgrade:
            out.write_text(_preferences(current))
        cmd = [
            uv_binary(), "pip", "compile", "requirements.in", "--output-file", "requirements.txt", "--generate-hashes",
            "--python-version", python, "--python-platform", platform, "--no-header", "--quiet",
            # pre-releases only where a requirement asks for one explicitly
            "--prerelease", "if-necessary-or-explicit",
        ]
        for name in upgrade_packages:
            cmd += ["--upgrade-package", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=resolver_environment())
        if proc.returncode != 0:
            raise LockError(f"uv could not resolve {', '.join(requirements)} for Python {python} on {platform}:\n"
                            + proc.stderr.strip())
        return out.read_text()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _header(fields: dict[str, str]) -> str:
    lines = [f"{HEADER_PREFIX}: generated by `vlmbuild lock`, do not edit"]
    lines += [f"# {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def lock_variant(variant: Variant, upgrade: bool = False, upgrade_packages: tuple[str, ...] = ()) -> Path:
    """Write the variant's lockfile. Every pin of the current one that the spec still allows is kept, unless
    ``upgrade`` (everything to the newest allowed) or ``upgrade_packages`` (these to the newest allowed)."""
    text = compile_lock_text(variant, variant.requirement_lines(), {}, upgrade, upgrade_packages)
    _write_atomically(variant.lockfile_path, text)
    return variant.lockfile_path


def compile_lock_text(variant: Variant, requirements: list[str], extra_header: dict[str, str],
                      upgrade: bool = False, upgrade_packages: tuple[str, ...] = ()) -> str:
    """A lockfile of ``requirements`` for the variant's Python and platform, its current lockfile as preferences,
    its direct wheels appended (a sweep's cell: the variant's requirements with some pins moved)."""
    body = _compile(requirements, variant.python, variant.platform, variant.lockfile_path, upgrade, upgrade_packages)
    for wheel in sorted(variant.installed_wheels.values(), key=lambda w: w.name):
        body += f"{wheel.name} @ {wheel.url} \\\n    --hash=sha256:{wheel.sha256}\n    # direct wheel from the spec\n"
    inputs = (variant_inputs_hash(variant) if requirements == variant.requirement_lines()
              else inputs_hash(variant.python, variant.platform, requirements, []))
    text = _header({
        "image": variant.image.name,
        "variant": variant.name,
        "python": variant.python,
        "platform": variant.platform,
        "inputs-sha256": inputs,
        **extra_header,
    }) + body
    try:
        parse_lockfile(text, variant.lockfile_path)  # never write what we could not read back
    except LockfileError as exc:
        raise LockError(f"resolver output for {variant.image.name}/{variant.name} is not a valid lockfile: {exc}") from None
    return text


def lock_build_tools(root: Path, upgrade: bool = False, upgrade_packages: tuple[str, ...] = ()) -> Path:
    body = _compile(list(BUILD_TOOLS), BUILD_TOOLS_PYTHON, "x86_64-manylinux_2_28", repo_layout.build_tools_lockfile(root), upgrade,
                    upgrade_packages)
    text = _header({"purpose": "tools that install the lock inside the image",
                    "inputs-sha256": build_tools_inputs_hash()}) + body
    path = repo_layout.build_tools_lockfile(root)
    _write_atomically(path, text)
    return path


def _status(path: Path, expected_hash: str, lock: Lockfile | None = None) -> LockStatus:
    if lock is None:
        if not path.is_file():
            return LockStatus(path, "missing", "no lockfile: run `vlmbuild lock`")
        try:
            lock = read_lockfile(path)
        except LockfileError as exc:
            return LockStatus(path, "invalid", str(exc))
    recorded = lock.header.get("inputs-sha256")
    if recorded != expected_hash:
        return LockStatus(path, "stale", f"inputs changed since it was locked (recorded {str(recorded)[:12]}, "
                                         f"spec now {expected_hash[:12]}): run `vlmbuild lock`")
    return LockStatus(path, "fresh")


def variant_status(variant: Variant, lock: Lockfile | None = None) -> LockStatus:
    """Fresh, stale, missing or invalid; ``lock`` when the caller has read it already."""
    return _status(variant.lockfile_path, variant_inputs_hash(variant), lock)


def build_tools_status(root: Path) -> LockStatus:
    return _status(repo_layout.build_tools_lockfile(root), build_tools_inputs_hash())


def require_fresh(variant: Variant, lock: Lockfile | None = None) -> LockStatus:
    """The lockfile's status, when fresh; a stale, missing or invalid one is refused (exit 1)."""
    status = variant_status(variant, lock)
    if status.state != "fresh":
        raise CheckFailed(f"{status.path}: lockfile {status.state}: {status.detail}")
    tools = build_tools_status(variant.image.root)
    if tools.state != "fresh":
        raise CheckFailed(f"{tools.path}: lockfile {tools.state}: {tools.detail}")
    return status


def load_variant_lock(variant: Variant) -> Lockfile:
    path = variant.lockfile_path
    if not path.is_file():
        raise VlmbuildError(f"{path}: lockfile missing for {variant.image.name}/{variant.name}: run `vlmbuild lock "
                            f"{variant.image.name} --variant {variant.name}`")
    try:
        return read_lockfile(path)
    except LockfileError as exc:
        raise VlmbuildError(str(exc)) from None


def read_fresh_lock(variant: Variant) -> tuple[Lockfile, LockStatus]:
    """The variant's lockfile, read once, and its status: refused when missing or unreadable (exit 2), stale, or
    beside a stale build-tools lockfile (exit 1)."""
    lock = load_variant_lock(variant)
    return lock, require_fresh(variant, lock)
