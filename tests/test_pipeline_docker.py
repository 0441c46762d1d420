"""Build → smoke → tag → push on a real Docker engine and a real registry on 127.0.0.1 (started when absent).

The local variant is built from its committed lockfile (the real torch 2.6.0 stack) on a debootstrapped
bookworm base, smoked on CPU inside the image, tagged with its evidence, pushed and pulled back by digest.
Failures are real: DeepSpeed 0.15.4 (the seed's) fails the smoke, a tampered hash fails the build.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import (
    OWNER,
    REPO,
    TEST_REPO,
    compiled_at_import,
    image_files_that_differ,
    layer_entries,
    run_cli,
    saved_layer_entries,
)

# the session's engine fixture, `client`, is in conftest too
from vlmbuild import contract

pytestmark = pytest.mark.docker
docker = pytest.importorskip("docker")


def tag_id(client, ref: str) -> str | None:
    try:
        return client.images.get(ref).id
    except docker.errors.ImageNotFound:
        return None


def our_containers(client) -> list:
    return client.containers.list(all=True, filters={"label": OWNER})


def test_build_tags_the_tested_image_with_its_evidence(client, built_local):
    tag, lock_sha, immutable = built_local["tag"], built_local["lock_sha"], built_local["immutable"]
    build = built_local["report"]["builds"][0]
    assert build["passed"] and build["smoke_device"] == "cpu" and not build["reused"]
    # the immutable tag names the inputs: <variant tag>-<identity prefix>
    assert immutable == f"{tag}-{build['identity'][:12]}"
    assert build["tags"] == [tag, immutable]  # local is not the default: no latest
    image_id = tag_id(client, f"{TEST_REPO}:{tag}")
    assert image_id == build["image_id"] == tag_id(client, f"{TEST_REPO}:{immutable}")
    assert tag_id(client, f"{TEST_REPO}:latest") is None
    labels = client.images.get(image_id).labels
    assert labels["io.vlmbuild.smoke.result"] == "passed"
    # a commit keeps its container's labels: the evidence container carries none of ours, or every container
    # users make from the image would look like one of our leftovers
    assert not {OWNER, "io.vlmbuild.owner-process"} & set(labels), labels
    assert labels["io.vlmbuild.smoke.device"] == "cpu" and labels["io.vlmbuild.smoke.world-size"] == "2"
    assert labels["io.vlmbuild.smoke.nodes"] == "1,2"
    assert labels["io.vlmbuild.smoke.passes"] == "cpu x2 (cpu); cpu x2 over 2 nodes (cpu)"
    assert labels["io.vlmbuild.smoke.validated-on"].startswith("cpu-only")
    assert labels["io.vlmbuild.lock-sha256"] == lock_sha
    assert labels["io.vlmbuild.identity"] == build["identity"]
    assert labels["io.vlmbuild.base.image-id"] == tag_id(client, "vlmbuild-local/debian:bookworm")
    assert json.loads(labels["io.vlmbuild.versions"])["torch"] == "2.6.0"
    assert json.loads(labels["io.vlmbuild.smoke.checks"]) == {
        "stack": "passed", "zero3_load": "passed", "train_step": "passed", "checkpoint_resume": "passed",
        "grpo": "passed", "optimizer_offload": "passed", "lora": "passed", "trainer_resume": "passed",
        "zero3_repeat": "passed", "prebuilt_ops": "passed", "nodes": "passed"}
    # the CI job summary of this build names them too
    summary = run_cli("summary", str(built_local["report_path"]))
    assert summary.code == 0 and "lora passed, trainer_resume passed" in summary.out, summary.out
    # the evidence file inside the image is the report the labels vouch for; the SBOM too
    import hashlib

    from vlmbuild.engine import Engine

    files = Engine().read_image_files(image_id, ["/opt/vlmbuild/smoke-report.json", "/opt/vlmbuild/sbom.cdx.json"])
    report_bytes, sbom = files["/opt/vlmbuild/smoke-report.json"], files["/opt/vlmbuild/sbom.cdx.json"]
    assert hashlib.sha256(report_bytes).hexdigest() == labels["io.vlmbuild.smoke.report-sha256"]
    assert hashlib.sha256(sbom).hexdigest() == labels["io.vlmbuild.sbom-sha256"]
    assert json.loads(sbom)["bomFormat"] == "CycloneDX"
    evidence = json.loads(report_bytes)
    assert evidence["passed"] and len(evidence["passes"]) == 2
    report, over_nodes = evidence["passes"]
    # the pass over two containers: one world of 2, a rank on each node, and the report says both were on one host
    assert over_nodes["passed"] and over_nodes["nodes"] == 2 and over_nodes["world_size"] == 2
    assert [c["name"] for c in over_nodes["checks"]] == list(contract.ACROSS_NODES)
    nodes = next(c for c in over_nodes["checks"] if c["name"] == "nodes")["details"]
    assert nodes["hosts"] == ["node0", "node1"]
    assert sorted((r["rank"], r["node"], r["hostname"], r["world_size"]) for r in nodes["ranks"]) == [
        (0, 0, "node0", 2), (1, 1, "node1", 2)]
    assert over_nodes["node_containers"]["hosts"] == 1 and over_nodes["node_containers"]["exit_status"] == [0, 0]
    assert report["passed"] and report["mode"] == "cpu" and report["world_size"] == 2
    assert report["checks"][0]["details"]["lock"]["mismatches"] == 0
    repeat = next(c for c in report["checks"] if c["name"] == "zero3_repeat")["details"]
    assert repeat["runs"] == 3 and len(set(repeat["weights_sha256"])) == 1
    # the released image is the tested one plus one evidence layer
    candidate = client.images.get(build["candidate_id"])
    assert client.images.get(image_id).attrs["RootFS"]["Layers"][:-1] == candidate.attrs["RootFS"]["Layers"]
    assert not our_containers(client)


def test_deepspeed_ops_are_built_in_for_a_portable_cpu(client, built_local):
    """ds_report shows the CPU ops installed; cpu_adam holds no AVX-512 instruction although the build machine
    has AVX-512 (portable-cxx), and the image records the built wheel's sha256."""
    script = ("DS_ACCELERATOR=cpu ds_report 2>/dev/null | grep -E '^(cpu_adam|deepspeed_shm_comm|fused_adam) ' "
              "| grep -c YES; "
              "objdump -d /opt/venv/lib/python3.11/site-packages/deepspeed/ops/adam/cpu_adam_op.*.so | grep -c zmm; "
              "cat /opt/vlmbuild/built-wheels.sha256")
    out = client.containers.run(f"{TEST_REPO}:{built_local['tag']}", ["bash", "-c", script], remove=True,
                                network_mode="none", labels={OWNER: "test"}).decode().split("\n")
    assert out[0].strip() == "3", out
    assert out[1].strip() == "0", out  # no zmm register: AVX2 code only
    assert re.match(r"^[0-9a-f]{64}  \./deepspeed-0\.19\.8-cp311-cp311-linux_x86_64\.whl$", out[2]), out


def test_the_image_ships_its_bytecode_and_compiles_nothing_at_import(client, built_local):
    """Every module the smoke's ranks import (torch, transformers, DeepSpeed, trl, datasets, the stdlib, the smoke)
    has a valid hash-based .pyc in the image: a process started as an unprivileged user compiles none."""
    found = compiled_at_import(client, f"{TEST_REPO}:{built_local['tag']}")
    assert found["imported"] > 2000, found["imported"]
    assert found["compiled"] == [], f"{len(found['compiled'])} compiled at import, first: {found['compiled'][:5]}"


def metadata_only_wheel(directory: Path, name: str, version: str) -> Path:
    """A wheel of ``name`` ``version`` holding only its metadata. A stand-in, and only because the test's containers
    reach no package index (no network): what is tested is pip's decision to install it or not, which reads no
    more than the name and version."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: vlmbuild-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(text.encode())}\n" for path, text in files.items()) + f"{dist}/RECORD,,\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in {**files, f"{dist}/RECORD": record}.items():
            zf.writestr(path, text)
    return wheel


def test_the_images_pip_refuses_to_replace_the_validated_deepspeed(client, built_local, tmp_path):
    """VLM-R1's setup.sh pins deepspeed==0.15.4 (no resume on torch 2.6): run in the image, pip refuses it and names
    the constraint; with the constraint unset the same pip installs it, so the refusal is the constraint's."""
    metadata_only_wheel(tmp_path, "deepspeed", "0.15.4")
    image = f"{TEST_REPO}:{built_local['tag']}"
    install = "pip install --no-index --find-links /wheels --disable-pip-version-check deepspeed==0.15.4 2>&1; "

    def run(script: str) -> str:
        return client.containers.run(image, ["bash", "-c", script], remove=True, network_mode="none",
                                     volumes={str(tmp_path): {"bind": "/wheels", "mode": "ro"}},
                                     labels={OWNER: "test"}).decode()

    refused = run(install + "echo exit=$?; pip show deepspeed 2>/dev/null | grep ^Version")
    assert "Cannot install deepspeed==0.15.4" in refused and "(constraint) deepspeed==0.19.8" in refused, refused
    assert "exit=1" in refused and "Version: 0.19.8" in refused
    replaced = run("PIP_CONSTRAINT= " + install + "echo exit=$?; pip show deepspeed 2>/dev/null | grep ^Version")
    assert "Successfully installed deepspeed-0.15.4" in replaced and "Version: 0.15.4" in replaced, replaced


# Paths only the build may use: its secrets, its helper files, the download caches it mounts. BuildKit 0.8 (what
# dockerd 20.10 runs) leaves the empty directories it creates as mount points in the layer
# (https://github.com/moby/buildkit/issues/3153, fixed later by moby/buildkit#3307): an empty directory is allowed,
# a file under one of these paths is not.
BUILD_ONLY = ("build-ca", "build-env", "vlmbuild-build", ".cache/pip", ".cache/uv", "pip-cache", "uv-cache",
              "run/secrets", "opt/build-tools", "vlmbuild-wheels", "tmp/wheels", "tmp/inputs")


def scan_layers(client, ref: str) -> list[str]:
    """Every file, in every layer of the image, under a path only the build may use."""
    return [f"{e.layer}: {e.path}" for e in layer_entries(client, ref)
            if not e.is_dir and any(s in e.path for s in BUILD_ONLY)]


def test_the_layer_scan_reads_what_docker_save_ships(client):
    """The scans read the engine's layer directories (no export on a shared disk); they must see what a `docker
    save` of the same image ships, layer by layer: a deletion (a whiteout), a symlink to a directory, the base."""
    dockerfile = (b"FROM vlmbuild-local/debian:bookworm\n"
                  b"RUN mkdir -p /opt/a && echo x > /opt/a/f && ln -s /opt/a /opt/l\n"
                  b"RUN rm /opt/a/f && rm -rf /usr/share/doc\n")
    image, _ = client.images.build(fileobj=io.BytesIO(dockerfile), rm=True, labels={OWNER: "tests"})
    try:
        def per_layer(entries):
            layers = {}
            for e in entries:
                layers.setdefault(e.layer, set()).add((e.path, e.is_dir))
            return sorted(sorted(layer) for layer in layers.values())

        read = layer_entries(client, image.id)
        saved = saved_layer_entries(client, image.id, len(image.attrs["RootFS"]["Layers"]))
        assert per_layer(read) == per_layer(saved)
        assert {("opt/a/.wh.f", False), ("usr/share/.wh.doc", False), ("opt/l", False)} <= {
            (e.path, e.is_dir) for e in read}
        assert len({e.layer for e in read}) == 3
    finally:
        client.images.remove(image.id, force=True)


def extra_host_cas() -> list[str]:
    """A line from each certificate the host trusts beyond Debian's stock bundle (the intercepting proxy's)."""
    host = os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    stock = Path("/usr/share/ca-certificates")
    stock_text = "".join(p.read_text(errors="ignore") for p in stock.rglob("*.crt")) if stock.is_dir() else ""
    out = []
    if not Path(host).is_file():
        return out
    for block in Path(host).read_text(errors="ignore").split("-----BEGIN CERTIFICATE-----")[1:]:
        lines = [l for l in block.splitlines() if l and "END CERTIFICATE" not in l]
        if len(lines) > 3 and lines[2] not in stock_text:
            out.append(lines[2])
    return out


def test_final_image_holds_no_ca_no_proxy_no_cache(client, built_local):
    image = client.images.get(f"{TEST_REPO}:{built_local['tag']}")
    env = "\n".join(image.attrs["Config"].get("Env") or [])
    assert not any(k in env.upper() for k in ("PROXY", "SSL_CERT_FILE", "PIP_CERT", "TOKEN"))
    history = json.dumps(client.api.history(image.id))
    assert "build-ca" not in history and "vlmbuild-build" not in history and "PROXY" not in history.upper()
    assert scan_layers(client, image.id) == []
    # and no file anywhere in the image holds the certificates the build had to trust
    needles = extra_host_cas()
    script = ("test -z \"$(find /tmp /run/secrets /root/.cache /opt/build-tools -type f 2>/dev/null)\" && "
              "test -z \"$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock | grep -v partial)\"")
    for needle in needles:
        script += f" && ! grep -rqsF -- '{needle}' /etc /opt /usr/local /root /tmp /workspace"
    out = client.containers.run(image.id, ["bash", "-c", script + " && echo CLEAN"], remove=True,
                                network_mode="none", labels={OWNER: "test"})
    assert out.decode().strip() == "CLEAN"


def test_push_needs_an_explicit_flag_for_cpu_evidence(built_local):
    result = run_cli("push", "vlm-r1", "--variant", "local", "--repository", TEST_REPO, "--unsigned")
    assert result.code == 1 and "--allow-cpu-evidence" in result.err


@pytest.fixture(scope="session")
def cosign_keys(tmp_path_factory) -> dict:
    """Two cosign key pairs: ours (the validator's) and a forger's, each with its password."""
    from vlmbuild.signing import cosign_binary

    keys = {}
    for who in ("ours", "forger"):
        directory = tmp_path_factory.mktemp(f"cosign-{who}")
        password = f"test-password-{who}"
        subprocess.run([cosign_binary(), "generate-key-pair"], cwd=directory, check=True, capture_output=True,
                       env={**os.environ, "COSIGN_PASSWORD": password})
        keys[who] = {"key": directory / "cosign.key", "pub": directory / "cosign.pub", "password": password}
    return keys


@pytest.fixture(scope="session")
def signed_push(client, built_local, cosign_keys) -> dict:
    """`vlmbuild push --sign-key`: the immutable tag pushed, its digest signed and attested, then the moving tag."""
    ours = cosign_keys["ours"]
    result = run_cli("push", "vlm-r1", "--variant", "local", "--repository", TEST_REPO, "--allow-cpu-evidence",
                     "--sign-key", str(ours["key"]), env={"COSIGN_PASSWORD": ours["password"]}, timeout=1800)
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    lines = [line for line in result.out.splitlines() if line.startswith(("pushed ", "signed ", "attested "))]
    digest = lines[0].split()[-1]
    return {"result": result, "lines": lines, "digest": digest}


def test_push_signs_then_moves_the_tags_and_pulls_back_by_digest(client, built_local, signed_push, cosign_keys):
    tag, immutable, digest = built_local["tag"], built_local["immutable"], signed_push["digest"]
    lines = [" ".join(line.split()[:2]) for line in signed_push["lines"]]
    # the immutable tag first, signed and attested, and only then the moving tag
    assert lines == [f"pushed {TEST_REPO}:{immutable}", f"signed {TEST_REPO}@{digest}",
                     "attested the", f"pushed {TEST_REPO}:{tag}"], signed_push["lines"]
    assert digest.startswith("sha256:") and signed_push["lines"][-1].split()[-1] == digest
    pulled = client.images.pull(f"{TEST_REPO}@{digest}")
    assert pulled.id == tag_id(client, f"{TEST_REPO}:{tag}")
    assert pulled.labels["io.vlmbuild.smoke.result"] == "passed"
    # no key in any layer's history nor in the report: signing happens outside the build, on the pushed digest
    key_text = cosign_keys["ours"]["key"].read_text().splitlines()[1]
    assert key_text not in json.dumps(pulled.history()) and key_text not in json.dumps(built_local["report"])
    # pushing again: the registry serves the immutable tag with this very content already, nothing to overwrite
    again = run_cli("push", "vlm-r1", "--variant", "local", "--repository", TEST_REPO, "--allow-cpu-evidence",
                    "--unsigned", timeout=1800)
    assert again.code == 0 and f"already in the registry: {TEST_REPO}:{immutable} {digest}" in again.out


def test_inspect_verify_checks_the_signature_and_the_attested_evidence(built_local, signed_push, cosign_keys):
    from vlmbuild import contract
    from vlmbuild.signing import cosign_binary

    ref = f"{TEST_REPO}:{built_local['tag']}"
    result = run_cli("inspect", ref, "--verify", "--key", str(cosign_keys["ours"]["pub"]), "--json")
    assert result.code == 0, result.out[-3000:] + result.err
    whats = [f["what"] for f in json.loads(result.out)["findings"] if f["ok"]]
    for needed in ("the image inspected here is the one the registry serves", "the attested smoke report is the one "
                   "inside the image", "the attested report passes the contract's test",
                   "the attested SBOM is the one inside the image"):
        assert needed in whats, whats
    # what the README's pull-user section shows: cosign alone, the report with its device and world size
    plain = subprocess.run([cosign_binary(), "verify-attestation", "--key", str(cosign_keys["ours"]["pub"]),
                            "--insecure-ignore-tlog=true", "--allow-http-registry", "--type",
                            contract.PREDICATE_SMOKE_REPORT, f"{TEST_REPO}@{signed_push['digest']}"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    statement = json.loads(base64.b64decode(json.loads(plain.stdout.splitlines()[0])["payload"]))
    assert statement["subject"][0]["digest"]["sha256"] == signed_push["digest"].split(":", 1)[1]
    assert [(p["mode"], p["world_size"], p.get("nodes")) for p in statement["predicate"]["passes"]] == [
        ("cpu", 2, 1), ("cpu", 2, 2)]
    # another key: the same registry content does not verify
    other = run_cli("inspect", ref, "--verify", "--key", str(cosign_keys["forger"]["pub"]))
    assert other.code == 1 and "FAIL the digest" in other.out and "signed by the expected signer" in other.out


def test_a_consistent_forgery_under_the_same_tag_fails_verify(client, built_local, signed_push, cosign_keys):
    """Report and labels rewritten together (inspect alone finds nothing), signed and attested with the forger's own
    key, pushed under the same tag: --verify with our key fails, naming the signature."""
    from vlmbuild import contract
    from vlmbuild.engine import Engine
    from vlmbuild.signing import Signer, sign_and_attest

    tag = built_local["tag"]
    engine = Engine()
    genuine = engine.read_image_files(built_local["image_id"], [contract.REPORT_PATH, contract.SBOM_PATH])
    forged = genuine[contract.REPORT_PATH].replace(b'"seconds": ', b'"seconds": 1', 1)
    # the forger's evidence layer, made the way a release adds ours: the report and the label that vouches for it
    image = client.images.get(engine.add_evidence(built_local["image_id"], {contract.REPORT_PATH: forged},
                                                  {contract.LABEL_REPORT_SHA256: hashlib.sha256(forged).hexdigest()}))
    image.tag(TEST_REPO, tag)
    try:
        assert run_cli("inspect", f"{TEST_REPO}:{tag}").code == 0  # consistent: the image alone cannot tell
        digest = None
        for event in client.api.push(TEST_REPO, tag=tag, stream=True, decode=True):
            digest = event.get("aux", {}).get("Digest", digest)
        assert digest and digest != signed_push["digest"]

        class Quiet:
            def say(self, _text):
                pass

        forger = cosign_keys["forger"]
        os.environ["COSIGN_PASSWORD"] = forger["password"]
        sign_and_attest(f"{TEST_REPO}@{digest}", forged, genuine[contract.SBOM_PATH], Signer(forger["key"]), Quiet())
        del os.environ["COSIGN_PASSWORD"]
        result = run_cli("inspect", f"{TEST_REPO}:{tag}", "--verify", "--key", str(cosign_keys["ours"]["pub"]))
        assert result.code == 1, result.out
        assert f"FAIL the digest {digest[:19]} is signed by the expected signer" in result.out
    finally:
        client.images.get(built_local["image_id"]).tag(TEST_REPO, tag)
        client.images.push(TEST_REPO, tag=tag)  # the genuine image under its tag again
        client.images.remove(image.id, force=True)


def test_a_signing_failure_moves_no_tag(client, built_local, cosign_keys):
    """cosign refuses (a wrong key password): exit 1 with cosign's reason; the immutable tag is in the registry,
    unsigned (verify fails on it, a retry signs it), and the moving tag was never pushed."""
    from vlmbuild.engine import Engine

    repository = f"{TEST_REPO}-signfail"
    for tag in (built_local["tag"], built_local["immutable"]):
        client.images.get(built_local["image_id"]).tag(repository, tag)
    ours = cosign_keys["ours"]
    result = run_cli("push", "vlm-r1", "--variant", "local", "--repository", repository, "--allow-cpu-evidence",
                     "--sign-key", str(ours["key"]), env={"COSIGN_PASSWORD": "not the password"}, timeout=1800)
    assert result.code == 1, result.out[-2000:] + result.err[-2000:]
    assert "signing" in result.err and "cosign exited" in result.err and "Traceback" not in result.err
    engine = Engine()
    assert engine.remote_digest(repository, built_local["immutable"]) is not None
    assert engine.remote_digest(repository, built_local["tag"]) is None  # the moving tag did not move


# ------------------------------------------------------------------ failures


@pytest.fixture(scope="session")
def seed_on_local_base(tmp_path_factory) -> Path:
    """A copy of the repo whose spec has one more variant: the seed's DeepSpeed 0.15.4 on the local base."""
    root = tmp_path_factory.mktemp("seedrepo")
    import shutil

    shutil.copytree(REPO / "images", root / "images")
    shutil.copytree(REPO / "lockfiles", root / "lockfiles")
    spec = root / "images" / "vlm-r1.yaml"
    spec.write_text(spec.read_text() + """
  local-seed:
    expect: rejected
    description: the seed's DeepSpeed 0.15.4 on the local base (test only)
    base_image: vlmbuild-local/debian:bookworm
    python: "3.11"
    cuda: null
    tag: "bookworm-py{python}-torch{torch}-ds{deepspeed}-tf{transformers}"
    packages:
      deepspeed: "==0.15.4"
""")
    result = run_cli("lock", "vlm-r1", "--variant", "local-seed", root=root, timeout=600)
    assert result.code == 0, result.err
    return root


def test_rules_refuse_the_seed_before_any_build(seed_on_local_base):
    result = run_cli("build", "vlm-r1", "--variant", "local-seed", root=seed_on_local_base)
    assert result.code == 1
    assert "violates known-bad rules; not building" in result.err
    assert "ds-0.16.3-triton-3.2-no-gpu-import" in result.err


def test_a_variant_that_fails_the_gate_is_not_tagged_and_moves_no_tag(client, built_local, seed_on_local_base):
    """The seed's DeepSpeed 0.15.4 no longer even builds here: its setup.py imports triton, which on a GPU-less
    builder dies with "0 active drivers" (rule row 5). The gate stops at the build, explained, and tags nothing.
    (What the smoke says of it at run time: tests/test_smoke_stack.py, with 0.15.4 laid over the good stack.)"""
    from vlmbuild.lockfile import read_lockfile
    from vlmbuild.spec import load_spec

    variant = load_spec(seed_on_local_base / "images" / "vlm-r1.yaml").variant("local-seed")
    tag = variant.tag(read_lockfile(variant.lockfile_path).pins)
    # an existing tag of that name, on another image: it must not move
    placeholder = client.images.get("vlmbuild-local/debian:bookworm")
    placeholder.tag(TEST_REPO, tag)
    report = seed_on_local_base / "build.json"
    result = run_cli("build", "vlm-r1", "--variant", "local-seed", "--ignore-rules", "--smoke-device", "cpu",
                     "--repository", TEST_REPO, "--report", str(report), root=seed_on_local_base, timeout=3600)
    assert result.code == 1, result.out[-3000:]
    assert "nothing was tagged" in result.err and "[deepspeed-wheel" in result.err
    assert "0 active drivers" in result.err and "ds-0.16.3-triton-3.2-no-gpu-import" in result.err
    assert tag_id(client, f"{TEST_REPO}:{tag}") == placeholder.id
    assert not [t for i in client.images.list(name=TEST_REPO) for t in i.tags if t.startswith(f"{TEST_REPO}:{tag}-")]
    assert not our_containers(client)
    build = json.loads(report.read_text())["builds"][0]
    assert build["passed"] is False and build["failing_checks"] == ["build"] and build["candidate_id"] is None


def test_a_tampered_lock_hash_fails_the_build(client, built_local, tmp_path):
    import re
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(REPO / "images", root / "images")
    shutil.copytree(REPO / "lockfiles", root / "lockfiles")
    lock = root / "lockfiles" / "vlm-r1" / "local.txt"
    text = lock.read_text()
    # every hash of trl (a package layer of its own: only that stage rebuilds) replaced by a wrong one
    block = re.search(r"^trl==0\.17\.0 \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M)
    assert block
    lock.write_text(text.replace(block.group(1), re.sub(r"[0-9a-f]{64}", "0" * 64, block.group(1))))
    result = run_cli("build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu", "--repository",
                     f"{TEST_REPO}-tampered", root=root, timeout=1800)
    assert result.code == 1, result.out[-3000:]
    assert "build failed at [pkg-trl 1/1]" in result.err  # the stage of the package whose hash is wrong
    assert "hash" in result.err.lower()
    assert not client.images.list(name=f"{TEST_REPO}-tampered")


def test_a_hanging_smoke_is_killed_and_nothing_is_tagged(client, built_local):
    before = tag_id(client, f"{TEST_REPO}:{built_local['tag']}")
    result = run_cli("build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu", "--smoke-timeout", "3",
                     "--rebuild", "--repository", TEST_REPO, timeout=1800)
    assert result.code == 1, result.out[-3000:]
    assert "killed at the timeout" in result.out
    assert tag_id(client, f"{TEST_REPO}:{built_local['tag']}") == before
    assert not our_containers(client)


def as_in_a_terminal() -> None:
    """SIGINT as a terminal delivers it. A shell without job control starts background jobs with SIGINT
    ignored (POSIX), and Python then installs no KeyboardInterrupt handler: `bash .ci/run &` would make the
    Ctrl-C test meaningless."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_build(*extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlmbuild", "build", "vlm-r1", "--variant", "local",
                             "--smoke-device", "cpu", "--repository", TEST_REPO, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=as_in_a_terminal)


def images_of(client) -> set[str]:
    return {i.id for i in client.images.list(all=True)}


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_the_smoke_removes_our_container_and_tags_nothing(client, built_local, sig, code):
    """SIGTERM (how CI runners cancel a job) takes the same way out as Ctrl-C."""
    before = {t: tag_id(client, f"{TEST_REPO}:{t}") for t in (built_local["tag"], built_local["immutable"])}
    proc = start_build("--rebuild")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not client.containers.list(filters={"label": f"{OWNER}=smoke"}):
        time.sleep(0.5)
    assert client.containers.list(filters={"label": f"{OWNER}=smoke"}), "the smoke never started"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out[-2000:]
    assert not our_containers(client)
    assert {t: tag_id(client, f"{TEST_REPO}:{t}") for t in before} == before


def test_a_smoke_killed_with_sigkill_leaves_a_container_that_the_next_run_removes(client, built_local):
    """SIGKILL reaches no handler: the smoke container stays (still running the ranks). It carries its maker's
    process mark, and the next vlmbuild command that starts a container (here `inspect`) removes it; a container
    whose maker lives (this test process's mark) is left alone, and so is one that is not ours to judge."""
    from vlmbuild import owner
    from vlmbuild.contract import OWNER_PROCESS_LABEL

    image = f"{TEST_REPO}:{built_local['tag']}"
    alive = client.containers.create(image, ["true"], labels={OWNER: "test", OWNER_PROCESS_LABEL: owner.mark()})
    elsewhere = client.containers.create(image, ["true"], labels={OWNER: "test",
                                                                  OWNER_PROCESS_LABEL: "another-host/b/1/2"})
    try:
        proc = start_build("--rebuild")
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not client.containers.list(filters={"label": f"{OWNER}=smoke"}):
            time.sleep(0.5)
        assert client.containers.list(filters={"label": f"{OWNER}=smoke"}), "the smoke never started"
        proc.kill()
        proc.communicate(timeout=60)
        left = client.containers.list(all=True, filters={"label": f"{OWNER}=smoke"})
        assert len(left) == 1 and owner.is_gone(left[0].labels[OWNER_PROCESS_LABEL])
        assert run_cli("inspect", image).code == 0
        assert {c.id for c in our_containers(client)} == {alive.id, elsewhere.id}
    finally:
        alive.remove(force=True)
        elsewhere.remove(force=True)


def test_a_build_the_disk_cannot_hold_is_refused_before_it_starts(client, built_local, repo_copy):
    """The spec says a cold build takes more than this disk has free: exit 2 before BuildKit is asked anything,
    the message names the spec file, the key and the numbers; no image made, no tag moved. `doctor` says the same
    (exit 1) with the engine's storage as du sees it against what the engine accounts for."""
    spec = repo_copy / "images" / "vlm-r1.yaml"
    spec.write_text(spec.read_text().replace("  local:\n", "  local:\n    build_disk_gb: 100000\n", 1))
    before = {t: tag_id(client, f"{TEST_REPO}:{t}") for t in (built_local["tag"], built_local["immutable"])}
    images = images_of(client)
    result = run_cli("--root", str(repo_copy), "build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu",
                     "--repository", TEST_REPO, "--rebuild")
    assert result.code == 2, result.out[-2000:] + result.err
    message = " ".join(result.err.split())
    for needed in ("a cold build takes about 100000 GB of free disk", f"{spec}, key build_disk_gb", "GB free",
                   "The build was not started and nothing was tagged"):
        assert needed in message, message
    assert "Traceback" not in result.err and "building vlm-r1/local" not in result.out
    assert images_of(client) == images
    assert {t: tag_id(client, f"{TEST_REPO}:{t}") for t in before} == before

    doctor = run_cli("--root", str(repo_copy), "doctor", "vlm-r1", "--json")
    assert doctor.code == 1, doctor.out + doctor.err
    found = json.loads(doctor.out)
    enough = {v["variant"]: v["enough"] for v in found["variants"]}
    assert enough["local"] is False and set(enough) == {"local", "cu124"}
    disk = found["disk"]
    assert disk["images"] >= client.images.get(f"{TEST_REPO}:{built_local['tag']}").attrs["Size"] > 0
    assert disk["on_disk"] is not None and disk["unaccounted"] == max(0, disk["on_disk"] - disk["accounted"])


def test_sigterm_during_the_build_cancels_it_and_leaves_nothing(client, built_local):
    """Killed while BuildKit builds (from scratch, so it is still building): exit 143, no candidate, no tag moved,
    no container, and the BuildKit CLI gone with it."""
    before = {t: tag_id(client, f"{TEST_REPO}:{t}") for t in (built_local["tag"], built_local["immutable"])}
    images = images_of(client)
    proc = start_build("--rebuild", "--no-cache")
    deadline = time.monotonic() + 300
    out = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        out += line
        if "running" in line:  # a build stage is running
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out + rest)[-2000:]
    assert "terminated" in rest
    assert {t: tag_id(client, f"{TEST_REPO}:{t}") for t in before} == before
    assert images_of(client) <= images, "an image (a candidate?) survived the SIGTERM"
    assert not our_containers(client)
    cli_left = subprocess.run(["pgrep", "-f", "docker build --progress=plain"], capture_output=True, text=True)
    assert cli_left.stdout.strip() == "", "the BuildKit CLI outlived the build"


def test_sigkill_during_the_build_cancels_it_too(client, built_local):
    """SIGKILL reaches no handler of ours: the BuildKit CLI gets SIGINT from the kernel when vlmbuild dies (its
    parent-death signal) and cancels the build as on Ctrl-C, instead of building on into an untagged candidate."""
    images = images_of(client)
    proc = start_build("--rebuild", "--no-cache")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if "running" in proc.stdout.readline():
            break
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", "docker build --progress=plain"],
                                                         capture_output=True).returncode == 0:
        time.sleep(1)
    left = subprocess.run(["pgrep", "-f", "docker build --progress=plain"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the BuildKit CLI outlived a SIGKILLed vlmbuild"
    assert images_of(client) <= images, "an image (a candidate?) was made after the SIGKILL"


def test_rebuilding_an_unchanged_variant_builds_nothing_and_moves_no_tag(client, built_local):
    images = images_of(client)
    result = run_cli("build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu", "--repository", TEST_REPO)
    assert result.code == 0, result.out[-2000:] + result.err[-2000:]
    assert "already names" in result.out and "nothing to build, no tag moved" in result.out
    assert images_of(client) == images
    assert tag_id(client, f"{TEST_REPO}:{built_local['immutable']}") == built_local["image_id"]


def vlmbuild_copy(tmp_path: Path, change_smoke: bool) -> Path:
    """A copy of the vlmbuild package (another version of the tool), its smoke code changed if asked."""
    import shutil

    pkg = tmp_path / "pkg" / "vlmbuild"
    shutil.copytree(REPO / "builder", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    if change_smoke:
        worker = pkg / "smoke" / "worker.py"
        worker.write_text(worker.read_text() + "\n# a change to the smoke code: another image\n")
    return pkg.parent


def test_a_changed_base_makes_a_new_immutable_tag(client, built_local):
    """The base's image id is an input: a base with the same files and another id (a label added) is another
    image. `vlmbuild plan` resolves it against the engine without building."""
    base = "vlmbuild-test/relabelled-base:1"
    client.images.build(fileobj=io.BytesIO(b"FROM vlmbuild-local/debian:bookworm\nLABEL io.vlmbuild.test=base\n"),
                        tag=base, rm=True)
    same = run_cli("plan", "vlm-r1", "--variant", "local", "--repository", TEST_REPO)
    other = run_cli("plan", "vlm-r1", "--variant", "local", "--repository", TEST_REPO, "--base-image", base)
    assert same.code == other.code == 0, same.err + other.err
    same, other = json.loads(same.out), json.loads(other.out)
    assert same["immutable_tag"] == built_local["immutable"] and same["built"] == built_local["image_id"]
    assert other["immutable_tag"] != same["immutable_tag"] and other["built"] is None
    assert other["base_image_id"] == tag_id(client, base) != same["base_image_id"]
    client.images.remove(base)


def test_a_tag_failure_between_two_tags_moves_neither(client, built_local):
    """The tag set moves as a unit, on the real engine: the second tag fails (injected), the first goes back."""
    from vlmbuild.engine import Engine, EngineError
    from vlmbuild.release import move_tags

    class SecondTagFails(Engine):
        calls = 0

        def tag(self, image_id, repository, tag):
            SecondTagFails.calls += 1
            if SecondTagFails.calls == 2:
                raise EngineError("injected: the engine refused the second tag")
            super().tag(image_id, repository, tag)

    engine = SecondTagFails()
    placeholder = tag_id(client, "vlmbuild-local/debian:bookworm")
    client.images.get(placeholder).tag(TEST_REPO, "unit-a")
    with pytest.raises(EngineError, match="injected"):
        move_tags(engine, built_local["image_id"], TEST_REPO, ["unit-a", "unit-b"])
    assert tag_id(client, f"{TEST_REPO}:unit-a") == placeholder  # moved, then put back
    assert tag_id(client, f"{TEST_REPO}:unit-b") is None
    client.images.remove(f"{TEST_REPO}:unit-a")


def tampered(client, image_id: str, change: str) -> str:
    """A copy of an image with one label, or the report inside, changed: a new image id."""
    container = client.containers.create(image_id, command=["true"], labels={OWNER: "test"})
    try:
        if change == "label":
            image = container.commit(changes=['LABEL "io.vlmbuild.smoke.checks"="{\\"stack\\":\\"passed\\"}"'])
        else:
            stream, _ = container.get_archive("/opt/vlmbuild/smoke-report.json")
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                member = tar.next()
                data = tar.extractfile(member).read().replace(b'"world_size": 2', b'"world_size": 8', 1)
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                info = tarfile.TarInfo("opt/vlmbuild/smoke-report.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            container.put_archive("/", buf.getvalue())
            image = container.commit()
    finally:
        container.remove(force=True)
    return image.id


def test_inspect_verifies_a_built_image(built_local):
    result = run_cli("inspect", f"{TEST_REPO}:{built_local['tag']}", "--json")
    assert result.code == 0, result.out[-3000:] + result.err
    data = json.loads(result.out)
    assert data["ok"] and all(f["ok"] for f in data["findings"]) and len(data["findings"]) >= 15
    assert [(p["mode"], p["world_size"], p["nodes"]) for p in data["passes"]] == [("cpu", 2, 1), ("cpu", 2, 2)]
    assert any(f["what"] == "the nodes label says what the report says" and f["ok"] for f in data["findings"])
    whats = [layer["what"] for layer in data["layers"]]
    assert "lock layer torch, installed in place" in whats and any(w.startswith("package trl==") for w in whats)
    assert sum(layer["size"] for layer in data["layers"]) == data["size"]


@pytest.mark.parametrize("change, finding", [("label", "the checks label says what the report says"),
                                             ("report", "the report hashes to the label that vouches for it")])
def test_inspect_fails_a_tampered_image(client, built_local, change, finding):
    image = tampered(client, built_local["image_id"], change)
    try:
        result = run_cli("inspect", image, "--json")
        assert result.code == 1, result.out[-2000:]
        failed = [f["what"] for f in json.loads(result.out)["findings"] if not f["ok"]]
        assert finding in failed, failed
    finally:
        client.images.remove(image, force=True)
    assert not our_containers(client)


def test_an_image_whose_report_was_edited_after_tagging_is_not_reused_or_pushed(client, built_local):
    """Its labels all say passed and its identity is these inputs', but the report inside no longer hashes to its
    label: the immutable tag names no validated image (plan says so, a build would not reuse it), and a push
    refuses it before anything leaves the machine."""
    image = tampered(client, built_local["image_id"], "report")
    immutable = built_local["immutable"]
    try:
        def vouching(labels: dict) -> dict:
            return {k: v for k, v in labels.items() if k != OWNER}  # the copy's maker marks its container

        assert vouching(client.images.get(image).labels) == vouching(client.images.get(built_local["image_id"]).labels)
        client.images.get(image).tag(TEST_REPO, immutable)
        plan = run_cli("plan", "vlm-r1", "--variant", "local", "--repository", TEST_REPO)
        assert plan.code == 0, plan.err
        assert json.loads(plan.out)["built"] is None
        push = run_cli("push", "vlm-r1", "--variant", "local", "--repository", TEST_REPO, "--allow-cpu-evidence",
                       "--unsigned")
        assert push.code == 1, push.out + push.err
        assert (f"{TEST_REPO}:{immutable}: carries no passing smoke evidence (its smoke report "
                "/opt/vlmbuild/smoke-report.json does not hash to the label that vouches for it") in push.err
    finally:
        client.images.get(built_local["image_id"]).tag(TEST_REPO, immutable)
        client.images.remove(image, force=True)
    plan = run_cli("plan", "vlm-r1", "--variant", "local", "--repository", TEST_REPO)
    assert json.loads(plan.out)["built"] == built_local["image_id"]  # the untouched image is validated again


def test_smoke_of_an_image_without_the_smoke_is_a_clear_exit_2(client):
    base = "vlmbuild-local/debian:bookworm"
    result = run_cli("smoke", base, "--device", "cpu")
    assert result.code == 2 and f"{base}: not an image vlmbuild built" in result.err and "Traceback" not in result.err
    # an image that claims the smoke but lacks it: the container's start fails; nothing of it stays behind
    fake = client.images.get(base)
    container = client.containers.create(fake.id, command=["true"], labels={OWNER: "test"})
    impostor = container.commit(repository="vlmbuild-test/impostor", tag="1",
                                changes=['LABEL "io.vlmbuild.smoke-entrypoint"="vlmbuild-smoke"'])
    container.remove(force=True)
    try:
        result = run_cli("smoke", "vlmbuild-test/impostor:1", "--device", "cpu")
        assert result.code == 2, result.out + result.err
        assert "the smoke could not start in vlmbuild-test/impostor:1" in result.err and "Traceback" not in result.err
        assert not client.containers.list(all=True, filters={"ancestor": impostor.id})
    finally:
        client.images.remove(impostor.id, force=True)
    assert not our_containers(client)


CHECKPOINT = """
import sys, torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
sys.path.insert(0, "/opt/vlmbuild/lib")
from vlmbuild.smoke.tiny_model import tiny_config, tiny_processor
torch.manual_seed(3)
model = Qwen2_5_VLForConditionalGeneration(tiny_config()).to(torch.bfloat16)  # as Qwen2.5-VL releases: bf16
model.save_pretrained("/out", safe_serialization=True)
tiny_processor().save_pretrained("/out")
"""


def test_smoke_of_an_image_with_a_bf16_checkpoint_mounted_read_only(client, built_local, tmp_path):
    """`vlmbuild smoke` again on the built image (how a user checks an image after the fact), on a checkpoint of
    its own: the release's dtype, mounted read-only."""
    model = tmp_path / "model"
    model.mkdir()
    client.containers.run(built_local["image_id"], ["python", "-c", CHECKPOINT], remove=True, network_mode="none",
                          volumes={str(model): {"bind": "/out", "mode": "rw"}}, labels={OWNER: "test"})
    report = tmp_path / "report.json"
    result = run_cli("smoke", f"{TEST_REPO}:{built_local['tag']}", "--device", "cpu", "--model-dir", str(model),
                     "--report", str(report), timeout=1200)
    assert result.code == 0, result.out[-3000:] + result.err[-2000:]
    data = json.loads(report.read_text())
    assert data["passed"] is True
    # named as the user gave it on the host, read where it is mounted (read-only), with its dtype and size
    assert data["model"] == str(model) and data["checkpoint"]["read_at"] == "/model"
    assert data["checkpoint"]["dtype"] == "torch.bfloat16" and data["checkpoint"]["parameters"] > 0
    assert f"checkpoint {model}: torch.bfloat16" in result.out
    load = next(c for c in data["checks"] if c["name"] == "zero3_load")["details"]
    # compared in the checkpoint's own dtype, every tensor of it
    assert load["dtype"] == "torch.bfloat16" and load["tensors_compared"] == data["checkpoint"]["tensors"]
    missing = run_cli("smoke", f"{TEST_REPO}:{built_local['tag']}", "--model-dir", str(tmp_path / "nope"))
    assert missing.code == 2 and "no such directory" in missing.err
    assert not our_containers(client)


def test_a_failed_push_is_recorded_in_the_build_report(client, built_local, tmp_path):
    """No registry answers on that port: the build passes (the validated image, already tagged there: what it
    pushes is the point here, not another smoke), the push fails, and the report says so."""
    repository = "127.0.0.1:5999/vlmbuild-test/unreachable"
    for tag in (built_local["tag"], built_local["immutable"]):
        client.images.get(built_local["image_id"]).tag(repository, tag)
    report = tmp_path / "build.json"
    try:
        result = run_cli("build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu", "--repository",
                         repository, "--push", "--allow-cpu-evidence", "--unsigned", "--report", str(report),
                         timeout=1800)
        assert result.code == 2, result.out[-2000:] + result.err[-2000:]
        build = json.loads(report.read_text())["builds"][0]
        assert build["passed"] is True and build["reused"] and build["tags"] and build["push_error"]
        assert "push failed" in result.out
    finally:
        for image in client.images.list(name=repository):  # that repository's tags alone: the image stays
            for tag in image.tags:
                if tag.startswith(f"{repository}:"):
                    client.images.remove(tag)
    assert tag_id(client, f"{TEST_REPO}:{built_local['immutable']}") == built_local["image_id"]


def test_no_daemon_is_a_clear_exit_2(tmp_path):
    result = run_cli("build", "vlm-r1", "--variant", "local",
                     env={"DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"})
    assert result.code == 2
    assert "no Docker daemon answers" in result.err and "Traceback" not in result.err


class SocketRelay:
    """A unix-socket relay to the real daemon that can be cut: the daemon 'going away' mid-build,
    as a client sees it, without stopping the engine the other tests share."""

    def __init__(self, path: Path, target: str = "/var/run/docker.sock") -> None:
        import socket
        import threading

        self.path, self.target, self.conns, self.bytes_down = path, target, [], 0
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(16)
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while self.open:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, down):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if down:
                    self.bytes_down += len(data)
                dst.sendall(data)
        except OSError:
            pass

    def cut(self):
        import socket

        self.open = False
        for s in self.conns + [self.server]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_the_daemon_going_away_mid_build_is_a_clear_exit_2(client, built_local, tmp_path):
    # A base of its own, so that what the interrupted build leaves in BuildKit's cache is no other test's.
    base = "vlmbuild-test/cut-base:1"
    client.images.build(fileobj=io.BytesIO(b"FROM vlmbuild-local/debian:bookworm\nLABEL io.vlmbuild.test=cut\n"),
                        tag=base, rm=True)
    relay = SocketRelay(tmp_path / "docker.sock")
    # --no-cache: the build is still running when the relay is cut (a cached one would be done at once)
    proc = subprocess.Popen([sys.executable, "-m", "vlmbuild", "build", "vlm-r1", "--variant", "local",
                             "--smoke-device", "cpu", "--repository", f"{TEST_REPO}-cut", "--base-image", base,
                             "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DOCKER_HOST": f"unix://{relay.path}"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and relay.bytes_down < 20_000 and proc.poll() is None:
        time.sleep(0.2)  # the build has started streaming its steps
    relay.cut()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    assert "lost the Docker daemon" in err and "Traceback" not in err
    assert not client.images.list(name=f"{TEST_REPO}-cut")
    client.images.remove(base)


def test_changed_smoke_code_built_twice_at_once_makes_one_new_tag_set_and_leaves_the_old_one(client, built_local,
                                                                                               tmp_path):
    """Changed smoke code is another image: a new immutable tag, the old one untouched, only the top layers new.
    Two builds of those new inputs race: one moves the whole tag set, the other finds the immutable tag taken by a
    validated image of the same inputs and moves nothing. Every tag names one passed image."""
    from vlmbuild.build_turns import leaks_concurrent_exports

    pkg = vlmbuild_copy(tmp_path, change_smoke=True)
    repository = f"{TEST_REPO}-race"
    procs = [subprocess.Popen([sys.executable, "-m", "vlmbuild", "build", "vlm-r1", "--variant", "local",
                               "--smoke-device", "cpu", "--repository", repository],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(pkg)}) for _ in range(2)]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    if leaks_concurrent_exports(client.version()["Version"]):
        # BuildKit's part took turns (moby/moby#46136, vlmbuild.build_turns): without them this race left the
        # image's 26 layers, 6.8 GB, held by nothing, and the cold rebuild below failed the suite's leak bound
        waited = ["waiting for another build on this engine" in " ".join(out.split()) for out in outs]
        assert sorted(waited) == [False, True], waited
    tagged = client.images.list(name=repository)
    assert len(tagged) == 1, [i.tags for i in tagged]  # both tags on one image
    image = tagged[0]
    assert len(image.tags) == 2 and image.labels["io.vlmbuild.smoke.result"] == "passed"
    tags = {t.rsplit(":", 1)[1] for t in image.tags}
    assert built_local["tag"] in tags and built_local["immutable"] not in tags, tags
    assert image.labels["io.vlmbuild.identity"] != built_local["report"]["builds"][0]["identity"]
    assert tag_id(client, f"{TEST_REPO}:{built_local['immutable']}") == built_local["image_id"]  # untouched
    # the smoke code sits in the top layers only (the RUN that copies it in with its entry point, WORKDIR, the
    # evidence): everything below is the very same layer
    old = client.images.get(built_local["image_id"]).attrs["RootFS"]["Layers"]
    new = image.attrs["RootFS"]["Layers"]
    assert len(new) == len(old) and new[: len(old) - 3] == old[: len(old) - 3] and new[-3] != old[-3]
    for tag in image.tags:
        client.images.remove(tag)


def test_a_second_machine_builds_from_the_registry_cache_and_compiles_nothing(client, built_local, tmp_path, capsys):
    """`build --rebuild` never moves the immutable tag of a validated image of the same inputs. `build --cache-to`
    pushes the image's inline cache and each wheel stage's beside it; with BuildKit's whole
    cache and its cache mounts pruned (a new machine: no layer, no uv download, no DeepSpeed wheel), a build with
    `--cache-from` runs no step: no op compiled, no package installed, the same layers, the same identity."""
    from conftest import render_variant
    from vlmbuild.build_cache import BuildCache, stage_ref
    from vlmbuild.engine import Engine
    from vlmbuild.progress import Progress
    from vlmbuild.spec import load_spec

    cache_ref = f"{TEST_REPO}:cache-local"
    report = tmp_path / "cache.json"
    first = run_cli("build", "vlm-r1", "--variant", "local", "--smoke-device", "cpu", "--repository", TEST_REPO,
                    "--rebuild", "--cache-to", cache_ref, "--report", str(report), timeout=1800)
    assert first.code == 0, first.out[-3000:] + first.err[-2000:]
    build = json.loads(report.read_text())["builds"][0]
    # --rebuild built and smoked again; the immutable tag already named a validated image of the same inputs, so
    # no tag moved and the rebuilt image was dropped
    assert build["rebuilt_image"] and tag_id(client, build["rebuilt_image"]) is None
    for tag in (built_local["tag"], built_local["immutable"]):
        assert tag_id(client, f"{TEST_REPO}:{tag}") == built_local["image_id"]
    assert build["cache_pushed"] == [stage_ref(cache_ref, "deepspeed-wheel"), cache_ref], build["cache_pushed"]
    assert build["identity"] == json.loads(run_cli("plan", "vlm-r1", "--variant", "local", "--repository",
                                                   TEST_REPO).out)["identity"]
    # the wheel stage's image was pushed, not kept here; the cache tag names the candidate as built
    assert not [t for image in client.images.list() for t in image.tags if ":cache-local-" in t]

    tagged = client.images.get(f"{TEST_REPO}:{built_local['tag']}")
    base = tagged.labels["org.opencontainers.image.base.name"]
    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("local")
    rendered = render_variant(variant, tmp_path / "context", base_image=base)
    cache = BuildCache((cache_ref,))
    client.api.prune_builds(all=True)
    capsys.readouterr()
    if tag_id(client, cache_ref):  # a second machine has no local image of the cache
        client.images.remove(cache_ref)
    engine = Engine()
    image_id = engine.build(rendered.context, Progress("second machine"),
                            cache_from=cache.import_refs(rendered.wheel_stages))
    # the cache images were pulled for the build (the remote route leaks on dockerd 20.10) and are gone after it
    assert not [t for image in client.images.list() for t in image.tags if t.startswith(cache_ref)]
    said = capsys.readouterr().out
    try:
        assert "running" not in said, said  # every stage came from the registry's cache: nothing ran, nothing compiled
        assert client.images.get(image_id).attrs["RootFS"]["Layers"] == tagged.attrs["RootFS"]["Layers"][:-1]
    finally:
        try:
            client.images.remove(image_id)
        except docker.errors.APIError:
            pass  # the very candidate the cache came from (the same image id), below the tagged image: it stays
    # the wheel alone, by its stage's key: what a change of the smoke's code (which reruns the last step, and
    # that step mounts the wheel) finds in the registry instead of compiling
    client.api.prune_builds(all=True)
    capsys.readouterr()
    wheel = engine.build(rendered.context, Progress("wheel"), cache_from=(stage_ref(cache_ref, "deepspeed-wheel"),),
                         target="deepspeed-wheel")
    said = capsys.readouterr().out
    client.images.remove(wheel, force=True)
    assert "stage deepspeed-wheel: cached" in said and "running" not in said, said


def test_a_cache_image_is_pulled_only_when_missing_and_a_missing_one_is_left_to_buildkit(client, capsys):
    """Engine.pull_caches: an image the engine has is not pulled (and so never removed after the build); one the
    registry does not have is said and skipped (BuildKit then builds without it), never an error."""
    from vlmbuild.engine import Engine
    from vlmbuild.progress import Progress

    present = "vlmbuild-local/debian:bookworm"
    Engine().resolve_base(present)  # made when missing
    missing = f"{TEST_REPO}:no-such-cache"
    capsys.readouterr()
    assert Engine().pull_caches((present, missing), Progress("cache", tty=False, github=False)) == []
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"cache {missing}: not pulled" in said and "BuildKit looks it up itself" in said, said
    assert client.images.get(present)


REBUILT = f"{TEST_REPO}:rebuilt"  # the rebuild of the test below, which the bump test after it compares with


def remove_images_holding(client, layers: list[str]) -> None:
    """Remove every image that holds one of ``layers`` (all of them ours: the test repositories' tags, and the
    untagged candidates below them), tags first: a tagged image takes its untagged parents with it."""
    for _ in range(5):
        holders = [i for i in client.images.list(all=True) if set(i.attrs["RootFS"]["Layers"]) & set(layers)]
        if not holders:
            return
        foreign = [t for i in holders for t in i.tags if not t.startswith(TEST_REPO)]
        assert not foreign, f"images not made by the tests hold these layers: {foreign}"
        for image in holders:
            for ref in image.tags or [image.id]:
                try:
                    client.images.remove(ref, force=True)
                except docker.errors.APIError:
                    pass  # a parent with a child still there: the next round
    raise AssertionError("images holding the layers could not all be removed")


@pytest.mark.after_built_local
def test_the_same_inputs_give_the_same_layers_after_the_build_cache_is_pruned(client, built_local, tmp_path):
    """Reproducible layers: with BuildKit's whole cache pruned (layers, uv's and pip's downloads, the DeepSpeed wheel:
    a new machine), the same inputs build to the same bytes in every layer above the base, the compiled ops
    included. So a registry, or a puller, that holds the image keeps every layer of a rebuild.

    The first image is removed before the rebuild, its layer list kept: dockerd's BuildKit, re-making a layer an
    image in the engine still holds, leaves a copy of it that nothing references and no prune reaches
    (vlmbuild.engine_orphans, moby/moby#45939); in this test that was the whole image, 7 GB a run. The
    suite's own bound (conftest, engine_leak_measured) holds this test to it. It is the last test to use the
    built_local image (marked after_built_local: conftest runs it after every other docker test, in any file)."""
    from conftest import render_variant
    from vlmbuild import buildkit
    from vlmbuild.progress import Progress
    from vlmbuild.spec import load_spec

    tagged = client.images.get(f"{TEST_REPO}:{built_local['tag']}")
    base = tagged.labels["org.opencontainers.image.base.name"]
    assert client.images.get(base).id == tagged.labels["io.vlmbuild.base.image-id"]  # the very base it was built on
    first = tagged.attrs["RootFS"]["Layers"]
    base_layers = len(client.images.get(base).attrs["RootFS"]["Layers"])
    remove_images_holding(client, first[base_layers:])
    client.api.prune_builds(all=True)
    variant = load_spec(REPO / "images" / "vlm-r1.yaml").variant("local")
    rendered = render_variant(variant, tmp_path / "context", base_image=base)
    image_id = buildkit.build(rendered.context, Progress("rebuild"))
    client.images.get(image_id).tag(REBUILT)
    again = client.images.get(image_id).attrs["RootFS"]["Layers"]
    # the tagged image was this candidate plus its evidence layer on top
    assert len(first) == len(again) + 1, (len(first), len(again))
    differ = [i for i in range(base_layers, len(again)) if again[i] != first[i]]
    assert differ == [], f"layers {differ} of {len(again)} differ after a rebuild of the same inputs"


@pytest.mark.after_built_local
def test_bumping_one_package_reships_its_layer_alone(client, tmp_path, capsys):
    """A package layer is rebuilt from its own stage; every other layer comes out byte-identical (the same
    diffID), so a registry or a puller already holding them gets them for free. It compares with the rebuild of
    the test above, whose layers BuildKit's cache now holds: had that cache been pruned, the layers below the bump
    would run again and, the rebuild being there, leave copies no prune reaches (moby/moby#45939). Both are
    candidates, built as the gate builds them; what a smoke says of an image is other tests' (the layers are the
    point here)."""
    import shutil

    from conftest import render_variant
    from vlmbuild import buildkit
    from vlmbuild.progress import Progress
    from vlmbuild.spec import load_spec

    if tag_id(client, REBUILT) is None:
        pytest.skip(f"{REBUILT} is made by the test above")
    root = tmp_path / "repo"
    shutil.copytree(REPO / "images", root / "images")
    shutil.copytree(REPO / "lockfiles", root / "lockfiles")
    spec = root / "images" / "vlm-r1.yaml"
    spec.write_text(spec.read_text().replace('accelerate: ">=1.3,<2"', 'accelerate: "==1.14.0"'))
    assert run_cli("lock", "vlm-r1", "--variant", "local", root=root, timeout=600).code == 0
    before = client.images.get(REBUILT)
    variant = load_spec(spec).variant("local")
    rendered = render_variant(variant, tmp_path / "context", base_image=before.labels["org.opencontainers.image.base.name"])
    capsys.readouterr()
    bumped = None
    try:
        bumped = buildkit.build(rendered.context, Progress("bump", tty=False, github=False))
        said = capsys.readouterr().out
        after = client.images.get(bumped)
        assert after.labels["io.vlmbuild.versions"] != before.labels["io.vlmbuild.versions"]
        assert json.loads(after.labels["io.vlmbuild.versions"])["accelerate"] == "1.14.0"
        old, new = before.attrs["RootFS"]["Layers"], after.attrs["RootFS"]["Layers"]
        changed = [i for i, layer in enumerate(new) if layer not in old]
        assert len(new) == len(old)
        # the accelerate layer, then only what sits on top of every package: the smoke's files
        # (benchmarks/bench_build.py prints the bytes: a few MB)
        assert changed and changed[0] < len(new) - 2 and all(i >= len(new) - 2 for i in changed[1:]), (
            f"{changed}; " + image_files_that_differ(client, before.id, after.id))
        # the wheel stage builds on the torch layer and DeepSpeed's own build requirements: no op compiled again
        assert "stage deepspeed-wheel: cached" in said, said
    finally:
        if bumped is not None:
            client.images.remove(bumped, force=True)
        client.images.remove(REBUILT, force=True)
