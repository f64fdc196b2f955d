"""GCS fault tolerance in the chart (deploy/helm/lull, `gcsFaultTolerance`): the RayService's
gcsFaultToleranceOptions name a Redis of the GCS's own (a StatefulSet with a volume, its
Service, a password Secret), never the KV tier's Redis, in the form KubeRay's CRD (validated
against ../shared/k8s-schemas) and KubeRay's own checks (ValidateRayClusterSpec) accept; on in
the gpu-multinode values, off by default; only the Ray head reaches that Redis. Rendered
offline (helm-python-sdk); a head restart itself needs a Kubernetes cluster, which cannot
run here."""

from __future__ import annotations

import pytest

from controller.runtime.actor import ControllerActor
from tests.k8s_validation import validate
from tests.unit.test_helm_chart import find, rendered
from tests.unit.test_helm_security import ANYONE, open_to, pod_specs
from tests.unit.test_helm_tiers import render

ON = {"gcsFaultTolerance": {"enabled": True}}


def cluster_of(objs) -> dict:
    return next(o for o in objs if o["kind"] == "RayService")["spec"]["rayClusterConfig"]


def named(objs, kind: str, name: str) -> dict:
    [obj] = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def test_multinode_values_back_the_gcs_with_a_persistent_redis_of_its_own():
    objs = rendered("gpu-multinode")
    service = find("gpu-multinode", "RayService")[0]
    validate(service)  # KubeRay's CRD schema, strict
    options = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    host, port = options["redisAddress"].split(":")
    assert (host, port) == ("lull-gcs-redis", "6379") and host != "lull-redis"  # not the KV tier's Redis
    assert named(objs, "Service", host)["spec"]["selector"]["app.kubernetes.io/component"] == "gcs-redis"
    redis = named(objs, "StatefulSet", host)
    validate(redis)
    pod = redis["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == env["REDIS_PASSWORD"] == {
        "name": "lull-gcs-redis-auth", "key": "redis-password"}  # the Secret made beforehand
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "16Gi"
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    conf = named(objs, "ConfigMap", "lull-gcs-redis-config")["data"]["redis.conf"].splitlines()
    assert {"dir /data", "appendonly yes", "maxmemory-policy noeviction"} <= set(conf)
    assert "--requirepass" in container["command"][-1]


@pytest.mark.parametrize("which", ["gpu-multinode", "default-on"])
def test_the_rayservice_passes_kuberays_own_fault_tolerance_checks(which):
    """KubeRay refuses (ValidateRayClusterSpec) the ft-enabled annotation beside
    gcsFaultToleranceOptions, and RAY_REDIS_ADDRESS, REDIS_PASSWORD or a redis-password or
    redis-username start parameter of the head's own: it sets them from the options."""
    objs = render(ON) if which == "default-on" else rendered(which)
    service = next(o for o in objs if o["kind"] == "RayService")
    validate(service)
    assert "ray.io/ft-enabled" not in (service["metadata"].get("annotations") or {})
    head = cluster_of(objs)["headGroupSpec"]
    env = {e["name"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert not env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"}
    assert not {"redis-password", "redis-username"} & set(head["rayStartParams"])


def test_off_by_default_and_on_the_chart_makes_the_password_secret():
    off = rendered("default")
    assert "gcsFaultToleranceOptions" not in cluster_of(off)
    assert not [o for o in off if "gcs" in o["metadata"]["name"]]
    on = render(ON)
    ref = cluster_of(on)["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    secret = named(on, "Secret", ref["name"])
    assert ref["name"] == "lull-gcs-redis-auth" and len(secret["data"][ref["key"]]) >= 32  # generated, kept
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert ref["name"] != "lull-redis-auth"
    for obj in on:
        validate(obj)


def test_only_the_ray_head_reaches_the_gcs_redis():
    objs = rendered("gpu-multinode")
    labels = {role: t["metadata"]["labels"] for role, t in pod_specs(objs).items()}
    gcs = named(objs, "StatefulSet", "lull-gcs-redis")["spec"]["template"]["metadata"]["labels"]
    assert open_to(objs, gcs, 6379, {"labels": labels["head"], "namespace": "lull"})
    for role in ("gpu", "gateway", "lull-redis"):
        assert not open_to(objs, gcs, 6379, {"labels": labels[role], "namespace": "lull"}), role
    helm_test = {**labels["gateway"], "app.kubernetes.io/component": "helm-test"}
    assert not open_to(objs, gcs, 6379, {"labels": helm_test, "namespace": "lull"})
    assert not open_to(objs, gcs, 6379, ANYONE)


def test_the_gcs_redis_memory_limit_must_exceed_its_maxmemory():
    with pytest.raises(Exception, match="must exceed its maxmemoryMb"):
        render({"gcsFaultTolerance": {"enabled": True, "redis": {"maxmemoryMb": 2048, "memoryLimitMb": 1024}}})


def test_the_controller_is_a_detached_actor_ray_restarts_without_limit():
    """What GCS fault tolerance brings back after a head restart: a named detached actor with
    max_restarts=-1 is restarted on the new head, and rebuilds its books (restore.py)."""
    assert ControllerActor._default_options["max_restarts"] == -1
