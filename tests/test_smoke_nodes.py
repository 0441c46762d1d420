"""The smoke over two nodes (`vlmbuild smoke IMAGE --nodes 2`, engine_nodes): one hardened container of the image per
node on a private internal network, each starting the image's own torchrun against node 0's c10d rendezvous. It
passes on the local image with one world over both containers, and fails for the right reason, in bounded time, when
the rendezvous cannot be reached, when a node dies, and when the rendezvous forms a world per node. Every run leaves
no container, network or volume behind."""

from __future__ import annotations

import argparse
import json
import threading
import time

import pytest
from conftest import OWNER, TEST_REPO, run_cli
from vlmbuild import contract
from vlmbuild.engine_api import SmokeLimits, SmokeRun

# ---------------------------------------------------------------- without an engine


def test_a_smoke_over_nodes_runs_the_checks_that_cross_them_and_asserts_the_world_first():
    across = contract.checks_for("cpu", flash_attention=False, prebuilt_ops=True, repeat=3, nodes=2)
    assert across == ("stack", "nodes", "zero3_load", "train_step", "checkpoint_resume", "grpo")
    assert "nodes" not in contract.checks_for("cpu", flash_attention=False, prebuilt_ops=True, nodes=1)


def test_each_node_starts_the_images_torchrun_with_a_bounded_c10d_rendezvous():
    from vlmbuild.smoke.node_ranks import torchrun_command

    args = argparse.Namespace(nodes=2, node_rank=1, rdzv_endpoint="node0:29400", rdzv_timeout=45.0, run_id="r1",
                              min_nodes=0)
    cmd = torchrun_command(args, per_node=1)
    assert cmd[0].endswith("/torchrun")
    joined = " ".join(cmd)
    for part in ("--nnodes 2 ", "--nproc-per-node 1", "--node-rank 1", "--rdzv-backend c10d",
                 "--rdzv-endpoint node0:29400", "--rdzv-id r1", "join_timeout=45,read_timeout=45", "--max-restarts 0"):
        assert part in joined, joined
    args.min_nodes = 1
    assert "--nnodes 1:2 " in " ".join(torchrun_command(args, per_node=1))  # an elastic run, as a user may start one


@pytest.mark.parametrize("argv, said", [
    (["--nodes", "2"], "--nodes: give --workdir, a directory every node mounts"),
    (["--nodes", "2", "--workdir", "/tmp", "--node-rank", "2"], "--node-rank 2: expected 0 to 1"),
    (["--nodes", "2", "--workdir", "/tmp", "--rdzv-endpoint", "node0"], "--rdzv-endpoint node0: expected HOST:PORT"),
    (["--nodes", "0"], "--nodes 0: expected 1 to 64"),
])
def test_bad_node_arguments_are_refused_before_anything_starts(argv, said, capsys):
    from vlmbuild.smoke.__main__ import EXIT_USAGE, main

    assert main(["--device", "cpu", *argv]) == EXIT_USAGE
    assert said in capsys.readouterr().err


def test_local_smoke_refuses_nodes():
    result = run_cli("smoke", "--local", "--nodes", "2")
    assert result.code == 2 and "give IMAGE_REF, not --local" in result.out + result.err


class Engine:
    """Stands in for the Docker engine in the gate's pass planning only (what each pass was asked for)."""

    def __init__(self, passing: bool = True) -> None:
        self.calls: list[tuple[str, int]] = []
        self.passing = passing

    def run_smoke(self, image, device, timeout, progress, repeat=1, model_dir=None, limits=None, nodes=1, **kw):
        self.calls.append((device, nodes))
        check = contract.check_record("stack", 1, device, "passed" if self.passing else "failed")
        report = {"mode": device, "world_size": 2, "nodes": nodes, "passed": self.passing, "checks": [check],
                  "seconds": 1.0}
        return SmokeRun(0 if self.passing else 1, report, "", 1.0, False, device, nodes=nodes)


def test_the_gate_adds_a_pass_over_nodes_after_the_passes_that_run_every_check():
    from vlmbuild.gate import run_smoke_passes
    from vlmbuild.progress import Progress

    progress = Progress("t", tty=False, github=False)
    engine = Engine()
    runs = run_smoke_passes(engine, "img", "cpu", 60, 1, None, progress, nodes=2)
    assert engine.calls == [("cpu", 1), ("cpu", 2)]
    assert [contract.pass_name(r.report, r.device) for r in runs] == ["cpu x2", "cpu x2 over 2 nodes"]
    assert contract.nodes_label([r.report for r in runs]) == "1,2"
    engine = Engine()
    run_smoke_passes(engine, "img", "cpu", 60, 1, None, progress, nodes=2, nodes_only=True)
    assert engine.calls == [("cpu", 2)]
    engine = Engine(passing=False)
    run_smoke_passes(engine, "img", "cpu", 60, 1, None, progress, nodes=2)
    assert engine.calls == [("cpu", 1)]  # a failed pass is not followed by one that would say less


def test_a_node_that_ended_badly_is_named_with_its_own_output():
    from vlmbuild.gate import describe_failure

    logs = ("==== node 0 (c-node0), exit status 137 ====\nnode 0 was fine\n"
            "==== node 1 (c-node1), exit status 1 ====\nnode 1's own last words\n")
    run = SmokeRun(1, None, logs, 9.0, False, "cpu", SmokeLimits(), nodes=2, failed_node=1, node_exit=(137, 1))
    message, failing = describe_failure(run)
    assert failing == ["node-failed"]
    assert message.startswith("node 1 of the smoke's 2 nodes ended first, with status 1")
    # the node that failed first comes first, then the others that failed, each with its own output only
    assert message.index("node 1's own last words") < message.index("node 0 was fine")
    assert "node 0 (status 137), its last output:" in message


# ---------------------------------------------------------------- on the engine, with the local image

docker = pytest.importorskip("docker")


def ours_left(client) -> list[str]:
    """Containers, networks and volumes of ours that are still there."""
    return ([c.name for c in client.containers.list(all=True, filters={"label": OWNER})]
            + [n.name for n in client.networks.list(filters={"label": OWNER})]
            + [v.name for v in client.volumes.list(filters={"label": OWNER})])


def workers_of(container) -> str:
    """The command lines of a running container's processes ("" once it has stopped)."""
    try:
        return " ".join(" ".join(p) for p in container.top(ps_args="-ww -o pid,args")["Processes"] or [])
    except docker.errors.APIError:
        return ""


def node_smoke(image: str, node_args=lambda rank: [], checks: str | None = None, timeout: int = 600) -> SmokeRun:
    from vlmbuild.engine import Engine as DockerEngine
    from vlmbuild.engine_nodes import run_node_smoke
    from vlmbuild.progress import Progress

    return run_node_smoke(DockerEngine(), f"{TEST_REPO}:{image}", "cpu", timeout, Progress("nodes", tty=False, github=False), 2,
                          checks=checks, node_args=node_args)


@pytest.mark.docker
def test_vlmbuild_smoke_nodes_2_passes_on_the_local_image_with_one_world_and_says_so(client, built_local, tmp_path):
    """The command a user runs; the pass over nodes with every check that crosses them is the build's (built_local
    runs it with --smoke-nodes 2, and test_pipeline_docker checks its evidence: report, labels, inspect)."""
    ref = f"{TEST_REPO}:{built_local['tag']}"
    report_path = tmp_path / "report.json"
    result = run_cli("smoke", ref, "--device", "cpu", "--nodes", "2", "--checks", "nodes",
                     "--report", str(report_path), timeout=900)
    assert result.code == 0, result.out[-4000:] + result.err[-2000:]
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["nodes"] == 2 and report["world_size"] == 2
    assert report["rendezvous"] == "c10d at node0:29400 (torchrun)"
    assert [c["name"] for c in report["checks"]] == ["nodes"]
    nodes = report["checks"][0]["details"]
    assert nodes["hosts"] == ["node0", "node1"] and nodes["world_size"] == 2
    assert sorted((r["rank"], r["node"], r["hostname"]) for r in nodes["ranks"]) == [(0, 0, "node0"), (1, 1, "node1")]
    assert report["node_containers"]["hosts"] == 1 and report["node_containers"]["exit_status"] == [0, 0]
    assert "world size 2 over 2 nodes" in result.out
    assert ours_left(client) == []


@pytest.mark.docker
def test_a_node_that_cannot_reach_the_rendezvous_fails_in_bounded_time_naming_itself(client, built_local):
    from vlmbuild.gate import describe_failure

    started = time.monotonic()
    # node 1's bound is the shorter, so it is the first to give up (node 0 would give up waiting for it later)
    run = node_smoke(built_local["tag"], lambda rank: ["--rdzv-timeout", "60"] if rank == 0 else
                     ["--rdzv-timeout", "10", "--rdzv-endpoint", "nowhere:29400"], checks="nodes")
    assert not run.passed and run.failed_node == 1, run.logs[-3000:]
    message, failing = describe_failure(run)
    assert "node-failed" in failing and message.startswith("node 1 of the smoke's 2 nodes ended first"), message
    assert "node 1: torchrun's c10d rendezvous at nowhere:29400 did not complete within 10 s" in message, message
    assert time.monotonic() - started < 120  # node 1's 10 s, node 0's grace, the containers' start and removal
    assert ours_left(client) == []


@pytest.mark.docker
def test_a_node_that_dies_takes_the_other_down_and_both_are_removed(client, built_local):
    from vlmbuild.gate import describe_failure

    seen: dict = {}

    def kill_node1_once_its_ranks_run():
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and "killed_at" not in seen:
                for c in client.containers.list(filters={"label": OWNER}):
                    if c.name.endswith("-node1") and "vlmbuild.smoke.worker" in workers_of(c):
                        seen["host_config"] = c.attrs["HostConfig"]
                        network = client.networks.get(next(iter(c.attrs["NetworkSettings"]["Networks"])))
                        seen["internal"] = network.attrs["Internal"]
                        time.sleep(2)  # in the rendezvous or a collective by now
                        c.kill()
                        seen["killed_at"] = time.monotonic()
                time.sleep(0.3)
        except Exception as exc:  # noqa: BLE001 - said by the assertion below, not lost in a thread
            seen["error"] = repr(exc)

    killer = threading.Thread(target=kill_node1_once_its_ranks_run)
    killer.start()
    run = node_smoke(built_local["tag"])
    killer.join()
    assert "killed_at" in seen, f"node 1's ranks never seen running: {seen.get('error')}; {run.logs[-2000:]}"
    assert not run.passed and run.failed_node == 1, run.logs[-3000:]
    assert time.monotonic() - seen["killed_at"] < 60  # node 0 was stopped, not left to its collective's timeout
    message, _ = describe_failure(run)
    assert message.startswith("node 1 of the smoke's 2 nodes ended first, with status 137"), message
    hardened = seen["host_config"]
    assert hardened["CapDrop"] == ["ALL"] and "no-new-privileges:true" in hardened["SecurityOpt"]
    assert hardened["Memory"] > 0 and hardened["PidsLimit"] > 0 and seen["internal"] is True
    assert ours_left(client) == []


@pytest.mark.docker
def test_a_rendezvous_that_forms_a_world_per_node_fails_saying_so(client, built_local):
    from vlmbuild.gate import describe_failure

    # each node its own rendezvous host, and an elastic lower bound of one node: each forms a world of one
    run = node_smoke(built_local["tag"], lambda rank: ["--rdzv-endpoint", "localhost:29400", "--min-nodes", "1"],
                     checks="nodes")
    assert not run.passed, run.logs[-3000:]
    message, _ = describe_failure(run)
    said = " ".join(message.split())
    assert "joined a world of 1 rank(s)" in said and "the rendezvous formed separate worlds" in said, said
    assert ours_left(client) == []
