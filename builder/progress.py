"""The one way the builder talks to a person: a timestamped line per event (per build stage, not per instruction:
vlmbuild.buildkit decides what is an event), blocks of text as they are (smoke summaries), errors, and a live
status line on a terminal.

On GitHub Actions (GITHUB_ACTIONS=true) every finished build stage and every smoke pass is a ``::group::`` fold
holding its output, and an error is an ``::error::`` annotation with a title naming what failed (the failing check),
so a failed job shows why on its summary page instead of at line 4,000 of its log
(https://docs.github.com/actions/reference/workflow-commands-for-github-actions).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.text import Text


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def on_github_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


class Progress:
    def __init__(self, title: str, tty: bool | None = None, github: bool | None = None) -> None:
        self.title = title
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.github = on_github_actions() if github is None else github
        self.console = Console(highlight=False, soft_wrap=True)
        self.errors = Console(highlight=False, soft_wrap=True, stderr=True)
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

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False)  # build output has [brackets]

    def info(self, message: str) -> None:
        self._line(f"[{_fmt(self.elapsed()):>6}] {message}")
        self.latest = message
        if self._status:
            self._status.update(Text(self._status_text()))

    def say(self, text: str) -> None:
        """A block of text as it is: a smoke summary, a warning with its explanation."""
        self._line(text)

    def fold(self, title: str, lines: Iterable[str]) -> None:
        """A finished part (a build stage): its title as an event; on GitHub Actions a fold holding its lines."""
        if not self.github:
            self.info(title)
            return
        self._line(f"::group::[{_fmt(self.elapsed()):>6}] {title}")
        for line in lines:
            self._line(line)
        self._line("::endgroup::")
        self.latest = title

    @contextmanager
    def group(self, title: str) -> Iterator[None]:
        """A part in progress (a smoke pass): on GitHub Actions everything said inside is one fold."""
        if self.github:
            self._line(f"::group::[{_fmt(self.elapsed()):>6}] {title}")
        else:
            self.info(title)
        try:
            yield
        finally:
            if self.github:
                self._line("::endgroup::")

    def error(self, message: str, title: str | None = None) -> None:
        """A failure, on stderr; on GitHub Actions also an annotation titled with what failed."""
        self.annotate(message, title)
        self.errors.print(message, markup=False)

    def annotate(self, message: str, title: str | None = None, level: str = "error") -> None:
        """On GitHub Actions only: an ``error`` (or ``warning``) annotation (for what was already told in the
        output)."""
        if self.github:
            head = f"::{level} title={_escape_property(title)}::" if title else f"::{level}::"
            self._line(head + _escape_data(message))

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
