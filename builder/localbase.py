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


def is_local_base(ref: str) -> bool:
    return ref == LOCAL_BASE


def ensure_local_base(client, ref: str = LOCAL_BASE, echo=print) -> str:
    """The image id of ``ref``, made with debootstrap first when the engine lacks it."""
    import docker

    try:
        return client.images.get(ref).id
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
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], check=True)
        repository, tag = ref.rsplit(":", 1)
        client.api.import_image_from_file(
            str(tarball), repository=repository, tag=tag,
            changes=['CMD ["bash"]', 'ENV LANG=C.UTF-8',
                     f'LABEL io.vlmbuild.local-base="debootstrap --variant=minbase {SUITE} {MIRROR}"'],
        )
    image_id = client.images.get(ref).id
    echo(f"made {ref} ({image_id[:19]}) in {time.monotonic() - started:.0f}s")
    return image_id
