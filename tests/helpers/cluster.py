"""A real 3-node Redis Cluster on free loopback ports, formed without redis-cli."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from engine.store.embedded import EmbeddedRedis, free_port

SLOTS = 16_384


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, so at most 55535."""
    while True:
        port = free_port()
        if port <= 55_535 and _free(port + 10_000):
            return port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextmanager
def redis_cluster(base: Path, nodes: int = 3) -> Iterator[list[EmbeddedRedis]]:
    servers = [
        EmbeddedRedis(base / f"node{i}", persistent=False, port=_cluster_port(),
                      extra_args=["--cluster-enabled", "yes",
                                  "--cluster-config-file", f"nodes-{i}.conf",
                                  "--cluster-node-timeout", "2000"])
        for i in range(nodes)
    ]
    try:
        for s in servers:
            s.start()
        clients = [redis.Redis(port=s.port) for s in servers]
        per = SLOTS // nodes
        for i, c in enumerate(clients):
            end = SLOTS if i == nodes - 1 else (i + 1) * per
            c.execute_command("CLUSTER ADDSLOTS", *range(i * per, end))
        for c in clients[1:]:
            c.execute_command("CLUSTER MEET", "127.0.0.1", servers[0].port)
        deadline = time.monotonic() + 20
        while not all(c.cluster("info").get("cluster_state") == "ok" for c in clients):
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not converge")
            time.sleep(0.05)  # polling a state change in another process, with a deadline
        for c in clients:
            c.close()
        yield servers
    finally:
        for s in servers:
            s.stop()
