"""The `nodes` check of a smoke over several nodes: the world the rendezvous formed is the one the nodes make.

A rendezvous that goes wrong is silent: a master address that resolves to the node itself makes each node form a
world of its own, whose ranks then train alone (mlc-ai/pith-train PR #91). Every rank gathers every rank's hostname,
node and the world size it was given, and fails unless all of them saw one world of the expected size spread over
the expected number of hosts.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from .common import CheckProblem


def check_nodes(smoke: Any) -> dict[str, Any]:
    import torch.distributed as dist

    expected_world, expected_nodes = smoke.args.expect_world, smoke.args.expect_nodes
    me = {"rank": smoke.rank, "node": int(os.environ.get("GROUP_RANK", "0")), "hostname": socket.gethostname(),
          "world_size": dist.get_world_size()}
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, me)
    hosts = sorted({r["hostname"] for r in ranks})
    problems = []
    if dist.get_world_size() != expected_world:
        problems.append(f"rank {smoke.rank} on {me['hostname']} joined a world of {dist.get_world_size()} rank(s) on "
                        f"{', '.join(hosts)}, but {expected_nodes} nodes make a world of {expected_world}: the "
                        "rendezvous formed separate worlds (does the endpoint resolve to each node itself?)")
    elif len(hosts) != expected_nodes:
        problems.append(f"the world of {len(ranks)} ranks spans {len(hosts)} host(s) ({', '.join(hosts)}), "
                        f"expected {expected_nodes} nodes")
    sizes = sorted({r["world_size"] for r in ranks})
    if sizes != [expected_world]:
        problems.append(f"the ranks were given world sizes {sizes}, expected {expected_world} on every one")
    if problems:
        raise CheckProblem("; ".join(problems))
    return {"world_size": expected_world, "nodes": expected_nodes, "hosts": hosts, "ranks": ranks}
