"""Runtime names that the Ray cluster, the Serve config, the Helm chart and the
manifests must agree on. Change one here and the tests of platform/ and deploy/
point at every file that still uses the old name."""

from __future__ import annotations

RAY_NAMESPACE = "lull"
SERVE_APP = "lull"
SERVE_IMPORT_PATH = "controller.assembly:build_app"
GATEWAY_DEPLOYMENT = "LullGateway"  # ingress: REST on the HTTP port, gRPC session service
ENGINE_DEPLOYMENT = "LullEngine"  # one replica per GPU, wraps vLLM's AsyncLLM
CONTROLLER_ACTOR = "lull-controller"  # detached, named
NODE_AGENT_ACTOR_PREFIX = "lull-node-agent-"
GATEWAY_RESOURCE = "lull_gateway"  # the Ray resource the chart gives each gateway pod (cluster.gateway_resource)
RAY_METRICS_PORT = 8080  # Ray's own metrics export port (`ray start --metrics-export-port`)


def node_agent_actor(node_id: str) -> str:
    """The named actor of the KV agent on Ray node ``node_id``."""
    if not node_id:
        raise ValueError("node_id must be a non-empty Ray node id")
    return f"{NODE_AGENT_ACTOR_PREFIX}{node_id}"
