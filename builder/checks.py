"""`vlmbuild check`: every variant (or this environment) against the compatibility rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from .contract import HEADLINE_PACKAGES
from .lock import LockStatus, variant_status
from .lockfile import Lockfile, LockfileError, read_lockfile
from .rules import RECIPE_CONDITIONS, RuleSet, Violation, installed_versions, load_rules, training_conditions
from .spec import Variant


@dataclass
class VariantVerdict:
    variant: Variant
    source: str  # where the versions came from
    versions: dict[str, str]
    conditions: tuple[str, ...]
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.rule.severity == "error"]

    @property
    def ok(self) -> bool:
        """Clean for a normal variant; flagged by at least one error rule for an expected-bad one."""
        return bool(self.errors) if self.variant.expected_rejected else not self.errors


def variant_conditions(variant: Variant, versions: dict[str, str]) -> tuple[str, ...]:
    """A variant is checked under its image's recipe conditions (gpu_less_host is one of them when declared)."""
    return training_conditions(variant.image.conditions or RECIPE_CONDITIONS, versions, gpu_less_host=False)


def declared_versions(variant: Variant) -> dict[str, str]:
    """Exact pins the spec declares (used only while a variant has no lockfile yet)."""
    out = {n: s[2:] for n, s in variant.packages.items() if s.startswith("==") and "," not in s and "*" not in s}
    from .lockfile import version_from_url

    out.update({n: version_from_url(w.url) for n, w in variant.installed_wheels.items()})
    return out


def pinned_versions(variant: Variant, lock: Lockfile | None = None) -> tuple[dict[str, str], str | None]:
    """The versions a variant really has: its lockfile's pins (``lock`` when the caller read it already), else the
    spec's exact pins; the second value says why they are not the lockfile's (None: they are)."""
    if lock is None and variant.lockfile_path.is_file():
        try:
            lock = read_lockfile(variant.lockfile_path)
        except LockfileError as exc:
            return declared_versions(variant), f"lockfile unreadable ({exc})"
    if lock is None:
        return declared_versions(variant), "no lockfile yet"
    return lock.pins, None


def check_variant(variant: Variant, rules: RuleSet | None = None, lock: Lockfile | None = None,
                  status: LockStatus | None = None) -> VariantVerdict:
    """The variant's locked versions (its declared pins while it has no lockfile) against the rules (the shipped
    ones unless given); ``lock`` and its ``status`` when the caller has them already."""
    rules = rules or load_rules()
    status = status or variant_status(variant, lock)
    notes = []
    if status.state in ("fresh", "stale"):
        versions, not_locked = pinned_versions(variant, lock)
        if not_locked:
            source = "declared pins"
            notes.append(f"{not_locked}; checked the declared pins instead")
        else:
            source = f"lockfile {variant.lockfile_path.name}" + (" (stale)" if status.state == "stale" else "")
            if status.state == "stale":
                notes.append(f"lockfile is stale: {status.detail}")
    else:
        versions, source = declared_versions(variant), "declared pins (no lockfile yet)"
    conditions = variant_conditions(variant, versions)
    verdict = VariantVerdict(variant, source, versions, conditions, rules.evaluate(versions, conditions), notes)
    if variant.expected_rejected and not verdict.errors:
        verdict.notes.append("marked 'expect: rejected' but no error rule flags it: add the rule that explains why")
    return verdict


def environment_conditions(when: tuple[str, ...] | None, versions: dict[str, str]) -> tuple[str, ...]:
    if when:
        return tuple(sorted(set(when)))
    return training_conditions(None, versions)


def check_environment(rules: RuleSet, when: tuple[str, ...] | None = None) -> tuple[dict[str, str], tuple[str, ...], list[Violation]]:
    versions = installed_versions()
    conds = environment_conditions(when, versions)
    return versions, conds, rules.evaluate(versions, conds)


def format_verdict(verdict: VariantVerdict) -> str:
    v = verdict.variant
    expect = " (expected to be rejected)" if v.expected_rejected else ""
    state = "ok" if verdict.ok else "FAIL"
    keys = ", ".join(f"{k} {verdict.versions[k]}" for k in HEADLINE_PACKAGES
                     if k in verdict.versions)
    lines = [f"{state}  {v.image.name}/{v.name}{expect}: {keys} [{verdict.source}; when {', '.join(verdict.conditions)}]"]
    for violation in verdict.violations:
        lines.append(violation.explain(indent="      ").replace("[", "    [", 1))
    lines.extend(f"    note: {n}" for n in verdict.notes)
    if not verdict.violations:
        lines.append("    no rule matches")
    return "\n".join(lines)
