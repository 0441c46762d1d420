"""`vlmbuild inspect IMAGE`: re-verify an image's evidence from the image itself, and say what each layer holds.

Nothing is taken from the labels on trust: the report inside must hash to the label that vouches for it and
pass the contract's test, the lockfile inside to the lock label, the SBOM to its label and agree with the
lockfile, and the installed distributions must be the locked ones (checked by running the image's own
``vlmbuild-smoke verify-install``, without network). Any disagreement is a finding, and exit 1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import Version

from . import contract
from .engine import Engine
from .engine_api import EngineAPI
from .errors import VlmbuildError
from .lockfile import LockfileError, parse_lockfile
from .release import LABEL_BASE_ID, LABEL_IDENTITY, LABEL_PASSES, LABEL_SBOM_SHA256

EVIDENCE_COMMENT = "vlmbuild: smoke evidence"


@dataclass
class Finding:
    ok: bool
    what: str
    detail: str = ""


@dataclass
class Inspection:
    image: str
    image_id: str
    findings: list[Finding] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # package -> "url: why", from the image
    release_differences: list[str] = field(default_factory=list)  # what the release runner builds otherwise

    @property
    def ok(self) -> bool:
        return bool(self.findings) and all(f.ok for f in self.findings)

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        self.findings.append(Finding(bool(ok), what, detail))
        return bool(ok)

    def as_json(self) -> dict[str, Any]:
        return {"image": self.image, "image_id": self.image_id, "ok": self.ok, "size": self.size,
                "findings": [asdict(f) for f in self.findings], "passes": self.passes, "layers": self.layers,
                "identity": self.labels.get(LABEL_IDENTITY), "base_image_id": self.labels.get(LABEL_BASE_ID),
                "left_out": self.left_out, "release_differences": self.release_differences}


def sha256(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def passes_in_evidence(evidence: dict[str, Any]) -> list[dict[str, Any]]:
    """The smoke reports in an evidence file (an older image holds one report, not a list of passes)."""
    return list(evidence.get("passes") or ([evidence] if "checks" in evidence else []))


def check_vouched(result: Inspection, data: bytes | None, what: str, path: str, label: str | None,
                  claim: str) -> bool:
    """The file is in the image (``what`` at ``path``) and hashes to the label that vouches for it; False when
    the file is missing."""
    if not result.check(data is not None, f"the {what} is in the image", path):
        return False
    result.check(sha256(data) == label, claim, f"sha256 {sha256(data)} vs label {label}")
    return True


def parsed_json(result: Inspection, data: bytes, what: str) -> dict[str, Any] | None:
    """``data`` as a JSON object; None, and a failed finding, when it is not one."""
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        result.check(False, f"the {what} is JSON", str(exc))
        return None
    if not result.check(isinstance(parsed, dict), f"the {what} is a JSON object", type(parsed).__name__):
        return None
    return parsed


def check_report(result: Inspection, report_bytes: bytes | None, labels: dict[str, str]) -> None:
    if not check_vouched(result, report_bytes, "smoke report", contract.REPORT_PATH,
                         labels.get(contract.LABEL_REPORT_SHA256), "the report hashes to the label that vouches for it"):
        return
    assert report_bytes is not None  # check_vouched passes only bytes it read
    evidence = parsed_json(result, report_bytes, "report")
    if evidence is None:
        return
    passes = passes_in_evidence(evidence)
    result.check(contract.evidence_passed({"passes": passes}), "every smoke pass in the report passed every check")
    statuses = contract.checks_label(passes)
    try:
        labelled = json.loads(labels.get(contract.LABEL_CHECKS) or "{}")
    except json.JSONDecodeError:
        labelled = None
    result.check(labelled == statuses, "the checks label says what the report says",
                 f"label {labelled} vs report {statuses}")
    worlds = contract.world_size_label(passes)
    result.check(labels.get(contract.LABEL_WORLD_SIZE) == worlds, "the world-size label says what the report says",
                 f"label {labels.get(contract.LABEL_WORLD_SIZE)} vs report {worlds}")
    nodes = contract.nodes_label(passes)
    result.check(labels.get(contract.LABEL_NODES, "1") == nodes, "the nodes label says what the report says",
                 f"label {labels.get(contract.LABEL_NODES)} vs report {nodes}")
    result.check(any(p.get("world_size", 0) >= 2 for p in passes),
                 "ZeRO-3 partitioning across ranks was proven (a pass with world size 2 or more)", f"world sizes {worlds}")
    for p in passes:
        result.passes.append({
            "mode": p.get("mode"), "world_size": p.get("world_size"), "device": p.get("device_name") or "cpu",
            "nodes": p.get("nodes", 1), "node_containers": p.get("node_containers"),
            "passed": contract.report_passed(p), "seconds": p.get("seconds"),
            "checks": [{"name": c["name"], "status": c["status"], "device": c.get("device"),
                        "world_size": c.get("world_size"), "seconds": c.get("seconds")} for c in p.get("checks", [])],
        })


def check_lock_and_sbom(result: Inspection, lock_bytes: bytes | None, sbom_bytes: bytes | None,
                        labels: dict[str, str], left_out: Iterable[str] = ()) -> None:
    """The lockfile and the SBOM are the ones the labels vouch for, and the SBOM lists every locked package at its
    version, but those the image goes without (``left_out``: variant.json's), which it must not list."""
    lock = None
    if check_vouched(result, lock_bytes, "lockfile", contract.LOCK_PATH, labels.get(contract.LABEL_LOCK_SHA256),
                     "the lockfile hashes to the lock label"):
        try:
            assert lock_bytes is not None  # check_vouched passes only bytes it read
            lock = parse_lockfile(lock_bytes.decode(), None)
        except (LockfileError, UnicodeDecodeError) as exc:
            result.check(False, "the lockfile parses", str(exc))
    if not check_vouched(result, sbom_bytes, "SBOM", contract.SBOM_PATH, labels.get(LABEL_SBOM_SHA256),
                         "the SBOM hashes to its label"):
        return
    assert sbom_bytes is not None  # check_vouched passes only bytes it read
    sbom = parsed_json(result, sbom_bytes, "SBOM")
    if sbom is None:
        return
    result.check(sbom.get("bomFormat") == "CycloneDX", "the SBOM is a CycloneDX document",
                 f"bomFormat {sbom.get('bomFormat')!r}, specVersion {sbom.get('specVersion')!r}")
    if lock is not None:
        components: dict[str, Any] = {canonicalize_name(c.get("name", "")): c.get("version")
                                      for c in sbom.get("components", [])}
        left_out = set(left_out)
        held = [r for r in lock.requirements if r.name not in left_out]
        disagree = [f"{r.name}: locked {r.version}, SBOM {components.get(r.name)}" for r in held
                    if components.get(r.name) is None
                    or Version(components[r.name]).public != Version(r.version).public]
        disagree += [f"{name}: left out, but the SBOM lists {components[name]}" for name in sorted(left_out)
                     if name in components]
        result.check(not disagree, f"the SBOM lists the {len(held)} locked packages the image holds at their versions"
                     + (f" ({', '.join(sorted(left_out))} left out, not listed)" if left_out else ""),
                     "; ".join(disagree[:5]))


def check_installed(engine: EngineAPI, result: Inspection) -> None:
    code, out = engine.run_in_image(result.image_id, [contract.SMOKE_ENTRYPOINT, "verify-install"])
    result.check(code == 0, "the installed distributions are the locked ones (verify-install in the image)",
                 out.strip().splitlines()[-1] if out.strip() else f"exit {code}")


def describe_layers(engine: EngineAPI, result: Inspection, variant: dict[str, Any]) -> None:
    """Each layer's size and what it holds, from the image's history and the layer plan in variant.json."""
    history = engine.history(result.image_id)
    base_id = result.labels.get(LABEL_BASE_ID)
    base_entries = len(engine.history(base_id)) if base_id and engine.image_id(base_id) else 0
    chain = list(variant.get("layers") or [])
    packages = list(variant.get("packages") or [])
    for i, entry in enumerate(history):
        created, size = entry.get("CreatedBy") or "", int(entry.get("Size") or 0)
        if i < base_entries:
            what = f"base image {result.labels.get('org.opencontainers.image.base.name', '')}".strip()
        elif "apt-get" in created and "venv" in created:
            what = f"Python {variant.get('python', '')}, g++ and the empty venv (python-base)"
        elif "nvidia-cuda-toolkit" in created:
            what = f"the CUDA {variant.get('cuda', '')} toolkit (nvcc, cuobjdump, headers; no driver library)"
        elif created.startswith(f"COPY {contract.DEEPSPEED_CPU_PATH}/"):
            what = f"DeepSpeed built for the CPU accelerator ({contract.DEEPSPEED_CPU_PATH}, the CPU pass's)"
        elif "uv pip install" in created and chain:
            what = f"lock layer {chain.pop(0)}, installed in place"
        elif created.startswith("COPY /opt/venv/") and packages:
            what = f"package {packages.pop(0)}"
        elif created.startswith("COPY vlmbuild/"):
            what = "the smoke (vlmbuild-smoke), the lockfile, the variant's metadata"
        elif "cyclonedx-py" in created:
            what = "the smoke's entry point, the SBOM, the built wheel's sha256"
        elif entry.get("Comment") == EVIDENCE_COMMENT:
            what = "evidence: the smoke report"
        elif size == 0:
            continue  # ENV, LABEL, WORKDIR, CMD: configuration, no layer
        else:
            what = created[:80]
        result.layers.append({"size": size, "what": what})


def check_left_out(result: Inspection, variant: dict[str, Any]) -> None:
    """What the image goes without: the label says what variant.json (inside, hashed into the identity) says."""
    declared = variant.get("left_out") or {}
    try:
        labelled = json.loads(result.labels.get(contract.LABEL_LEFT_OUT) or "{}")
    except json.JSONDecodeError:
        labelled = None
    result.check(labelled == declared, "the left-out label says what the image's variant.json says",
                 f"label {labelled} vs variant.json {declared}")
    result.left_out = dict(declared)


def release_differences(result: Inspection, variant: dict[str, Any]) -> list[str]:
    """How this image differs from what the release runner builds of the same spec and lockfile: the base, what
    is left out, where the smoke ran."""
    out = []
    base = result.labels.get("org.opencontainers.image.base.name", "")
    release_base = variant.get("release_base")
    if release_base and base != release_base:
        out.append(f"base: {base} (image {result.labels.get(LABEL_BASE_ID, '?')[:19]}), the release builds on "
                   f"{release_base}")
    built_from_source = set(variant.get("source_builds") or ())
    for name, why in (variant.get("left_out") or {}).items():
        out.append(f"left out: {name} ({why}); " + (
            f"the release runner builds it from its sdist (build without --leave-out {name})"
            if name in built_from_source else "the release leaves it out too until the spec pins its sha256"))
    device = result.labels.get(contract.LABEL_DEVICE)
    if device != "gpu":
        out.append(f"smoke device: {device or 'none'} x{result.labels.get(contract.LABEL_WORLD_SIZE, '?')}; the "
                   "release runner smokes on its GPUs (--smoke-device gpu), where flash-attn, NCCL and bf16 run")
    return out


def inspect_image(ref: str, engine: EngineAPI | None = None) -> Inspection:
    engine = engine or Engine()
    image_id = engine.image_id(ref)
    if image_id is None:
        raise VlmbuildError(f"{ref}: no such image in this engine")
    labels = engine.labels(image_id)
    result = Inspection(ref, image_id, labels=labels)
    result.size = engine.image_size(image_id)
    if not result.check(contract.LABEL_SMOKE_ENTRYPOINT in labels, "the image was built by vlmbuild",
                        f"label {contract.LABEL_SMOKE_ENTRYPOINT}"):
        return result
    result.check(labels.get(contract.LABEL_RESULT) == "passed", "the result label says passed",
                 f"{contract.LABEL_RESULT}={labels.get(contract.LABEL_RESULT)!r}")
    result.check(bool(labels.get(LABEL_IDENTITY)), "the image names the inputs it was built from (identity label)",
                 labels.get(LABEL_IDENTITY) or "")
    files = engine.read_image_files(image_id, [contract.REPORT_PATH, contract.LOCK_PATH, contract.SBOM_PATH,
                                               contract.VARIANT_PATH, contract.BUILT_WHEELS_PATH])
    variant = json.loads(files[contract.VARIANT_PATH] or b"{}")
    check_report(result, files[contract.REPORT_PATH], labels)
    check_lock_and_sbom(result, files[contract.LOCK_PATH], files[contract.SBOM_PATH], labels,
                        (variant.get("left_out") or {}))
    result.check(bool(files[contract.BUILT_WHEELS_PATH]), "the sha256 of the wheel built from source is recorded",
                 (files[contract.BUILT_WHEELS_PATH] or b"").decode(errors="replace").strip())
    check_installed(engine, result)
    check_left_out(result, variant)
    result.release_differences = release_differences(result, variant)
    describe_layers(engine, result, variant)
    return result


def format_inspection(result: Inspection) -> str:
    lines = [f"{result.image} ({result.image_id[:19]}), {result.size / 1e9:.2f} GB"]
    if result.labels.get(LABEL_PASSES):
        lines.append(f"  smoke passes: {result.labels[LABEL_PASSES]}")
    for p in result.passes:
        over = (f" over {p['nodes']} nodes ({p['node_containers']['hosts']} host)"
                if p["nodes"] > 1 and p.get("node_containers") else "")
        lines.append(f"  pass {p['mode']} x{p['world_size']}{over} ({p['device']}): "
                     + ", ".join(f"{c['name']} {c['status']} [{c['device']} x{c['world_size']}]" for c in p["checks"]))
    lines.append("  verified:")
    for f in result.findings:
        lines.append(f"    {'ok  ' if f.ok else 'FAIL'} {f.what}" + (f" ({f.detail})" if f.detail and not f.ok else ""))
    if result.left_out:
        lines.append("  left out (named by the spec, not in the image):")
        lines += [f"    {name}: {why}" for name, why in result.left_out.items()]
    if result.release_differences:
        lines.append("  differs from the release build:")
        lines += [f"    {d}" for d in result.release_differences]
    lines.append("  layers, bottom to top:")
    for layer in result.layers:
        lines.append(f"    {layer['size'] / 1e6:10.1f} MB  {layer['what']}")
    lines.append("RESULT: " + ("every piece of evidence agrees" if result.ok else "the evidence DISAGREES"))
    return "\n".join(lines)
