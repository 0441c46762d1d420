"""Rendering: a complete context per variant, hadolint-clean, layered for cheap bumps, no CA in the result."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, render_variant
from vlmbuild.errors import VlmbuildError
from vlmbuild.spec import load_spec

SPEC = REPO / "images" / "vlm-r1.yaml"
VARIANTS = sorted(load_spec(SPEC).variants)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not installed (pip install -e '.[test]')"
    return found


def stages(dockerfile: str) -> dict[str, str]:
    """Stage name -> its instructions (the last, unnamed stage is 'final')."""
    parts = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    out = {}
    for part in parts:
        part = "\n".join(line for line in part.splitlines() if not line.startswith("#"))  # comments: no cache key
        first, _, body = part.partition("\n")
        m = re.search(r" AS (\S+)", first)
        out[m.group(1) if m else "final"] = first + "\n" + body
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, object]:
    spec = load_spec(SPEC)
    return {name: render_variant(spec.variant(name), tmp_path_factory.mktemp(name) / "ctx") for name in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_dockerfile_passes_hadolint(rendered, variant):
    proc = subprocess.run([hadolint(), "--failure-threshold", "error", str(rendered[variant].context / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_context_is_complete(rendered):
    ctx = rendered["local"].context
    for rel in ("Dockerfile", "build/fetch_sdist.py", "build/build-sdist-wheel.sh", "build/portable-cxx",
                "build/build_ext.cfg", "lock/build-tools.txt", "lock/sdist-deepspeed.txt", "vlmbuild/lock.txt",
                "vlmbuild/variant.json", "vlmbuild/bin/vlmbuild-smoke", "vlmbuild/lib/vlmbuild/smoke/worker.py",
                "vlmbuild/lib/vlmbuild/rules/known_bad.yaml", "vlmbuild/lib/vlmbuild/lockfile.py", "vlmbuild/lib/vlmbuild/contract.py"):
        assert (ctx / rel).is_file(), rel
    # only what the smoke needs ships in the image: no CLI, no docker SDK code
    assert not (ctx / "vlmbuild/lib/vlmbuild/cli.py").exists()
    # every COPY source and every bind-mounted context path of the Dockerfile exists in the context
    dockerfile = rendered["local"].dockerfile
    for src in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, flags=re.M):
        assert (ctx / src).exists(), src
    for src in re.findall(r"--mount=type=bind,source=([^,\s]+)", dockerfile):
        assert (ctx / src).exists(), src


def requirement_names(path: Path) -> list[str]:
    return [re.split(r"[=@ ]", line)[0] for line in path.read_text().splitlines() if "==" in line or " @ " in line]


@pytest.mark.parametrize("variant", ["local", "cu124"])
def test_every_locked_package_is_in_exactly_one_layer(rendered, variant):
    result = rendered[variant]
    names = []
    for layer in result.layers:
        names += requirement_names(result.context / layer.file)
    for package in result.packages:
        lock_file = f"lock/sdist-{package.name}.txt" if package.built else package.file
        names += requirement_names(result.context / lock_file)
    assert sorted(names) == sorted(r.name for r in result.lock.requirements)  # every package once, none missing
    built = [p.name for p in result.packages if p.built]
    assert built == (["deepspeed", "flash-attn"] if variant == "cu124" else ["deepspeed"])


def test_layers_split_the_lock_exactly(rendered):
    result = rendered["local"]
    assert [layer.name for layer in result.layers] == ["torch", "libraries"]
    assert "torch" in requirement_names(result.context / result.layers[0].file)
    # fast movers each in a layer of their own, the recipe's on top, the most often bumped last
    order = [p.name for p in result.packages]
    assert {"transformers", "trl", "accelerate", "deepspeed", "peft", "wandb", "math-verify"} <= set(order)
    assert order.index("accelerate") > order.index("transformers") and order[-1] == "tensorboardx"
    assert [p.name for p in result.packages if p.built] == ["deepspeed"]


def test_bumping_one_package_changes_only_its_layer(repo_copy: Path, tmp_path: Path):
    spec = load_spec(repo_copy / "images" / "vlm-r1.yaml")
    before = render_variant(spec.variant("local"), tmp_path / "before")
    lock = spec.variant("local").lockfile_path
    lock.write_text(lock.read_text().replace("transformers==4.49.0", "transformers==4.49.1"))
    after = render_variant(load_spec(repo_copy / "images" / "vlm-r1.yaml").variant("local"), tmp_path / "after")
    changed = sorted(str(p.relative_to(after.context)) for p in (after.context / "lock").iterdir()
                     if p.read_bytes() != (before.context / "lock" / p.name).read_bytes())
    assert changed == ["lock/pkg-transformers.txt"]
    # every stage's instructions are the same text: the one that rebuilds is the stage whose bind-mounted lock
    # file changed (BuildKit keys a bind mount by its content), and the final stage differs in its labels only
    b, a = stages(before.dockerfile), stages(after.dockerfile)
    assert sorted(name for name in a if a[name] != b.get(name)) == ["final"]
    assert "source=lock/pkg-transformers.txt" in a["pkg-transformers"]
    def unlabelled(stage: str) -> str:
        return "\n".join(line for line in stage.splitlines() if not line.startswith("LABEL "))

    assert unlabelled(a["final"]) == unlabelled(b["final"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_secret_in_the_context_and_none_in_the_released_stage(rendered, variant, monkeypatch):
    result = rendered[variant]
    # the context holds no certificate and no proxy setting: they reach the build as BuildKit secrets
    for path in result.context.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert b"BEGIN CERTIFICATE" not in text and b"PROXY=" not in text.upper(), path
    parts = stages(result.dockerfile)
    final = parts["final"]
    assert "type=secret" not in final and "type=cache" not in final  # nothing that reaches the network
    assert not re.search(r"(?i)proxy|SSL_CERT_FILE|PIP_CERT", final)
    # the released stage takes only /opt/venv from the package stages, and nothing at all from the build stages
    # (and a CUDA image's CPU-accelerator DeepSpeed, from the stage that installed its wheel)
    extra = {("pkg-deepspeed-wheel-cpu", "/opt/deepspeed-cpu/")} if "DS_ACCELERATOR=cuda" in result.dockerfile else set()
    assert set(re.findall(r"COPY --from=(\S+) (\S+)", final)) == {(p.stage, "/opt/venv/") for p in result.packages} | extra
    # every RUN that reaches the network mounts the secrets; every install is hash-checked (or installs the wheel
    # built from the hash-checked sdist) and keeps its downloads in the cache mount, never in a layer
    for name, body in parts.items():
        for run in re.findall(r"^RUN (.*?)(?=^\S|\Z)", body, flags=re.M | re.S):
            if "pip install" in run or "apt-get" in run or "build-sdist-wheel" in run:
                assert "--mount=type=secret,id=build-env" in run and "/run/secrets/build-env" in run, name
            if "uv pip install" in run:
                assert "type=cache,id=vlmbuild-uv" in run, name
                assert "--require-hashes" in run, name
            if re.search(r"(?<!uv )pip install", run):
                assert "type=cache,id=vlmbuild-pip,target=/root/.cache/pip" in run and "--require-hashes" in run, name


def test_deepspeed_is_built_with_the_variants_ops_for_a_portable_cpu(rendered):
    local, cuda = stages(rendered["local"].dockerfile)["deepspeed-wheel"], stages(rendered["cu124"].dockerfile)["deepspeed-wheel"]
    assert "DS_ACCELERATOR=cpu" in local and "DS_BUILD_CPU_ADAM=1" in local and "DS_BUILD_SHM_COMM=1" in local
    assert "DS_ACCELERATOR=cuda" in cuda and "DS_BUILD_FUSED_ADAM=1" in cuda
    # cubins for every arch of the spec and PTX of the newest; nvcc's host compiler is one it accepts
    assert "TORCH_CUDA_ARCH_LIST='8.0;8.6;9.0+PTX'" in cuda and "VLMBUILD_REAL_CXX=g++-13" in cuda
    assert "DS_BUILD_OPS=0" in local  # nothing but what the spec names
    # a CUDA image carries a second DeepSpeed, built for the CPU accelerator (the CPU pass compiles nothing)
    cpu = stages(rendered["cu124"].dockerfile)["deepspeed-wheel-cpu"]
    assert "DS_ACCELERATOR=cpu" in cpu and "DS_BUILD_SHM_COMM=1" in cpu and "DS_BUILD_CPU_ADAM=1" in cpu
    assert "TORCH_CUDA_ARCH_LIST" not in cpu and "VLMBUILD_REAL_CXX" not in cpu
    assert "deepspeed-wheel-cpu" not in rendered["local"].dockerfile
    for body in (local, cuda):
        assert "CXX=/tmp/vlmbuild/files/portable-cxx" in body and "VLMBUILD_MARCH=x86-64-v3" in body
    assert "--no-build-isolation" in (rendered["local"].context / "build/build-sdist-wheel.sh").read_text()


def test_flash_attn_is_built_from_its_locked_sdist_on_the_torch_layer_and_cached_like_deepspeed(rendered):
    """The release builds flash-attn from PyPI's sdist (the lockfile's sha256): in a stage on the torch layer and the
    CUDA toolkit, with its own switches, its wheel in the cache mount under its inputs' key; installed in a layer of
    its own by its sha256, recorded in the image, and carried by a cross-machine build cache."""
    result = rendered["cu124"]
    stage = stages(result.dockerfile)["flash-attn-wheel"]
    assert stage.startswith("layer-torch AS flash-attn-wheel")
    assert "source=lock/sdist-flash-attn.txt" in stage and "build-sdist-wheel.sh flash-attn" in stage
    assert "FLASH_ATTENTION_FORCE_BUILD=TRUE" in stage and "FLASH_ATTN_CUDA_ARCHS='80;90'" in stage
    assert "CUDA_HOME=/usr" in stage and "VLMBUILD_REAL_CXX=g++-13" in stage
    assert "id=vlmbuild-wheels,target=/var/cache/vlmbuild-wheels" in stage
    sdist = (result.context / "lock/sdist-flash-attn.txt").read_text()
    assert sdist.startswith("flash-attn==2.7.4.post1") and "--hash=sha256:f03485c9a49a4d68" in sdist
    # its build requirements as locked, but what the torch layer holds already
    torch_layer = set(requirement_names(result.context / "lock/layer-1-torch.txt"))
    declared = load_spec(SPEC).variant("cu124").source_builds["flash-attn"].build_requires
    assert requirement_names(result.context / "lock/flash-attn-build.txt") == [
        n for n in declared if n not in torch_layer]
    assert "wheel" in declared and "setuptools" in declared
    package = stages(result.dockerfile)["pkg-flash-attn"]
    assert "from=flash-attn-wheel,source=/wheels" in package and "--require-hashes" in package
    final = stages(result.dockerfile)["final"]
    assert "COPY --from=pkg-flash-attn /opt/venv/ /opt/venv/" in final
    assert "wheels-flash-attn/SHA256SUMS >> /opt/vlmbuild/built-wheels.sha256" in final
    assert "flash-attn-wheel" in result.wheel_stages and "flash-attn" in json.loads(
        result.labels["io.vlmbuild.versions"])
    assert "flash-attn-wheel" not in rendered["local"].dockerfile


def test_a_build_that_leaves_flash_attn_out_is_the_same_dockerfile_without_it_and_says_so(rendered, tmp_path):
    """--leave-out flash-attn (a machine that cannot afford hours of nvcc): the same template and lockfile, the
    release's Dockerfile without the flash-attn stages and the final stage's lines that take from them; the labels,
    variant.json and the versions label say what is missing; pip's constraints still hold its locked version."""
    from vlmbuild.options import leaving_out

    full = rendered["cu124"]
    [variant] = leaving_out([load_spec(SPEC).variant("cu124")], ["flash-attn"])
    without = render_variant(variant, tmp_path / "ctx")
    assert "flash-attn-wheel" not in without.dockerfile and "pkg-flash-attn" not in without.dockerfile
    assert "flash-attn-wheel" not in without.wheel_stages
    full_lines, without_lines = set(full.dockerfile.splitlines()), set(without.dockerfile.splitlines())
    extra = [line for line in without.dockerfile.splitlines() if line not in full_lines]
    assert all(line.startswith(("LABEL io.vlmbuild.versions=", "LABEL io.vlmbuild.left-out=")) for line in extra), extra
    missing = [line for line in full.dockerfile.splitlines() if line not in without_lines]
    final_lines = [line for line in missing if "flash-attn" in line and not line.startswith(("#", "FROM", "RUN"))]
    assert "COPY --from=pkg-flash-attn /opt/venv/ /opt/venv/" in final_lines
    left_out = json.loads(without.labels["io.vlmbuild.left-out"])
    assert list(left_out) == ["flash-attn"] and "--leave-out flash-attn" in left_out["flash-attn"]
    assert "the release runner builds it" in left_out["flash-attn"]
    assert "flash-attn" not in json.loads(without.labels["io.vlmbuild.versions"])
    metadata = json.loads((without.context / "vlmbuild/variant.json").read_text())
    assert list(metadata["left_out"]) == ["flash-attn"] and metadata["source_builds"] == ["flash-attn"]
    assert "flash-attn==2.7.4.post1" not in metadata["packages"]
    assert "flash-attn==2.7.4.post1" in (without.context / "pip/constraint.txt").read_text()
    assert (without.context / "vlmbuild/lock.txt").read_text() == (full.context / "vlmbuild/lock.txt").read_text()


def test_leaving_out_what_no_variant_builds_from_source_is_refused(cli):
    result = cli("render", "vlm-r1", "--variant", "local", "--output", "/nonexistent/ctx", "--leave-out", "flash-attn")
    assert result.code == 2 and "--leave-out flash-attn: no variant selected builds" in result.err
    assert "vlm-r1/local: none" in result.err and "Traceback" not in result.err


def test_deepspeed_is_built_from_torch_and_its_own_build_requirements_only(repo_copy: Path, tmp_path: Path):
    """The wheel stage builds on the torch layer with the spec's build requirements (as locked) beside it: a version
    change in the libraries layer (a dependency nobody builds DeepSpeed with) leaves it byte for byte the same, so
    the ops are not compiled again; a change of a build requirement does reach it."""
    spec = load_spec(repo_copy / "images" / "vlm-r1.yaml")
    before = render_variant(spec.variant("local"), tmp_path / "before")
    wheel_stage = stages(before.dockerfile)["deepspeed-wheel"]
    assert wheel_stage.startswith("layer-torch AS deepspeed-wheel")
    assert "layer-2-libraries" not in wheel_stage
    requires = requirement_names(before.context / "lock/deepspeed-build.txt")
    assert {"setuptools", "ninja", "psutil", "py-cpuinfo"} <= set(requires) and "torch" not in requires
    lock = spec.variant("local").lockfile_path
    text = lock.read_text()
    old = re.search(r"^platformdirs==(\S+)", text, flags=re.M).group(1)
    assert "platformdirs" not in requires
    lock.write_text(text.replace(f"platformdirs=={old}", "platformdirs==0.0.1"))
    library_bump = render_variant(load_spec(repo_copy / "images" / "vlm-r1.yaml").variant("local"), tmp_path / "lib")
    assert stages(library_bump.dockerfile)["deepspeed-wheel"] == wheel_stage
    for name in ("lock/deepspeed-build.txt", "lock/layer-1-torch.txt", "lock/sdist-deepspeed.txt"):
        assert (library_bump.context / name).read_bytes() == (before.context / name).read_bytes(), name
    assert (library_bump.context / "lock/layer-2-libraries.txt").read_bytes() != \
        (before.context / "lock/layer-2-libraries.txt").read_bytes()
    ninja = re.search(r"^ninja==(\S+)", text, flags=re.M).group(1)
    lock.write_text(text.replace(f"ninja=={ninja}", "ninja==1.11.1"))
    tool_bump = render_variant(load_spec(repo_copy / "images" / "vlm-r1.yaml").variant("local"), tmp_path / "tool")
    assert (tool_bump.context / "lock/deepspeed-build.txt").read_bytes() != \
        (before.context / "lock/deepspeed-build.txt").read_bytes()


def test_a_build_requirement_the_lock_lacks_is_a_clear_error(repo_copy: Path, tmp_path: Path):
    spec_path = repo_copy / "images" / "vlm-r1.yaml"
    text, count = re.subn(r"(?m)^  requires: \[[^\]]*\]", "  requires: [setuptools, no-such-build-tool]", spec_path.read_text())
    assert count == 1
    spec_path.write_text(text)
    with pytest.raises(VlmbuildError, match="deepspeed_build.requires names no-such-build-tool"):
        render_variant(load_spec(spec_path).variant("local"), tmp_path / "ctx")


def test_every_layer_is_made_reproducible(rendered):
    """What makes the same inputs give the same layer bytes (a real build twice: test_pipeline_docker): every RUN
    whose files reach the image clamps its times, no RUN creates a mount point, apt's logs go, bytecode is
    hash-based, and the context's files carry the fixed time."""
    from vlmbuild.build_layout import BUILD_EPOCH, MOUNT_POINTS, SCRATCH

    result = rendered["local"]
    parts = stages(result.dockerfile)
    image_stages = ["python-base"] + [layer.stage for layer in result.layers] + [p.stage for p in result.packages] \
        + ["final"]
    for name in image_stages:
        runs = re.findall(r"^RUN (.*?)(?=^\S|\Z)", parts[name], flags=re.M | re.S)
        assert runs, name
        for run in runs:
            if run.startswith("mkdir -p"):  # the mount points, made once, with the fixed time
                assert all(point in run for point in MOUNT_POINTS) and f"touch -h -d @{BUILD_EPOCH}" in run
                continue
            assert run.rstrip().endswith(f"normalize-times {BUILD_EPOCH}"), (name, run[-200:])
            # every mounted file sits inside a tmpfs; every other mount point was made in the first RUN
            assert "--mount=type=tmpfs,target=/run/secrets" in run or "type=secret" not in run, name
            for target in re.findall(r"--mount=type=(?:bind|cache)[^\s]*target=([^,\s]+)", run):
                assert target.startswith(SCRATCH + "/") or target in MOUNT_POINTS, (name, target)
            if "uv pip install" in run:  # bytecode by compile-bytecode (fixed shares), never uv's (core count, timing)
                assert "build_files/compile-bytecode" not in run and "/compile-bytecode /opt/venv/lib/python3." in run, name
                assert "--compile-bytecode" not in run, name
    assert "/var/log/dpkg.log" in parts["python-base"] and "/var/cache/ldconfig/aux-cache" in parts["python-base"]
    assert "COPY vlmbuild" not in result.dockerfile  # the smoke is copied inside a RUN, and clamped there
    assert {p.stat().st_mtime for p in result.context.rglob("*")} == {BUILD_EPOCH}


def test_compile_bytecode_compiles_only_what_is_new_hash_based_and_the_same_bytes_twice(tmp_path):
    """The bytecode of a layer: every .py without a hash-based .pyc gets a checked-hash one (PEP 552 flags 0b11), a
    hash-based .pyc a lower layer left is not touched, a timestamp-based one (the distribution's own, stale once the
    times are clamped) is replaced, and compiling again from scratch gives the same bytes."""
    import importlib.util
    import subprocess
    import sys

    script = REPO / "builder" / "build_files" / "compile-bytecode"
    site = tmp_path / "site-packages"
    for i in range(30):
        module = site / f"pkg{i % 3}" / f"m{i}.py"
        module.parent.mkdir(parents=True, exist_ok=True)
        module.write_text(f"NAMES = {{'a{i}', 'b', 'c'}}\nX = ('shared', {i}, 1.5)\ndef f(x):\n    return x in NAMES\n")
    (site / "py2.py").write_text("print 'vendored python 2'\n")
    lower = Path(importlib.util.cache_from_source(str(site / "pkg0" / "m0.py")))
    lower.parent.mkdir()
    lower.write_bytes(importlib.util.MAGIC_NUMBER + (0b11).to_bytes(4, "little") + b"lower layer's hash")
    stale = Path(importlib.util.cache_from_source(str(site / "pkg0" / "m3.py")))
    stale.write_bytes(importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") + b"an install-time mtime")

    def run() -> dict[str, bytes]:
        out = subprocess.run([sys.executable, str(script), str(site)], capture_output=True, text=True, check=True)
        assert "30 files in 4 shares, 1 not compilable" in out.stdout, out.stdout
        return {str(p): p.read_bytes() for p in sorted(site.rglob("*.pyc")) if p != lower}

    first = run()
    assert len(first) == 29 and lower.read_bytes().endswith(b"lower layer's hash")
    assert all(int.from_bytes(data[4:8], "little") == 0b11 for data in first.values())  # checked hash, no mtime
    assert str(stale) in first  # the stale timestamp-based one was compiled again
    for path in first:
        Path(path).unlink()
    assert run() == first
    missing = subprocess.run([sys.executable, str(script), str(site), str(tmp_path / "nowhere")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and f"no such directory: {tmp_path / 'nowhere'}" in missing.stderr


def test_compile_bytecode_fails_the_step_when_a_pyc_cannot_be_written(tmp_path):
    """Only a source that does not compile is skipped (and named). A .pyc that cannot be written (here its
    __pycache__ is a file; on a build machine a full disk) fails the step: the layer would silently miss bytecode,
    and differ from a rebuild of the same inputs. (Tests run as root: a read-only directory would not stop it.)"""
    import importlib.util
    import subprocess
    import sys

    script = REPO / "builder" / "build_files" / "compile-bytecode"
    site = tmp_path / "site-packages"
    (site / "good").mkdir(parents=True)
    (site / "bad").mkdir()
    for i in range(8):
        (site / "good" / f"m{i}.py").write_text(f"X = {i}\n")
    (site / "good" / "py2.py").write_text("print 'vendored python 2'\n")
    (site / "bad" / "m.py").write_text("X = 1\n")
    (site / "bad" / "__pycache__").write_text("not a directory")
    failed = subprocess.run([sys.executable, str(script), str(site)], capture_output=True, text=True)
    assert failed.returncode != 0, failed.stdout
    assert "a worker failed" in failed.stderr and "NotADirectoryError" in failed.stderr, failed.stderr
    (site / "bad" / "__pycache__").unlink()  # what the failed run compiled stays compiled: the rest is done now
    passed = subprocess.run([sys.executable, str(script), str(site)], capture_output=True, text=True, check=True)
    assert "in 4 shares, 1 not compilable" in passed.stdout
    assert all(Path(importlib.util.cache_from_source(str(p))).exists() for p in site.rglob("m*.py"))
    assert f"not compilable: {site / 'good' / 'py2.py'}" in passed.stdout, passed.stdout


INTERPRETERS = [sys.executable] + [p for p in ("/usr/bin/python3",) if Path(p).exists()]


@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=lambda p: "debian" if p.startswith("/usr/") else "this")
def test_the_helpers_start_without_writing_the_bytecode_of_what_a_pth_file_imports(tmp_path, interpreter):
    """setuptools' distutils-precedence.pth imports _distutils_hack at every start of the venv's Python: a helper
    started plainly writes its .pyc (timestamp-based: the source's install time in it) before it does anything.
    Run as the template runs them, neither helper writes one, and compile-bytecode writes a checked-hash one into
    the venv's site-packages: with Debian's Python too, whose sysconfig under -S answers posix_local
    (VENV/local/lib/.../dist-packages), where a guessed path once found nothing and every venv layer went without
    bytecode."""
    import subprocess

    from vlmbuild.build_layout import (
        BUILD_FILES_MOUNT,
        COMPILE_BYTECODE,
        HELPER_PYTHON_FLAGS,
        NORMALIZE_TIMES,
        VENV,
        site_packages,
    )

    venv = tmp_path / "venv"
    subprocess.run([interpreter, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = venv.glob("lib/python*/site-packages")
    python = site.parent.name.removeprefix("python")
    assert site_packages(python).replace(VENV, str(venv)) == str(site)
    (site / "hack.pth").write_text("import hackmod\n")
    (site / "hackmod.py").write_text("HACKED = True\n")
    files = REPO / "builder" / "build_files"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as in a build's RUN
    plain = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys"], check=True, env=env)
    assert plain.returncode == 0 and list(site.glob("__pycache__/hackmod.*.pyc"))  # what a plain start does
    shutil.rmtree(site / "__pycache__")
    assert NORMALIZE_TIMES.startswith(HELPER_PYTHON_FLAGS + " ") and COMPILE_BYTECODE.startswith(HELPER_PYTHON_FLAGS)
    assert HELPER_PYTHON_FLAGS == "-S -B"
    compile_cmd = [str(venv / "bin" / "python"), *COMPILE_BYTECODE.replace(BUILD_FILES_MOUNT, str(files)).split(),
                   str(site)]
    out = subprocess.run(compile_cmd, check=True, capture_output=True, text=True, env=env).stdout
    assert "1 files in 4 shares" in out, out
    [pyc] = site.glob("__pycache__/hackmod.*.pyc")
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b11


def test_the_portable_compiler_rewrites_the_build_machines_cpu_flags(tmp_path):
    wrapper = REPO / "builder" / "build_files" / "portable-cxx"
    fake = tmp_path / "g++"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    out = subprocess.run([str(wrapper), "-O3", "-g", "-march=native", "-D__AVX512__", "-fopenmp", "x.cpp"],
                         capture_output=True, text=True, check=True,
                         env={"VLMBUILD_MARCH": "x86-64-v3", "VLMBUILD_SIMD": "AVX256", "VLMBUILD_REAL_CXX": str(fake),
                              "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["-O3", "-g0", "-march=x86-64-v3", "-D__AVX256__", "-fopenmp", "x.cpp"]


def test_base_image_is_a_parameter_not_a_fork(rendered):
    local, cu = rendered["local"].dockerfile, rendered["cu124"].dockerfile
    assert "ARG BASE_IMAGE=vlmbuild-local/debian:bookworm" in local
    assert "ARG BASE_IMAGE=debian:trixie-slim@sha256:" in cu
    assert "python3.13-venv" in cu and "python3.11-venv" in local


def test_labels_carry_lock_hash_and_versions(rendered):
    result = rendered["cu124"]
    assert result.labels["io.vlmbuild.lock-sha256"] == result.lock.sha256
    assert '"deepspeed":"0.19.8"' in result.labels["io.vlmbuild.versions"]
    assert result.labels["org.opencontainers.image.version"] == result.tag == "cu12.4-py3.13-torch2.6.0-ds0.19.8-tf4.49.0"
    assert f'LABEL io.vlmbuild.lock-sha256="{result.lock.sha256}"' in result.dockerfile


def test_undefined_template_variable_is_an_error(repo_copy: Path, tmp_path: Path):
    template = repo_copy / "images" / "templates" / "Dockerfile.j2"
    template.write_text(template.read_text() + "\n# {{ no_such_variable }}\n")
    with pytest.raises(VlmbuildError, match="no_such_variable"):
        render_variant(load_spec(repo_copy / "images" / "vlm-r1.yaml").variant("local"), tmp_path / "ctx")
    assert not (tmp_path / "ctx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ctx")]


def test_render_refuses_a_non_empty_output(tmp_path: Path):
    out = tmp_path / "ctx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(VlmbuildError, match="not empty"):
        render_variant(load_spec(SPEC).variant("local"), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_the_image_constrains_pip_to_the_validated_stack(rendered):
    """pip and uv in the image read the locked versions of the stack's key packages: VLM-R1's setup.sh would
    otherwise silently put back DeepSpeed 0.15.4, which cannot resume on torch 2.6."""
    result = rendered["local"]
    constraints = (result.context / "pip" / "constraint.txt").read_text()
    pins = [line for line in constraints.splitlines() if line and not line.startswith("#")]
    assert pins == [f"{name}=={result.lock.pins[name]}" for name in ("torch", "deepspeed", "transformers",
                                                                      "accelerate", "trl", "triton")
                    if name in result.lock.pins]
    assert "deepspeed==" in constraints and "torch==2.6.0" in constraints
    final = stages(result.dockerfile)["final"]
    assert "PIP_CONSTRAINT=/etc/pip/constraint.txt" in final and "UV_CONSTRAINT=/etc/pip/constraint.txt" in final
    assert "install -D -m 0644 /tmp/vlmbuild/pip/constraint.txt /etc/pip/constraint.txt" in final


RENDERINGS = REPO / "tests" / "renderings"
FIXED_BASE = "vlmbuild-local/debian:bookworm@sha256:" + "0" * 64


@pytest.mark.parametrize("variant", ["local", "cu124", "seed"])
def test_every_variant_renders_byte_identical_to_its_committed_rendering(variant, tmp_path):
    """The Dockerfile and variant.json of every variant, against the rendering committed under tests/renderings/
    (on a fixed base, without the commit-revision label): a refactor of the planning or the writing changes no
    byte of what is built. A change meant to change the image updates them:
    VLMBUILD_UPDATE_RENDERINGS=1 pytest tests/test_render.py -k committed_rendering, and the diff is reviewed."""
    result = render_variant(load_spec(SPEC).variant(variant), tmp_path / "ctx", base_image=FIXED_BASE)
    got = {"Dockerfile": re.sub(r"^LABEL org\.opencontainers\.image\.revision=.*\n", "", result.dockerfile, flags=re.M),
           "variant.json": (result.context / "vlmbuild" / "variant.json").read_text()}
    where = RENDERINGS / f"vlm-r1-{variant}"
    if os.environ.get("VLMBUILD_UPDATE_RENDERINGS") == "1":
        where.mkdir(parents=True, exist_ok=True)
        for name, text in got.items():
            (where / name).write_text(text)
    for name, text in got.items():
        assert text == (where / name).read_text(), f"{where / name} differs from what renders now"
