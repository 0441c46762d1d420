"""Shared fixtures. Real over mocked: the stack tests install the committed lockfile's torch/DeepSpeed/
transformers into a venv made here with uv; the docker tests talk to a real engine (tests/docker_env.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
SPECS = TESTS / "specs"
FAULTS = TESTS / "faults"
CACHE = Path(os.environ.get("VLMBUILD_TEST_CACHE", Path.home() / ".cache" / "vlmbuild-tests"))
# The docker tests' registry (a real one on 127.0.0.1, started when absent) and the repositories they tag into.
REGISTRY = os.environ.get("VLMBUILD_REGISTRY", "127.0.0.1:5000")
TEST_REPO = f"{REGISTRY}/vlmbuild-test/vlm-r1"
OWNER = "io.vlmbuild.owner"


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(*args: str, root: Path | None = None, env: dict | None = None, timeout: int = 900) -> Result:
    cmd = [sys.executable, "-m", "vlmbuild"]
    if root is not None:
        cmd += ["--root", str(root)]
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(autouse=True)
def no_environment_leaks():
    """What one test puts in os.environ (the in-process smoke sets DS_ACCELERATOR=cpu) must not reach the next:
    a leaked DS_ACCELERATOR made a later uv build of DeepSpeed 0.15.4 import torch, and only a warm cache hid it."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


# Every process this session starts inherits this mark (each smoke's environment is built from os.environ), so the
# orphan check below sees this session's ranks only: a second suite on the same machine (a developer's run beside a
# CI run) once had its running smokes SIGKILLed by the other's check, and two fault tests failed for no fault.
SESSION_MARK = f"VLMBUILD_TEST_SESSION={os.getpid()}".encode()
os.environ["VLMBUILD_TEST_SESSION"] = str(os.getpid())


def smoke_ranks_running() -> list[int]:
    """This session's smoke rank processes running on this host outside any container (those in a container are the
    docker tests' to remove)."""
    own = os.readlink("/proc/self/ns/pid")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (b"vlmbuild.smoke.worker" in (entry / "cmdline").read_bytes().split(b"\0")
                    and os.readlink(entry / "ns" / "pid") == own
                    and SESSION_MARK in (entry / "environ").read_bytes().split(b"\0")):
                pids.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return pids


@pytest.fixture(autouse=True)
def no_rank_left_running():
    """A test that leaves a smoke rank running fails, and the rank is killed: an orphaned rank spins in DeepSpeed's
    shm wait loop at 100 % of a core, and on a two-core CI machine every later smoke then ran into its timeout."""
    yield
    left = smoke_ranks_running()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        pytest.fail(f"the test left {len(left)} smoke rank(s) running (pids {left}); killed them")


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A scratch copy of images/ and lockfiles/ to edit freely."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "images", root / "images")
    shutil.copytree(REPO / "lockfiles", root / "lockfiles")
    return root


def render_variant(variant, output: Path, base_image: str | None = None):
    """A variant planned with its committed lockfile and written out (vlmbuild render's path)."""
    from vlmbuild.lock import load_variant_lock
    from vlmbuild.plan import make_plan
    from vlmbuild.render import render

    return render(make_plan(variant, load_variant_lock(variant)), base_image, output)


# Where DeepSpeed wheels built with their ops are kept by key: the stack venv's and the sweep test's cells share
# them (one build of a DeepSpeed version per suite).
SWEEP_WORK = CACHE / "sweep"


def build_deepspeed_with_ops(python: Path, variant, lock, uv: str) -> Path:
    """DeepSpeed's wheel with the ops the CPU smoke loads compiled in (cpu_adam, deepspeed_shm_comm, fused_adam), by
    the helper and environment the image build uses (build_files/build-sdist-wheel.sh): the smoke then compiles nothing
    at run time, so no test waits minutes for a JIT compile or loads one that another environment left in a shared
    cache. The wheel is kept by its inputs (those `vlmbuild sweep` keys it by) where the sweep test's cells find it."""
    from vlmbuild.build_layout import BUILD_FILES
    from vlmbuild.plan import wheel_build_env
    from vlmbuild.sweep_cell import deepspeed_build_inputs

    work = CACHE / "deepspeed-build"
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    requirement = work / "in" / "deepspeed.txt"
    requirement.write_text(lock.get("deepspeed").render() + "\n")
    inputs = work / "in" / "build-inputs.txt"
    inputs.write_text(deepspeed_build_inputs(variant, lock))
    env = {**os.environ, **wheel_build_env(variant, str(BUILD_FILES), accelerator="cpu"),
           "VLMBUILD_PYTHON": str(python), "VLMBUILD_UV": uv, "VLMBUILD_SRC": str(work / "src"),
           "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # ninja, from the venv
    started = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD_FILES / "build-sdist-wheel.sh"), "deepspeed", str(requirement), str(work / "out"),
                           str(SWEEP_WORK / "deepspeed-wheels"), str(inputs)],
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"building DeepSpeed with its CPU ops for the tests failed:\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-3000:]}")
    wheel = next((work / "out").glob("deepspeed-*.whl"))
    print(f"\n[stack venv] DeepSpeed with {', '.join(sorted(variant.image.deepspeed_build.ops['cpu']))} "
          f"prebuilt in {time.monotonic() - started:.0f} s: {wheel.name}")
    return wheel


@pytest.fixture(scope="session")
def stack_python() -> Path:
    """A venv holding the local variant's committed lockfile (torch 2.6.0, deepspeed, transformers 4.49.0), its
    DeepSpeed rebuilt with the CPU ops compiled in (the image's way).

    Made once per lockfile content with uv (its cache makes a re-make take seconds) and kept under
    $VLMBUILD_TEST_CACHE, since 5 GB of torch per test run would not fit the CI budget.
    """
    from vlmbuild.lockfile import read_lockfile
    from vlmbuild.plan import wheel_build_env
    from vlmbuild.spec import load_spec

    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("local")
    lock = read_lockfile(variant.lockfile_path)
    # Keyed by the lockfile and by how DeepSpeed is built (its ops): a venv kept from before an op was added to the
    # spec would lack it, and only a fresh machine would see the smoke compile it.
    build = sorted(wheel_build_env(variant, "-").items())
    key = hashlib.sha256(f"{lock.sha256}\n{build}".encode()).hexdigest()[:16]
    venv = CACHE / f"stack-{key}"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if not marker.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        from vlmbuild.lock import uv_binary

        uv = uv_binary()
        subprocess.run([uv, "venv", "-q", "--python", lock.header.get("python", "3.11"), str(venv)], check=True)
        # With its bytecode: where PYTHONDONTWRITEBYTECODE is set (CI's shell), every smoke process would compile
        # ~3,000 modules from source at each start. (The test venv's bytes need not be reproducible: uv's own.)
        subprocess.run([uv, "pip", "install", "-q", "--python", str(python), "--require-hashes", "--no-deps",
                        "--compile-bytecode", "-r", str(lock.path)], check=True)
        wheel = build_deepspeed_with_ops(python, variant, lock, uv)
        subprocess.run([uv, "pip", "install", "-q", "--python", str(python), "--no-deps", "--reinstall",
                        "--compile-bytecode", str(wheel)], check=True)
        marker.write_text(lock.sha256)
        # Keep only this lockfile's venv: disk is shared.
        for old in CACHE.glob("stack-*"):
            if old != venv:
                shutil.rmtree(old, ignore_errors=True)
    return python


BUILD_CACHE_KEPT = 16 * 2**30
# The docker suites' peak on top of what was there when they began (measured on a fresh clone, 2026-12-04: 34 GB,
# at the cu124 module's cold build, after test_pipeline_docker's builds, prunes and bumps), with a margin. The disk is
# shared: what another user of it holds is not ours to free, but BuildKit's cache is.
DOCKER_SUITE_DISK = 45 * 2**30
# The cu124 module's own peak: its cold build adds about 25 GB (the toolkit stage, cp313 torch, two DeepSpeed builds).
CU124_MODULE_DISK = 30 * 2**30


def local_tag() -> tuple[str, str]:
    from vlmbuild.lockfile import read_lockfile
    from vlmbuild.spec import load_spec

    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("local")
    lock = read_lockfile(variant.lockfile_path)
    return variant.tag(lock.pins), lock.sha256


@pytest.fixture(scope="session")
def built_local(client, tmp_path_factory):
    """The README's main job, into a test repository: build + CPU smoke + tag; with the further smoke pass over two
    nodes (--smoke-nodes 2), so that the evidence of a pass over nodes is checked end to end with the rest."""
    report = tmp_path_factory.mktemp("build") / "build.json"
    started = time.monotonic()
    result = run_cli("build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu", "--repository", TEST_REPO,
                     "--smoke-nodes", "2", "--report", str(report), timeout=3600)
    assert result.code == 0, result.out[-6000:] + result.err[-3000:]
    tag, lock_sha = local_tag()
    build = json.loads(report.read_text())["builds"][0]
    return {"result": result, "report": json.loads(report.read_text()), "report_path": report, "tag": tag,
            "lock_sha": lock_sha,
            "immutable": build["immutable_tag"], "image_id": build["image_id"], "seconds": time.monotonic() - started}


def make_room(c, needed: int, what: str) -> None:
    """Prune all of BuildKit's cache when the disk cannot hold what comes next: a build that runs out of space in
    the middle of a layer fails it (compile-bytecode fails the step on a .pyc it cannot write), and the message
    below says why. Not a failure by itself: it may still fit. Checked again before the cu124 module, since the
    free space of a shared disk moves while the suite runs (a fresh-clone run began with 53 GB free and ran out)."""
    root = c.info().get("DockerRootDir") or "/var/lib/docker"
    root = root if os.path.isdir(root) else "/"
    free = shutil.disk_usage(root).free
    if free < needed:
        c.api.prune_builds(all=True)
        after = shutil.disk_usage(root).free
        print(f"\nconftest: {free / 2**30:.1f} GB free for {what}, which needs about {needed / 2**30:.0f} GB: "
              f"BuildKit's cache pruned, {after / 2**30:.1f} GB free now")


def remove_test_state(c) -> None:
    """What the tests make, also where a test failed before its own clean-up or an earlier run was killed: every
    tag of our test repositories (TEST_REPO and its -bump, -changed, -race... siblings), containers of ours and
    the test repositories in the local registry."""
    from vlmbuild.engine_setup import purge_local_repository

    for container in c.containers.list(all=True, filters={"label": OWNER}):
        container.remove(force=True)
    for image in c.images.list():
        for tag in image.tags:
            if tag.startswith(TEST_REPO):
                c.images.remove(tag, force=True)
    c.images.prune(filters={"dangling": True})
    for repository in ("vlmbuild-test/vlm-r1", "vlmbuild-test/vlm-r1-signfail", "vlmbuild-test/vlm-r1-cu124"):
        purge_local_repository(repository)


@pytest.fixture(scope="session")
def client():
    """A real engine; the tests start one (and the registry) themselves when none answers.

    The suite starts from none of its own state: a run killed before its clean-up (CI's time limit, a machine
    that went down) left images under the test tags, a pushed image in the registry and a container; the next
    run would reuse the image instead of building it and find a container it never made."""
    from vlmbuild import engine_setup

    if not engine_setup.daemon_answers() or not engine_setup.registry_answers():
        engine_setup.main()
    import docker

    c = docker.from_env(timeout=900)
    remove_test_state(c)
    make_room(c, DOCKER_SUITE_DISK, "the docker suite")
    yield c
    remove_test_state(c)
    # The tests build many variants of the image (changed smoke, bases, bumps): about 40 GB of BuildKit cache.
    # Disk is shared; keep the most recently used part (the local variant's layers, uv's and pip's downloads,
    # the DeepSpeed wheel), which the next run and `vlmbuild build` reuse.
    c.api.prune_builds(keep_storage=BUILD_CACHE_KEPT)


def pytest_collection_modifyitems(config, items):
    """Fast tests first, then the stack ones, then docker: a core failure shows before minutes of building."""
    order = {"stack": 1, "docker": 2, "after_built_local": 2.5, "cu124": 3}

    def rank(item):
        return max([order.get(m.name, 0) for m in item.iter_markers()] or [0])

    items.sort(key=rank)


# A CI run that is killed at its time limit prints nothing of what failed before: say each failure when it happens,
# and stop (failing) while the summary can still be printed.
BUDGET_S = float(os.environ.get("VLMBUILD_TEST_BUDGET_S", 75 * 60))
STARTED = time.monotonic()
TERMINAL = {}


def pytest_configure(config):
    TERMINAL["reporter"] = config.pluginmanager.get_plugin("terminalreporter")


def pytest_runtest_logreport(report):
    reporter = TERMINAL.get("reporter")
    if report.failed and reporter is not None:
        reporter.write_line(f"\n---- {report.nodeid} ({report.when}) failed:")
        reporter.write_line("\n".join(report.longreprtext.splitlines()[-40:]) + "\n----")


def pytest_runtest_setup(item):
    spent = time.monotonic() - STARTED
    if spent > BUDGET_S:
        pytest.exit(f"the tests ran {spent:.0f} s, past their budget of {BUDGET_S:.0f} s "
                    "(VLMBUILD_TEST_BUDGET_S): stopping before the CI limit kills the run unreported", returncode=1)


# What each docker test leaves on the engine's disk that nothing accounts for (issue 29: a suite run leaked 7 GB of
# BuildKit snapshots no prune reaches, twice over). Measured after every docker test (du of the engine's storage,
# about a second); the tests that left more than LEAK_REPORTED_BYTES are listed at the end of the run, and one that
# left more than LEAK_BOUND_BYTES fails: every build shape the suite runs (cold, warm, after a prune, --cache-from,
# --cache-to, interrupted, two at once) stays within it (a cold build of local leaves 0.34 GB: BuildKit's own
# metadata and the l/ links, benchmarks/results/engine-disk.txt).
LEAK_REPORTED_BYTES = int(0.5e9)
LEAK_BOUND_BYTES = int(1e9)
LEAKS: list[tuple[int, str]] = []


@pytest.fixture(autouse=True)
def engine_leak_measured(request):
    if not ({"docker", "cu124"} & {m.name for m in request.node.iter_markers()}):
        yield
        return
    from vlmbuild import engine_disk

    c = request.getfixturevalue("client")
    before = engine_disk.measure(c).unaccounted
    yield
    after = engine_disk.measure(c).unaccounted
    if before is not None and after is not None and after - before > LEAK_REPORTED_BYTES:
        LEAKS.append((after - before, request.node.nodeid))
        if after - before > LEAK_BOUND_BYTES:
            pytest.fail(f"the test left {(after - before) / 1e9:.2f} GB of the engine's storage that nothing "
                        f"accounts for (bound {LEAK_BOUND_BYTES / 1e9:g} GB; `vlmbuild doctor` names the directories)")


def pytest_terminal_summary(terminalreporter):
    if LEAKS:
        terminalreporter.write_sep("-", "unaccounted engine storage left by docker tests (vlmbuild doctor)")
        for leaked, nodeid in sorted(LEAKS, reverse=True):
            terminalreporter.write_line(f"{leaked / 1e9:+6.2f} GB  {nodeid}")


# Run inside an image as an unprivileged user: every module the smoke's ranks import, with the import system's
# compile-from-source step counted. The image ships hash-based bytecode for all of it (build_files/compile-bytecode):
# nothing is compiled at a start (once every venv layer went without bytecode and each process of a smoke compiled
# about 3,000 modules, some 10 s of CPU, again).
COMPILED_AT_IMPORT = """
import importlib._bootstrap_external as bootstrap, json, os, sys
compiled = []
original = bootstrap.SourceLoader.source_to_code
def source_to_code(self, data, path, *args, **kwargs):
    compiled.append(path)
    return original(self, data, path, *args, **kwargs)
bootstrap.SourceLoader.source_to_code = source_to_code
os.environ["DS_ACCELERATOR"] = "cpu"
import torch, transformers, deepspeed, trl, datasets, vlmbuild.smoke.worker, vlmbuild.smoke.grpo
from transformers import Qwen2_5_VLForConditionalGeneration
print(json.dumps({"imported": len(sys.modules), "compiled": compiled}))
"""


def compiled_at_import(client, image: str) -> dict:
    """{"imported": modules imported, "compiled": the image's sources compiled because no valid .pyc was there}.
    What a process writes at run time and imports (torch generates _remote_module_non_scriptable.py in a temporary
    directory) is not the image's and is left out."""
    import json

    out = client.containers.run(image, ["python", "-c", COMPILED_AT_IMPORT], remove=True, network_mode="none",
                                user="nobody", environment={"PYTHONPATH": "/opt/vlmbuild/lib"},
                                labels={OWNER: "test"}, stderr=False).decode()
    found = json.loads(out.strip().splitlines()[-1])
    found["compiled"] = [p for p in found["compiled"] if not p.startswith("/tmp/")]
    return found


# Run inside an image: every entry under the roots with what a layer's tar records of it (type, mode, owner, size,
# mtime, and the sha256 of a file's bytes or a link's target). Only for the message of a failed reproducibility test:
# a layer's diffID says that it differs, this says which files.
MANIFEST = """
import hashlib, json, os, stat, sys
out = {}
for root in sys.argv[1:]:
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            info = os.lstat(path)
            what = [stat.filemode(info.st_mode), info.st_uid, info.st_gid, info.st_size, int(info.st_mtime)]
            if stat.S_ISLNK(info.st_mode):
                what.append(os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256()
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
                what.append(digest.hexdigest()[:16])
            out[path] = what
print(json.dumps(out))
"""


def image_files_that_differ(client, first: str, second: str, roots: tuple[str, ...] = ("/opt", "/usr", "/etc"),
                            shown: int = 15) -> str:
    """Which files of two images differ (content or metadata), for the message of a failed layer comparison."""
    import json

    def manifest(image: str) -> dict:
        out = client.containers.run(image, ["/opt/venv/bin/python", "-I", "-S", "-B", "-c", MANIFEST, *roots],
                                    remove=True, network_mode="none", labels={OWNER: "test"}, stderr=False)
        return json.loads(out.decode().strip().splitlines()[-1])

    a, b = manifest(first), manifest(second)
    made_by_the_engine = {"/etc/hostname", "/etc/hosts", "/etc/mtab", "/etc/resolv.conf"}  # per container
    differ = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p) and p not in made_by_the_engine)
    lines = [f"  {p}: {a.get(p)} != {b.get(p)}" for p in differ[:shown]]
    return f"{len(differ)} entries differ under {', '.join(roots)}:\n" + "\n".join(lines)


@dataclass(frozen=True)
class LayerEntry:
    layer: str  # which layer: "layer 3 of 21" (the base's first), or its file in the saved image
    path: str  # relative to the root, as in the layer's tar ("opt/venv/..."); a deletion as ".wh.<name>"
    is_dir: bool


def layer_entries(client, ref: str) -> list[LayerEntry]:
    """Every entry of every layer of an image, a file a later layer deletes included (it is still shipped).

    Read from the engine's own layer directories where its overlay2 storage is on this machine (CI's and the
    README's dockerd are): `docker save` would first write the whole image into the engine's tmp directory (12 GB
    for cu124), and on a shared disk that once ran out of space mid-export and failed a CI run. Elsewhere (a remote
    engine), the saved image, streamed."""
    attrs = client.api.inspect_image(ref)
    diff_ids = attrs["RootFS"]["Layers"]
    dirs = _overlay2_layer_dirs(attrs)
    if dirs is None:
        return saved_layer_entries(client, ref, len(diff_ids))
    # One directory per layer, bottom up, or the image is not read whole.
    assert len(dirs) == len(diff_ids), (ref, len(dirs), len(diff_ids))
    entries = []
    for index, top in enumerate(dirs):
        for directory, subdirs, files in os.walk(top):
            relative = os.path.relpath(directory, top)
            for name in subdirs + files:
                path = name if relative == "." else f"{relative}/{name}"
                info = os.lstat(os.path.join(directory, name))
                if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:  # overlayfs's whiteout: a deletion
                    head, _, tail = path.rpartition("/")
                    path = f"{head}/.wh.{tail}" if head else f".wh.{tail}"
                entries.append(LayerEntry(f"layer {index + 1} of {len(dirs)}", path, stat.S_ISDIR(info.st_mode)))
    return entries


def _overlay2_layer_dirs(attrs: dict) -> list[Path] | None:
    driver = attrs.get("GraphDriver") or {}
    data = driver.get("Data") or {}
    if driver.get("Name") != "overlay2" or not data.get("UpperDir"):
        return None
    top_first = [data["UpperDir"], *(data.get("LowerDir") or "").split(":")]
    dirs = [Path(d) for d in reversed(top_first) if d]
    return dirs if all(d.is_dir() for d in dirs) else None


def saved_layer_entries(client, ref: str, layers: int) -> list[LayerEntry]:
    import tarfile

    entries, seen = [], 0
    stream = io.BufferedReader(_ChunkReader(client.api.get_image(ref, chunk_size=1 << 20)), buffer_size=1 << 20)
    with tarfile.open(fileobj=stream, mode="r|") as outer:
        for member in outer:
            if not (member.name.endswith("layer.tar") and member.isfile()):
                continue
            seen += 1
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as layer:
                for e in layer:
                    path = e.name.removeprefix("./").rstrip("/")  # an imported base's tar names "./usr/..."
                    if path not in ("", "."):
                        entries.append(LayerEntry(member.name, path, e.isdir()))
    assert seen == layers, (ref, seen, layers)
    return entries


class _ChunkReader(io.RawIOBase):
    """A raw file over the engine's byte stream, for tarfile's stream mode."""

    def __init__(self, chunks) -> None:
        super().__init__()
        self.chunks, self.buf = iter(chunks), b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            self.buf = next(self.chunks, b"")
            if not self.buf:
                return 0
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n
