"""vlmbuild.owner: a container's maker is judged gone only when it provably is (real processes, no mocks)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from vlmbuild import owner


def test_this_process_is_not_gone():
    assert not owner.is_gone(owner.mark())
    assert owner.mark().split("/")[2] == str(os.getpid())


def test_a_process_that_exited_is_gone():
    proc = subprocess.Popen(["sleep", "30"])
    mark = owner.mark(proc.pid)
    assert not owner.is_gone(mark)
    proc.kill()
    proc.wait()
    assert owner.is_gone(mark)


def test_a_reused_pid_is_not_its_old_process():
    """Same host, same boot, same pid, another start time: another process (pids are reused)."""
    host, boot, pid, started = owner.mark().split("/")
    assert owner.is_gone(f"{host}/{boot}/{pid}/{int(started) + 1}")


def test_a_process_of_an_earlier_boot_is_gone():
    host, _, pid, started = owner.mark().split("/")
    assert owner.is_gone(f"{host}/00000000-0000-0000-0000-000000000000/{pid}/{started}")


def test_marks_of_another_host_or_not_ours_are_never_judged():
    _, boot, pid, started = owner.mark().split("/")
    assert not owner.is_gone(f"not-{socket.gethostname()}/{boot}/999999999/{started}")
    for foreign in ("", "evidence", "a/b/c", "a/b/not-a-pid/d", "a/b/c/d/e"):
        assert not owner.is_gone(foreign), foreign


def test_a_command_name_with_spaces_and_parentheses_is_read_past(tmp_path):
    """/proc/<pid>/stat's second field is the command name in parentheses, and it may hold both."""
    odd = tmp_path / "a) b (c"
    odd.symlink_to(shutil.which("sleep"))
    proc = subprocess.Popen([str(odd), "30"])
    try:
        time.sleep(0.2)
        assert "(a) b (c)" in (owner.PROC / str(proc.pid) / "stat").read_text()
        assert owner.start_time(proc.pid) == owner.mark(proc.pid).split("/")[3] != "None"
        assert not owner.is_gone(owner.mark(proc.pid))
    finally:
        proc.kill()
        proc.wait()
