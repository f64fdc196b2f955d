"""The Helm chart (deploy/helm/lull): lint, render with the default and the
multi-node GPU values, validate every object offline (Kubernetes schemas, KubeRay
CRDs), and check that it agrees with controller/config.py and platform/."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml

from controller import names
from controller.config import LullConfig, Secrets, from_dict
from controller.config_export import expected_files
from tests.k8s_validation import ROOT, load_all, validate

CHART = ROOT / "deploy" / "helm" / "lull"
MULTINODE = CHART / "values-gpu-multinode.yaml"
VALUE_SETS = {"default": None, "gpu-multinode": MULTINODE}


def helm():
    try:
        from helm_python import chart
    except ImportError as error:  # a dev dependency: the message says how to get it
        raise AssertionError(f"helm-python-sdk is required ({error}); run scripts/setup.sh") from None
    return chart


def values_of(which: str) -> dict | None:
    path = VALUE_SETS[which]
    return yaml.safe_load(path.read_text()) if path else None


@functools.cache
def rendered(which: str) -> tuple[dict, ...]:
    manifests = helm().Chart.load(str(CHART)).render(values_of(which), name="lull", namespace="lull", is_install=True)
    return tuple(obj for path, text in sorted(manifests.items()) if path.endswith(".yaml") for obj in load_all(text))


def find(which: str, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in rendered(which) if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


@pytest.mark.parametrize("which", VALUE_SETS)
def test_helm_lint_has_no_errors_or_warnings(which):
    report = helm().lint(str(CHART), values_of(which), strict=True, kube_version="v1.32.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("which", VALUE_SETS)
def test_every_rendered_object_validates(which):
    kinds = {o["kind"] for o in rendered(which)}
    expected = {"RayService", "Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding",
                "ClusterRole", "ClusterRoleBinding"}
    assert expected <= kinds, f"missing kinds: {expected - kinds}"
    for obj in rendered(which):
        validate(obj)


def test_multinode_values_add_monitoring_and_use_existing_secrets():
    kinds = {o["kind"] for o in rendered("gpu-multinode")}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds
    assert not find("gpu-multinode", "Secret"), "existingSecret given: the chart must not make its own"
    monitor = find("gpu-multinode", "ServiceMonitor")[0]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"lull-metrics", "ray-metrics"}
    metrics_service = find("gpu-multinode", "Service", "lull-metrics")[0]
    assert {p["port"] for p in metrics_service["spec"]["ports"]} == {9102, names.RAY_METRICS_PORT}


def test_worker_group_has_autoscaling_bounds_gpus_and_placement():
    worker = find("gpu-multinode", "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    # replicas 2..16 of 2 GPUs each, 8 GPUs per pod: 1..4 pods, 8 GPUs' worth at start.
    assert (worker["minReplicas"], worker["maxReplicas"], worker["replicas"]) == (1, 4, 1)
    pod = worker["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    spec = find("default", "RayService")[0]["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


@pytest.mark.parametrize("which", VALUE_SETS)
def test_serve_config_is_platforms_with_the_configs_ports_and_names(which):
    serve = yaml.safe_load(find(which, "RayService")[0]["spec"]["serveConfigV2"])
    platform_serve = yaml.safe_load((ROOT / "platform" / "serve" / "lull.yaml").read_text())
    config = yaml.safe_load(find(which, "ConfigMap", "lull-config")[0]["data"]["config.yaml"])
    app = serve["applications"][0]
    assert (app["name"], app["import_path"]) == (names.SERVE_APP, names.SERVE_IMPORT_PATH)
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {names.GATEWAY_DEPLOYMENT, names.ENGINE_DEPLOYMENT}
    assert serve["http_options"]["port"] == config["gateway"]["http_port"]
    assert "grpc_options" not in serve  # the gateway serves gRPC itself on gateway.grpc_port
    engine = deployments[names.ENGINE_DEPLOYMENT]
    assert engine["num_replicas"] == config["replicas"]["initial"]
    assert engine["ray_actor_options"]["num_gpus"] == config["engine"]["tensor_parallel_size"]
    # Everything the chart does not set comes from platform/serve/lull.yaml unchanged.
    assert serve["proxy_location"] == platform_serve["proxy_location"]
    assert app["runtime_env"] == platform_serve["applications"][0]["runtime_env"]


@pytest.mark.parametrize("which", VALUE_SETS)
def test_rendered_lull_config_loads_with_controller_config(which):
    text = find(which, "ConfigMap", "lull-config")[0]["data"]["config.yaml"]
    # Keys arrive at run time from the Secret; the config must accept the rest as is.
    config = from_dict(yaml.safe_load(text), Secrets(api_keys={"tenant": "key-from-the-secret"}))
    assert isinstance(config, LullConfig) and config.model.device == "gpu"
    assert config.tiers.redis_url == "redis://lull-redis:6379/0"


def test_redis_has_maxmemory_eviction_policy_and_a_memory_limit():
    conf = find("default", "ConfigMap", "lull-redis-config")[0]["data"]["redis.conf"]
    settings = dict(line.split(" ", 1) for line in conf.splitlines() if line)
    assert settings["maxmemory-policy"] == "allkeys-lru"
    maxmemory_mb = int(settings["maxmemory"].removesuffix("mb"))
    config = yaml.safe_load(find("default", "ConfigMap", "lull-config")[0]["data"]["config.yaml"])
    assert maxmemory_mb >= config["tiers"]["shared_capacity_gib"] * 1024, "Redis must hold the whole shared tier"
    container = find("default", "Deployment", "lull-redis")[0]["spec"]["template"]["spec"]["containers"][0]
    limit_mb = int(container["resources"]["limits"]["memory"].removesuffix("Mi"))
    assert limit_mb > maxmemory_mb
    assert "requirepass" not in conf, "the password belongs in the Secret, not the ConfigMap"


def test_secrets_are_generated_never_shipped():
    def api_keys() -> str:
        manifests = helm().Chart.load(str(CHART)).render(None, name="lull", namespace="lull", is_install=True)
        secret = next(o for o in load_all(manifests["lull/templates/secrets.yaml"]) if o["metadata"]["name"] == "lull-api-keys")
        return secret["data"]["api-keys"]

    assert api_keys() != api_keys(), "a default API key would be the same in every install"
    values_text = (CHART / "values.yaml").read_text() + MULTINODE.read_text()
    assert "password: \"\"" in values_text and "tenants: {}" in values_text


def test_values_schema_rejects_bad_values():
    chart = helm()
    for bad in ({"config": {"engine": {"block_size": 12}}}, {"config": {"policy": {"nmae": "lull"}}},
                {"redis": {"evictionPolicy": "sometimes"}}, {"replcas": 3}):
        with pytest.raises(Exception, match="schema"):
            chart.Chart.load(str(CHART)).render(bad, name="lull", namespace="lull")


def test_values_config_block_and_schema_match_controller_config():
    for path, text in expected_files(CHART).items():
        assert path.read_text() == text, f"{path.name} drifted; run python -m controller.config_export --write"


def test_chart_copies_of_platform_files_are_identical():
    pairs = [(ROOT / "platform" / "serve" / "lull.yaml", CHART / "files" / "serve" / "lull.yaml"),
             (ROOT / "platform" / "prometheus" / "alerts.yaml", CHART / "files" / "prometheus" / "alerts.yaml")]
    platform_dashboards = sorted((ROOT / "platform" / "grafana").glob("*.json"))
    chart_dashboards = sorted((CHART / "files" / "grafana").glob("*.json"))
    assert [p.name for p in platform_dashboards] == [p.name for p in chart_dashboards]
    pairs += list(zip(platform_dashboards, chart_dashboards))
    for source, copy in pairs:
        assert source.read_bytes() == copy.read_bytes(), f"{copy} differs from {source}; run scripts/sync_chart_files.sh"


def test_dashboards_ship_as_labelled_configmaps():
    maps = [o for o in rendered("default") if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    shipped = {key: json.loads(value) for m in maps for key, value in m["data"].items()}
    platform = {p.name: json.loads(p.read_text()) for p in (ROOT / "platform" / "grafana").glob("*.json")}
    assert shipped == platform


def test_packaged_chart_is_self_contained(tmp_path: Path):
    chart = helm()
    archive = chart.package(str(CHART), destination=str(tmp_path))
    packaged = chart.Chart.load_archive(Path(archive).read_bytes())
    manifests = packaged.render(None, name="lull", namespace="lull")
    objs = [o for p, t in manifests.items() if p.endswith(".yaml") for o in load_all(t)]
    assert sum(o["metadata"].get("labels", {}).get("grafana_dashboard") == "1" for o in objs) == 4
    serve = yaml.safe_load(next(o for o in objs if o["kind"] == "RayService")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["import_path"] == names.SERVE_IMPORT_PATH
