"""The local base image: a Debian bookworm root made with debootstrap and imported into the engine.

Our machines reach no container registry (no ``docker pull``), but they reach Debian's packages. The
production base stays ``nvidia/cuda:...`` in the spec; this one is only ever a parameter (the local
variant's ``base_image``, or ``--base-image``), never a fork of the template.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import VlmbuildError

LOCAL_BASE = "vlmbuild-local/debian:bookworm"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
RECIPE_LABEL = "io.vlmbuild.local-base"
# How the root is made; a base the engine holds under another recipe is made again.
RECIPE = f"debootstrap --variant=minbase {SUITE} {MIRROR}; /etc/hosts"
# debootstrap writes no /etc/hosts. BuildKit then creates one as a mount point in every RUN and takes it out again,
# which leaves /etc with the build's time in every layer (moby/buildkit#3153): the root carries one.
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def ensure_local_base(client, ref: str = LOCAL_BASE, echo=print) -> str:
    """The image id of ``ref``, made with debootstrap first when the engine lacks it (or holds an older recipe's)."""
    import docker

    try:
        image = client.images.get(ref)
        if (image.labels or {}).get(RECIPE_LABEL) == RECIPE:
            return image.id
        echo(f"the local base {ref} was made by an older recipe: making it again")
    except docker.errors.ImageNotFound:
        pass
    if shutil.which("debootstrap") is None:
        raise VlmbuildError(f"the local base {ref} is missing and debootstrap is not installed "
                            "(apt-get install debootstrap, or run .ci/setup)")
    started = time.monotonic()
    echo(f"making the local base image {ref} with debootstrap ({SUITE}, minbase)")
    with tempfile.TemporaryDirectory(prefix="vlmbuild-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), MIRROR],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
            raise VlmbuildError(f"debootstrap of {SUITE} failed:\n{tail}")
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
                     f'LABEL {RECIPE_LABEL}="{RECIPE}"'],
        )
    image_id = client.images.get(ref).id
    echo(f"made {ref} ({image_id[:19]}) in {time.monotonic() - started:.0f}s")
    return image_id
