"""Debian and Ubuntu bases: apt, the distribution's ``pythonX.Y`` packages, debootstrap for a local root."""

from __future__ import annotations

from . import BaseFamily, CudaToolkit, LocalRoot, register

DEBIAN_MIRROR = "http://deb.debian.org/debian"
UBUNTU_MIRROR = "http://archive.ubuntu.com/ubuntu"
UBUNTU_SUITES = ("focal", "jammy", "noble")
# What apt and dpkg write that records when the build ran, not what it installed: emptied, not deleted (deleting a
# file the base holds leaves a whiteout in the layer, which carries the time of the build).
BUILD_RECORDS = ("/var/log/apt/*", "/var/log/dpkg.log", "/var/log/alternatives.log", "/var/cache/apt/*.bin",
                 "/var/cache/ldconfig/aux-cache", "/var/cache/debconf/*-old", "/var/lib/dpkg/*-old")


def install(packages: tuple[str, ...], scratch: str) -> str:
    """apt-get install with the build's CA ($APT_OPTIONS, from the build-env secret), then out with the lists this
    RUN downloaded (not those the base holds), the .debs and the records of when it ran."""
    return " \\\n && ".join([
        f"ls -A /var/lib/apt/lists > {scratch}/apt-lists-before",
        "apt-get $APT_OPTIONS update",
        "apt-get $APT_OPTIONS install -y --no-install-recommends \\\n      " + " ".join(packages),
        f"(cd /var/lib/apt/lists && ls -A | {{ grep -vxF -f {scratch}/apt-lists-before || true; }} | xargs -r rm -rf)",
        "find /var/cache/apt/archives -name '*.deb' -type f -delete",
        f'for f in {" ".join(BUILD_RECORDS)}; do if [ -f "$f" ]; then : > "$f"; fi; done',
    ])


def python_packages(python: str) -> tuple[str, ...]:
    return (f"python{python}", f"python{python}-venv", f"python{python}-dev", "g++", "ca-certificates")


def local_root(suite: str) -> LocalRoot:
    return LocalRoot(suite, UBUNTU_MIRROR if suite in UBUNTU_SUITES else DEBIAN_MIRROR)


def cuda_toolkit(cuda: str) -> CudaToolkit:
    # The production base (nvidia/cuda:...-devel) carries the toolkit where NVIDIA puts it.
    return CudaToolkit("/usr/local/cuda", (), f"the base image's CUDA {cuda} toolkit (nvidia/cuda devel)")


FAMILY = register(BaseFamily(
    name="debian",
    description="Debian and Ubuntu (apt, the distribution's Python, debootstrap)",
    install=install,
    python_command=lambda python: f"python{python}",
    python_packages=python_packages,
    local_root=local_root,
    cuda_toolkit=cuda_toolkit,
    build_records=BUILD_RECORDS,
))
