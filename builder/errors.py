"""Errors as values with a message for a person; the CLI turns them into exit codes.

Exit codes everywhere: 0 ok; 1 the thing checked is bad (rule violated, lock stale, smoke failed);
2 bad input, bad usage, or an environment we cannot work in (no Docker daemon, say).
"""

from __future__ import annotations


class VlmbuildError(Exception):
    """Bad input or an environment we cannot work in: exit 2."""

    exit_code = 2


class CheckFailed(VlmbuildError):
    """What was checked is bad (a rule violated, a lockfile stale, a smoke failed): exit 1."""

    exit_code = 1


class SpecError(VlmbuildError):
    """An image spec is invalid. Names the file and the key path, says what was expected."""

    def __init__(self, path: object, key: str, message: str) -> None:
        self.path, self.key = str(path), key
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")
