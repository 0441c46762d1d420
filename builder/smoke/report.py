"""The smoke report: JSON for machines (schema-versioned), a short summary for people, rule explanations."""

from __future__ import annotations

import json
from typing import Any

from ..contract import (
    PASSED,
    PASSED_WITH_WORKAROUND,
    REGISTRY,
    check_passed,
    entry_point,
    evidence_passed,
    report_passed,
)
from ..rules import load_rules

SCHEMA_VERSION = 2  # 2: every check records its world_size and device; checks grpo, optimizer_offload, attention
STATUS_WORDS = {PASSED: "PASS", PASSED_WITH_WORKAROUND: "PASS*", "failed": "FAIL", "skipped": "SKIP"}


def explain(check: dict[str, Any]) -> list[dict[str, Any]]:
    """Rules whose known symptom appears in the check's error text."""
    text = "\n".join(str(check.get(k) or "") for k in ("error", "traceback"))
    if not text.strip():
        return []
    return [
        {"id": r.id, "severity": r.severity, "title": r.title, "symptom": r.symptom, "fix": r.fix,
         "sources": list(r.sources)}
        for r in load_rules().match_error(text)
    ]


def finalize(report: dict[str, Any]) -> dict[str, Any]:
    for check in report["checks"]:
        if not check_passed(check):
            check["explanations"] = explain(check)
    report["passed"] = report_passed(report)
    return report


def summary(report: dict[str, Any]) -> str:
    mode = report["mode"]
    over = f" over {report['nodes']} nodes" if report.get("nodes", 1) > 1 else ""
    lines = [f"vlmbuild smoke: {mode.upper()} mode, world size {report.get('world_size')}{over}, "
             f"{report.get('device_name') or 'cpu'}"]
    checkpoint = report.get("checkpoint")
    if checkpoint:
        lines.append(f"  checkpoint {checkpoint['path']}: {checkpoint['dtype']}, {checkpoint['parameters']:,} parameters")
    for check in report["checks"]:
        status = STATUS_WORDS[check["status"]]
        where = f"{check.get('device') or mode} x{check.get('world_size', '?')}"
        lines.append(f"  {status} {check['name']:<18} {check['seconds']:7.1f}s  {where:<8} {_detail(check)}")
        if check["status"] == "failed" and check.get("error"):
            for err_line in str(check["error"]).splitlines()[:10]:
                lines.append(f"       {err_line}")
        for rule in check.get("explanations") or []:
            lines.append(f"       explained by known-bad combination [{rule['severity']}] {rule['id']}: {rule['title']}")
            lines.append(f"         symptom: {rule['symptom']}")
            lines.append(f"         fix: {rule['fix']}")
            lines.extend(f"         source: {s}" for s in rule["sources"])
        workaround = check["details"].get("workaround")
        if check["status"] == PASSED_WITH_WORKAROUND and workaround:
            lines.append(f"       * passed only with the recipe's workaround ({workaround.get('rule')}): "
                         f"{workaround.get('applied')}")
            lines.append(f"         the stock code failed: {str(workaround.get('stock_error', '')).splitlines()[0]}")
    environment = report.get("environment") or {}
    for name, why in ((environment.get("variant") or {}).get("left_out") or {}).items():
        lines.append(f"  left out: {name} (not in this image, nothing checked it): {why}")
    if environment.get("deepspeed_build") not in (None, "the venv's own"):
        lines.append(f"  deepspeed: the {mode.upper()} accelerator's build at {environment['deepspeed_build']}")
    verdict = "PASS" if report["passed"] else "FAIL"
    qualifier = " (CPU only: not a GPU validation)" if mode == "cpu" else ""
    lines.append(f"RESULT: {verdict} on {mode.upper()}{qualifier} in {report['seconds']:.1f}s")
    return "\n".join(lines)


def _detail(check: dict[str, Any]) -> str:
    """The detail line of a passing check, by the function the registry names for it."""
    registered = REGISTRY.get(check["name"])
    if not check_passed(check) or registered is None or not registered.detail:
        return ""
    return entry_point(registered.detail)(check)


def detail_stack(check: dict[str, Any]) -> str:
    d = check["details"]
    v = d.get("versions", {})
    lock, files = d.get("lock"), d.get("files") or {}
    locked = (f", {lock['packages']} locked packages installed exactly" if lock else ", no lockfile to compare")
    locked += f", {files.get('checked', 0):,} files equal to their RECORD hashes"
    return f"torch {v.get('torch')}, deepspeed {v.get('deepspeed')}, transformers {v.get('transformers')}{locked}"


def detail_nodes(check: dict[str, Any]) -> str:
    d = check["details"]
    return (f"one world of {d.get('world_size')} ranks over {d.get('nodes')} nodes ("
            + ", ".join(f"rank {r['rank']} on {r['hostname']} node {r['node']}" for r in d.get("ranks") or []) + ")")


def detail_zero3_load(check: dict[str, Any]) -> str:
    d = check["details"]
    return (f"{d.get('parameters')} parameters ({d.get('vision_parameters')} vision) partitioned, "
            f"{d.get('tensors_compared')} tensors bit-identical to the checkpoint")


def detail_train_step(check: dict[str, Any]) -> str:
    d = check["details"]
    losses = d.get("losses") or []
    return f"{d.get('steps')} steps, loss " + " -> ".join(f"{x:.3f}" for x in losses)


def detail_checkpoint_resume(check: dict[str, Any]) -> str:
    d = check["details"]
    return (f"{d.get('parameters_compared')} parameters and {d.get('optimizer_tensors_compared')} optimizer "
            f"tensors equal after load, next loss {d.get('loss_after_resume', 0):.3f}")


def detail_grpo(check: dict[str, Any]) -> str:
    d = check["details"]
    save = d.get("consolidated_save") or {}
    lengths = d.get("completion_lengths") or [0]
    return (f"{d.get('steps')} GRPO steps, {d.get('generations')} generation(s) under ZeRO-3 (completions "
            f"{min(lengths)}-{max(lengths)} tokens), {d.get('parameters_changed')} parameters moved; consolidated "
            f"save of {save.get('tensors_compared')} tensors equal to the trained parameters")


def detail_optimizer_offload(check: dict[str, Any]) -> str:
    d = check["details"]
    off = d.get("offload") or {}
    where = ("fp32 partitions, moments and parameter shards on the CPU" if check.get("device", "cpu") != "cpu"
             else "placement not judged on the CPU")
    return (f"{d.get('steps')} step(s) with {str(off.get('optimizer', '')).rsplit('.', 1)[-1]} (Adam step "
            f"{off.get('adam_step')}, {(off.get('adam_moments') or {}).get('count')} moments written); {where}")


def detail_lora(check: dict[str, Any]) -> str:
    legs = check["details"].get("legs") or {}
    return "; ".join(
        f"{d.get('config')}.json: {d.get('lora_parameters')} LoRA tensors on {d.get('targets')} layers moved, "
        f"{d.get('base_parameters')} base weights unchanged, adapter reloaded to "
        f"{(d.get('adapter') or {}).get('logits_relative_error', 0):.1e} of the logits"
        for d in legs.values())


def detail_trainer_resume(check: dict[str, Any]) -> str:
    d = check["details"]
    run, resume = d.get("run") or {}, d.get("resume") or {}
    return (f"saved at {run.get('checkpoint')}, resumed in fresh processes to step {resume.get('global_step')}: "
            f"learning rate, data rows, samples, {resume.get('optimizer_tensors_compared')} optimizer tensors and "
            f"{resume.get('parameters_compared')} parameters equal to the uninterrupted run ({resume.get('compared')})")


def detail_zero3_repeat(check: dict[str, Any]) -> str:
    d = check["details"]
    return f"{d.get('runs')} loads in fresh processes, every one bit-identical to the checkpoint"


def detail_cuda_ops(check: dict[str, Any]) -> str:
    d = check["details"]
    cubins = d.get("cubins") or {}
    with_code = "; ".join(f"{op} {'/'.join(a.removeprefix('sm_') for a in archs)} +PTX "
                          f"{'/'.join(p.removeprefix('sm_') for p in (d.get('ptx') or {}).get(op, []))}"
                          for op, archs in cubins.items())
    host = ", ".join(d.get("host_code_only") or [])
    return f"{with_code or 'no device code'}{f'; host code only: {host}' if host else ''}; loaded with no GPU"


def detail_prebuilt_ops(check: dict[str, Any]) -> str:
    loaded = check["details"].get("loaded") or {}
    package = check["details"].get("package") or "DeepSpeed's package"
    return (f"{', '.join(loaded)} loaded from {package} on {min((len(r) for r in loaded.values()), default=0)} "
            "rank(s); nothing compiled at run time")


def detail_attention(check: dict[str, Any]) -> str:
    d = check["details"]
    vt, lm = d.get("vision_tower") or {}, d.get("language_model") or {}
    return (f"{d.get('candidate')} vs {d.get('reference')}: vision rel. error {vt.get('relative_error', 0):.1e}, "
            f"language model {lm.get('relative_error', 0):.1e}"
            + (f"; only with the recipe's fix ({d['workaround']['rule']})" if d.get("workaround") else ""))


def combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The evidence a build puts into its image: every smoke pass it ran (a GPU pass with world size 1 is
    followed by a CPU pass with world size 2, so ZeRO-3 partitioning across ranks is always proven)."""
    return {"schema_version": SCHEMA_VERSION, "kind": "vlmbuild-evidence", "passed": evidence_passed({"passes": reports}),
            "passes": reports}


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"
