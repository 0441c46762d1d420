"""`vlmbuild sweep` without measuring: axes and their errors, shards, results files, merging, what a smoke report
means for a cell (rules that explain it, the CPU accelerator's defect), the grid. The measuring itself is in
test_sweep_stack.py (real environments, real smokes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from vlmbuild import sweep_results
from vlmbuild.errors import VlmbuildError
from vlmbuild.rules import load_rules
from vlmbuild.spec import load_spec
from vlmbuild.sweep_axes import Measure, check_axes, first_line, make_cells, parse_axis, parse_shard, shard_of
from vlmbuild.sweep_cell import Measured
from vlmbuild.sweep_grid import markdown
from vlmbuild.sweep_verdict import NOT_MEASURED, cpu_route, is_finding, make_record

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def local():
    return load_spec(REPO / "images" / "vlm-r1.yaml").variant("local")


def cells_of(local, *axes, measure=Measure()):
    return make_cells(local, [parse_axis(a) for a in axes], measure)


@pytest.mark.parametrize("text, says", [
    ("deepspeed", "PACKAGE=VERSION"), ("deepspeed=", "PACKAGE=VERSION"), ("=0.19.8", "PACKAGE=VERSION"),
    ("deepspeed=0.19.8,latest", "not a version"), ("deepspeed=0.19.8,0.19.8", "listed twice"),
])
def test_a_malformed_axis_is_bad_input(text, says):
    with pytest.raises(VlmbuildError, match=says):
        parse_axis(text)


def test_an_axis_must_be_a_package_of_the_variant_and_on_one_axis_only(local):
    with pytest.raises(VlmbuildError, match="has no package of that name") as info:
        check_axes([parse_axis("vllm=0.8.5")], local, "--axis")
    assert "vlm-r1.yaml" in str(info.value) and "deepspeed" in str(info.value)
    with pytest.raises(VlmbuildError, match="on two axes"):
        check_axes([parse_axis("trl=0.16.1"), parse_axis("TRL=0.17.0")], local, "--axis")
    with pytest.raises(VlmbuildError, match="no axis"):
        check_axes([], local, "--axis")


def test_cells_are_the_product_with_the_variant_inputs_moved(local):
    cells = cells_of(local, "deepspeed=0.16.9,0.19.8", "trl=0.16.1,0.17.0")
    assert [c.label() for c in cells] == ["deepspeed=0.16.9 trl=0.16.1", "deepspeed=0.16.9 trl=0.17.0",
                                         "deepspeed=0.19.8 trl=0.16.1", "deepspeed=0.19.8 trl=0.17.0"]
    lines = cells[0].requirement_lines()
    assert "deepspeed==0.16.9" in lines and "trl==0.16.1" in lines and "transformers==4.49.0" in lines
    assert len(lines) == len(local.requirement_lines())
    assert len({c.id for c in cells}) == 4


def test_a_cell_id_changes_with_what_it_measures(local):
    plain = cells_of(local, "deepspeed=0.19.8")[0]
    assert cells_of(local, "deepspeed=0.19.8")[0].id == plain.id
    assert cells_of(local, "deepspeed=0.19.8", measure=Measure(repeat=3))[0].id != plain.id
    assert cells_of(local, "deepspeed=0.19.8", measure=Measure(checks="stack"))[0].id != plain.id
    assert cells_of(local, "deepspeed=0.19.8", measure=Measure(device="gpu"))[0].id != plain.id


def test_shards_are_disjoint_and_cover_every_cell(local):
    cells = cells_of(local, "deepspeed=0.16.9,0.17.6,0.18.5,0.19.8", "trl=0.16.1,0.17.0", "peft=0.14.0,0.15.2")
    for n in (1, 2, 3, 5):
        shares = [shard_of(cells, (i, n)) for i in range(1, n + 1)]
        ids = [c.id for share in shares for c in share]
        assert sorted(ids) == sorted(c.id for c in cells) and len(set(ids)) == len(ids)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # the share does not depend on how the axes were written
    swapped = cells_of(local, "trl=0.16.1,0.17.0", "deepspeed=0.16.9,0.17.6,0.18.5,0.19.8", "peft=0.14.0,0.15.2")
    assert {c.pins for c in shard_of(cells, (1, 3))} != set() and \
        {frozenset(c.pins) for c in shard_of(cells, (1, 3))} == {frozenset(c.pins) for c in shard_of(swapped, (1, 3))}


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_bad_input(text):
    with pytest.raises(VlmbuildError, match="--shard"):
        parse_shard(text)


def test_first_line_is_the_resolvers_reason():
    stderr = ("error: No solution found when resolving dependencies\n"
              "  cause: Because trl==0.18.0 depends on transformers>=4.50.0 and you require trl==0.18.0, we can\n"
              "         conclude that you require transformers>=4.50.0.\n")
    assert first_line(stderr) == ("Because trl==0.18.0 depends on transformers>=4.50.0 and you require trl==0.18.0, "
                                  "we can conclude that you require transformers>=4.50.0.")
    assert first_line("error: boom\n") == "boom"


# ---- what a report means for a cell: real rules, reports shaped as the smoke writes them (report.finalize)

def check(name, status="passed", error=None, explanations=()):
    return {"name": name, "status": status, "seconds": 1.0, "error": error, "traceback": None, "details": {},
            "explanations": [{"id": r} for r in explanations]}


def stack(versions):
    return {**check("stack"), "details": {"versions": versions}}


def measured(checks, passed):
    return Measured("measured", "", "a" * 64, {"checks": checks, "passed": passed}, "b" * 64, {"smoke": 9.0}, (),
                    {"torch": "2.6.0"})


HOOKS = "AttributeError: 'DeepSpeedZeRoOffload' object has no attribute '_register_hooks_recursively'"


def test_a_failure_is_explained_only_by_a_rule_that_matches_both_symptom_and_versions(local):
    cell = cells_of(local, "deepspeed=0.19.8", "trl=0.15.2")[0]
    checks = [stack({"deepspeed": "0.19.8", "trl": "0.15.2"}), check("zero3_load"),
              check("grpo", "failed", HOOKS, ["ds-0.16.4-trl-0.15-generation-hooks"])]
    record = make_record(cell, measured(checks, False), "rev")
    assert record["result"] == "failed" and record["first_failure"] == {"check": "grpo", "error": HOOKS}
    assert record["explained_by"] == ["ds-0.16.4-trl-0.15-generation-hooks"] and not is_finding(record)
    # the same symptom beside a trl the rule does not name: not explained, a finding
    cell = cells_of(local, "deepspeed=0.19.8", "trl=0.17.0")[0]
    checks[0] = stack({"deepspeed": "0.19.8", "trl": "0.17.0"})
    record = make_record(cell, measured(checks, False), "rev")
    assert record["explained_by"] == [] and is_finding(record)


def test_a_cells_line_names_the_rule_of_its_first_failure_and_then_the_others(local):
    from vlmbuild.sweep import describe

    cell = cells_of(local, "deepspeed=0.19.8", "trl=0.15.2")[0]
    lora = "LoRA under zero2.json: 28 of 30 LoRA parameter(s) did not move in 2 steps"
    checks = [stack({"deepspeed": "0.19.8", "trl": "0.15.2"}), check("zero3_load"), check("grpo", "failed", HOOKS),
              check("lora", "failed", lora)]
    locked = {"torch": "2.6.0", "peft": "0.14.0"}  # every pin of the cell's lock reaches the rules
    line = describe(make_record(cell, Measured("measured", "", "a" * 64, {"checks": checks, "passed": False}, "b" * 64,
                                               {}, (), locked), "rev"))
    assert line.startswith(f"FAIL grpo: {HOOKS} [explained by ds-0.16.4-trl-0.15-generation-hooks] "
                           "[other checks: trl-0.15-grpo-peft-checkpointing-no-input-grads]"), line


def test_a_passing_cell_and_a_cell_that_could_not_resolve(local):
    cell = cells_of(local, "deepspeed=0.19.8")[0]
    record = make_record(cell, measured([stack({"deepspeed": "0.19.8"}), check("zero3_load")], True), "rev")
    assert record["result"] == "passed" and record["first_failure"] is None
    assert set(record) == set(sweep_results.RECORD_KEYS)
    unresolvable = make_record(cell, Measured("unresolvable", "trl 0.18 needs transformers>=4.50"), "rev")
    assert unresolvable["result"] == "unresolvable" and unresolvable["checks"] == []
    assert unresolvable["explained_by"] == []  # the cell pins no trl 0.18: no rule's versions are its


UV_TRL_018 = ("Because trl==0.18.0 depends on transformers>=4.50.0 and you require transformers==4.49.0, we can "
              "conclude that your requirements and trl==0.18.0 are incompatible.")


def test_an_unresolvable_cell_is_explained_by_the_rule_its_pins_and_the_resolver_name(local):
    cell = cells_of(local, "transformers=4.49.0", "trl=0.18.0")[0]
    record = make_record(cell, Measured("unresolvable", UV_TRL_018), "rev")
    assert record["explained_by"] == ["trl-0.18-needs-transformers-4.50"]
    # the same pins failing for a reason that names another package: the rule is not what uv said
    other = make_record(cell, Measured("unresolvable", "Because torch==2.6.0 has no wheel for the platform"), "rev")
    assert other["explained_by"] == []
    # a reason naming both, beside pins the rule does not hold for
    newer = cells_of(local, "transformers=4.52.4", "trl=0.18.0")[0]
    assert make_record(newer, Measured("unresolvable", UV_TRL_018), "rev")["explained_by"] == []
    # a smoke that reports no pass yet no failing check is not a pass
    odd = make_record(cell, measured([stack({"deepspeed": "0.19.8"})], False), "rev")
    assert odd["result"] == "failed"


def test_a_cpu_accelerator_failure_leaves_the_other_checks_not_measured(local):
    cell = cells_of(local, "deepspeed=0.17.6")[0]
    corrupt = ("2 parameter(s) differ from the saved checkpoint; first ones:\n  visual.blocks.0.attn.proj.weight: "
               "not bit-identical to the checkpoint (the checkpoint shape [64, 64] torch.float32, ...)")
    checks = [stack({"deepspeed": "0.17.6"}),
              check("zero3_load", "failed", corrupt, ["ds-cpu-accelerator-zero3-coalesced-gather-race"]),
              check("train_step"), check("grpo", "skipped")]
    record = make_record(cell, measured(checks, False), "rev")
    assert record["cpu_accelerator"]["rules"] == ["ds-cpu-accelerator-zero3-coalesced-gather-race"]
    assert "says nothing about GPUs" in record["cpu_accelerator"]["note"]
    statuses = {c["name"]: c["status"] for c in record["checks"]}
    # the stack check ran before any ZeRO-3 rank: its result stands
    assert statuses == {"stack": "passed", "zero3_load": "failed", "train_step": NOT_MEASURED,
                        "grpo": NOT_MEASURED}
    assert record["first_failure"]["error"].startswith("2 parameter(s) differ") and "visual.blocks.0" in \
        record["first_failure"]["error"]
    assert not is_finding(record) and "CPU accelerator" in markdown(grid_of(record))
    assert record["cpu_accelerator"]["setting"] is None  # 0.17.6 knows no setting that routes around it
    assert cpu_route(cell, measured(checks, False), load_rules()) is None
    # on DeepSpeed 0.19.8 the rule does not hold: the same failure is a finding
    cell = cells_of(local, "deepspeed=0.19.8")[0]
    checks[0] = stack({"deepspeed": "0.19.8"})
    record = make_record(cell, measured(checks, False), "rev")
    assert record["cpu_accelerator"] is None and is_finding(record)


def grid_of(*records):
    data = sweep_results.empty("vlm-r1", "local")
    sweep_results.add_axes(data, [(k, (v,)) for r in records for k, v in r["pins"].items()])
    for r in records:
        sweep_results.put(data, r)
    return data


# ---- results files

def test_results_are_written_whole_and_read_back(tmp_path, local):
    cell = cells_of(local, "deepspeed=0.19.8")[0]
    record = make_record(cell, measured([stack({"deepspeed": "0.19.8"})], True), "rev")
    path = tmp_path / "compat" / "vlm-r1-local.json"
    sweep_results.save(path, grid_of(record))
    assert sweep_results.load(path, "vlm-r1", "local")["cells"] == [record]
    assert [p.name for p in path.parent.iterdir()] == ["vlm-r1-local.json"]  # no temporary file left
    with pytest.raises(VlmbuildError, match="vlm-r1/local, not vlm-r1/cu124"):
        sweep_results.load(path, "vlm-r1", "cu124")
    path.write_text(json.dumps({"schema": 1, "image": "x", "variant": "y", "axes": [], "cells": [{"id": "1"}]}))
    with pytest.raises(VlmbuildError, match=r"cells\[0\]: missing key"):
        sweep_results.load(path)
    path.write_text("{")
    with pytest.raises(VlmbuildError, match="not JSON"):
        sweep_results.load(path)


def test_merge_joins_shards_and_refuses_a_cell_measured_two_ways(local):
    a, b = cells_of(local, "deepspeed=0.16.9,0.19.8")
    passed = make_record(b, measured([stack({"deepspeed": "0.19.8"})], True), "rev")
    failed = make_record(a, measured([stack({"deepspeed": "0.16.9"}), check("grpo", "failed", "boom")], False), "rev")
    merged = sweep_results.merge([grid_of(passed), grid_of(failed)], ["1.json", "2.json"])
    assert [c["id"] for c in merged["cells"]] == sorted([a.id, b.id])
    assert merged["axes"] == [{"package": "deepspeed", "versions": ["0.19.8", "0.16.9"]}]
    # the same cell measured again elsewhere (other host, other timings) joins as one
    again = {**passed, "host": {"cpu": "other"}, "seconds": {"smoke": 99.0}, "measured_at": "later"}
    assert len(sweep_results.merge([grid_of(passed), grid_of(again)], ["1", "2"])["cells"]) == 1
    flaky = {**passed, "result": "failed"}
    with pytest.raises(VlmbuildError, match="disagrees"):
        sweep_results.merge([grid_of(passed), grid_of(flaky)], ["1.json", "2.json"])
    with pytest.raises(VlmbuildError, match="not vlm-r1/local"):
        sweep_results.merge([grid_of(passed), {**grid_of(failed), "variant": "cu124"}], ["1.json", "2.json"])


def test_merging_files_carries_each_cells_kept_report_beside_the_output(tmp_path, local):
    """Shards keep their cells' reports beside their own results file; the merged file must hold its evidence too,
    checked against report_sha256, or it is an error before anything is written."""
    a, b = cells_of(local, "deepspeed=0.16.9,0.19.8")
    paths = []
    for n, cell in enumerate((a, b), 1):
        report = json.dumps({"checks": [stack(dict(cell.pins))], "passed": True}).encode()
        shard = tmp_path / f"shard{n}" / f"shard-{n}.json"
        kept = sweep_results.reports_dir(shard) / f"{cell.id}.json"
        kept.parent.mkdir(parents=True)
        kept.write_bytes(report)
        record = make_record(cell, Measured("measured", "", "a" * 64, json.loads(report),
                                            hashlib.sha256(report).hexdigest(), {}, (), dict(cell.pins)), "rev")
        sweep_results.save(shard, grid_of({**record, "reports": [str(kept.relative_to(shard.parent))]}))
        paths.append(shard)
    output = tmp_path / "compat" / "vlm-r1-local.json"
    merged = sweep_results.merge_files(paths, output)
    for cell in merged["cells"]:
        kept = output.parent / cell["reports"][0]
        assert kept.parent == sweep_results.reports_dir(output)
        assert hashlib.sha256(kept.read_bytes()).hexdigest() == cell["report_sha256"]
    assert sweep_results.load(output) == merged
    # a report that is not the bytes its record hashes (edited, or another run's): refused, nothing written
    (sweep_results.reports_dir(paths[0]) / f"{a.id}.json").write_text("{}")
    elsewhere = tmp_path / "other" / "merged.json"
    with pytest.raises(VlmbuildError, match="not the report its report_sha256 names"):
        sweep_results.merge_files(paths, elsewhere)
    (sweep_results.reports_dir(paths[0]) / f"{a.id}.json").unlink()
    with pytest.raises(VlmbuildError, match="which is not there"):
        sweep_results.merge_files(paths, elsewhere)
    assert not elsewhere.parent.exists()


def test_the_grid_has_rows_columns_and_sections(local):
    records = []
    for cell in cells_of(local, "deepspeed=0.16.9,0.19.8", "trl=0.16.1,0.17.0", "peft=0.14.0"):
        ok = cell.label() == "deepspeed=0.19.8 trl=0.17.0 peft=0.14.0"
        checks = [stack(dict(cell.pins))] + ([] if ok else [check("grpo", "failed", "boom")])
        records.append(make_record(cell, measured(checks, ok), "rev"))
    text = markdown(grid_of(*records[:3]))
    assert "**peft 0.14.0**" in text and "| deepspeed \\ trl | 0.16.1 | 0.17.0 |" in text
    assert "| 0.16.9 | FAIL grpo (unexplained) | FAIL grpo (unexplained) |" in text
    assert "| 0.19.8 | FAIL grpo (unexplained) | · |" in text  # not measured yet
    assert "| 0.19.8 | FAIL grpo (unexplained) | PASS |" in markdown(grid_of(*records))


def test_sections_show_their_own_rows_and_columns_and_a_cell_the_grid_cannot_place_is_listed(local):
    """A sparse section (one cell of another sweep) is one row and one column, not the whole axis of dots; a cell
    that installed nothing (unresolvable) has no version of an unpinned axis package and is listed under the grid."""
    main = [make_record(c, measured([stack(dict(c.pins))], True), "rev")
            for c in cells_of(local, "deepspeed=0.16.9,0.19.8", "trl=0.16.1,0.17.0")]
    wide = cells_of(local, "deepspeed=0.19.8", "trl=0.17.0", "peft=0.15.2")[0]
    main.append(make_record(wide, measured([stack({"deepspeed": "0.19.8"})], True), "rev"))
    for record in main:  # what the variant's lock installed beside the pins
        record["versions"] = {"peft": "0.14.0", "transformers": "4.49.0", **record["pins"]}
    lost = cells_of(local, "deepspeed=0.19.8", "transformers=4.49.0", "trl=0.18.0")[0]
    data = grid_of(*main, make_record(lost, Measured("unresolvable", UV_TRL_018), "rev"))
    text = markdown(data)
    sparse = text.split("**peft 0.15.2, transformers 4.49.0**", 1)[1].split("**", 1)[0]
    assert "| 0.19.8 | PASS |" in sparse and "0.16.9" not in sparse and "·" not in sparse, text
    assert "- deepspeed 0.19.8, transformers 4.49.0, trl 0.18.0: unresolvable (trl-0.18-needs-transformers-4.50)" \
        in text, text
    assert text.count("PASS") == len(main)  # every cell once


def test_a_stack_that_cannot_be_built_here_is_explained_by_its_rule(local):
    cell = cells_of(local, "deepspeed=0.19.5")[0]
    reason = ("building DeepSpeed with its CPU ops failed (exit 2): RuntimeError: 0 active drivers ([]). "
              "There should only be one.")
    record = make_record(cell, Measured("install_failed", reason, "a" * 64,
                                       pins={"deepspeed": "0.19.5", "triton": "3.2.0", "torch": "2.6.0"}), "rev")
    assert record["result"] == "install_failed" and record["explained_by"] == ["ds-0.16.3-triton-3.2-no-gpu-import"]
    assert record["versions"]["deepspeed"] == "0.19.5"
    # the same text beside a DeepSpeed the rule does not name explains nothing
    cell = cells_of(local, "deepspeed=0.19.8")[0]
    record = make_record(cell, Measured("install_failed", reason, "a" * 64,
                                       pins={"deepspeed": "0.19.8", "triton": "3.2.0"}), "rev")
    assert record["explained_by"] == []


def test_a_cell_of_another_sweep_is_placed_by_what_it_installed(local):
    """A results file may hold sweeps over different axes: a cell without a peft axis sits in the peft column of the
    version its lock installed."""
    wide = cells_of(local, "deepspeed=0.19.8", "peft=0.15.2")[0]
    narrow = cells_of(local, "deepspeed=0.19.8")[0]
    records = [make_record(wide, measured([stack({"deepspeed": "0.19.8"}), check("lora", "failed", "x")], False), "r"),
               make_record(narrow, Measured("measured", "", "a" * 64, {"checks": [stack({})], "passed": True}, "b" * 64,
                                            {}, (), {"deepspeed": "0.19.8", "peft": "0.14.0"}), "r")]
    data = grid_of(*records)
    sweep_results.add_axes(data, [("peft", ("0.14.0",))])
    assert "| 0.19.8 | PASS | FAIL lora (unexplained) |" in markdown(data), markdown(data)


def test_check_and_lock_warn_where_a_variant_sits_on_a_failing_cell(cli, repo_copy, local):
    cell = cells_of(local, "deepspeed=0.19.8")[0]
    failing = make_record(cell, measured([stack({"deepspeed": "0.19.8"}),
                                          check("grpo", "failed", HOOKS, ["ds-0.16.4-trl-0.15-generation-hooks"])],
                                         False), "rev")
    sweep_results.save(repo_copy / "compat" / "vlm-r1-local.json", grid_of(failing))
    result = cli("--root", str(repo_copy), "check", "vlm-r1")
    assert result.code == 0, result.out + result.err
    warnings = [line for line in result.out.splitlines() if "warning:" in line]
    # local and cu124 both lock deepspeed 0.19.8; seed (0.15.4) does not sit on the cell
    assert len(warnings) == 2 and all("check grpo failed" in w and "_register_hooks_recursively" in w
                                      for w in warnings), result.out
    assert "vlm-r1/seed sits on" not in result.out
    locked = cli("--root", str(repo_copy), "lock", "vlm-r1", "--variant", "local")
    assert locked.code == 0 and "vlm-r1/local sits on a cell measured failing" in locked.out, locked.out + locked.err
    # a cell measured passing warns of nothing
    sweep_results.save(repo_copy / "compat" / "vlm-r1-local.json",
                       grid_of(make_record(cell, measured([stack({"deepspeed": "0.19.8"})], True), "rev")))
    assert "warning:" not in cli("--root", str(repo_copy), "check", "vlm-r1").out


def test_a_cpu_defect_a_setting_routes_around_is_measured_with_it_and_says_so(local):
    rule = "ds-cpu-accelerator-zero3-coalesced-gather-race"
    corrupt = "1 parameter(s) differ from the saved checkpoint; first ones:\n  x: not bit-identical to the checkpoint"
    cell = cells_of(local, "deepspeed=0.19.2")[0]
    first = measured([stack({"deepspeed": "0.19.2"}), check("zero3_load", "failed", corrupt, [rule])], False)
    first.pins = {"deepspeed": "0.19.2"}
    settings = cpu_route(cell, first, load_rules())
    assert settings == {"stage3_allgather_sequential": True}
    again = measured([stack({"deepspeed": "0.19.2"}), check("zero3_load"), check("grpo")], True)
    again.zero_settings, again.first_run = settings, first
    record = make_record(cell, again, "rev")
    assert record["result"] == "passed" and not is_finding(record)
    cpu = record["cpu_accelerator"]
    assert cpu["setting"] == settings and cpu["rules"] == [rule] and "says nothing about GPUs" in cpu["note"]
    assert cpu["without_setting"]["check"] == "zero3_load"
    assert "PASS (CPU: with stage3_allgather_sequential)" in markdown(grid_of(record))
    # the route did not hold: the defect shows again, the rest is not measured
    still = measured([stack({"deepspeed": "0.19.2"}), check("zero3_load", "failed", corrupt, [rule]), check("grpo")],
                     False)
    still.zero_settings, still.first_run = settings, first
    record = make_record(cell, still, "rev")
    assert record["result"] == "failed" and record["cpu_accelerator"]["setting"] == settings
    assert {c["name"]: c["status"] for c in record["checks"]}["grpo"] == NOT_MEASURED
    # DeepSpeed 0.19.8 is not covered: nothing to route around
    fixed = measured([stack({"deepspeed": "0.19.8"}), check("zero3_load", "failed", corrupt, [rule])], False)
    assert cpu_route(cells_of(local, "deepspeed=0.19.8")[0], fixed, load_rules()) is None


def test_readme_grid_is_generated_from_the_committed_data(cli):
    """The README carries the measured grid between markers; it must be what the committed data renders to."""
    data = REPO / "compat" / "vlm-r1-local.json"
    committed = sweep_results.load(data)
    assert len(committed["cells"]) >= 24, "the committed sweep must hold at least 24 cells"
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- compat:start -->\n", 1)[1].split("<!-- compat:end -->", 1)[0].strip()
    generated = cli("sweep", "report", "--markdown", str(data))
    assert generated.code == 0
    assert block == generated.out.strip(), \
        "README's compatibility grid drifted: paste `vlmbuild sweep report --markdown compat/vlm-r1-local.json`"


def test_rejudge_explains_cells_that_never_smoked(tmp_path, local):
    """An install that failed and a resolution that failed have no report: rejudge explains them from what the
    record says (the build's error, uv's reason), and does not trip on the missing report."""
    from vlmbuild.sweep import rejudge

    built = cells_of(local, "deepspeed=0.19.5")[0]
    reason = "building DeepSpeed with its CPU ops failed (exit 2): RuntimeError: 0 active drivers ([])."
    broken = make_record(built, Measured("install_failed", reason, "a" * 64,
                                         pins={"deepspeed": "0.19.5", "triton": "3.2.0"}), "rev")
    lost = cells_of(local, "transformers=4.49.0", "trl=0.18.0")[0]
    unresolvable = make_record(lost, Measured("unresolvable", UV_TRL_018), "rev")
    results = tmp_path / "vlm-r1-local.json"
    sweep_results.save(results, grid_of({**broken, "explained_by": []}, {**unresolvable, "explained_by": []}))
    data, changed = rejudge(results, local)
    assert sorted(changed) == sorted([built.id, lost.id])
    assert {c["id"]: c["explained_by"] for c in data["cells"]} == {
        built.id: ["ds-0.16.3-triton-3.2-no-gpu-import"], lost.id: ["trl-0.18-needs-transformers-4.50"]}


def test_rejudge_explains_old_measurements_with_the_rules_as_they_are_now(tmp_path, local):
    """A rule added after a sweep explains its failures from the kept reports, measuring nothing again."""
    from vlmbuild.sweep import rejudge

    sampler = "TypeError: GRPOTrainer._get_train_sampler() takes 1 positional argument but 2 were given"
    cell = cells_of(local, "deepspeed=0.19.8", "transformers=4.52.4", "trl=0.16.1")[0]
    report = {"checks": [stack({"deepspeed": "0.19.8", "transformers": "4.52.4", "trl": "0.16.1"}),
                         check("grpo", "failed", sampler)], "passed": False}
    results = tmp_path / "vlm-r1-local.json"
    kept = tmp_path / "reports" / "vlm-r1-local" / f"{cell.id}.json"
    kept.parent.mkdir(parents=True)
    kept.write_text(json.dumps(report))
    record = make_record(cell, Measured("measured", "", "a" * 64, report, "b" * 64, {}, (),
                                        {"deepspeed": "0.19.8", "transformers": "4.52.4", "trl": "0.16.1"}), "rev")
    assert record["explained_by"] == ["trl-0.16-transformers-4.52-train-sampler"]
    # as the sweep judged it before the rule existed
    old = {**record, "explained_by": [], "reports": [str(kept.relative_to(tmp_path))],
           "checks": [{**c, "explained_by": []} for c in record["checks"]]}
    sweep_results.save(results, grid_of(old))
    data, changed = rejudge(results, local)
    assert changed == [cell.id]
    assert data["cells"][0]["explained_by"] == ["trl-0.16-transformers-4.52-train-sampler"]
    assert data["cells"][0]["measured_at"] == old["measured_at"] and data["cells"][0]["seconds"] == old["seconds"]
