"""Which process a container of ours belongs to, and whether that process is gone.

Every path out of a vlmbuild run removes the containers it started (vlmbuild.engine.Engine.container), except the
one no process can act on: SIGKILL, an OOM kill, a machine that goes down. Those leave a container (and its
writable layer) that nothing owns. Each container we create carries a mark naming its process; a later run removes
the containers whose process is provably gone, and never one whose process may still be running.

The mark is ``host/boot_id/pid/start_time``: a pid alone is reused, and after a reboot it certainly is; the boot id
(Linux's /proc/sys/kernel/random/boot_id) and the process's start time (field 22 of /proc/<pid>/stat, in clock
ticks since boot) make it name one process of one boot. A mark from another host (a remote DOCKER_HOST shared by
several machines) is never judged gone: this host cannot see that host's processes.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PROC = Path("/proc")


def boot_id() -> str:
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return "unknown"


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None when no such process exists."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or parentheses: split after the last ')'
    return stat[stat.rindex(")") + 2:].split()[19]


def mark(pid: int | None = None) -> str:
    """The mark of process ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{boot_id()}/{pid}/{start_time(pid)}"


def is_gone(owner: str) -> bool:
    """True only when ``owner`` names a process of this host that is no longer running."""
    try:
        host, boot, pid, started = owner.split("/")
        pid_number = int(pid)
    except ValueError:
        return False  # not a mark we wrote: not ours to judge
    if host != socket.gethostname():
        return False
    if boot != boot_id():
        return True  # the machine rebooted since: every process of that boot is gone
    return start_time(pid_number) != started
