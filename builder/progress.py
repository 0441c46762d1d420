"""Progress a person can follow on long builds and pushes; a plain, timestamped log when not on a terminal."""

from __future__ import annotations

import re
import sys
import time
from collections import deque

from rich.console import Console
from rich.text import Text

STEP_RE = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
STAGE_RE = re.compile(r"^FROM \S+(?: AS (\S+))?", re.I)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Fed with build/push events; keeps the last output lines for error reports."""

    def __init__(self, title: str, tty: bool | None = None, keep: int = 30) -> None:
        self.title = title
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.console = Console(highlight=False, soft_wrap=True)
        self.started = time.monotonic()
        self.step_started = self.started
        self.step = (0, 0, "")
        self.stage = ""
        self.last_lines: deque[str] = deque(maxlen=keep)
        self._status = None
        if self.tty:
            self._status = self.console.status(Text(self._status_text()))
            self._status.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _status_text(self) -> str:
        n, total, text = self.step
        where = f" [{self.stage}]" if self.stage else ""
        return f"{self.title}: step {n}/{total}{where} {text[:70]} ({_fmt(time.monotonic() - self.step_started)} in step, {_fmt(self.elapsed())} total)"

    def info(self, message: str) -> None:
        self.console.print(f"[{_fmt(self.elapsed()):>6}] {message}", markup=False)  # build output has [brackets]

    def build_line(self, line: str) -> None:
        line = line.rstrip("\n")
        if not line.strip():
            return
        m = STEP_RE.match(line)
        if m:
            n, total, text = int(m.group(1)), int(m.group(2)), m.group(3)
            if self.step[0]:
                self.info(f"  step {self.step[0]}/{self.step[1]} done in {_fmt(time.monotonic() - self.step_started)}")
            stage = STAGE_RE.match(text)
            if stage:
                self.stage = stage.group(1) or "final"
            self.step, self.step_started = (n, total, text), time.monotonic()
            self.info(f"step {n}/{total} [{self.stage}] {text[:160]}")
            self.last_lines.clear()
        else:
            self.last_lines.append(line)
            if line.startswith(" ---> Using cache"):
                self.info("  (cached)")
        if self._status:
            self._status.update(Text(self._status_text()))

    def push_event(self, event: dict, layers: dict[str, str]) -> None:
        layer, status = event.get("id"), event.get("status", "")
        if not layer or status == layers.get(layer):
            return
        layers[layer] = status
        detail = event.get("progressDetail") or {}
        if status in ("Pushed", "Layer already exists", "Mounted from"):
            self.info(f"  layer {layer}: {status.lower()}")
        elif self._status and detail.get("total"):
            self._status.update(Text(f"{self.title}: layer {layer} {status} {detail['current'] / 1e6:.0f}/"
                                     f"{detail['total'] / 1e6:.0f} MB ({_fmt(self.elapsed())})"))

    def close(self) -> None:
        if self._status:
            self._status.stop()
            self._status = None
