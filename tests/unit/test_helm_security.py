"""The chart's security (deploy/helm/lull): every pod runs as the image's non-root user with
no capabilities under RuntimeDefault seccomp, read-only root filesystems where the container
writes only to volumes, no ServiceAccount token where no Kubernetes client runs, Ray's token
authentication and the node agents' token from Secrets, Ray's dashboard on the pod's
address, and NetworkPolicies under which only the gateway's ports are open to anyone.
Rendered offline (helm-python-sdk); the policies are evaluated here by their own rules
(a port is open to a peer when any policy selecting the pod admits it), since no network
plugin runs here."""

from __future__ import annotations

import pytest

from tests.unit.test_dockerfile import args_of
from tests.unit.test_helm_chart import VALUE_SETS, find, loaded_config, rendered, values_of
from tests.unit.test_helm_pods import groups
from tests.k8s_validation import validate
from tests.unit.test_helm_tiers import render

ANYONE = {"labels": {}, "namespace": "elsewhere"}  # a pod of another namespace, no labels
OPERATOR = {"labels": {"app.kubernetes.io/name": "kuberay-operator"}, "namespace": "kuberay"}


def pod_specs(objs) -> dict[str, dict]:
    """Every pod template by role: the RayService's groups, the Deployments and StatefulSets."""
    specs = {}
    for obj in objs:
        if obj["kind"] == "RayService":
            specs |= {role: group["template"] for role, group in groups(obj).items()}
        elif obj["kind"] in ("Deployment", "StatefulSet"):
            specs[obj["metadata"]["name"]] = obj["spec"]["template"]
    return specs


def image_uid() -> int:
    [uid] = [int(rest.split("=")[1]) for rest in args_of("ARG") if rest.startswith("LULL_UID=")]
    [user] = args_of("USER")
    assert user.split(":")[0] in ("${LULL_UID}", str(uid))
    return uid


def test_the_image_runs_as_a_non_root_user():
    assert image_uid() > 0


@pytest.mark.parametrize("which", VALUE_SETS)
def test_every_pod_runs_non_root_without_capabilities(which):
    specs = pod_specs(rendered(which))
    assert {"head", "gateway", "gpu", "lull-redis"} <= set(specs)
    for role, template in specs.items():
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == pod["runAsGroup"] == image_uid(), role
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, role
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (role, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (role, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (role, container["name"])
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            if container["name"] != "redis":  # the places Ray, vLLM and Hugging Face write to
                assert {"/tmp", "/home/lull"} <= mounts, (role, container["name"])
    autoscaler = find(which, "RayService")[0]["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["capabilities"] == {"drop": ["ALL"]} and autoscaler["allowPrivilegeEscalation"] is False


def test_a_root_uid_is_refused():
    with pytest.raises(Exception, match="schema"):
        render({"security": {"runAsUser": 0}})


@pytest.mark.parametrize("which", VALUE_SETS)
def test_only_the_head_mounts_a_service_account_token(which):
    """The controller and Lull's Serve autoscaling policy (on the head) call the Kubernetes
    API; engines, agents, gateways and Redis never do."""
    specs = pod_specs(rendered(which))
    assert specs["head"]["spec"].get("automountServiceAccountToken", True) is True
    for role in ("gpu", "gateway", "lull-redis"):
        assert specs[role]["spec"]["automountServiceAccountToken"] is False, role


def secret_keys(objs) -> dict[str, set[str]]:
    return {o["metadata"]["name"]: set(o["data"]) for o in objs if o["kind"] == "Secret"}


@pytest.mark.parametrize("which", VALUE_SETS)
def test_ray_and_the_node_agents_authenticate_with_tokens_from_secrets(which):
    objs = rendered(which)
    cluster = find(which, "RayService")[0]["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    given = (values_of(which) or {}).get("security", {})
    if not given:  # the chart makes both Secrets, with the keys KubeRay and the pods read
        assert "auth_token" in secret_keys(objs)[cluster["authOptions"]["secretName"]]
    else:  # the Secrets made beforehand (k8s/README.md), named in the values
        assert cluster["authOptions"]["secretName"] == given["rayAuth"]["existingSecret"]
    for role, template in pod_specs(objs).items():
        if role.endswith("redis"):  # the KV tier's and the GCS's
            continue
        [container] = [c for c in template["spec"]["containers"] if c["name"].startswith("ray-")]
        env = {e["name"]: e for e in container["env"]}
        ref = env["LULL_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "internal-token", role
        assert ref["name"] == given["internalToken"]["existingSecret"] if given else ref["key"] in secret_keys(objs)[ref["name"]]
        assert env["LULL_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    params = [g["rayStartParams"] for g in groups(find(which, "RayService")[0]).values()]
    assert params[0]["dashboard-host"] == "$(LULL_POD_IP)"  # Kubernetes expands it from the env above
    assert not any("0.0.0.0" in str(value) for p in params for value in p.values())
    config = loaded_config(find(which, "ConfigMap", "lull-config")[0])
    assert config.tiers.node_agent_host is None  # the agents listen on the pod's (Ray node's) IP


def test_existing_secrets_are_used_and_ray_auth_can_be_turned_off():
    objs = render({"security": {"rayAuth": {"existingSecret": "my-ray"}, "internalToken": {"existingSecret": "my-int"}}})
    cluster = next(o for o in objs if o["kind"] == "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["secretName"] == "my-ray"
    assert {"lull-ray-auth", "lull-internal-token"}.isdisjoint(secret_keys(objs))
    env = [e for c in pod_specs(objs)["gpu"]["spec"]["containers"] for e in c["env"]]
    assert {"name": "my-int", "key": "internal-token"} in [e["valueFrom"]["secretKeyRef"] for e in env
                                                           if e["name"] == "LULL_INTERNAL_TOKEN"]
    off = render({"security": {"rayAuth": {"enabled": False}}})
    assert "authOptions" not in next(o for o in off if o["kind"] == "RayService")["spec"]["rayClusterConfig"]


def matches(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        ok = ok and labels.get(expr["key"]) in expr["values"]
    return ok


def peer_admits(peer: dict, source: dict) -> bool:
    if "namespaceSelector" in peer:  # any namespace the selector matches ({} : every one)
        return matches(peer.get("podSelector", {}), source["labels"]) and matches(peer["namespaceSelector"], {})
    return source["namespace"] == "lull" and matches(peer["podSelector"], source["labels"])


def open_to(objs, pod_labels: dict, port: int, source: dict) -> bool:
    policies = [o["spec"] for o in objs if o["kind"] == "NetworkPolicy" and matches(o["spec"]["podSelector"], pod_labels)]
    if not policies:
        return True  # no policy selects it: Kubernetes admits everything
    for policy in policies:
        for rule in policy.get("ingress", []):
            ports = rule.get("ports", [])
            if ports and not any(p["port"] <= port <= p.get("endPort", p["port"]) for p in ports):
                continue
            if "from" not in rule or any(peer_admits(peer, source) for peer in rule["from"]):
                return True
    return False


RAY_PORTS = (6379, 10001, 8265, 52365, 8076, 10002, 19999)  # GCS, client, dashboard, agent, objects, workers


def peers(objs) -> dict[str, dict]:
    """A source pod of each kind in the release's namespace: the pods it renders, the `helm
    test` pod, and a pod of the namespace with none of the release's labels."""
    sources = {role: {"labels": t["metadata"]["labels"], "namespace": "lull"} for role, t in pod_specs(objs).items()}
    [test_pod] = [o for o in objs if o["kind"] == "Pod"]
    sources["helm-test"] = {"labels": test_pod["metadata"]["labels"], "namespace": "lull"}
    sources["stranger"] = {"labels": {}, "namespace": "lull"}
    return sources


def reachers(objs, target: str, port: int) -> set[str]:
    """Which sources ``peers`` may open a connection to pod ``target`` on ``port``."""
    sources = peers(objs)
    return {name for name, source in sources.items() if open_to(objs, sources[target]["labels"], port, source)}


RAY_ROLES = {"head", "gateway", "gpu"}


@pytest.mark.parametrize("which", VALUE_SETS)
def test_only_ray_pods_reach_rays_ports(which):
    objs = rendered(which)
    for role in RAY_ROLES:
        for port in RAY_PORTS:
            assert reachers(objs, role, port) == RAY_ROLES, (role, port)
    assert open_to(objs, peers(objs)["head"]["labels"], 8265, OPERATOR)
    assert not open_to(objs, peers(objs)["head"]["labels"], 6379, OPERATOR)


@pytest.mark.parametrize("which", VALUE_SETS)
def test_only_the_controller_on_the_head_reaches_the_node_agents(which):
    objs = rendered(which)
    port = loaded_config(find(which, "ConfigMap", "lull-config")[0]).tiers.node_agent_port
    for role in RAY_ROLES:  # a node agent runs on every Ray pod
        assert reachers(objs, role, port) == {"head"}, role
        assert not open_to(objs, peers(objs)[role]["labels"], port, ANYONE)


def test_with_free_agent_ports_ray_pods_reach_every_port():
    """node_agent_port 0 (a free port per agent) cannot be singled out by a policy."""
    objs = render({"config": {"tiers": {"node_agent_port": 0}}})
    ray = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "lull-ray")
    assert "ports" not in ray["spec"]["ingress"][0] and len(ray["spec"]["ingress"]) == 3
    validate(ray)


@pytest.mark.parametrize("which", VALUE_SETS)
def test_only_the_node_agents_ray_pods_reach_the_kv_redis(which):
    assert reachers(rendered(which), "lull-redis", 6379) == RAY_ROLES


@pytest.mark.parametrize("which", VALUE_SETS)
def test_only_the_gateways_ports_are_open_to_clients(which):
    objs = rendered(which)
    config = loaded_config(find(which, "ConfigMap", "lull-config")[0])
    labels = {role: source["labels"] for role, source in peers(objs).items()}
    for port in (config.gateway.http_port, config.gateway.grpc_port):
        assert open_to(objs, labels["gateway"], port, ANYONE)
    for role in ("head", "gpu", "lull-redis"):
        for port in (*RAY_PORTS, config.tiers.node_agent_port, config.gateway.http_port, config.gateway.grpc_port):
            assert not open_to(objs, labels[role], port, ANYONE), (role, port)


@pytest.mark.parametrize("gateway_from", [[], [{"podSelector": {"matchLabels": {"team": "agents"}}}]])
def test_the_helm_test_pod_reaches_the_gateway_only(gateway_from):
    objs = render({"security": {"networkPolicy": {"gatewayFrom": gateway_from}}})
    config = loaded_config(next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "lull-config"))
    sources = peers(objs)
    test_pod = sources["helm-test"]
    assert open_to(objs, sources["gateway"]["labels"], config.gateway.http_port, test_pod)
    for role in ("head", "gpu", "lull-redis", "gateway"):
        for port in (*RAY_PORTS, config.tiers.node_agent_port):
            assert not open_to(objs, sources[role]["labels"], port, test_pod), (role, port)
    client = {"labels": {"team": "agents"}, "namespace": "lull"}
    assert open_to(objs, sources["gateway"]["labels"], config.gateway.http_port, client)
    assert open_to(objs, sources["gateway"]["labels"], config.gateway.http_port, ANYONE) == (not gateway_from)


def test_network_policies_can_be_turned_off():
    assert not [o for o in render({"security": {"networkPolicy": {"enabled": False}}}) if o["kind"] == "NetworkPolicy"]


def test_tenant_names_in_values_follow_the_id_charset():
    with pytest.raises(Exception, match="schema"):
        render({"apiKeys": {"tenants": {"acme/prod": "k" * 20}}})
    secret = next(o for o in render({"apiKeys": {"tenants": {"acme.prod_1": "k" * 20}}}) if o["kind"] == "Secret")
    assert secret["metadata"]["name"] == "lull-api-keys"
