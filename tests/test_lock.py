"""Lockfiles: committed and fresh, every line hashed, stale or missing ones named, failed runs write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO
from packaging.version import Version
from vlmbuild.lock import LockError, lock_variant, resolver_environment, variant_status
from vlmbuild.lockfile import LockfileError, parse_lockfile, read_lockfile
from vlmbuild.spec import load_spec

SPEC = REPO / "images" / "vlm-r1.yaml"


@pytest.mark.parametrize("variant", sorted(load_spec(SPEC).variants))
def test_committed_lockfile_is_fresh_and_fully_hashed(variant: str):
    v = load_spec(SPEC).variant(variant)
    assert variant_status(v).state == "fresh"
    lock = read_lockfile(v.lockfile_path)
    assert lock.header["python"] == v.python and lock.header["variant"] == variant
    assert all(r.hashes for r in lock.requirements)
    for name, spec in v.packages.items():
        if spec.startswith("=="):
            assert lock.pins[name] == spec[2:], name


def test_seed_lock_pins_the_seed_deepspeed():
    assert read_lockfile(REPO / "lockfiles/vlm-r1/seed.txt").pins["deepspeed"] == "0.15.4"


def test_lock_check_passes_on_the_committed_tree(cli):
    result = cli("lock", "--check")
    assert result.code == 0, result.out + result.err


def test_lock_check_names_a_stale_lockfile(cli, repo_copy: Path):
    spec = repo_copy / "images" / "vlm-r1.yaml"
    spec.write_text(spec.read_text().replace('trl: "==0.17.0"', 'trl: "==0.16.1"'))
    result = cli("lock", "--check", root=repo_copy)
    assert result.code == 1
    for name in ("seed.txt", "cu124.txt", "local.txt"):
        assert f"stale    lockfiles/vlm-r1/{name}" in result.out
    assert "run `vlmbuild lock`" in result.err


def test_lock_check_names_a_missing_lockfile(cli, repo_copy: Path):
    (repo_copy / "lockfiles" / "vlm-r1" / "cu124.txt").unlink()
    result = cli("lock", "--check", root=repo_copy)
    assert result.code == 1
    assert "missing  lockfiles/vlm-r1/cu124.txt" in result.out


def test_failed_lock_leaves_the_old_lockfile_untouched(repo_copy: Path):
    spec_path = repo_copy / "images" / "vlm-r1.yaml"
    spec_path.write_text(spec_path.read_text().replace('transformers: "==4.49.0"', 'transformers: "==4.49.0"\n    no-such-package-vlmbuild-test: "==9.9.9"', 1))
    variant = load_spec(spec_path).variant("local")
    before = variant.lockfile_path.read_bytes()
    with pytest.raises(LockError, match="could not resolve"):
        lock_variant(variant)
    assert variant.lockfile_path.read_bytes() == before
    assert not list(variant.lockfile_path.parent.glob(".*.tmp"))


def _tiny_spec(tmp_path: Path, pins: str, tag: str):
    """A spec of one variant that pins a few packages (torch/deepspeed/transformers named, unpinned unless given)."""
    root = tmp_path / "repo"
    (root / "images" / "templates").mkdir(parents=True)
    (root / "images" / "templates" / "Dockerfile.j2").write_text("FROM {{ base_image }}\n")
    (root / "images" / "tiny.yaml").write_text((REPO / "tests/specs/valid/mini.yaml").read_text()
        .replace("name: mini", "name: tiny")
        .replace('    torch: "==2.6.0"\n    deepspeed: "==0.19.8"\n    transformers: "==4.49.0"\n', pins)
        .replace("tag: \"py{python}-torch{torch}-ds{deepspeed}\"", f"tag: \"{tag}\""))
    return load_spec(root / "images" / "tiny.yaml")


def test_lock_writes_header_and_hashes_for_a_small_stack(tmp_path: Path):
    """A real resolution (uv against the index), small enough to be quick."""
    spec = _tiny_spec(tmp_path, '    torch: ""\n    deepspeed: ""\n    transformers: ""\n    packaging: "==24.2"\n',
                      "py{python}-p{packaging}")
    # torch/deepspeed/transformers stay named (the spec requires them) but unpinned: the resolver picks them;
    # the test pins and checks one small package.
    path = lock_variant(spec.variant("good"))
    lock = read_lockfile(path)
    assert lock.header["inputs-sha256"] and lock.pins["packaging"] == "24.2"
    assert all(r.hashes for r in lock.requirements)
    assert variant_status(spec.variant("good")).state == "fresh"


def test_lock_of_a_deepspeed_sdist_ignores_the_shells_deepspeed_switches(tmp_path: Path, monkeypatch):
    """DeepSpeed 0.15.4's setup.py imports torch when DS_ACCELERATOR=cpu; uv's isolated build has none. The lock
    must work from a shell that exported it (a CPU smoke does), with uv's cache empty as on a fresh machine."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("DS_BUILD_CPU_ADAM", "1")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    spec = _tiny_spec(tmp_path, '    torch: ""\n    deepspeed: "==0.15.4"\n    transformers: ""\n',
                      "py{python}-ds{deepspeed}")
    lock = read_lockfile(lock_variant(spec.variant("good")))
    assert lock.pins["deepspeed"] == "0.15.4" and "torch" in lock.pins
    assert (tmp_path / "uv-cache").is_dir()  # the resolution really ran against the empty cache


def test_the_resolver_environment_drops_only_deepspeeds_switches():
    env = resolver_environment({"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "1", "PATH": "/bin", "SSL_CERT_FILE": "x"})
    assert env == {"PATH": "/bin", "SSL_CERT_FILE": "x"}


def test_unpinned_or_unhashed_lines_are_refused():
    with pytest.raises(LockfileError, match="no --hash"):
        parse_lockfile("torch==2.6.0\n")
    with pytest.raises(LockfileError, match="not pinned"):
        parse_lockfile("torch>=2.6 --hash=sha256:" + "a" * 64 + "\n")


def test_direct_wheel_lines_carry_their_version():
    lock = parse_lockfile("flash-attn @ https://example.org/flash_attn-2.7.4.post1%2Bcu12torch2.6cxx11abiFALSE-cp310"
                          "-cp310-linux_x86_64.whl \\\n    --hash=sha256:" + "b" * 64 + "\n")
    assert lock.pins == {"flash-attn": "2.7.4.post1+cu12torch2.6cxx11abifalse"}


def test_a_bump_relocks_that_package_alone(repo_copy: Path):
    """The current lockfile's pins are uv's preferences: bumping one package moves its line only, not whatever
    was released since the lock was made."""
    spec_path = repo_copy / "images" / "vlm-r1.yaml"
    before = read_lockfile(repo_copy / "lockfiles" / "vlm-r1" / "local.txt")
    assert before.pins["accelerate"] != "1.14.0"
    spec_path.write_text(spec_path.read_text().replace('accelerate: ">=1.3,<2"', 'accelerate: "==1.14.0"'))
    lock_variant(load_spec(spec_path).variant("local"))
    after = read_lockfile(repo_copy / "lockfiles" / "vlm-r1" / "local.txt")
    assert after.pins["accelerate"] == "1.14.0"
    moved = sorted({r.name for r in after.requirements} ^ {r.name for r in before.requirements}
                   | {r.name for r in after.requirements if before.get(r.name) != r})
    assert moved == ["accelerate"], moved
    assert after.header["inputs-sha256"] != before.header["inputs-sha256"]


def test_upgrade_package_moves_only_that_package(repo_copy: Path):
    """--upgrade-package NAME: NAME to the newest version the spec allows, everything else kept."""
    path = repo_copy / "lockfiles" / "vlm-r1" / "local.txt"
    text = path.read_text()
    before = read_lockfile(path)
    old = before.get("accelerate")
    # Make the current lockfile pin an older accelerate (and keep its header: the spec allows it).
    older = text.replace(f"accelerate=={old.version}", "accelerate==1.14.0")
    path.write_text(older)
    lock_variant(load_spec(repo_copy / "images" / "vlm-r1.yaml").variant("local"))
    kept = read_lockfile(path)
    assert kept.pins["accelerate"] == "1.14.0"  # a preference the spec allows is kept
    lock_variant(load_spec(repo_copy / "images" / "vlm-r1.yaml").variant("local"), upgrade_packages=("accelerate",))
    upgraded = read_lockfile(path)
    # the newest the index has today: at least the one the committed lock pins (PyPI moves on; 1.16.0 came out
    # after the lock was made), never the older preference
    assert Version(upgraded.pins["accelerate"]) >= Version(old.version) > Version("1.14.0")
    assert [r for r in upgraded.requirements if r.name != "accelerate"] == \
        [r for r in before.requirements if r.name != "accelerate"]


FLASH_ATTN_SDIST_SHA256 = "f03485c9a49a4d68d0733acdcad80ab0e72afa025a777fdc2966ceccf9d51765"  # PyPI's, 2025-01-30


def test_a_source_build_is_locked_by_its_sdists_hash(tmp_path: Path, monkeypatch):
    """A package the spec builds from source (flash-attn) is locked as PyPI's sdist, by its sha256, with what its
    metadata requires (einops) beside it; read from the sdist's static metadata (PKG-INFO 2.2), never by running its
    setup.py, which imports torch. uv's cache is empty, as on a fresh machine."""
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    spec = _tiny_spec(tmp_path, '    torch: "==2.6.0"\n    deepspeed: ""\n    transformers: ""\n', "py{python}")
    spec.path.write_text(spec.path.read_text().replace("  good: {}\n", (
        "  good:\n    packages:\n      flash-attn: \"==2.7.4.post1\"\n    source_builds:\n      flash-attn:\n"
        "        why: no wheel fits\n        build_requires: [setuptools]\n")))
    variant = load_spec(spec.path).variant("good")
    assert list(variant.source_builds) == ["flash-attn"]
    lock = read_lockfile(lock_variant(variant))
    flash = lock.get("flash-attn")
    assert flash.version == "2.7.4.post1" and flash.url is None
    assert flash.hashes == (f"sha256:{FLASH_ATTN_SDIST_SHA256}",)
    assert "einops" in lock.pins and lock.pins["torch"] == "2.6.0"
