"""Rendering: a complete context per variant, hadolint-clean, layered for cheap bumps, no CA in the result."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from vlmbuild.errors import VlmbuildError
from vlmbuild.render import render
from vlmbuild.spec import load_spec

SPEC = REPO / "images" / "vlm-r1.yaml"
VARIANTS = sorted(load_spec(SPEC).variants)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not installed (pip install -e '.[test]')"
    return found


def stages(dockerfile: str) -> dict[str, str]:
    """Stage name -> its instructions (the last, unnamed stage is 'final')."""
    parts = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    out = {}
    for part in parts:
        first, _, body = part.partition("\n")
        m = re.search(r" AS (\S+)", first)
        out[m.group(1) if m else "final"] = first + "\n" + body
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, object]:
    spec = load_spec(SPEC)
    ca = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nVLMBUILDTESTCA\n-----END CERTIFICATE-----\n")
    return {name: render(spec.variant(name), tmp_path_factory.mktemp(name) / "ctx", ca_bundle=ca) for name in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_dockerfile_passes_hadolint(rendered, variant):
    proc = subprocess.run([hadolint(), "--failure-threshold", "error", str(rendered[variant].context / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_context_is_complete(rendered):
    ctx = rendered["local"].context
    for rel in ("Dockerfile", "build-env.sh", "build-ca.pem", "lock/build-tools.txt", "vlmbuild/lock.txt",
                "vlmbuild/variant.json", "vlmbuild/bin/vlmbuild-smoke", "vlmbuild/lib/vlmbuild/smoke/worker.py",
                "vlmbuild/lib/vlmbuild/rules/known_bad.yaml", "vlmbuild/lib/vlmbuild/lockfile.py", "vlmbuild/lib/vlmbuild/contract.py"):
        assert (ctx / rel).is_file(), rel
    # only what the smoke needs ships in the image: no CLI, no docker SDK code
    assert not (ctx / "vlmbuild/lib/vlmbuild/cli.py").exists()
    # every COPY source of the Dockerfile exists in the context
    for src in re.findall(r"^COPY (?!--from)(\S+)", rendered["local"].dockerfile, flags=re.M):
        assert (ctx / src).exists(), src


def test_layers_split_the_lock_exactly(rendered):
    result = rendered["local"]
    lines = []
    for layer in result.layers:
        lines += [l for l in (result.context / layer.file).read_text().splitlines() if "==" in l or " @ " in l]
    assert len(lines) == len(result.lock.requirements)
    first = (result.context / result.layers[0].file).read_text()
    training = next(layer for layer in result.layers if layer.name == "training")
    recipe = (result.context / result.layers[-1].file).read_text()
    assert re.search(r"^torch==", first, re.M)
    assert re.search(r"^transformers==", (result.context / training.file).read_text(), re.M)
    assert result.layers[-1].name == "recipe" and re.search(r"^wandb==", recipe, re.M)


def test_bumping_transformers_changes_only_its_layer(repo_copy: Path, tmp_path: Path):
    spec = load_spec(repo_copy / "images" / "vlm-r1.yaml")
    before = render(spec.variant("local"), tmp_path / "before")
    lock = spec.variant("local").lockfile_path
    lock.write_text(lock.read_text().replace("transformers==4.49.0", "transformers==4.49.1"))
    after = render(load_spec(repo_copy / "images" / "vlm-r1.yaml").variant("local"), tmp_path / "after")
    changed = [l.name for l in after.layers
               if (after.context / l.file).read_bytes() != (before.context / l.file).read_bytes()]
    assert changed == ["training"]
    # and the Dockerfile's instructions for the earlier layers are the same text (same build cache keys)
    b, a = stages(before.dockerfile), stages(after.dockerfile)
    for name in ("python-base", "installer", f"layer-{before.layers[0].name}"):
        assert a[name] == b[name], name


@pytest.mark.parametrize("variant", VARIANTS)
def test_ca_proxy_and_caches_stay_out_of_the_released_stage(rendered, variant):
    result = rendered[variant]
    assert "VLMBUILDTESTCA" in (result.context / "build-ca.pem").read_text()
    parts = stages(result.dockerfile)
    final = parts["final"]
    assert "build-ca" not in final and "build-env" not in final and "/tmp/vlmbuild-build" not in final
    assert not re.search(r"(?i)proxy|SSL_CERT_FILE|PIP_CERT", final)
    # the released stage takes only /opt/venv from the installer-derived stages
    assert set(re.findall(r"COPY --from=(\S+) (\S+)", final)) == {(f"layer-{l.name}", "/opt/venv/") for l in result.layers}
    # installs never keep a cache
    for name, body in parts.items():
        if "uv pip install" in body:
            assert "--no-cache" in body, name
        if "pip install" in body and "uv pip" not in body:
            assert "--no-cache-dir" in body, name
    assert "--require-hashes" in parts[f"layer-{result.layers[0].name}"]


def test_base_image_is_a_parameter_not_a_fork(rendered):
    local, cu = rendered["local"].dockerfile, rendered["cu124"].dockerfile
    assert "ARG BASE_IMAGE=vlmbuild-local/debian:bookworm" in local
    assert "ARG BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04" in cu
    assert "python3.10-venv" in cu and "python3.11-venv" in local


def test_labels_carry_lock_hash_and_versions(rendered):
    result = rendered["cu124"]
    assert result.labels["io.vlmbuild.lock-sha256"] == result.lock.sha256
    assert '"deepspeed":"0.19.8"' in result.labels["io.vlmbuild.versions"]
    assert result.labels["org.opencontainers.image.version"] == result.tag == "cu12.4-py3.10-torch2.6.0-ds0.19.8-tf4.49.0"
    assert f'LABEL io.vlmbuild.lock-sha256="{result.lock.sha256}"' in result.dockerfile


def test_undefined_template_variable_is_an_error(repo_copy: Path, tmp_path: Path):
    template = repo_copy / "images" / "templates" / "Dockerfile.j2"
    template.write_text(template.read_text() + "\n# {{ no_such_variable }}\n")
    with pytest.raises(VlmbuildError, match="no_such_variable"):
        render(load_spec(repo_copy / "images" / "vlm-r1.yaml").variant("local"), tmp_path / "ctx")
    assert not (tmp_path / "ctx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ctx")]


def test_render_refuses_a_non_empty_output(tmp_path: Path):
    out = tmp_path / "ctx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(VlmbuildError, match="not empty"):
        render(load_spec(SPEC).variant("local"), out)
    assert (out / "keep.txt").read_text() == "mine"
