"""Builds on one engine take turns where that engine's BuildKit leaks the layers two builds export at once.

dockerd's BuildKit adapter turned a build's snapshot into a layer without a lock (moby/moby#46136): two builds
exporting the same new layers at once both register them, one reference is dropped, and the layer store keeps
the layers for good. No image, container, cache record or prune owns them, and they outlive a restart. Fixed by
moby/moby#47523 in 23.0.11, 25.0.5 and 26.0.0 (its 24.0 backport never shipped in a release); Debian 12's
docker.io 20.10 has it. Measured here: two builds of `local` with changed smoke code, started together, left
the image's 26 layers above the base, 6.8 GB, held by nothing once every image and cache record was gone
(docs/benchmarks.md).

On such an engine a build waits for a lock file named by the engine's ID: every vlmbuild process of this host
that builds on that engine takes the same one. Only BuildKit's part waits (a second build of the same inputs
then finds every layer cached); smokes, pushes and tags run side by side as before. A build started from another
host on the same engine does not see this host's lock.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .progress import Progress

# The first release of each line with moby/moby#47523; a line not named here is before it (24.0) or after it (26+).
FIXED_IN = {(23, 0): (23, 0, 11), (25, 0): (25, 0, 5)}
FIRST_FIXED_LINE = (26, 0)


def leaks_concurrent_exports(engine_version: str) -> bool:
    """Whether dockerd of this version (its `Version`, "20.10.24+dfsg1") has moby/moby#46136. A version that
    does not read as dockerd's (another engine, a dev build) is taken as having it: waiting costs only time."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", engine_version or "")
    if not match:
        return True
    major, minor, patch = (int(part) for part in match.groups())
    if (major, minor) >= FIRST_FIXED_LINE:
        return False
    fixed = FIXED_IN.get((major, minor))
    return fixed is None or (major, minor, patch) < fixed


def lock_path(engine_id: str) -> Path:
    """One file per engine, in the host's temporary directory so that every user's builds on it meet there."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", engine_id or "unknown")
    return Path(tempfile.gettempdir()) / f"vlmbuild-build-turn-{safe}.lock"


def _open_shared(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # made by another user with a umask that took write away: a read fd locks as well
        return os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o666)  # so that another user's builds can open it too
    except PermissionError:
        pass  # not ours to change
    return fd


@contextmanager
def build_turn(engine_id: str, engine_version: str, progress: Progress) -> Iterator[None]:
    """Hold this engine's build turn for the body where the engine needs builds to take turns; else nothing."""
    if not leaks_concurrent_exports(engine_version):
        yield
        return
    fd = _open_shared(lock_path(engine_id))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.info(f"waiting for another build on this engine to finish: dockerd {engine_version} leaks "
                          "the layers of two builds exported at once (moby/moby#46136)")
            fcntl.flock(fd, fcntl.LOCK_EX)  # a signal still ends the wait: its handler raises
        yield
    finally:
        os.close(fd)  # closing releases the lock
