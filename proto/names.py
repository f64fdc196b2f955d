"""Runtime names that the Ray cluster, the Serve config, the Helm chart and the
manifests must agree on. Change one here and the tests of platform/ and deploy/
point at every file that still uses the old name."""

from __future__ import annotations

import re

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


# Every id a caller names (tenants, sessions, replicas, moves, nodes): the charset
# proto/session.proto documents. No `/`, so a tenant cannot address another's namespace.
ID_CHARSET = r"[A-Za-z0-9._:-]{1,128}"
ID_PATTERN = re.compile(ID_CHARSET)


def id_problem(what: str, value: object) -> str:
    """Why ``value`` is not a valid id, naming ``what`` it is; empty when it is one."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        return f"{what} must be 1 to 128 characters of A-Z a-z 0-9 . _ : -; got {value!r:.140}"
    return ""


# A session as the controller and the tiers key it: ``tenant/session`` (the gateway scopes every
# client's session id by its tenant) or a bare id (sessions of internal callers and tests).
SESSION_KEY_PATTERN = re.compile(rf"(?:{ID_CHARSET}/)?{ID_CHARSET}")


def session_key_problem(what: str, value: object) -> str:
    """Why ``value`` is not a session key (``tenant/session`` or a bare id); empty when it is one."""
    if not isinstance(value, str) or not SESSION_KEY_PATTERN.fullmatch(value):
        return (f"{what} must be tenant/session or session, each 1 to 128 characters of A-Z a-z 0-9 . _ : -; "
                f"got {value!r:.280}")
    return ""


def path_safe_id(what: str, value: str) -> str:
    """``value`` when it is an id that can name a folder inside another: an id that is not
    `.` or `..`, or it raises ValueError. Every folder Lull names after an id goes through here."""
    problem = id_problem(what, value) or (f"{what} must not be . or .." if value in (".", "..") else "")
    if problem:
        raise ValueError(problem)
    return value


def tenant_of(session_key: str) -> str:
    """The tenant of a session key (``tenant/session``); "" for a bare id (an internal caller's)."""
    tenant, slash, _ = session_key.partition("/")
    return tenant if slash else ""
