"""Progress a person can follow on long builds, smokes and pushes: a timestamped line per event (per build stage,
not per instruction: vlmbuild.buildkit decides what is an event), and a live status line on a terminal."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.text import Text


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    def __init__(self, title: str, tty: bool | None = None) -> None:
        self.title = title
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.console = Console(highlight=False, soft_wrap=True)
        self.started = time.monotonic()
        self.latest = "starting"
        self._status = None
        if self.tty:
            self._status = self.console.status(Text(self._status_text()))
            self._status.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _status_text(self) -> str:
        return f"{self.title}: {self.latest[:90]} ({_fmt(self.elapsed())})"

    def info(self, message: str) -> None:
        self.console.print(f"[{_fmt(self.elapsed()):>6}] {message}", markup=False)  # build output has [brackets]
        self.latest = message
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
