"""The spec loader's checks of one value at a key path: each failure a SpecError naming the file and the key."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name

from .errors import SpecError
from .spec_model import MODULE_RE, SHA256_RE, Wheel


class SpecChecker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, message: str) -> SpecError:
        return SpecError(self.path, key, message)

    def mapping(self, value: Any, key: str, allowed: set[str] | None = None, required: set[str] | frozenset[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            unknown = sorted(set(map(str, value)) - allowed)
            if unknown:
                raise self.fail(f"{key}.{unknown[0]}" if key else unknown[0],
                                f"unknown key; allowed keys: {', '.join(sorted(allowed))}")
        for req in sorted(required):
            if req not in value:
                raise self.fail(f"{key}.{req}" if key else req, "missing (required)")
        return value

    def string(self, value: Any, key: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string{' (' + what + ')' if what else ''}, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(key, f"expected {what or 'a value matching ' + pattern.pattern}, got {value!r}")
        return value

    def modules(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(m, str) and MODULE_RE.match(m) for m in value):
            raise self.fail(key, f"expected a list of importable module names such as [math_verify, antlr4], got {value!r}")
        return tuple(value)

    def specifier(self, name: str, value: Any, key: str) -> str:
        if value is None or value == "":
            return ""
        if not isinstance(value, str):
            raise self.fail(key, f"expected a version specifier string such as '==2.6.0', got {value!r}")
        try:
            SpecifierSet(value)
            Requirement(f"{name}{value}")
        except (InvalidSpecifier, InvalidRequirement) as exc:
            raise self.fail(key, f"invalid version specifier {value!r}: {exc}") from None
        return value

    def packages(self, value: Any, key: str) -> dict[str, str | None]:
        self.mapping(value, key)
        out: dict[str, str | None] = {}
        for name, spec in value.items():
            if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
                raise self.fail(f"{key}.{name}", "expected a package name")
            # null in a variant removes a package inherited from defaults
            out[canonicalize_name(name)] = None if spec is None else self.specifier(name, spec, f"{key}.{name}")
        return out

    def wheels(self, value: Any, key: str) -> dict[str, Wheel]:
        self.mapping(value, key)
        out: dict[str, Wheel] = {}
        for name, raw in value.items():
            k = f"{key}.{name}"
            self.mapping(raw, k, allowed={"url", "sha256", "left_out"}, required={"url", "sha256"})
            url = self.string(raw["url"], f"{k}.url", re.compile(r"^(https|file)://\S+\.whl$"),
                              "an https:// (or file://) URL of a .whl file")
            left_out = raw.get("left_out")
            if raw["sha256"] is None:
                if not left_out:
                    raise self.fail(f"{k}.sha256", "is null: a wheel without its sha256 cannot be installed; say why "
                                                   "the build goes without it in left_out, or give the sha256")
                left_out = self.string(left_out, f"{k}.left_out", what="the reason, in words")
                sha = None
            else:
                if left_out is not None:
                    raise self.fail(f"{k}.left_out", "a wheel with a sha256 is installed: left_out goes with sha256: null")
                sha = self.string(raw["sha256"], f"{k}.sha256", SHA256_RE, "64 lowercase hex digits")
            from .lockfile import LockfileError, version_from_url

            try:
                version_from_url(url)
            except LockfileError as exc:
                raise self.fail(f"{k}.url", str(exc)) from None
            out[canonicalize_name(name)] = Wheel(canonicalize_name(name), url, sha, left_out)
        return out


def tag_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


