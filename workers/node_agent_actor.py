"""The node agent as a Ray actor: one per node, named `lull-node-agent-<node_id>`.

A thin shell: it builds the node's DRAM tier, connects the shared tier, starts
the gRPC server, and expires leases of prepared moves that nobody completed.

The server listens on one address: ``host`` when given (`lull up` gives 127.0.0.1),
else the Ray node's own IP (on Kubernetes, the pod's), never on every interface. Every
call must carry the internal token, read here from the node's environment
(LULL_INTERNAL_TOKEN): an agent without one does not start.
"""

from __future__ import annotations

import logging
import threading
import time

import ray
from prometheus_client import CollectorRegistry, generate_latest

from proto.config_secrets import internal_token
from proto.telemetry.metrics import make_metrics, serve_agent_metrics

from workers.dram_store import DramStore, node_dram_dir
from workers.connector_control import read_all_connector_stats
from workers.node_agent import NodeAgent
from workers.node_agent_service import serve
from workers.shared_tier import open_shared_tier

log = logging.getLogger(__name__)
LEASE_SWEEP_S = 1.0


@ray.remote(num_cpus=0)
class NodeAgentActor:
    def __init__(self, node_id: str, dram_dir: str, dram_capacity_bytes: int, *, redis_url: str | None = None,
                 shared_capacity_bytes: int = 0, port: int = 0, metrics_port: int | None = None,
                 host: str | None = None):
        token = internal_token()  # first: a node without the token fails before it opens anything
        # The password comes from this node's environment, never from the actor's arguments
        # (Ray keeps those in the GCS); a misconfigured Redis fails the agent's start here.
        shared = open_shared_tier(redis_url, shared_capacity_bytes) if redis_url else None
        dram_dir = node_dram_dir(dram_dir, node_id)  # the same folder this node's engines use
        self.agent = NodeAgent(node_id, DramStore(dram_dir, dram_capacity_bytes), shared, dram_dir=dram_dir)
        self.registry = CollectorRegistry()
        self.host = host or ray.util.get_node_ip_address()
        self.server, self.port, self.servicer = serve(self.agent, port, self.host, token=token,
                                                      metrics=make_metrics(self.registry))
        self._metrics_url: str | None = None
        if metrics_port is not None:  # the node's merged registry when in multiprocess mode, else this agent's
            if serve_agent_metrics(metrics_port, self.registry, self.host) is not None:
                host = f"[{self.host}]" if ":" in self.host else self.host
                self._metrics_url = f"http://{host}:{metrics_port}/metrics"
        self._sweeper = threading.Thread(target=self._sweep_leases, daemon=True, name="lease-sweeper")
        self._sweeper.start()

    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def metrics_url(self) -> str | None:
        """Where this agent serves its node's merged metrics; None when it serves none
        (no metrics port, or another agent on this host serves them)."""
        return self._metrics_url

    def metrics_text(self) -> str:
        """This agent's `lull:*` metrics (moves, tier occupancy), Prometheus text format."""
        return generate_latest(self.registry).decode()

    def connector_stats(self) -> dict[str, dict]:
        """The KV connector counters of this node's engine replicas, by replica id
        (``workers.kv_connector``: tokens loaded by source, busy seconds, saves)."""
        return read_all_connector_stats(self.agent.dram_dir)

    def _sweep_leases(self) -> None:
        while True:
            time.sleep(LEASE_SWEEP_S)
            try:
                self.servicer.sweep()
            except Exception:  # a sweep must never kill the agent
                log.exception("lease sweep failed")
