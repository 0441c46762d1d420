"""Build progress: steps, stages and the last output lines kept for error reports, on a terminal or not."""

from __future__ import annotations

import pytest
from vlmbuild.progress import Progress


@pytest.mark.parametrize("tty", [False, True])
def test_progress_follows_steps_stages_and_keeps_the_last_lines(tty, capsys):
    p = Progress("build x", tty=tty, keep=3)
    p.build_line("Step 1/3 : FROM base AS layer-torch")
    for i in range(5):
        p.build_line(f"output {i}")
    p.build_line("Step 2/3 : RUN false")
    p.build_line("boom")
    p.push_event({"id": "abc", "status": "Pushing", "progressDetail": {"current": 5e6, "total": 1e7}}, {})
    p.push_event({"id": "abc", "status": "Pushed"}, {})
    p.close()
    assert p.step[:2] == (2, 3) and p.stage == "layer-torch"
    assert list(p.last_lines) == ["boom"]  # a new step starts a fresh tail
    out = capsys.readouterr().out
    assert "step 1/3 [layer-torch]" in out and "layer abc: pushed" in out
