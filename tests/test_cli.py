"""The command line: JSON matrix, check verdicts, and exit codes 0 / 1 / 2 with no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SPECS


def assert_clean_error(result, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err + result.out
    for f in fragments:
        assert f in result.err, result.err


def test_every_command_has_help(cli):
    for cmd in ((), ("matrix",), ("check",), ("lock",), ("render",), ("smoke",), ("build",), ("push",), ("summary",),
                ("doctor",), ("plan",), ("inspect",)):
        result = cli(*cmd, "--help")
        assert result.code == 0 and "Usage:" in result.out, cmd


def test_matrix_is_json_for_ci(cli):
    result = cli("matrix")
    assert result.code == 0
    rows = json.loads(result.out)
    assert {r["variant"] for r in rows} == {"cu124", "local"}  # the expected-bad seed is not built
    cu = next(r for r in rows if r["variant"] == "cu124")
    assert cu["tag"] == "cu12.4-py3.13-torch2.6.0-ds0.19.8-tf4.49.0" and cu["default"] and cu["locked"]
    assert {r["variant"] for r in json.loads(cli("matrix", "--all").out)} == {"seed", "cu124", "local"}
    assert {r["variant"] for r in json.loads(cli("matrix", "--release").out)} == {"cu124"}


def test_check_passes_with_the_seed_flagged(cli):
    result = cli("check")
    assert result.code == 0, result.out + result.err
    assert "ok  vlm-r1/seed (expected to be rejected)" in result.out
    assert "ds-0.15-torch-2.6-resume-weights-only" in result.out
    assert "source: https://github.com/axolotl-ai-cloud/axolotl/issues/2610" in result.out


def test_check_fails_when_a_good_variant_violates_a_rule(cli, repo_copy: Path):
    spec = repo_copy / "images" / "vlm-r1.yaml"
    lock = repo_copy / "lockfiles" / "vlm-r1" / "local.txt"
    lock.write_text(lock.read_text().replace("trl==0.17.0", "trl==0.15.2"))
    result = cli("check", str(spec), root=repo_copy)
    assert result.code == 1
    assert "FAIL  vlm-r1/local" in result.out and "ds-0.16.4-trl-0.15-generation-hooks" in result.out
    assert "fix: trl >=0.16.0" in result.out


def test_check_fails_when_an_expected_bad_variant_is_not_flagged(cli, repo_copy: Path):
    lock = repo_copy / "lockfiles" / "vlm-r1" / "seed.txt"
    lock.write_text(lock.read_text().replace("deepspeed==0.15.4", "deepspeed==0.19.8"))
    result = cli("check", root=repo_copy)
    assert result.code == 1
    assert "FAIL  vlm-r1/seed" in result.out and "no error rule flags it" in result.out


def test_check_env_judges_the_running_interpreter(cli, tmp_path: Path):
    # The test interpreter has no training stack: nothing to flag, exit 0; the report says so.
    result = cli("check", "--env")
    assert result.code == 0, result.out + result.err
    assert "error(s)" in result.out


def test_check_env_with_a_custom_rules_file_flags_installed_packages(cli, tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("schema: 1\nrules:\n- {id: click-is-bad, severity: error, title: t, packages: {click: '>=1'},"
                     " symptom: s, fix: f, sources: ['https://example.org']}\n")
    result = cli("check", "--env", "--rules", str(rules))
    assert result.code == 1 and "click-is-bad" in result.out


@pytest.mark.parametrize("args, fragments", [
    (("render", "no-such-image", "--variant", "x", "--output", "/tmp/vlmbuild-never"), ("no image spec named 'no-such-image'",)),
    (("render", "vlm-r1", "--variant", "nope", "--output", "/tmp/vlmbuild-never"), ("no variant 'nope'",)),
    (("check", str(SPECS / "broken" / "bad-specifier.yaml")), ("bad-specifier.yaml: defaults.packages.torch",)),
    (("lock", "--variant", "local"), ("--variant needs IMAGE",)),
    (("check", "--env", "--when", "moon"), ("unknown condition",)),
    (("smoke",), ("exactly one of --local or IMAGE_REF",)),
])
def test_bad_input_exits_2_with_one_paragraph(cli, args, fragments):
    assert_clean_error(cli(*args), *fragments)


def test_render_writes_a_context(cli, tmp_path: Path):
    result = cli("render", "vlm-r1", "--variant", "local", "--output", str(tmp_path / "ctx"))
    assert result.code == 0, result.err
    assert "bookworm-py3.11-torch2.6.0-ds0.19.8-tf4.49.0" in result.out
    assert (tmp_path / "ctx" / "Dockerfile").is_file()


def test_readme_version_table_is_the_generated_one(cli):
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- versions:start -->\n", 1)[1].split("<!-- versions:end -->", 1)[0].strip()
    generated = cli("matrix", "--markdown")
    assert generated.code == 0
    assert block == generated.out.strip(), "README's version table drifted: paste `vlmbuild matrix --markdown`"


def test_summary_of_a_build_report(cli, tmp_path: Path):
    report = tmp_path / "build.json"
    report.write_text(json.dumps({"schema_version": 2, "builds": [{
        "image": "vlm-r1", "variant": "cu124", "passed": True, "smoke_device": "gpu", "tags": ["t1", "t1-abc"],
        "digests": {"t1": "sha256:" + "f" * 64}, "build_seconds": 300.0, "smoke_seconds": 40.0,
        "passes": ["gpu x1", "cpu x2"],
        "smoke_report": {"checks": [{"name": "stack", "status": "passed"}, {"name": "zero3_load", "status": "passed"}]},
    }, {"image": "vlm-r1", "variant": "local", "passed": True, "reused": True, "smoke_device": None, "tags": ["t2"],
        "push_error": "the registry refused", "digests": {}}]}))
    result = cli("summary", str(report))
    assert result.code == 0
    assert ("| vlm-r1/cu124 | passed on GPU | gpu x1; cpu x2 | t1, t1-abc | `sha256:ffffffffffff` | "
            "stack passed, zero3_load passed | 300 | 40 |") in result.out
    assert "already validated (reused); push failed: the registry refused" in result.out
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    assert_clean_error(cli("summary", str(bad)), "not a JSON build report")


def test_a_push_names_who_signs_it_before_anything_runs(cli):
    """No signing flag, or two: exit 2 naming the choices, before any engine is asked (no daemon needed)."""
    env = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    none = cli("push", "vlm-r1", "--variant", "local", env=env)
    assert none.code == 2 and "--sign-key" in none.err and "--unsigned" in none.err and "Traceback" not in none.err
    both = cli("push", "vlm-r1", "--variant", "local", "--unsigned", "--sign-keyless", env=env)
    assert both.code == 2 and "exclude each other" in both.err
    missing = cli("push", "vlm-r1", "--variant", "local", "--sign-key", "/nonexistent/cosign.key", env=env)
    build_push = cli("build", "vlm-r1", "--variant", "local", "--push", env=env)
    assert build_push.code == 2 and "--sign-keyless" in build_push.err and "Traceback" not in build_push.err
    build_only = cli("build", "vlm-r1", "--variant", "local", "--smoke-timeout", "-1", env=env)
    assert "--sign-key" not in build_only.err  # no push: no signer asked for
    assert missing.code == 2 and "/nonexistent/cosign.key: no such file" in missing.err
    verify = cli("inspect", "vlmbuild-test/x:y", "--verify", env=env)
    assert verify.code == 2 and "--certificate-identity" in verify.err
