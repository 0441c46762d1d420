"""Storage directories of the engine that nothing references, and reclaiming them while the engine is stopped.

dockerd's BuildKit, on a graph-driver engine (overlay2; every dockerd without the containerd image store), runs each
step in a directory of its own. When it exports the result, the layer store registers that directory as the layer;
but when the layer store already holds a layer of the same chain (an image still tagged holds the very bytes, which
reproducible builds make the rule: a rebuild after a prune, a `--no-cache` build, a bumped package whose lower layers
run again), ``RegisterByGraphID`` hands back the existing layer and the new directory belongs to no one. BuildKit's
snapshotter, on removing that cache record, releases the layer and never removes the directory
(builder/builder-next/adapters/snapshot/snapshot.go, ``remove``: a snapshot with a layer is released, not removed).
No prune, no image removal and no restart reaches it; moby/moby#45939 and docker/buildx#2061 are users meeting it.
Measured here: a 200 MB layer rebuilt with ``--no-cache`` while its first image is tagged leaves 200 MB that
survives ``docker builder prune -af``, ``docker rmi`` and a dockerd restart.

The engine has no API that removes them, and deleting under its storage while it runs races its own bookkeeping (a
step's directory exists a moment before BuildKit records it). So finding is read-only and safe at any time, and
reclaiming refuses while any dockerd process lives.

A directory is referenced when its name is a layer's ``cache-id``, a container mount's ``mount-id`` or ``init-id``
(the layer store's files under image/<driver>/layerdb), or appears anywhere in BuildKit's databases
(buildkit/*.db: a snapshot key or the directory it was committed to). The last test is by bytes, so a name left in
a free page of those databases keeps its directory: it errs towards keeping.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .engine_disk import du_bytes
from .errors import VlmbuildError


@dataclass(frozen=True)
class Orphan:
    name: str  # the directory's name under the storage driver's directory
    size: int | None  # du's bytes; None when it cannot be read


def referenced_names(root: Path, driver: str = "overlay2") -> set[str]:
    """The storage directories the layer store knows: each layer's cache-id, each container's mount-id and
    init-id."""
    layerdb = root / "image" / driver / "layerdb"
    names = set()
    for pattern in ("sha256/*/cache-id", "mounts/*/mount-id", "mounts/*/init-id"):
        for f in layerdb.glob(pattern):
            names.add(f.read_text().strip())
    return names


def buildkit_bytes(root: Path) -> bytes:
    """Every byte of BuildKit's databases (the snapshot keys, the directories they were committed to)."""
    return b"".join(f.read_bytes() for f in sorted((root / "buildkit").glob("*.db")) if f.is_file())


def find_orphans(root: Path, driver: str = "overlay2", sizes: bool = True) -> list[Orphan]:
    """The directories under ``root/driver`` that neither the layer store nor BuildKit references, largest first.
    VlmbuildError when the storage cannot be read (not root; a remote engine's)."""
    storage = root / driver
    if not os.access(storage, os.R_OK | os.X_OK) or not (root / "image" / driver).is_dir():
        raise VlmbuildError(f"cannot read the engine's storage at {storage} (run as root on the engine's host)")
    known = referenced_names(root, driver)
    recorded = buildkit_bytes(root)
    orphans = []
    for entry in storage.iterdir():
        # l/ holds the short links overlay2 mounts through; the rest are layer directories
        if entry.name == "l" or not entry.is_dir() or entry.name in known or entry.name.encode() in recorded:
            continue
        orphans.append(Orphan(entry.name, du_bytes(entry) if sizes else None))
    return sorted(orphans, key=lambda o: (-(o.size or 0), o.name))


def dockerd_running() -> list[int]:
    """The pids of live dockerd processes on this host."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == "dockerd":
                    pids.append(int(proc.name))
            except OSError:
                continue  # gone while we looked
    return pids


def reclaim(root: Path, driver: str = "overlay2") -> list[Orphan]:
    """Remove the orphaned directories (and overlay2's short link to each); what was removed. Refuses while any
    dockerd runs: the engine's own bookkeeping must be at rest."""
    running = dockerd_running()
    if running:
        raise VlmbuildError(f"dockerd is running (pid {', '.join(map(str, running))}): reclaiming its storage "
                            f"behind a running engine races its bookkeeping; stop it first, then run this again")
    return remove_orphans(root, driver)


def remove_orphans(root: Path, driver: str = "overlay2") -> list[Orphan]:
    """reclaim's work, for an engine known to be at rest."""
    mounted = Path("/proc/self/mounts").read_text()
    removed = []
    for orphan in find_orphans(root, driver):
        directory = root / driver / orphan.name
        if str(directory) in mounted:
            continue  # something still mounts it: not ours to judge
        link_file = directory / "link"
        if link_file.is_file():
            link = root / driver / "l" / link_file.read_text().strip()
            if link.is_symlink() and os.readlink(link).startswith(f"../{orphan.name}/"):
                link.unlink()
        shutil.rmtree(directory)
        removed.append(orphan)
    return removed
