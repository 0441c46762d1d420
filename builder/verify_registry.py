"""`vlmbuild inspect IMAGE --verify`: the evidence inside the image, bound to its digest by a signature the puller
trusts.

``inspect`` alone catches an inconsistent forgery (a report or a label edited alone). A consistent one (report,
labels and SBOM rewritten together and pushed under the same tag) has another digest, and nothing signed it: here
the registry's digest for the reference must be the local image's, carry a signature by the expected key or CI
identity, and carry a verified smoke-report attestation and SBOM attestation whose predicates equal the files
inside the image (the report must also pass the contract's test). Each is a finding; any that fails is exit 1.
"""

from __future__ import annotations

import json

from . import contract
from .engine_api import EngineAPI, split_ref
from .inspect_image import Inspection
from .signing import NotVerified, Verifier, attested_predicates, verify_signature


def check_attestation(result: Inspection, ref_digest: str, verifier: Verifier, predicate_type: str, what: str,
                      inside: bytes | None) -> dict | None:
    try:
        predicates = attested_predicates(ref_digest, verifier, predicate_type)
    except NotVerified as exc:
        result.check(False, f"a signed {what} attestation ({predicate_type}) names the digest", str(exc))
        return None
    result.check(True, f"a signed {what} attestation ({predicate_type}) names the digest")
    try:
        ours = json.loads(inside) if inside else None
    except ValueError:
        ours = None
    matching = next((p for p in predicates if p == ours), None)
    result.check(matching is not None, f"the attested {what} is the one inside the image",
                 f"{len(predicates)} attested, none equal to the image's" if ours is not None
                 else "the image holds no readable one")
    return matching


def verify_from_registry(engine: EngineAPI, result: Inspection, ref: str, verifier: Verifier) -> None:
    """Add the registry's findings about ``ref`` to ``result``."""
    repository, tag = split_ref(ref)
    remote = engine.remote_digest(repository, tag)
    if not result.check(remote is not None, f"the registry serves {repository}:{tag}") or remote is None:
        return
    local = engine.local_repo_digest(result.image_id, repository)
    if not result.check(local == remote, "the image inspected here is the one the registry serves",
                        f"registry {remote}, local {local or 'never pulled from or pushed to it'} "
                        f"(docker pull {repository}:{tag})"):
        return
    ref_digest = f"{repository}@{remote}"
    try:
        verify_signature(ref_digest, verifier)
        result.check(True, f"the digest {remote[:19]} is signed ({'key ' + str(verifier.key) if verifier.key else verifier.identity})")
    except NotVerified as exc:
        result.check(False, f"the digest {remote[:19]} is signed by the expected signer", str(exc))
        return
    files = engine.read_image_files(result.image_id, [contract.REPORT_PATH, contract.SBOM_PATH])
    report = check_attestation(result, ref_digest, verifier, contract.PREDICATE_SMOKE_REPORT, "smoke report",
                               files[contract.REPORT_PATH])
    if report is not None:
        result.check(contract.evidence_passed(report), "the attested report passes the contract's test")
    check_attestation(result, ref_digest, verifier, contract.PREDICATE_SBOM, "SBOM", files[contract.SBOM_PATH])
