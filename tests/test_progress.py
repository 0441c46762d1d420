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
