"""A local base image: a root of the named suite made with debootstrap and imported into the engine.

Our machines reach no container registry (no ``docker pull``), but they reach the distributions' packages. The
production base stays pinned by digest in the spec; a local one is only ever a parameter (a variant's
``base_image`` or ``--base-image``), never a fork of the template. Its name says what to make:
``vlmbuild-local/<family>:<suite>`` (``vlmbuild-local/debian:bookworm``); the family (vlmbuild.bases) says how.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .bases import FAMILIES, LOCAL_BASE_PREFIX, LocalRoot
from .errors import VlmbuildError

RECIPE_LABEL = "io.vlmbuild.local-base"
# debootstrap writes no /etc/hosts. BuildKit then creates one as a mount point in every RUN and takes it out again,
# which leaves /etc with the build's time in every layer (moby/buildkit#3153): the root carries one.
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def local_root_for(ref: str) -> LocalRoot:
    """How the root ``vlmbuild-local/<family>:<suite>`` is made."""
    name, _, suite = ref.removeprefix(LOCAL_BASE_PREFIX).partition(":")
    if not ref.startswith(LOCAL_BASE_PREFIX) or not suite or name not in FAMILIES:
        raise VlmbuildError(f"{ref}: a local base is named {LOCAL_BASE_PREFIX}<family>:<suite>, with a family of "
                            f"vlmbuild/bases ({', '.join(sorted(FAMILIES))}), e.g. {LOCAL_BASE_PREFIX}debian:bookworm")
    return FAMILIES[name].local_root(suite)


def ensure_local_base(client, ref: str, echo=print) -> str:
    """The image id of ``ref``, made with debootstrap first when the engine lacks it (or holds an older recipe's)."""
    import docker

    root = local_root_for(ref)
    try:
        image = client.images.get(ref)
        if (image.labels or {}).get(RECIPE_LABEL) == root.recipe:
            return image.id
        echo(f"the local base {ref} was made by an older recipe: making it again")
    except docker.errors.ImageNotFound:
        pass
    if shutil.which("debootstrap") is None:
        raise VlmbuildError(f"the local base {ref} is missing and debootstrap is not installed "
                            "(apt-get install debootstrap, or run .ci/setup)")
    started = time.monotonic()
    echo(f"making the local base image {ref}: {root.recipe}")
    with tempfile.TemporaryDirectory(prefix="vlmbuild-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(root.command(str(rootfs)), capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
            raise VlmbuildError(f"debootstrap of {root.suite} failed:\n{tail}")
        # apt's lists and the .deb cache are not part of a base image
        for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        (rootfs / "etc" / "hosts").write_text(HOSTS)
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], check=True)
        repository, tag = ref.rsplit(":", 1)
        client.api.import_image_from_file(
            str(tarball), repository=repository, tag=tag,
            changes=['CMD ["bash"]', 'ENV LANG=C.UTF-8',
                     f'LABEL {RECIPE_LABEL}="{root.recipe}"'],
        )
    image_id = client.images.get(ref).id
    echo(f"made {ref} ({image_id[:19]}) in {time.monotonic() - started:.0f}s")
    return image_id
