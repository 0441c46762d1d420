"""Compatibility rules: known-bad version combinations, kept as data (known_bad.yaml) and read here.

Dependency-light on purpose (stdlib, ``packaging``, ``yaml``; transformers needs both anyway): the smoke
uses this inside every image to explain a failing check.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

RULES_FILE = "known_bad.yaml"
SEVERITIES = ("error", "warning")
KNOWN_CONDITIONS = frozenset({"zero3", "bf16", "flash_attention_2", "generation", "resume", "gpu_less_host", "lora",
                              "modules_to_save", "gradient_checkpointing", "non_reentrant_checkpointing",
                              "optimizer_offload", "quantized", "liger_kernel", "cpu_accelerator",
                              "labels_loss"})
# cpu_accelerator: the run is on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo). A rule that needs it is a
# defect of that accelerator, which says nothing about GPUs: only `vlmbuild sweep` and the CPU smoke run under it,
# never a recipe or an image's own conditions.
# The VLM-R1 recipe's training paths, when nobody names the conditions (`check --env`, a smoke outside an image): its
# zero3/zero3_offload/zero2 configs, LoRA (run_grpo_rec_lora.sh), gradient checkpointing (reentrant: transformers
# 4.49's default, which it keeps), generation and the Trainer's resume.
RECIPE_CONDITIONS = ("zero3", "bf16", "generation", "resume", "lora", "gradient_checkpointing", "optimizer_offload")
RULE_KEYS = {"id", "severity", "title", "packages", "when", "symptom", "patterns", "fix", "sources"}


class RulesFileError(ValueError):
    """The rules data itself is malformed (a bug in vlmbuild's data, or in a user's rules file)."""


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    title: str
    packages: Mapping[str, tuple[SpecifierSet, ...]]
    when: frozenset[str]
    symptom: str
    patterns: tuple[re.Pattern[str], ...]
    fix: str
    sources: tuple[str, ...]

    def matches(self, versions: Mapping[str, str], conditions: Iterable[str]) -> dict[str, str] | None:
        """The offending versions if this rule applies to ``versions`` under ``conditions``, else None."""
        if not self.when <= set(conditions):
            return None
        offending: dict[str, str] = {}
        for name, alternatives in self.packages.items():
            installed = versions.get(name)
            if installed is None:
                return None
            try:
                version = Version(installed)
            except InvalidVersion:
                return None
            # prereleases=True: a rule written for 4.50.0.dev0 must match 4.50.0.dev0.
            if not any(spec.contains(version, prereleases=True) for spec in alternatives):
                return None
            offending[name] = installed
        return offending

    def matches_error(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)


@dataclass(frozen=True)
class Violation:
    rule: Rule
    versions: dict[str, str]

    def explain(self, indent: str = "  ") -> str:
        found = ", ".join(f"{k}=={v}" for k, v in self.versions.items())
        return explain_rule(self.rule, indent, header=f"[{self.rule.severity}] {self.rule.id}: {found}")


@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)
    source: str = ""

    def evaluate(self, versions: Mapping[str, str], conditions: Iterable[str]) -> list[Violation]:
        normalized: dict[str, str] = {canonicalize_name(k): str(v) for k, v in versions.items()}
        conds = set(conditions)
        out = []
        for rule in self.rules:
            hit = rule.matches(normalized, conds)
            if hit is not None:
                out.append(Violation(rule, hit))
        return out

    def match_error(self, text: str) -> list[Rule]:
        """Rules whose known symptom appears in an error text (the smoke explains failures with this)."""
        return [r for r in self.rules if r.matches_error(text)]

    def get(self, rule_id: str) -> Rule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)


def training_conditions(declared: Iterable[str] | None, versions: Mapping[str, str],
                        gpu_less_host: bool | None = None) -> tuple[str, ...]:
    """The conditions rules are evaluated under, decided here for every caller: the declared training path (the
    recipe's when none is declared), ``flash_attention_2`` when flash-attn is installed, and ``gpu_less_host``
    when the host has no GPU (True/False: the caller knows; None: no /dev/nvidia0)."""
    conditions = set(declared if declared else RECIPE_CONDITIONS)
    if any(canonicalize_name(name) == "flash-attn" for name in versions):
        conditions.add("flash_attention_2")
    if gpu_less_host is None:
        gpu_less_host = not Path("/dev/nvidia0").exists()
    if gpu_less_host:
        conditions.add("gpu_less_host")
    return tuple(sorted(conditions))


def explain_rule(rule: Rule, indent: str = "  ", header: str | None = None) -> str:
    lines = [header or f"[{rule.severity}] {rule.id}", f"{indent}{rule.title}"]
    lines.append(f"{indent}symptom: {rule.symptom}")
    lines.append(f"{indent}fix: {rule.fix}")
    lines.extend(f"{indent}source: {s}" for s in rule.sources)
    return "\n".join(lines)


def _fail(origin: str, path: str, message: str) -> RulesFileError:
    return RulesFileError(f"{origin}: {path}: {message}")


def _parse_rule(raw: object, origin: str, index: int) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise _fail(origin, where, "expected a mapping")
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise _fail(origin, where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(RULE_KEYS)}")
    for key in ("id", "severity", "title", "packages", "symptom", "fix", "sources"):
        if key not in raw:
            raise _fail(origin, f"{where}.{key}", "missing")
    rid = raw["id"]
    where = f"rules[{index}] ({rid})"
    if raw["severity"] not in SEVERITIES:
        raise _fail(origin, f"{where}.severity", f"expected one of {SEVERITIES}, got {raw['severity']!r}")
    packages: dict[str, tuple[SpecifierSet, ...]] = {}
    if not isinstance(raw["packages"], dict) or not raw["packages"]:
        raise _fail(origin, f"{where}.packages", "expected a non-empty mapping of package name to specifier(s)")
    for name, specs in raw["packages"].items():
        spec_list = specs if isinstance(specs, list) else [specs]
        try:
            packages[canonicalize_name(name)] = tuple(SpecifierSet(str(s)) for s in spec_list)
        except InvalidSpecifier as exc:
            raise _fail(origin, f"{where}.packages.{name}", f"invalid specifier: {exc}") from None
    when = raw.get("when") or []
    if not isinstance(when, list) or not set(when) <= KNOWN_CONDITIONS:
        raise _fail(origin, f"{where}.when", f"expected a list drawn from {sorted(KNOWN_CONDITIONS)}, got {when!r}")
    try:
        patterns = tuple(re.compile(p) for p in raw.get("patterns") or [])
    except re.error as exc:
        raise _fail(origin, f"{where}.patterns", f"invalid regular expression: {exc}") from None
    sources = raw["sources"]
    if not isinstance(sources, list) or not sources or not all(str(s).startswith("https://") for s in sources):
        raise _fail(origin, f"{where}.sources", "expected a non-empty list of https:// URLs")
    return Rule(
        id=str(rid),
        severity=raw["severity"],
        title=str(raw["title"]),
        packages=packages,
        when=frozenset(when),
        symptom=str(raw["symptom"]).strip(),
        patterns=patterns,
        fix=str(raw["fix"]).strip(),
        sources=tuple(str(s) for s in sources),
    )


def parse_rules(text: str, origin: str) -> RuleSet:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesFileError(f"{origin}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != 1 or not isinstance(data.get("rules"), list):
        raise RulesFileError(f"{origin}: expected a mapping with 'schema: 1' and a 'rules' list")
    rules = [_parse_rule(raw, origin, i) for i, raw in enumerate(data["rules"])]
    ids = [r.id for r in rules]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise RulesFileError(f"{origin}: rules: duplicate id(s) {dupes}")
    return RuleSet(rules, origin)


def load_rules(path: Path | None = None) -> RuleSet:
    """The rules shipped with vlmbuild, or those of ``path``."""
    if path is not None:
        return parse_rules(Path(path).read_text(), str(path))
    return _shipped_rules()


@functools.lru_cache(maxsize=1)
def _shipped_rules() -> RuleSet:
    # Parsed once per process: the smoke explains every failing check with them.
    text = resources.files(__name__).joinpath(RULES_FILE).read_text()
    return parse_rules(text, f"vlmbuild/rules/{RULES_FILE}")


def installed_versions() -> dict[str, str]:
    """Versions of every distribution visible to the running interpreter."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")  # type: ignore[attr-defined]  # an email.message.Message at run time
        if name:
            out.setdefault(canonicalize_name(name), dist.version)
    return out
