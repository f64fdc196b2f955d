"""The Helm chart (deploy/helm/lull): lint, render with the default and the
multi-node GPU values, validate every object offline (Kubernetes schemas, KubeRay
CRDs), and check that it agrees with proto/config.py and platform/."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingConfig

from proto import names
from proto.config import ConfigError, LullConfig, Secrets, from_dict, merge_overrides
from proto.config_export import expected_files
from controller.assembly.app import actor_options, engine_count
from tests.k8s_validation import ROOT, load_all, validate
from workers.engine_deployment import DRAIN_WAIT_S

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


def loaded_config(config_map: dict, overrides: dict | None = None) -> LullConfig:
    """The `lull-config` ConfigMap's config.yaml as proto/config.py loads it (keys
    arrive at run time from the Secret; the config must accept the rest as is), with
    ``overrides`` (the Serve app's args) laid over it as build_app lays them."""
    return config_of_data(yaml.safe_load(config_map["data"]["config.yaml"]), overrides)


def config_of_data(data: dict, overrides: dict | None = None) -> LullConfig:
    return from_dict(merge_overrides(data, overrides), Secrets(api_keys={"t": "key-from-secret"}))


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
    # replicas 2..16 of 1 GPU each, 8 GPUs per pod: 1..2 pods, 8 GPUs' worth at start.
    assert (worker["minReplicas"], worker["maxReplicas"], worker["replicas"]) == (1, 2, 1)
    pod = worker["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    spec = find("default", "RayService")[0]["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def metrics_dir_problems(service: dict) -> list[str]:
    """What keeps a RayService's Lull processes from sharing a node's metrics directory:
    every Ray pod template's ray container needs PROMETHEUS_MULTIPROC_DIR and an
    emptyDir mounted there, and Serve's runtime_env (which overrides the container's
    environment for the gateway and engines) must name the same directory."""
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(f"worker group {g['groupName']}", g) for g in cluster.get("workerGroupSpecs", [])]
    serve_env = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["runtime_env"]["env_vars"]
    problems = []
    for where, group in groups:
        pod = group["template"]["spec"]
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        rays = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        if not rays:
            problems.append(f"{where}: no ray container")
        for container in rays:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            path = env.get("PROMETHEUS_MULTIPROC_DIR")
            if not path:
                problems.append(f"{where}: {container['name']} lacks PROMETHEUS_MULTIPROC_DIR")
                continue
            if not any(m["mountPath"] == path and m["name"] in empty_dirs for m in container.get("volumeMounts", [])):
                problems.append(f"{where}: {container['name']} has no emptyDir mounted at {path}")
            if serve_env.get("PROMETHEUS_MULTIPROC_DIR") != path:
                problems.append(f"{where}: Serve's runtime_env sets PROMETHEUS_MULTIPROC_DIR="
                                f"{serve_env.get('PROMETHEUS_MULTIPROC_DIR')!r}, the container {path!r}")
    return problems


@pytest.mark.parametrize("which", VALUE_SETS)
def test_every_ray_container_shares_the_nodes_metrics_dir(which):
    service = find(which, "RayService")[0]
    assert service["spec"]["rayClusterConfig"]["workerGroupSpecs"], "no worker group to check"
    assert metrics_dir_problems(service) == []


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
    # Each replica's Ray resources are build_app's, from the config: an engine replica
    # reserves all its tensor-parallel GPUs for vLLM's workers. A ray_actor_options here
    # would override them.
    assert all("ray_actor_options" not in d for d in deployments.values())
    options = actor_options(loaded_config(find(which, "ConfigMap", "lull-config")[0]))
    assert options["engine"]["num_gpus"] == config["engine"]["tensor_parallel_size"]
    assert options["engine"]["num_cpus"] == config["cluster"]["engine_cpus"]
    assert options["gateway"]["num_cpus"] == config["cluster"]["gateway_cpus"]
    # Everything the chart does not set comes from platform/serve/lull.yaml unchanged.
    assert serve["proxy_location"] == platform_serve["proxy_location"]
    assert app["runtime_env"] == platform_serve["applications"][0]["runtime_env"]
    assert platform_serve["applications"][0]["args"].keys() <= app["args"].keys()


def engine_scaling_problems(serve: dict, config_data: dict, workers: dict | None) -> list[str]:
    """What keeps Serve from running the engine deployment as `build_app` means it to:
    a num_replicas (Serve's config overrides the code's count and autoscaling), a
    graceful shutdown no longer than the replica's drain, app args `build_app` rejects,
    or a config (``config_data`` with the args laid over it) whose bounds do not reach
    Serve and, on Kubernetes, that disagrees with the GPU worker group's pod spec
    (`workers`) the policy caps the count by."""
    app = serve["applications"][0]
    engine = next(d for d in app["deployments"] if d["name"] == names.ENGINE_DEPLOYMENT)
    problems = []
    if "num_replicas" in engine:
        problems.append(f"{names.ENGINE_DEPLOYMENT} sets num_replicas, overriding build_app's count")
    if not engine.get("graceful_shutdown_timeout_s", 0) > DRAIN_WAIT_S:
        problems.append(f"graceful_shutdown_timeout_s {engine.get('graceful_shutdown_timeout_s')} cuts short "
                        f"the replica's {DRAIN_WAIT_S} s drain")
    try:
        config = config_of_data(config_data, app.get("args", {}))
    except ConfigError as error:
        return problems + [f"build_app rejects the app's args: {error}"]
    bounds = (config.replicas.initial, config.replicas.min, config.replicas.max)
    selector = None
    if workers is not None:
        selector = ",".join(f"{k}={v}" for k, v in sorted(workers.get("nodeSelector", {}).items())) or None
        pods = (selector, workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        given = (config.cluster.gpu_node_selector, config.cluster.gpus_per_pod)
        if given != pods:
            problems.append(f"the config's node selector and GPUs per pod {given}; the worker group's {pods}")
    count = engine_count(config)
    if config.replicas.min == config.replicas.max or not config.autoscaling.enabled:
        return problems + ([] if count == {"num_replicas": config.replicas.initial} else [f"not fixed: {count}"])
    if "autoscaling_config" not in count:
        return problems + [f"the config autoscales, build_app does not: {count}"]
    scaling = AutoscalingConfig(**count["autoscaling_config"])  # Serve's own validation
    scaled = (scaling.initial_replicas, scaling.min_replicas, scaling.max_replicas)
    if scaled != bounds:
        problems.append(f"autoscaling_config's replicas, min, max {scaled}; the config's {bounds}")
    kube = scaling.policy.policy_kwargs.get("kube") or {}
    if kube.get("node_selector") != selector:
        problems.append(f"the policy caps by nodes {kube.get('node_selector')!r}, the workers run on {selector!r}")
    if kube and kube.get("gpus_per_replica") != config.engine.tensor_parallel_size:
        problems.append(f"the policy counts {kube.get('gpus_per_replica')} GPUs per replica, "
                        f"engine.tensor_parallel_size is {config.engine.tensor_parallel_size}")
    return problems


@pytest.mark.parametrize("which", VALUE_SETS)
def test_serve_runs_the_engines_as_build_app_means(which):
    service = find(which, "RayService")[0]
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    data = yaml.safe_load(find(which, "ConfigMap", "lull-config")[0]["data"]["config.yaml"])
    config = config_of_data(data)
    assert config.replicas.min < config.replicas.max, "these values should exercise the autoscaler"
    assert engine_scaling_problems(yaml.safe_load(service["spec"]["serveConfigV2"]), data, workers) == []


def test_platform_serve_config_args_match_the_config_defaults():
    serve = yaml.safe_load((ROOT / "platform" / "serve" / "lull.yaml").read_text())
    assert engine_scaling_problems(serve, {}, workers=None) == []


def test_gpu_node_selector_joins_every_label_sorted_by_key():
    values = {"ray": {"gpuWorkers": {"nodeSelector": {"pool": "gpu", "cloud.io/accelerator": "h100"}}}}
    manifests = helm().Chart.load(str(CHART)).render(values, name="lull", namespace="lull")
    config_map = next(o for o in load_all(manifests["lull/templates/config.yaml"]) if o["kind"] == "ConfigMap")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["cluster"]["gpu_node_selector"] == "cloud.io/accelerator=h100,pool=gpu"


def test_chart_refuses_a_minimum_of_zero_engine_replicas():
    # build_app keeps at least one engine replica (replicas.min and initial are >= 1).
    values = {"config": {"replicas": {"min": 0, "initial": 0}}}
    with pytest.raises(Exception, match="config.replicas.min"):
        helm().Chart.load(str(CHART)).render(values, name="lull", namespace="lull")


@pytest.mark.parametrize("which", VALUE_SETS)
def test_rendered_lull_config_loads_with_controller_config(which):
    config = loaded_config(find(which, "ConfigMap", "lull-config")[0])
    assert isinstance(config, LullConfig) and config.model.device == "gpu"
    assert config.tiers.redis_url == "redis://lull-redis:6379/0"


@pytest.mark.parametrize("which", VALUE_SETS)
def test_redis_has_maxmemory_noeviction_and_a_memory_limit(which):
    conf = find(which, "ConfigMap", "lull-redis-config")[0]["data"]["redis.conf"]
    settings = dict(line.split(" ", 1) for line in conf.splitlines() if line)
    assert settings["maxmemory-policy"] == "noeviction"  # what SharedTier refuses to run without
    maxmemory_mb = int(settings["maxmemory"].removesuffix("mb"))
    config = yaml.safe_load(find(which, "ConfigMap", "lull-config")[0]["data"]["config.yaml"])
    assert maxmemory_mb >= config["tiers"]["shared_capacity_gib"] * 1024, "Redis must hold the whole shared tier"
    container = find(which, "Deployment", "lull-redis")[0]["spec"]["template"]["spec"]["containers"][0]
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
                {"redis": {"evictionPolicy": "allkeys-lru"}}, {"replcas": 3}):
        with pytest.raises(Exception, match="schema"):
            chart.Chart.load(str(CHART)).render(bad, name="lull", namespace="lull")


def test_values_config_block_and_schema_match_controller_config():
    for path, text in expected_files(CHART).items():
        assert path.read_text() == text, f"{path.name} drifted; run python -m proto.config_export --write"


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
