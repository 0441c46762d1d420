"""What a measured cell says: its record in the results, with the rules that explain its failures.

A failing check is *explained* by a rule when the rule's symptom is in the check's error (the smoke's own
explanations) and the rule's packages match the cell's versions under the cell's conditions: a symptom alone is
not enough (the same AttributeError can have another cause), nor are versions alone (a rule is a claim about a
failure, not about a version). A failure no rule explains is a finding.

A rule whose ``when`` holds ``cpu_accelerator`` is a defect of DeepSpeed's CPU accelerator: on a GPU it says
nothing. A CPU cell that fails through one says so, and its other checks become ``not_measured``: whatever they
did after weights went wrong on the CPU is no evidence about the stack, so none of them counts as passed.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet

from .contract import KEY_PACKAGES
from .rules import RuleSet, load_rules, training_conditions
from .sweep_axes import Cell
from .sweep_cell import Measured
from .sweep_results import host_facts

CPU_ACCELERATOR = "cpu_accelerator"
NOT_MEASURED = "not_measured"
CPU_NOTE = "CPU accelerator: says nothing about GPUs"
# Checks the smoke's launcher runs before any ZeRO-3 rank: the install file for file and its imports.
OUTSIDE_ZERO3 = ("stack",)


def cell_conditions(cell: Cell, versions: Mapping[str, str]) -> tuple[str, ...]:
    """The recipe's conditions, and ``cpu_accelerator`` when the cell ran on DeepSpeed's CPU accelerator."""
    conditions = set(training_conditions(cell.variant.image.conditions, versions))
    if cell.measure.device == "cpu":
        conditions.add(CPU_ACCELERATOR)
    return tuple(sorted(conditions))


def first_error_line(check: Mapping[str, Any]) -> str | None:
    """The error's first line, with the line after it when the first only announces a list ("...; first ones:")."""
    lines = [line.strip() for line in str(check.get("error") or "").strip().splitlines() if line.strip()]
    if not lines:
        return None
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]


def make_record(cell: Cell, measured: Measured, revision: str | None, rules: RuleSet | None = None) -> dict[str, Any]:
    rules = rules or load_rules()
    record: dict[str, Any] = {
        "id": cell.id, "pins": dict(cell.pins), "device": cell.measure.device,
        "result": "", "reason": measured.reason, "first_failure": None, "explained_by": [], "cpu_accelerator": None,
        "checks": [], "versions": {},
        "inputs": {"requirements": cell.requirement_lines(), "python": cell.variant.python,
                   "platform": cell.variant.platform, "checks": cell.measure.checks, "repeat": cell.measure.repeat},
        "lock_sha256": measured.lock_sha256, "report_sha256": measured.report_sha256, "reports": [],
        "vlmbuild_revision": revision, "host": host_facts(cell.measure.device),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": measured.seconds or {}, "jit_compiled": list(measured.jit_compiled),
    }
    if measured.state != "measured":
        record["result"] = measured.state
        if measured.state == "unresolvable":
            record["explained_by"] = resolver_rules(cell, measured.reason, rules)
        elif measured.state == "install_failed":
            # a stack that cannot even be installed or imported here may be a known rule's (DeepSpeed that
            # initialises triton's GPU driver at import cannot be built on a GPU-less host)
            versions = dict(measured.pins)
            record["versions"] = {k: versions[k] for k in sorted(versions)
                                  if k in set(KEY_PACKAGES) | set(cell.variant.packages)}
            conditions = cell_conditions(cell, versions)
            record["explained_by"] = sorted(r.id for r in rules.match_error(measured.reason)
                                            if r.matches(versions, conditions) is not None)
        return record
    report = measured.report or {}
    # every pin of the lock for the rules (a rule may name any package), what was installed where the smoke says
    versions = {**measured.pins, **installed_versions(report)}
    # the key packages and every package the spec names: a cell of another sweep in the same file is placed on
    # this one's axes by what it had installed (the grid)
    shown = set(KEY_PACKAGES) | set(cell.variant.packages)
    record["versions"] = {k: versions[k] for k in sorted(versions) if k in shown}
    conditions = cell_conditions(cell, versions)
    checks = check_records(report, versions, conditions, rules)
    record["checks"] = checks
    if not checks:
        record["result"] = "failed"
        record["reason"] = measured.reason or "the smoke ran no check"
        return record
    cpu_rules = cpu_rules_of(checks, rules)
    if measured.first_run is not None:
        # smoked again with a setting that routes around a CPU-accelerator defect: this run is the cell's result,
        # and the record says which setting and what the first run, without it, saw
        first_checks = check_records(measured.first_run.report or {}, versions, conditions, rules)
        first_failed = next((c for c in first_checks if c["status"] == "failed"), None)
        record["cpu_accelerator"] = {
            "rules": cpu_rules_of(first_checks, rules), "note": CPU_NOTE, "setting": measured.zero_settings,
            "without_setting": {"check": first_failed["name"], "error": first_failed["error"]} if first_failed else None}
    if cpu_rules:
        # the defect shows still (no route, or the route did not hold): nothing else the cell saw is evidence
        record["cpu_accelerator"] = {**(record["cpu_accelerator"] or {"setting": None}), "rules": cpu_rules,
                                     "note": CPU_NOTE}
        for check in checks:
            if check["name"] in OUTSIDE_ZERO3:
                continue  # measured before any ZeRO-3 rank ran: the defect cannot have touched it
            own = [r for r in check["explained_by"] if r not in cpu_rules]
            if check["status"] == "failed" and own:
                continue  # a failure of its own, explained by a rule of the stack: evidence still
            if check["status"] == "failed" and check["explained_by"]:
                continue  # the CPU defect itself, as seen
            check["status"] = NOT_MEASURED
    failed = [c for c in checks if c["status"] == "failed"]
    if measured.reason and not failed:
        record["result"] = "failed"
        return record
    if not failed:
        record["result"] = "passed" if report.get("passed") else "failed"
        if not report.get("passed"):
            record["reason"] = "the smoke did not pass, yet no check failed"
        return record
    first = failed[0]
    record["result"] = "failed"
    record["first_failure"] = {"check": first["name"], "error": first["error"]}
    record["explained_by"] = sorted({r for c in failed for r in c["explained_by"]})
    record["reason"] = f"{first['name']}: {first['error'] or 'failed'}"
    return record


def check_records(report: Mapping[str, Any], versions: Mapping[str, str], conditions: tuple[str, ...],
                  rules: RuleSet) -> list[dict[str, Any]]:
    return [{"name": c["name"], "status": c["status"], "seconds": c.get("seconds"), "error": first_error_line(c),
             "explained_by": explaining_rules(c, versions, conditions, rules)} for c in report.get("checks", [])]


def cpu_rules_of(checks: list[dict[str, Any]], rules: RuleSet) -> list[str]:
    return sorted({r for c in checks for r in c["explained_by"] if CPU_ACCELERATOR in rules.get(r).when})


# Settings users could equally write in their DeepSpeed config that route around a CPU-accelerator defect, by rule,
# and the DeepSpeed versions that know the setting. The sweep smokes a cell that fails through the rule once more
# with it; where none applies, the cell's other checks are not_measured.
@dataclass(frozen=True)
class CpuRoute:
    settings: dict[str, Any]
    deepspeed: SpecifierSet
    why: str


CPU_ROUTES = {
    # Every gather of GatheredParameters (the HF ZeRO-3 load, the consolidated save, trl's gather for generation)
    # takes the sequential, synchronous all-gather instead of the coalesced one whose gloo handles are not all
    # waited on (deepspeedai/DeepSpeed#8539). The setting came with DeepSpeed 0.18.5 (PR 7661).
    "ds-cpu-accelerator-zero3-coalesced-gather-race": CpuRoute(
        {"stage3_allgather_sequential": True}, SpecifierSet(">=0.18.5"),
        "zero_optimization.stage3_allgather_sequential: true gathers each parameter synchronously"),
}


def cpu_route(cell: Cell, measured: Measured, rules: RuleSet) -> dict[str, Any] | None:
    """The settings to smoke ``cell`` again with, when its first smoke failed through a CPU-accelerator defect
    that a setting of the cell's DeepSpeed routes around; None otherwise."""
    if cell.measure.device != "cpu" or measured.report is None:
        return None
    versions = {**measured.pins, **installed_versions(measured.report)}
    conditions = cell_conditions(cell, versions)
    for rule_id in cpu_rules_of(check_records(measured.report, versions, conditions, rules), rules):
        route = CPU_ROUTES.get(rule_id)
        if route is not None and versions.get("deepspeed") and route.deepspeed.contains(versions["deepspeed"]):
            return dict(route.settings)
    return None


def resolver_rules(cell: Cell, reason: str, rules: RuleSet) -> list[str]:
    """The rules that explain a cell uv cannot resolve: the cell's own pins match every package of the rule, and
    the resolver's reason names each of them (``trl==0.18.0 depends on transformers>=4.50.0``: rule
    trl-0.18-needs-transformers-4.50). Nothing is installed, so the pins are the versions."""
    pins = dict(cell.pins)
    conditions = cell_conditions(cell, pins)
    # matches() holds only where the pins name every package of the rule; a rule of no package names nothing
    return sorted(r.id for r in rules.rules
                  if r.packages and all(name in reason for name in r.packages) and r.matches(pins, conditions) is not None)


def explaining_rules(check: Mapping[str, Any], versions: Mapping[str, str], conditions: tuple[str, ...],
                     rules: RuleSet) -> list[str]:
    """The rules whose symptom is in the check's error (matched now, with the rules as they are: a rule added after
    the smoke explains it too) and whose packages the cell's versions match."""
    if check.get("status") != "failed":
        return []
    text = "\n".join(str(check.get(k) or "") for k in ("error", "traceback"))
    return sorted(r.id for r in rules.match_error(text) if r.matches(versions, conditions) is not None)


def installed_versions(report: Mapping[str, Any]) -> dict[str, str]:
    """The key packages' versions as the smoke's stack check found them installed in the cell's environment."""
    for check in report.get("checks", []):
        if check.get("name") == "stack":
            found = (check.get("details") or {}).get("versions") or {}
            return {k: str(found[k]) for k in sorted(found) if k in KEY_PACKAGES and found[k]}
    return {}


def first_failure_rules(record: Mapping[str, Any]) -> list[str]:
    """The rules that explain the check a failed record names as its first failure (the CPU accelerator's
    included); [] when no check failed."""
    first = (record.get("first_failure") or {}).get("check")
    return next((c["explained_by"] for c in record.get("checks", []) if c["name"] == first and c["status"] == "failed"),
                [])


def is_finding(record: Mapping[str, Any]) -> bool:
    """A failure that no rule explains: a failing check without an explaining rule, or a failed cell whose smoke
    said why outside any check."""
    if record["result"] != "failed":
        return False
    failed = [c for c in record["checks"] if c["status"] == "failed"]
    if not failed:
        return True
    return any(not c["explained_by"] for c in failed)
