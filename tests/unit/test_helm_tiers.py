"""The chart's KV tiers (deploy/helm/lull): the Redis password reaches every Ray pod from
the Secret Redis uses, Redis never evicts, and the DRAM tier fits the GPU workers'
/dev/shm by the rule of proto/tier_capacity.py, which the chart repeats and these tests
hold together. Rendered offline (helm-python-sdk), validated by tests/k8s_validation.py."""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes.utils import parse_quantity

from proto.tier_capacity import dram_fit_problem
from tests.k8s_validation import load_all, validate
from tests.unit.test_helm_chart import CHART, VALUE_SETS, find, helm, loaded_config

GIB = 1 << 30


def render(values: dict) -> list[dict]:
    manifests = helm().Chart.load(str(CHART)).render(values, name="lull", namespace="lull")
    return [o for path, text in sorted(manifests.items()) if path.endswith(".yaml") for o in load_all(text)]


def ray_containers(service: dict) -> dict[str, dict]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return {c["name"]: c for g in groups for c in g["template"]["spec"]["containers"] if c["name"].startswith("ray-")}


def secret_env(container: dict, name: str) -> tuple[str, str] | None:
    for env in container.get("env", []):
        if env["name"] == name:
            ref = env["valueFrom"]["secretKeyRef"]
            return ref["name"], ref["key"]
    return None


def tier_problems(service: dict, config) -> list[str]:
    """Where a RayService and the config its pods read disagree on the tiers: the size of the
    GPU workers' /dev/shm against tiers.dram_volume_gib, and the Ray resource each gateway
    pod offers against cluster.gateway_resource."""
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    problems = []
    shm = next(v for v in groups["gpu"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    size_gib = float(parse_quantity(shm["emptyDir"]["sizeLimit"])) / GIB
    if config.tiers.dram_volume_gib != size_gib:
        problems.append(f"tiers.dram_volume_gib {config.tiers.dram_volume_gib}, the workers' /dev/shm {size_gib} GiB")
    if problem := dram_fit_problem(config.tiers.dram_capacity_gib, size_gib):
        problems.append(problem)
    offered = json.loads(json.loads(groups["gateway"]["rayStartParams"]["resources"]))
    if offered != {config.cluster.gateway_resource: 1}:
        problems.append(f"gateway pods offer {offered}; gateways ask for 1 {config.cluster.gateway_resource}")
    return problems


@pytest.mark.parametrize("which", VALUE_SETS)
def test_every_ray_pod_gets_the_redis_password_from_the_secret_redis_uses(which):
    redis = find(which, "Deployment", "lull-redis")[0]["spec"]["template"]["spec"]["containers"][0]
    expected = secret_env(redis, "REDIS_PASSWORD")
    containers = ray_containers(find(which, "RayService")[0])
    assert set(containers) == {"ray-head", "ray-gateway", "ray-worker"}
    assert {name: secret_env(c, "LULL_REDIS_PASSWORD") for name, c in containers.items()} == dict.fromkeys(
        containers, expected)
    assert not any(e.get("value") for c in containers.values() for e in c["env"] if "PASSWORD" in e["name"])


def test_an_external_redis_gets_its_password_from_an_existing_secret():
    external = {"redis": {"enabled": False, "auth": {"existingSecret": "ext-redis"}},
                "config": {"tiers": {"redis_url": "redis://redis.example:6379/0"}}}
    service = next(o for o in render(external) if o["kind"] == "RayService")
    assert {secret_env(c, "LULL_REDIS_PASSWORD") for c in ray_containers(service).values()} == {
        ("ext-redis", "redis-password")}
    without = next(o for o in render({"redis": {"enabled": False}}) if o["kind"] == "RayService")
    assert {secret_env(c, "LULL_REDIS_PASSWORD") for c in ray_containers(without).values()} == {None}


def test_no_value_makes_redis_evict():
    with pytest.raises(Exception, match="schema"):
        render({"redis": {"evictionPolicy": "allkeys-lru"}})
    conf = next(o for o in render({"redis": {"maxmemoryMb": 100}}) if o["kind"] == "ConfigMap"
                and o["metadata"]["name"] == "lull-redis-config")["data"]["redis.conf"]
    assert "maxmemory-policy noeviction" in conf.splitlines()


@pytest.mark.parametrize("which", VALUE_SETS)
def test_the_dram_tier_fits_the_workers_shm_and_the_config_knows_its_size(which):
    config = loaded_config(find(which, "ConfigMap", "lull-config")[0])
    assert tier_problems(find(which, "RayService")[0], config) == []
    assert config.tiers.dram_capacity_gib > 0


# (capacity GiB, shmSize): each side of the rule's two regimes (2 GiB floor, 10%).
EDGES = [(32, "40Gi"), (36, "40Gi"), (36.5, "40Gi"), (14, "16Gi"), (14.5, "16Gi"), (1, "3Gi"), (1, "2Gi"),
         (640, "720Gi"), (650, "720Gi"), (30, "34359738368")]


@pytest.mark.parametrize(("capacity", "shm"), EDGES)
def test_the_chart_refuses_exactly_what_the_config_refuses(capacity, shm):
    workers = {"shmSize": shm, "resources": {"limits": {"memory": "4Ti"}}}  # the limit out of the way
    values = {"config": {"tiers": {"dram_capacity_gib": capacity}}, "ray": {"gpuWorkers": workers}}
    problem = dram_fit_problem(capacity, float(parse_quantity(shm)) / GIB)
    if problem is None:
        objs = render(values)
        config = loaded_config(next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "lull-config"))
        assert config.tiers.dram_volume_gib == float(parse_quantity(shm)) / GIB
        for obj in objs:
            validate(obj)
        return
    with pytest.raises(Exception, match=r"config\.tiers\.dram_capacity_gib .+ lower config\.tiers\.dram_capacity_gib "
                                        r"to at most .+ or raise ray\.gpuWorkers\.shmSize to at least \d+Gi"):
        render(values)


def test_the_chart_names_the_smallest_shm_that_fits():
    with pytest.raises(Exception, match=r"at most 36\.00, or raise ray\.gpuWorkers\.shmSize to at least 72Gi"):
        render({"config": {"tiers": {"dram_capacity_gib": 64}}})
    render({"config": {"tiers": {"dram_capacity_gib": 64}}, "ray": {"gpuWorkers": {"shmSize": "72Gi"}}})


def test_shm_must_stay_below_the_workers_memory_limit():
    with pytest.raises(Exception, match=r"ray\.gpuWorkers\.shmSize \(100Gi\) must be below the workers' memory limit"):
        render({"ray": {"gpuWorkers": {"shmSize": "100Gi"}}})
    with pytest.raises(Exception, match="schema"):
        render({"ray": {"gpuWorkers": {"shmSize": "40gb"}}})


def test_a_disabled_dram_tier_needs_no_room():
    objs = render({"config": {"tiers": {"dram_capacity_gib": 0}}, "ray": {"gpuWorkers": {"shmSize": "1Gi"}}})
    config_map = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "lull-config")
    assert yaml.safe_load(config_map["data"]["config.yaml"])["tiers"]["dram_volume_gib"] == 1
