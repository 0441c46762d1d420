"""Base families (vlmbuild.bases): the template and the local base ask the family, never name a distribution.

A toy family registered here (no module of the builder touched) changes what the python-base stage runs, which
interpreter every stage calls and how its local stand-in root is made."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import REPO, render_variant
from vlmbuild import bases
from vlmbuild.bases import BaseFamily, CudaToolkit, LocalRoot
from vlmbuild.errors import VlmbuildError
from vlmbuild.localbase import local_root_for
from vlmbuild.plan import wheel_build_env
from vlmbuild.spec import load_spec

SPEC = REPO / "images" / "vlm-r1.yaml"


@pytest.fixture
def toy_family():
    family = bases.register(BaseFamily(
        name="toy",
        description="a toy family (pkg-install, /usr/bin/py3)",
        install=lambda packages, scratch: f"pkg-install {' '.join(packages)} && rm -rf {scratch}/pkg-cache",
        python_command=lambda python: f"py{python}",
        stdlib_dir=lambda python: f"/usr/lib/toy/py{python}",
        python_packages=lambda python: (f"py{python}-full", "cc"),
        local_root=lambda suite: LocalRoot(suite, "http://mirror.example/toy", ("core", "extra")),
        cuda_toolkit=lambda cuda, scratch: CudaToolkit("/opt/toy-cuda", ("toy-cuda-toolkit",), "the toy archive",
                                                       install=f"toy-get cuda-{cuda} --tmp {scratch}",
                                                       host_compiler="toy-cc-13", version_check="toy-nvcc --is 12.4"),
    ))
    yield family
    del bases.FAMILIES["toy"]


def test_the_template_asks_the_family(toy_family, tmp_path):
    variant = dataclasses.replace(load_spec(SPEC).variant("local"), base_family="toy")
    dockerfile = render_variant(variant, tmp_path / "ctx").dockerfile
    python_base = dockerfile.split("FROM python-base AS tools")[0]
    assert "pkg-install py3.11-full cc && rm -rf /tmp/vlmbuild/pkg-cache" in python_base
    assert "apt-get" not in dockerfile
    assert "py3.11 -m venv --without-pip /opt/venv" in python_base
    assert "py3.11 -m venv /opt/build-tools" in dockerfile  # the tools stage too
    assert "py3.11 -S -B /tmp/vlmbuild/files/compile-bytecode /usr/lib/toy/py3.11" in python_base  # its stdlib
    assert not re.search(r"(?<![/\w])python3\.11", dockerfile)  # no command of Debian's (venv paths aside)


def test_the_family_says_where_cuda_comes_from(toy_family, tmp_path):
    variant = dataclasses.replace(load_spec(SPEC).variant("cu124"), base_family="toy")
    env = wheel_build_env(variant, "/files")
    assert env["CUDA_HOME"] == "/opt/toy-cuda" and env["VLMBUILD_REAL_CXX"] == "toy-cc-13"
    python_base = render_variant(variant, tmp_path / "ctx").dockerfile.split("FROM python-base AS tools")[0]
    assert "toy-get cuda-12.4 --tmp /tmp/vlmbuild" in python_base and "toy-nvcc --is 12.4" in python_base
    assert "ENV CUDA_HOME=/opt/toy-cuda" in python_base
    debian = wheel_build_env(load_spec(SPEC).variant("cu124"), "/files")
    assert debian["CUDA_HOME"] == "/usr" and debian["VLMBUILD_REAL_CXX"] == "g++-13"


def test_debian_cuda_comes_without_the_driver(tmp_path):
    """Debian's toolkit, from non-free, with the placeholder that keeps NVIDIA's driver libraries out, checked to
    be the spec's CUDA; a CUDA version Debian does not carry is refused naming the ones it does."""
    dockerfile = render_variant(load_spec(SPEC).variant("cu124"), tmp_path / "ctx").dockerfile
    python_base = dockerfile.split("FROM python-base AS tools")[0]
    assert "Components: non-free" in python_base and "VERSION_CODENAME" in python_base
    assert "Provides: libcuda.so.1 (= 550), libcuda-12.4-1, libnvidia-ml.so.1 (= 550)" in python_base
    assert "/tmp/vlmbuild/no-driver.deb nvidia-cuda-toolkit" in python_base
    assert "grep -q 'V12.4.131'" in python_base and "-name 'libcuda.so*'" in python_base
    with pytest.raises(VlmbuildError, match="12.4 only"):
        bases.family("debian").cuda_toolkit("12.6", "/tmp/x")


def test_a_local_base_name_says_family_and_suite(toy_family):
    assert local_root_for("vlmbuild-local/toy:edge").command("/r") == [
        "debootstrap", "--variant=minbase", "--components=core,extra", "edge", "/r", "http://mirror.example/toy"]
    trixie = local_root_for("vlmbuild-local/debian:trixie")
    assert trixie.suite == "trixie" and trixie.mirror == "http://deb.debian.org/debian"
    # the recipe the engine's bookworm base carries: unchanged, so an existing base is not made again
    assert local_root_for("vlmbuild-local/debian:bookworm").recipe == (
        "debootstrap --variant=minbase bookworm http://deb.debian.org/debian; /etc/hosts")
    assert local_root_for("vlmbuild-local/debian:jammy").mirror == "http://archive.ubuntu.com/ubuntu"


@pytest.mark.parametrize("ref", ["vlmbuild-local/alpine:3.20", "vlmbuild-local/debian", "debian:bookworm"])
def test_a_local_base_of_no_known_family_is_refused(ref):
    with pytest.raises(VlmbuildError, match="vlmbuild-local/<family>:<suite>"):
        local_root_for(ref)


def test_the_spec_names_the_family(toy_family, tmp_path):
    text = SPEC.read_text().replace("    python: \"3.11\"\n", "    python: \"3.11\"\n    base_family: toy\n", 1)
    assert "base_family: toy" in text
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "Dockerfile.j2").write_text((REPO / "images/templates/Dockerfile.j2").read_text())
    path = tmp_path / "vlm-r1.yaml"
    path.write_text(text)
    spec = load_spec(path)
    assert spec.variant("local").family is toy_family
    assert spec.variant("cu124").family is bases.family("debian")
