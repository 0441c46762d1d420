"""Evidence bound to the digest: cosign signs a pushed image and attests its smoke report and its SBOM; verify reads
them back from the registry.

Labels and the files inside an image say what ran, but anyone who can push can write a new report, new labels and a
new SBOM that agree with each other. A signature over the manifest digest, by a key (or a CI identity) the puller
trusts, says who validated *these* bytes; the two in-toto attestations carry the evidence itself, bound to the same
digest:

- the smoke report, predicate type ``contract.PREDICATE_SMOKE_REPORT`` (the report JSON as the image holds it:
  every pass with its device, world size and each check's result);
- the CycloneDX SBOM the image holds, predicate type ``https://cyclonedx.org/bom`` (cosign's ``--type cyclonedx``).

Two ways to sign, one per place: a cosign key pair (``--sign-key``, its password in ``COSIGN_PASSWORD``) with no
transparency-log upload, for machines that reach no Rekor (ours); keyless on GitHub Actions (Fulcio certificate for
the workflow's OIDC identity, Rekor entry), verified with the expected certificate identity and issuer.

cosign is Debian 13's package (2.5.0; no PyPI wheel carries it): ``.ci/setup`` unpacks it into the venv's bin.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import contract
from .errors import CheckFailed, VlmbuildError

SBOM_PREDICATE_TYPE = "cyclonedx"  # cosign's short name for https://cyclonedx.org/bom
PREDICATE_TYPES = {contract.PREDICATE_SMOKE_REPORT: "smoke report", contract.PREDICATE_SBOM: "SBOM"}
LOCAL_REGISTRY_HOSTS = ("127.0.0.1", "localhost")


class SigningFailed(CheckFailed):
    """cosign could not sign or attest: nothing vouches for the digest, so no tag moves (exit 1)."""


class NotVerified(CheckFailed):
    """What the registry serves for a digest does not verify (exit 1)."""


@dataclass(frozen=True)
class Signer:
    """Who signs. ``key``: a cosign private key (key-based, no tlog upload); None: keyless (Fulcio + Rekor, the
    OIDC token GitHub Actions hands a job with ``id-token: write``)."""

    key: Path | None = None

    def describe(self) -> str:
        return f"key {self.key}" if self.key else "keyless (OIDC identity, transparency log)"


@dataclass(frozen=True)
class Verifier:
    """What a signature must come from: a cosign public key, or (keyless) a certificate identity and issuer."""

    key: Path | None = None
    identity: str | None = None
    issuer: str | None = None

    def __post_init__(self) -> None:
        if self.key is None and not (self.identity and self.issuer):
            raise VlmbuildError("--verify needs --key PUBLIC_KEY, or both --certificate-identity and "
                                "--certificate-oidc-issuer (a keyless signature from CI)")

    def args(self) -> list[str]:
        if self.key is not None:
            # key-based signatures are made without a tlog upload (see module docstring): nothing to look up there
            return ["--key", str(self.key), "--insecure-ignore-tlog=true"]
        return ["--certificate-identity", str(self.identity), "--certificate-oidc-issuer", str(self.issuer)]


def cosign_binary() -> str:
    """cosign on PATH, or beside this interpreter (where .ci/setup puts it)."""
    beside = Path(sys.executable).parent / "cosign"
    found = shutil.which("cosign") or (str(beside) if beside.is_file() else None)
    if not found:
        raise VlmbuildError("cosign not found on PATH nor in the venv's bin; `bash .ci/setup` installs Debian 13's "
                            "cosign 2.5.0 there")
    return found


def registry_args(ref: str) -> list[str]:
    """The local test registry speaks plain HTTP; every other registry gets TLS."""
    host = ref.split("/", 1)[0].split(":", 1)[0]
    return ["--allow-http-registry"] if host in LOCAL_REGISTRY_HOSTS else []


def cosign(args: list[str], what: str, error: type[CheckFailed], timeout: int = 300) -> str:
    """Run cosign; its stdout. A failure raises ``error`` with cosign's own last lines."""
    try:
        proc = subprocess.run([cosign_binary(), *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "COSIGN_YES": "true"})
    except subprocess.TimeoutExpired:
        raise error(f"{what}: cosign did not finish in {timeout} s") from None
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.strip().splitlines()[-6:] if line.strip())
        raise error(f"{what}: cosign exited {proc.returncode}:\n    " + tail.replace("\n", "\n    "))
    return proc.stdout


def sign_and_attest(ref_digest: str, report: bytes, sbom: bytes, signer: Signer, progress) -> None:
    """Sign ``repository@sha256:...`` and attest its report and SBOM. Raises SigningFailed."""
    if "@sha256:" not in ref_digest:
        raise VlmbuildError(f"{ref_digest}: signing needs a digest reference (repository@sha256:...)")
    base = ["--yes", *registry_args(ref_digest)]
    if signer.key is not None:
        base += ["--key", str(signer.key), "--tlog-upload=false"]
    with tempfile.TemporaryDirectory(prefix="vlmbuild-attest-") as tmp:
        report_file, sbom_file = Path(tmp) / "report.json", Path(tmp) / "sbom.json"
        report_file.write_bytes(report)
        sbom_file.write_bytes(sbom)
        cosign(["sign", *base, ref_digest], f"signing {ref_digest}", SigningFailed)
        progress.say(f"signed {ref_digest} ({signer.describe()})")
        for predicate_type, path in ((contract.PREDICATE_SMOKE_REPORT, report_file), (SBOM_PREDICATE_TYPE, sbom_file)):
            cosign(["attest", *base, "--type", predicate_type, "--predicate", str(path), ref_digest],
                   f"attesting the {path.stem} of {ref_digest}", SigningFailed)
        progress.say(f"attested the smoke report ({contract.PREDICATE_SMOKE_REPORT}) and the SBOM "
                     f"({contract.PREDICATE_SBOM}) of {ref_digest}")


def verify_signature(ref_digest: str, verifier: Verifier) -> None:
    cosign(["verify", *registry_args(ref_digest), *verifier.args(), ref_digest],
           f"the signature on {ref_digest}", NotVerified)


def attested_predicates(ref_digest: str, verifier: Verifier, predicate_type: str) -> list[dict]:
    """The predicates of every attestation of ``predicate_type`` on the digest that verifies, each an in-toto
    statement whose subject is this digest. Raises NotVerified when none does."""
    short = SBOM_PREDICATE_TYPE if predicate_type == contract.PREDICATE_SBOM else predicate_type
    out = cosign(["verify-attestation", *registry_args(ref_digest), *verifier.args(), "--type", short, ref_digest],
                 f"the {PREDICATE_TYPES[predicate_type]} attestation on {ref_digest}", NotVerified)
    digest = ref_digest.split("@sha256:", 1)[1]
    predicates = []
    for line in out.splitlines():
        if not line.strip():
            continue
        statement = json.loads(base64.b64decode(json.loads(line)["payload"]))
        subjects = [s.get("digest", {}).get("sha256") for s in statement.get("subject", [])]
        if statement.get("predicateType") == predicate_type and digest in subjects:
            predicates.append(statement["predicate"])
    if not predicates:
        raise NotVerified(f"{ref_digest}: no verified {PREDICATE_TYPES[predicate_type]} attestation names this digest")
    return predicates


def signer_from_flags(sign_key: Path | None, keyless: bool, unsigned: bool) -> Signer | None:
    """The signer a push uses, from its flags: exactly one of --sign-key, --sign-keyless, --unsigned. None: unsigned
    (said out loud: evidence nothing binds to the digest). Checked before anything is built or pushed."""
    chosen = [name for name, given in (("--sign-key", sign_key is not None), ("--sign-keyless", keyless),
                                       ("--unsigned", unsigned)) if given]
    if len(chosen) != 1:
        raise VlmbuildError(
            ("a push signs what it pushes: give --sign-key KEY (a cosign key pair; its password in COSIGN_PASSWORD), "
             "--sign-keyless (on CI, with an OIDC token), or --unsigned to push evidence that nothing binds to the "
             "digest") if not chosen else f"{' and '.join(chosen)} exclude each other: give one")
    if sign_key is not None and not Path(sign_key).is_file():
        raise VlmbuildError(f"--sign-key {sign_key}: no such file (make a pair with `cosign generate-key-pair`)")
    if unsigned:
        return None
    cosign_binary()  # fail now, not after the build
    return Signer(key=Path(sign_key).absolute() if sign_key is not None else None)
