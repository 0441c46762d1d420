"""A smoke over several nodes on one Docker engine, as VLM-R1's multi-node demo runs them: one container of the
image per node, each starting the image's own torchrun against node 0's c10d rendezvous.

The containers are hardened as every smoke container is (engine.smoke_container_options), and their only network is
one made for this run alone: an internal bridge (no route out) on which each node answers to ``node<R>``. The ZeRO-3
checkpoint and the ranks' results cross the nodes through a volume made for this run, mounted by every node as a
shared filesystem would be. A node that ends badly takes the others down; the containers, the network and the volume
are removed whatever ends the run. Every node's containers here share one host: the report says so
(``node_containers``), so that nobody reads it as two machines.
"""

from __future__ import annotations

import json
import platform
import secrets
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import docker

from . import contract, owner
from .engine import CONTAINER_REPORT_DIR, engine_errors
from .engine_api import SmokeLimits, SmokeRun
from .progress import Progress

RDZV_PORT = 29400
SHARED_DIR = "/vlmbuild-shared"
POLL_SECONDS = 0.5
# How long the other nodes have to end on their own once one ended badly, before they are killed.
FAILED_NODE_GRACE_SECONDS = 10
# The node's one interface, on the run's network: gloo and NCCL pick an interface by their own rules otherwise, and
# over a Docker bridge NCCL's pick fails with "unhandled system error" (pytorch/pytorch#23363, NVIDIA/nccl#331).
NODE_INTERFACE = {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}


def node_command(rank: int, nodes: int, run_id: str, device: str, timeout: int, repeat: int,
                 checks: str | None) -> list[str]:
    command = [contract.SMOKE_ENTRYPOINT, "--device", device, "--report", f"{CONTAINER_REPORT_DIR}/report.json",
               "--timeout", str(max(60, timeout - 30)), "--repeat", str(repeat), "--nodes", str(nodes),
               "--node-rank", str(rank), "--rdzv-endpoint", f"node0:{RDZV_PORT}", "--run-id", run_id,
               "--rdzv-timeout", str(min(contract.DEFAULT_RDZV_TIMEOUT, max(30, timeout // 4))),
               "--workdir", SHARED_DIR]
    return command + (["--checks", checks] if checks else [])


def run_node_smoke(engine, image: str, device: str, timeout: int, progress: Progress, nodes: int, repeat: int = 1,
                   model_dir: Path | None = None, checks: str | None = None, limits: SmokeLimits = SmokeLimits(),
                   node_args: Callable[[int], list[str]] = lambda rank: []) -> SmokeRun:
    """The smoke over ``nodes`` containers of ``image``; node 0's report, with what the engine saw of every node.
    ``node_args(rank)``: more smoke arguments for a node (the last of a repeated one wins), for fault tests."""
    client = engine.client
    run_id = f"{time.strftime('%H%M%S')}-{secrets.token_hex(3)}"
    name = f"vlmbuild-smoke-{run_id}"
    labels = {contract.OWNER_LABEL: "smoke", contract.OWNER_PROCESS_LABEL: owner.mark()}
    started = time.monotonic()
    network = volume = None
    try:
        # internal: no route out of it; the nodes reach each other by name through the engine's DNS
        with engine_errors(f"making the network and the volume of the smoke over {nodes} nodes"):
            network = client.networks.create(name, driver="bridge", internal=True, labels=labels)
            volume = client.volumes.create(name, labels=labels)
        with ExitStack() as stack:
            containers = []
            for rank in range(nodes):
                options, model_args = engine.smoke_container_options(device, limits, model_dir, network=name)
                options["volumes"] = {**options.get("volumes", {}), name: {"bind": SHARED_DIR, "mode": "rw"}}
                if device == "gpu":  # a GPU of its own per node: NCCL refuses two ranks on one device
                    options["device_requests"] = [docker.types.DeviceRequest(device_ids=[str(rank)],
                                                                             capabilities=[["gpu"]])]
                command = node_command(rank, nodes, run_id, device, timeout, repeat, checks) + model_args
                command += node_args(rank)
                containers.append(stack.enter_context(engine.container(
                    image, "smoke", f"creating node {rank} of the smoke of {image}", command=command,
                    name=f"{name}-node{rank}", hostname=f"node{rank}", environment=NODE_INTERFACE,
                    networking_config={name: client.api.create_endpoint_config(aliases=[f"node{rank}"])},
                    **options)))
            for rank, container in enumerate(containers):
                with engine_errors(f"starting node {rank} of the smoke of {image}"):  # as run_smoke's start
                    container.start()
            codes, timed_out, first_bad = watch(containers, timeout, progress)
            return collect(engine, containers, codes, timed_out, first_bad, started, device, limits, name)
    finally:
        for thing in (network, volume):
            try:
                if thing is not None:
                    thing.remove()
            except docker.errors.APIError:
                pass


def watch(containers: list, timeout: int, progress: Progress) -> tuple[list[int | None], bool, int | None]:
    """Wait for every node; the first that ends badly (or the timeout) takes the others down: they get
    FAILED_NODE_GRACE_SECONDS to end on their own (a node whose peer died usually fails at once, saying what it saw),
    then are killed. Each node's exit status, whether the timeout ended the run, the first node that failed."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = [None] * len(containers)
    first_bad = None
    while any(code is None for code in codes) and time.monotonic() < deadline:
        for rank, container in enumerate(containers):
            if codes[rank] is None:
                container.reload()
                if container.status in ("exited", "dead"):
                    codes[rank] = container.attrs["State"]["ExitCode"]
                    if codes[rank] != 0 and first_bad is None:
                        first_bad = rank
                        deadline = min(deadline, time.monotonic() + FAILED_NODE_GRACE_SECONDS)
        time.sleep(POLL_SECONDS)
    timed_out = first_bad is None and any(code is None for code in codes)
    why = f"node {first_bad} ended with status {codes[first_bad]}" if first_bad is not None else "the timeout"
    for rank, container in enumerate(containers):
        if codes[rank] is None:
            progress.info(f"{why}: stopping node {rank}")
            try:
                container.kill()
                container.wait(timeout=30)
            except docker.errors.APIError:
                pass
            container.reload()
            codes[rank] = container.attrs["State"]["ExitCode"]
    return codes, timed_out, first_bad


def collect(engine, containers: list, codes: list[int | None], timed_out: bool, first_bad: int | None,
            started: float, device: str, limits: SmokeLimits, network: str) -> SmokeRun:
    """Node 0's report (or, where a node ended badly and node 0 has none, none), every node's output, and the
    engine's facts of the nodes in the report."""
    logs, oom = [], False
    for rank, container in enumerate(containers):
        logs.append(f"==== node {rank} ({container.name}), exit status {codes[rank]} ====\n"
                    + container.logs().decode(errors="replace"))
        oom = oom or bool(container.attrs["State"].get("OOMKilled"))
    raw = None if timed_out else engine._read_file(containers[0], f"{CONTAINER_REPORT_DIR}/report.json")
    report = json.loads(raw) if raw else None
    if report is not None:
        report["node_containers"] = {
            "nodes": len(containers), "hosts": 1, "host": platform.node(), "network": f"{network} (internal bridge)",
            "exit_status": codes,
            "note": "every node is a container on this one host: the rendezvous, the store and gloo crossed a "
                    "network between containers, not between machines"}
    # the run passed only where every node did (node 0's report alone would not say that node 1 failed)
    exit_code = None if timed_out else codes[first_bad] if first_bad is not None else next(
        (code for code in codes if code != 0), 0)
    return SmokeRun(exit_code, report, "\n".join(logs), time.monotonic() - started, timed_out, device, limits, oom,
                    nodes=len(containers), failed_node=first_bad, node_exit=tuple(codes))
