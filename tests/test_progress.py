"""Progress a person can follow: BuildKit's plain output turned into one line per stage, failures with their
step and last output lines; on a terminal or not."""

from __future__ import annotations

import pytest
from vlmbuild.buildkit import PlainLog
from vlmbuild.progress import Progress

# What `docker build --progress=plain` prints (BuildKit 0.8, dockerd 20.10), shortened.
PLAIN = """\
#1 [internal] load build definition from Dockerfile
#1 DONE 0.0s
#4 [python-base 1/2] FROM docker.io/vlmbuild-local/debian:bookworm
#4 DONE 0.0s
#5 [python-base 2/2] RUN apt-get update
#5 CACHED
#7 [pkg-trl 1/1] RUN uv pip install -r /tmp/requirements.txt
#7 0.512 Resolved 1 package
#9 [layer-torch 1/1] RUN uv pip install -r /tmp/requirements.txt
#7 0.913 Installed 1 package
#7 DONE 1.1s
#9 3.0 error: Hash mismatch for `torch==2.6.0`
#9 ERROR: executor failed running [/bin/bash -o pipefail -c uv pip install]: exit code: 1
------
error: failed to solve: executor failed running [/bin/bash -o pipefail -c uv pip install]: exit code: 1
"""


@pytest.mark.parametrize("tty", [False, True])
def test_buildkit_output_becomes_one_line_per_stage(tty, capsys):
    progress = Progress("build x", tty=tty)
    log = PlainLog(progress)
    for line in PLAIN.splitlines():
        log.feed(line)
    progress.close()
    out = capsys.readouterr().out
    assert "stage python-base: cached" in out
    assert "stage pkg-trl: running (1 step)" in out and "stage pkg-trl: done in" in out
    assert "RUN apt-get" not in out and "Resolved 1 package" not in out  # no line per instruction or output
    failure = log.failure()
    assert failure.startswith("build failed at [layer-torch 1/1] RUN uv pip install")
    assert "Hash mismatch for `torch==2.6.0`" in failure and "exit code: 1" in failure


def test_push_progress_names_each_layer(capsys):
    progress = Progress("push x", tty=False)
    layers: dict[str, str] = {}
    progress.push_event({"id": "abc", "status": "Pushing", "progressDetail": {"current": 5e6, "total": 1e7}}, layers)
    progress.push_event({"id": "abc", "status": "Pushed"}, layers)
    progress.push_event({"id": "abc", "status": "Pushed"}, layers)
    progress.close()
    assert capsys.readouterr().out.count("layer abc: pushed") == 1


def test_on_github_actions_each_finished_stage_is_a_fold_holding_its_output(capsys):
    progress = Progress("build x", tty=False, github=True)
    log = PlainLog(progress)
    for line in PLAIN.splitlines():
        log.feed(line)
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("::group::") and "stage pkg-trl: done in" in line)
    assert out[start + 1:start + 4] == ["Resolved 1 package", "Installed 1 package", "::endgroup::"]
    assert any(line.startswith("::group::") and "stage python-base: cached" in line for line in out)


def test_elsewhere_a_stage_is_one_line_and_no_workflow_command_is_printed(capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    progress = Progress("build x", tty=False)
    for line in PLAIN.splitlines():
        PlainLog(progress).feed(line)
    with progress.group("smoke pass on CPU"):
        progress.say("RESULT: PASS")
    progress.error("broken", title="smoke check grpo failed")
    captured = capsys.readouterr()
    assert "::" not in captured.out and "smoke pass on CPU" in captured.out
    assert captured.err.strip() == "broken"


def test_on_github_actions_a_failure_is_an_annotation_naming_what_failed(capsys):
    progress = Progress("build x", tty=False, github=True)
    with progress.group("smoke pass on CPU"):
        progress.say("inside")
    progress.error("zero3_load: 3 tensors differ\n100% of them", title="smoke check zero3_load failed, on CPU")
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("::group::") and lines[0].endswith("smoke pass on CPU")
    assert lines[1:3] == ["inside", "::endgroup::"]
    # the workflow-command escapes: newlines and % in the message, also : and , in the title
    assert lines[3] == "::error title=smoke check zero3_load failed%2C on CPU::zero3_load: 3 tensors differ%0A100%25 of them"
    assert captured.err.startswith("zero3_load: 3 tensors differ")
