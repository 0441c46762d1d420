"""The smoke's container is hardened (engine.run_smoke): the smoke runs whatever code an image holds, so an image
that eats memory or forks without bound ends at its limits with a message that says so, and the code in it has no
capability, cannot gain one, and reaches nothing outside. The images here are tiny stand-ins whose smoke entrypoint
misbehaves on purpose (a real image's smoke passing under the same hardening is every other docker test)."""

from __future__ import annotations

import io
import tarfile
import time

import pytest
from conftest import TEST_REPO, run_cli
from vlmbuild import contract

docker = pytest.importorskip("docker")
pytestmark = pytest.mark.docker

BASE = "vlmbuild-local/debian:bookworm"
# what each stand-in's smoke entrypoint does instead of a smoke
FAULTS = {
    "memory": "tail /dev/zero",  # tail keeps the last line, and /dev/zero has no newline: it grows until killed
    "fork": "i=0; while [ $i -lt 100000 ]; do sleep 120 & i=$((i+1)); done; echo started $i",
    "probe": ("grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; echo interfaces: $(tail -n +3 /proc/net/dev "
              "| cut -d: -f1); getent hosts deb.debian.org || echo no-name-resolution; "
              "chown 1:1 /etc/hostname 2>&1 || true; echo uid $(id -u)"),
}


@pytest.fixture(scope="module")
def stand_ins(client):
    from vlmbuild.engine import Engine

    Engine().resolve_base(BASE)  # made when missing
    made = {}
    for fault, script in FAULTS.items():
        entry = f"#!/bin/sh\n{script}\nexit 3\n".encode()
        dockerfile = (f"FROM {BASE}\nCOPY smoke /usr/local/bin/{contract.SMOKE_ENTRYPOINT}\n"
                      f"LABEL {contract.LABEL_SMOKE_ENTRYPOINT}={contract.SMOKE_ENTRYPOINT}\n").encode()
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as tar:
            for name, data in (("Dockerfile", dockerfile), ("smoke", entry)):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
        context.seek(0)
        ref = f"{TEST_REPO}-hardening:{fault}"
        client.images.build(fileobj=context, custom_context=True, tag=ref, rm=True)
        made[fault] = ref
    yield made
    for ref in made.values():
        client.images.remove(ref, force=True)


def test_an_image_that_eats_memory_is_killed_at_the_limit_and_the_message_says_so(stand_ins):
    started = time.monotonic()
    result = run_cli("smoke", stand_ins["memory"], "--device", "cpu", "--memory-gb", "1", "--timeout", "300")
    assert result.code == 1, result.out + result.err
    said = " ".join((result.out + result.err).split())
    assert "killed at its container's memory limit of 1 GB" in said and "smoke.memory_gb" in said, said
    assert time.monotonic() - started < 120  # ended at the limit, not at the timeout


def test_an_image_that_forks_without_bound_ends_at_the_task_limit_and_the_message_says_so(stand_ins):
    result = run_cli("smoke", stand_ins["fork"], "--device", "cpu", "--pids", "256", "--timeout", "300")
    assert result.code == 1, result.out + result.err
    said = " ".join((result.out + result.err).split())
    assert "ran out of processes: its container may run 256 tasks" in said and "smoke.pids" in said, said


def test_the_smoke_container_has_no_capability_no_way_to_gain_one_and_no_network(stand_ins):
    from vlmbuild.engine import Engine
    from vlmbuild.engine_api import SmokeLimits
    from vlmbuild.progress import Progress

    run = Engine().run_smoke(stand_ins["probe"], "cpu", 120, Progress("probe", tty=False, github=False),
                             limits=SmokeLimits())
    assert run.exit_code == 3 and not run.oom_killed, run.logs
    logs = run.logs
    assert "CapEff:\t0000000000000000" in logs and "CapBnd:\t0000000000000000" in logs, logs  # none, none to regain
    assert "NoNewPrivs:\t1" in logs, logs  # a setuid binary gives nothing
    assert "interfaces: lo" in logs.replace("  ", " ") and "no-name-resolution" in logs, logs  # nothing outside
    assert "Operation not permitted" in logs and "uid 0" in logs, logs  # root, but without CAP_CHOWN
