"""Debian and Ubuntu bases: apt, the distribution's ``pythonX.Y`` packages, debootstrap for a local root."""

from __future__ import annotations

from ..errors import VlmbuildError
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


# Debian's own CUDA toolkit (non-free; `nvidia-cuda-toolkit`), by the CUDA version it carries: only trixie has a CUDA
# 12 compiler, and no CUDA 12 pip wheel carries nvcc (12.4.131 through 12.9.86 ship only ptxas). 12.4.131 is CUDA
# 12.4.1, the release torch 2.6.0's nvidia-cuda-runtime-cu12 12.4.127 belongs to.
DEBIAN_CUDA = {"12.4": "12.4.131"}
# nvcc 12.4 refuses gcc 14, trixie's default (and -allow-unsupported-compiler then fails in libstdc++'s bf16
# literals); the toolkit depends on g++-13 and nvcc is pointed at it.
CUDA_HOST_COMPILER = "g++-13"
# nvidia-cuda-dev depends on `libcuda1 (>= 550) | libcuda.so.1 | libcuda-12.4-1`, and the toolkit on libnvidia-ml:
# installed as they are, NVIDIA's driver user-space libraries land in the image and shadow the host driver the NVIDIA
# container toolkit mounts. This package stands in for them (it holds no file): the image carries no driver library.
DRIVER_PLACEHOLDER = "vlmbuild-no-cuda-driver"
DRIVER_PROVIDES = "libcuda.so.1 (= 550), libcuda-12.4-1, libnvidia-ml.so.1 (= 550)"


def _driver_placeholder(scratch: str) -> str:
    control = (f"Package: {DRIVER_PLACEHOLDER}\\nVersion: 550\\nArchitecture: all\\nMaintainer: vlmbuild\\n"
               f"Provides: {DRIVER_PROVIDES}\\n"
               "Description: stands in for the NVIDIA driver libraries the host provides at run time\\n")
    return " \\\n && ".join([
        f"mkdir -p {scratch}/no-driver/DEBIAN",
        f"printf '{control}' > {scratch}/no-driver/DEBIAN/control",
        f"SOURCE_DATE_EPOCH=315532800 dpkg-deb --root-owner-group --build {scratch}/no-driver {scratch}/no-driver.deb",
    ])


def cuda_toolkit(cuda: str, scratch: str) -> CudaToolkit:
    if cuda not in DEBIAN_CUDA:
        raise VlmbuildError(f"CUDA {cuda}: Debian carries a CUDA toolkit for {', '.join(DEBIAN_CUDA)} only "
                            "(nvidia-cuda-toolkit in trixie's non-free)")
    version = DEBIAN_CUDA[cuda]
    # non-free, for the suite of the base itself: the local stand-in root and debian:trixie-slim alike list main only
    sources = (f"printf 'Types: deb\\nURIs: {DEBIAN_MIRROR}\\nSuites: %s\\nComponents: non-free\\n' "
               '"$(. /etc/os-release && echo "$VERSION_CODENAME")" > /etc/apt/sources.list.d/vlmbuild-cuda.sources')
    packages = (f"{scratch}/no-driver.deb", "nvidia-cuda-toolkit")
    install_shell = " \\\n && ".join([sources, _driver_placeholder(scratch), install(packages, scratch)])
    check = " \\\n && ".join([
        # the spec's CUDA, not whatever the suite carries today
        f"{{ nvcc --version | grep -q 'V{version}' || {{ nvcc --version; echo 'expected CUDA {version}' >&2; exit 1; }}; }}",
        # no driver library from Debian: the host's is mounted at run time (stubs for linking only are allowed)
        "! find / -xdev \\( -name 'libcuda.so*' -o -name 'libnvidia-*.so*' \\) -not -path '*/stubs/*' | grep .",
    ])
    return CudaToolkit("/usr", ("nvidia-cuda-toolkit",), f"Debian's nvidia-cuda-toolkit {version} (non-free)",
                       install=install_shell, host_compiler=CUDA_HOST_COMPILER, version_check=check)


FAMILY = register(BaseFamily(
    name="debian",
    description="Debian and Ubuntu (apt, the distribution's Python, debootstrap)",
    install=install,
    python_command=lambda python: f"python{python}",
    stdlib_dir=lambda python: f"/usr/lib/python{python}",
    python_packages=python_packages,
    local_root=local_root,
    cuda_toolkit=cuda_toolkit,
    build_records=BUILD_RECORDS,
))
