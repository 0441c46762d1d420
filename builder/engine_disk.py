"""What the Docker engine's storage holds on disk, against what the engine says it holds.

``docker system df`` counts image layers, containers' writable layers and BuildKit's cache records. The bytes
under the storage driver's directory that none of those count belong to nothing the engine will ever remove:
``docker system prune -af`` and ``docker builder prune -af`` do not reach them (moby/moby#45939, #47089,
docker/buildx#2061). A build host that leaks them fills its disk while every prune reports nothing to reclaim.

The measure is du's, of the driver's directory (one file system, each inode once), minus the engine's own
accounting. du needs to read the engine's storage: without that (a remote DOCKER_HOST, not root) the unaccounted
bytes are unknown, and said so, never guessed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import docker


@dataclass(frozen=True)
class EngineDisk:
    storage: str  # the storage driver's directory: DockerRootDir/Driver
    on_disk: int | None  # du's bytes under it; None when this process cannot read it
    images: int  # the layers of every image, each once (the API's LayersSize)
    containers: int  # containers' writable layers
    build_cache: int  # BuildKit's cache records, less those shared with an image (counted in images)
    free: int  # free bytes on the file system that holds the storage

    @property
    def accounted(self) -> int:
        return self.images + self.containers + self.build_cache

    @property
    def unaccounted(self) -> int | None:
        return None if self.on_disk is None else max(0, self.on_disk - self.accounted)

    def as_dict(self) -> dict:
        return {"storage": self.storage, "on_disk": self.on_disk, "images": self.images,
                "containers": self.containers, "build_cache": self.build_cache, "accounted": self.accounted,
                "unaccounted": self.unaccounted, "free": self.free}


def du_bytes(path: Path) -> int | None:
    """Bytes allocated under ``path`` on its own file system (du -sx: the merged mounts of running containers
    are other file systems, and hard-linked files count once); None when it cannot all be read."""
    if not path.is_dir():
        return None
    proc = subprocess.run(["du", "-sx", "--block-size=1", str(path)], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.split():
        return None
    return int(proc.stdout.split()[0])


# dockerd before 23.0 answers a second `system df` while one runs with an error instead of the same answer (its
# SystemDiskUsage is a compare-and-swap flag; 23.0 made it a singleflight): two builds checking the disk at once
# failed one of them with "a disk usage operation is already running". Such an answer is asked again.
DF_BUSY = "a disk usage operation is already running"
DF_WAIT_S = 300


def disk_usage(client, wait_s: float = DF_WAIT_S) -> dict:
    """The engine's `system df`, asked again while another client's is running (up to ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    delay = 0.2
    while True:
        try:
            return client.df()
        except docker.errors.APIError as exc:
            if DF_BUSY not in str(exc.explanation or exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def measure(client) -> EngineDisk:
    """The engine's storage as du sees it and as the engine counts it."""
    info = client.info()
    root = Path(info.get("DockerRootDir") or "/var/lib/docker")
    storage = root / (info.get("Driver") or "overlay2")
    usage = disk_usage(client)
    images = int(usage.get("LayersSize") or 0)
    containers = sum(int(c.get("SizeRw") or 0) for c in usage.get("Containers") or [])
    build_cache = sum(int(r.get("Size") or 0) for r in usage.get("BuildCache") or [] if not r.get("Shared"))
    # free space is read where the storage is when this host can see it, else where we are (a guess, and the
    # only one available to a client of a remote engine)
    free = shutil.disk_usage(root if root.is_dir() else Path.cwd()).free
    return EngineDisk(str(storage), du_bytes(storage), images, containers, build_cache, free)


def required_free(disk: EngineDisk, cold_build: int, nocache: bool = False) -> int:
    """The free bytes a build needs: a cold build's, less what BuildKit's cache holds (it may serve part of the
    build: a warm rebuild takes next to nothing), unless the build ignores the cache. Errs towards starting a
    build whose cache is of something else: it never refuses one that would fit. `vlmbuild doctor`, `plan` and
    the gate all ask this one question."""
    return cold_build if nocache else max(0, cold_build - disk.build_cache)


def gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:.1f} GB"


def describe(disk: EngineDisk) -> str:
    """One line for a person: what the engine holds, and what nothing holds."""
    unaccounted = ("unaccounted: unknown (this process cannot read the engine's storage)"
                   if disk.unaccounted is None else f"unaccounted: {gb(disk.unaccounted)}")
    return (f"engine storage {disk.storage}: {gb(disk.on_disk)} on disk; images {gb(disk.images)}, containers "
            f"{gb(disk.containers)}, build cache {gb(disk.build_cache)}; {unaccounted}; {gb(disk.free)} free")
