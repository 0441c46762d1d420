"""Builds take turns on an engine with moby/moby#46136 (vlmbuild.build_turns): the versions, and the turn itself
between two processes. The leak the turns prevent is measured by test_pipeline_docker: its race of two builds
comes before the cold rebuild, whose bound on unowned storage caught the race's 7 GB every time without them."""

import subprocess
import sys
import threading
import uuid

import pytest
from vlmbuild.build_turns import build_turn, leaks_concurrent_exports, lock_path
from vlmbuild.progress import Progress


@pytest.mark.parametrize("version, leaks", [
    ("20.10.24+dfsg1", True),  # Debian 12's docker.io: this machine's
    ("23.0.10", True), ("23.0.11", False), ("23.0.15", False),
    ("24.0.9", True),  # the 24.0 backport never shipped
    ("25.0.4", True), ("25.0.5", False),
    ("26.0.0", False), ("28.2.2", False),
    ("", True), ("dev", True),  # not read as dockerd's: it waits (time is all that costs)
])
def test_the_engines_that_need_turns_are_the_ones_before_the_fix(version, leaks):
    assert leaks_concurrent_exports(version) is leaks


HOLDER = """
import sys
from vlmbuild.build_turns import build_turn
from vlmbuild.progress import Progress
with build_turn(sys.argv[1], "20.10.24", Progress("holder", tty=False, github=False)):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture
def engine_id():
    engine = f"test-{uuid.uuid4().hex}"
    yield engine
    lock_path(engine).unlink(missing_ok=True)


def start_holder(engine: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, engine], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def take_turn_in_thread(engine: str, version: str) -> threading.Event:
    got = threading.Event()

    def take():
        with build_turn(engine, version, Progress("second", tty=False, github=False)):
            got.set()

    threading.Thread(target=take, daemon=True).start()
    return got


def test_a_second_build_on_an_affected_engine_waits_for_the_first_and_says_why(engine_id, capsys):
    holder = start_holder(engine_id)
    try:
        got = take_turn_in_thread(engine_id, "20.10.24+dfsg1")
        assert not got.wait(1.5), "the second build took a turn another process held"
        said = " ".join(capsys.readouterr().out.split())
        assert "waiting for another build on this engine" in said and "moby/moby#46136" in said, said
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert got.wait(30), "the turn was not handed on when the first build ended"


def test_a_dead_holder_hands_the_turn_on(engine_id):
    """A build killed with SIGKILL holds no turn: the kernel drops the lock with the process."""
    holder = start_holder(engine_id)
    got = take_turn_in_thread(engine_id, "20.10.24")
    assert not got.wait(0.5)
    holder.kill()
    holder.wait(timeout=30)
    assert got.wait(30)


def test_a_fixed_engine_builds_side_by_side(engine_id, capsys):
    holder = start_holder(engine_id)
    try:
        assert take_turn_in_thread(engine_id, "26.1.5").wait(30)
        assert "waiting" not in capsys.readouterr().out
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
