"""What the smoke's rank processes must never leave behind: themselves, and DeepSpeed's shared-memory buffers.

DeepSpeed's CPU communication (csrc/cpu/comm/shm.cpp) waits for its peers in a busy loop
(``wait_buffer_state_until``: ``while (*state_ptr != state);``). A rank whose launcher was killed before it could
stop the ranks (a SIGKILL from an outer timeout) spins at 100 % of a core for ever, and on a two-core machine two
such orphans starve every later smoke into its timeout. So a rank dies with its launcher (the kernel's
parent-death signal), whatever way the launcher goes.

The same code creates one buffer per rank in /dev/shm (``deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>``,
32-70 MB each) and unlinks them only on a clean ``shared_close``, which a finished run never reaches: they pile up,
and in Docker's default 64 MB /dev/shm the next run segfaults in ``shm_comm_op.initialize``. The launcher removes
the buffers of its own address and port once its ranks have ended.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

SHM = Path("/dev/shm")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _load_prctl():
    # Looked up here, in the launcher, not in the forked child: a dlopen between fork and exec can deadlock when
    # another thread of the parent (torch's) held the loader's lock at the fork.
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def die_with_parent(launcher: int, sig: int = signal.SIGKILL) -> None:
    """preexec_fn of a rank (``functools.partial(die_with_parent, os.getpid())``): SIGKILL it (or send ``sig``) when
    its launcher, pid ``launcher``, ends. Linux only; elsewhere a no-op."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, sig)
    if os.getppid() != launcher:  # the launcher died before the signal was armed
        os._exit(1)


def remove_shm_buffers(addr: str, port: int) -> None:
    """Unlink DeepSpeed's CPU-comm buffers of the ranks that met at ``addr:port`` (they have ended: nothing maps
    the buffers any more)."""
    if SHM.is_dir():
        for path in SHM.glob(f"deepspeed_*_{addr}_{port}_*"):
            path.unlink(missing_ok=True)


def leave_process_group() -> None:
    """Destroy the process group before the rank ends, as torch.distributed asks of every program (on GPU it
    aborts NCCL's communicators). No collective: a failed peer cannot hang it. It made the teardown abort that
    end_rank now avoids rarer (once in about ten runs on Python 3.13 without it), but did not end it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_rank(code: int) -> NoReturn:
    """End the rank with ``code`` once its results file is written and its process group destroyed, without the
    interpreter's teardown.

    Why: after the last collective, gloo's worker threads can still be dropping the finished work's tensors when
    the main thread reaches finalization. A thread that must take the GIL then is stopped by Python with
    pthread_exit, and inside a C++ destructor that is std::terminate: SIGABRT, "terminate called without an active
    exception" (the mechanism in pytorch/pytorch#179291, whose atexit fix upstream abandoned). On a loaded 2-core
    CI machine a rank that had reported every check passed died so, and the launcher rightly failed the run.
    multiprocessing ends its children with os._exit for the same reason. Nothing is lost: the results file is
    closed, nothing in a rank registers exit work, and the output streams (Python's and C's stdio, where native
    code prints) are flushed here."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to flush into it
            pass
    ctypes.CDLL(None).fflush(None)
    os._exit(code)
