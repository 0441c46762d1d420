"""Where things lie in the build: the fixed paths, mounts and helper commands every Dockerfile of vlmbuild uses.

Shared by the plan (the build environments name these paths) and the renderer (the template gets them).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from . import contract

PACKAGE_DIR = Path(__file__).resolve().parent

VENV = contract.VENV
UV_CACHE = "/root/.cache/uv"
# The fixed time every file of the image carries (1980-01-01, the earliest a zip entry can hold): the same inputs
# give the same layer bytes whenever they are built (build_files/normalize-times).
BUILD_EPOCH = 315532800
# A tmpfs in every RUN: the files a RUN mounts (lock layers, build helpers, the wheel) are mounted inside it, so
# BuildKit 0.8 makes no mount point for them in the layer (moby/buildkit#3153).
SCRATCH = "/tmp/vlmbuild"
# Helper files of the build stages (build_files/), in the context under build/ and bind-mounted here.
BUILD_FILES = PACKAGE_DIR / "build_files"
BUILD_FILES_MOUNT = f"{SCRATCH}/files"
# Both helpers run with -S -B: the venv's .pth files import modules at startup (setuptools' distutils-precedence.pth
# imports _distutils_hack), and a plain start writes their bytecode, timestamp-based, with the source's install time
# in it, before anything else runs (a rebuild got another _distutils_hack .pyc in the libraries layer).
HELPER_PYTHON_FLAGS = "-S -B"
NORMALIZE_TIMES = f"{HELPER_PYTHON_FLAGS} {BUILD_FILES_MOUNT}/normalize-times {BUILD_EPOCH}"
# Every mount point a RUN of the build uses outside SCRATCH, made once in the first RUN with the fixed time.
MOUNT_POINTS = ("/run/secrets", SCRATCH, UV_CACHE, "/root/.cache/pip", "/opt/build-tools", "/var/cache/vlmbuild-wheels")
# Every RUN: the build's secrets (inside a tmpfs: no file of theirs in any layer), the scratch tmpfs with the build
# helpers in it. Every RUN that installs adds uv's download cache (one for every build on this machine: uv
# verifies hashes on every install, so a shared cache cannot smuggle a file in) and uv from the tools stage.
BASE_MOUNTS = ("--mount=type=tmpfs,target=/run/secrets "
               "--mount=type=secret,id=build-env --mount=type=secret,id=build-ca "
               f"--mount=type=tmpfs,target={SCRATCH} "
               f"--mount=type=bind,source=build,target={BUILD_FILES_MOUNT}")
UV_MOUNTS = (f"{BASE_MOUNTS} --mount=type=cache,id=vlmbuild-uv,target={UV_CACHE},sharing=shared "
             f"--mount=type=bind,from=tools,source=/opt/build-tools,target=/opt/build-tools")
# uv installs, compile-bytecode compiles what it added (hash-based .pyc, the same bytes on every build: uv's own
# --compile-bytecode gives bytes that depend on the order its workers finish, astral-sh/uv#10619). It is told the
# directories to compile: under -S, sysconfig answers Debian's posix_local scheme, not the venv's.
UV_INSTALL = (f"/opt/build-tools/bin/uv pip install --python {VENV}/bin/python --no-deps")
COMPILE_BYTECODE = f"{HELPER_PYTHON_FLAGS} {BUILD_FILES_MOUNT}/compile-bytecode"


def site_packages(python: str) -> str:
    """The venv's site-packages for Python ``python`` ("3.13")."""
    return f"{VENV}/lib/python{python}/site-packages"


def mount_points_and_parents() -> list[str]:
    """The mount points and every directory above them but /: what making them changes."""
    paths = set()
    for point in MOUNT_POINTS:
        path = PurePosixPath(point)
        paths.add(str(path))
        paths.update(str(parent) for parent in path.parents if str(parent) != "/")
    return sorted(paths)


# After a package stage's install: keep only the package's files and directories (uv's lock, pyvenv.cfg and the
# lib64 link are the base venv's, already in the image).
NORMALIZE_VENV = f"rm -f {VENV}/.lock {VENV}/pyvenv.cfg {VENV}/lib64"
