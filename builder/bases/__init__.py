"""Families of base images: what a build asks of the distribution under it.

A base family is one small object: the packages and shell commands of the python-base stage, the name of its
Python, how a stand-in root of one of its suites is made on a machine that reaches no registry, and where a CUDA
toolkit comes from. The template and vlmbuild.localbase ask the family; neither names a distribution.

Adding a family: a module beside debian.py that builds a ``BaseFamily`` and calls ``register`` (every module of
this package is imported below), and ``base_family: NAME`` in a spec (defaults or a variant).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

# Bases made on the build machine (vlmbuild.localbase): no registry digest exists for them; their image id is
# what a build records and checks.
LOCAL_BASE_PREFIX = "vlmbuild-local/"
DIGEST_RE = re.compile(r"^(?P<ref>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")


def split_digest(ref: str) -> tuple[str, str | None]:
    """('name:tag', 'sha256:...') of a pinned reference; (ref, None) of an unpinned one."""
    match = DIGEST_RE.match(ref)
    return (match.group("ref"), match.group("digest")) if match else (ref, None)


@dataclass(frozen=True)
class LocalRoot:
    """How a stand-in root of ``suite`` is made here (debootstrap, from the family's mirror)."""

    suite: str
    mirror: str
    components: tuple[str, ...] = ("main",)
    variant: str = "minbase"

    def command(self, target: str) -> list[str]:
        extra = [f"--components={','.join(self.components)}"] if self.components != ("main",) else []
        return ["debootstrap", f"--variant={self.variant}", *extra, self.suite, target, self.mirror]

    @property
    def recipe(self) -> str:
        """What the made image is labelled with: a base held under another recipe is made again."""
        components = f" [{','.join(self.components)}]" if self.components != ("main",) else ""
        return f"debootstrap --variant={self.variant} {self.suite}{components} {self.mirror}; /etc/hosts"


@dataclass(frozen=True)
class CudaToolkit:
    """Where nvcc and the CUDA headers come from when DeepSpeed's CUDA ops are compiled."""

    home: str  # CUDA_HOME for the op build and in the image
    packages: tuple[str, ...] = ()  # what the python-base stage installs for it; () when the base image carries it
    source: str = ""  # in words, for the Dockerfile's comments and the README
    install: str = ""  # shell of the RUN that installs it (with the build's secrets mounted); "" when packages is ()
    host_compiler: str = ""  # the C++ compiler nvcc accepts, when it is not the distribution's default g++
    version_check: str = ""  # shell that fails the build when the installed toolkit is not the spec's CUDA


@dataclass(frozen=True)
class BaseFamily:
    name: str
    description: str
    # shell of the python-base stage: install these packages, leaving nothing of the download behind
    install: Callable[[tuple[str, ...], str], str]
    python_command: Callable[[str], str]  # "3.11" -> the interpreter's command name
    stdlib_dir: Callable[[str], str]  # "3.11" -> where that Python's standard library lies (its bytecode is redone)
    python_packages: Callable[[str], tuple[str, ...]]  # what gives that Python, its venv, headers and a compiler
    local_root: Callable[[str], LocalRoot]  # suite -> how a stand-in root of it is made
    cuda_toolkit: Callable[[str, str], CudaToolkit]  # (CUDA version, scratch dir) -> where its toolkit comes from
    # files the package manager writes that record when the build ran: emptied (reproducible layers)
    build_records: tuple[str, ...] = field(default=())


FAMILIES: dict[str, BaseFamily] = {}
DEFAULT_FAMILY = "debian"


def register(family: BaseFamily) -> BaseFamily:
    FAMILIES[family.name] = family
    return family


def family(name: str) -> BaseFamily:
    return FAMILIES[name]


def _import_families() -> None:
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


_import_families()
