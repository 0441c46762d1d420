"""The registry of smoke checks (vlmbuild.contract.REGISTRY) is the only list of checks: a check registered there,
and nowhere else, is planned, run, reported with its detail line and judged by the pass test."""

from __future__ import annotations

import json

import pytest
from vlmbuild import contract
from vlmbuild.smoke import report as report_mod
from vlmbuild.smoke.__main__ import main

TOY_SEEN: list[str] = []


def run_toy(launch) -> dict:
    """A toy launcher check: passes when the run's workdir exists (observed), fails when told to."""
    TOY_SEEN.append(launch.mode)
    ok = launch.workdir.is_dir() and not getattr(launch.args, "toy_fail", False)
    return contract.check_record("toy", 1, launch.mode, "passed" if ok else "failed",
                                 None if ok else "the toy saw a failure", {"workdir_seen": ok})


def detail_toy(check) -> str:
    return f"workdir seen: {check['details']['workdir_seen']}"


def run_toy_after(launch) -> dict:
    return contract.check_record("toy_after", 1, launch.mode, details={"earlier": [r["name"] for r in launch.records]})


@pytest.fixture
def toy_checks():
    before = dict(contract.REGISTRY)
    contract.register(contract.Check("toy", "the toy sees its workdir", "launcher", f"{__name__}:run_toy",
                                     f"{__name__}:detail_toy"))
    contract.register(contract.Check("toy_after", "runs after the toy", "launcher", f"{__name__}:run_toy_after",
                                     needs=("toy",)))
    TOY_SEEN.clear()
    yield
    contract.REGISTRY.clear()
    contract.REGISTRY.update(before)


def test_a_check_registered_alone_is_planned_run_and_reported(toy_checks, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = main(["--device", "cpu", "--checks", "toy,toy_after", "--report", str(report)])
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert code == 0, out
    assert TOY_SEEN == ["cpu"]
    assert [c["name"] for c in data["checks"]] == ["toy", "toy_after"]
    assert data["checks"][1]["details"] == {"earlier": ["toy"]}
    assert "PASS toy" in out and "workdir seen: True" in out
    assert contract.checks_for("cpu", flash_attention=False)[-2:] == ("toy", "toy_after")


def test_a_failing_registered_check_fails_the_run_and_skips_what_needs_it(toy_checks, tmp_path, capsys):
    import vlmbuild.smoke.__main__ as launcher

    real = launcher.parser

    def with_toy_fail():
        p = real()
        p.add_argument("--toy-fail", action="store_true")
        return p

    launcher.parser = with_toy_fail
    try:
        code = main(["--device", "cpu", "--checks", "toy,toy_after", "--toy-fail", "--report", str(tmp_path / "r.json")])
    finally:
        launcher.parser = real
    data = json.loads((tmp_path / "r.json").read_text())
    assert code == 1
    assert [(c["name"], c["status"]) for c in data["checks"]] == [("toy", "failed"), ("toy_after", "skipped")]
    assert data["checks"][1]["error"] == "not run: toy did not pass"
    assert "FAIL toy" in report_mod.summary(data) and "the toy saw a failure" in report_mod.summary(data)


def test_a_selection_without_what_a_check_needs_is_refused(toy_checks, capsys):
    assert main(["--device", "cpu", "--checks", "toy_after"]) == 2
    assert "toy_after needs toy" in capsys.readouterr().err


def test_the_registry_refuses_a_check_that_needs_an_unknown_one():
    with pytest.raises(ValueError, match="not registered before it"):
        contract.register(contract.Check("orphan", "", "launcher", "x:y", needs=("nothing",)))
    assert "orphan" not in contract.REGISTRY


def test_every_registered_check_names_functions_that_exist():
    for check in contract.REGISTRY.values():
        assert callable(contract.entry_point(check.run)), check.name
        assert callable(contract.entry_point(check.detail)), check.name
