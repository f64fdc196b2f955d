"""k8s/: the kustomize base (generated from the chart) and its overlay render with
`kubectl kustomize`, every object validates offline, the overlay's config agrees with
its pods, and the controller's RBAC grants what it needs."""

from __future__ import annotations

import functools
import importlib.util
import subprocess

import pytest
import yaml

from tests.k8s_validation import ROOT, kubectl, load_all, validate
from tests.unit.test_helm_chart import engine_scaling_problems, find, loaded_config, metrics_dir_problems
from tests.unit.test_helm_tiers import tier_problems

TREES = ["k8s/base", "k8s/overlays/gpu-multinode"]


@functools.cache
def kustomize(tree: str) -> tuple[dict, ...]:
    result = subprocess.run([kubectl(), "kustomize", str(ROOT / tree)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {tree} failed: {result.stderr}"
    return tuple(load_all(result.stdout))


def config_map_of(objs: tuple[dict, ...]) -> dict:
    return next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "lull-config")


def config_of(objs: tuple[dict, ...]):
    return loaded_config(config_map_of(objs))


def render_base_module():
    spec = importlib.util.spec_from_file_location("render_k8s_base", ROOT / "scripts" / "render_k8s_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_base_is_the_charts_rendering():
    module = render_base_module()
    assert module.drift(module.render()) == []


@pytest.mark.parametrize("tree", TREES)
def test_kustomize_renders_valid_objects_in_one_namespace(tree):
    objs = kustomize(tree)
    assert {"RayService", "Deployment", "Service", "ConfigMap", "Role", "ClusterRole"} <= {o["kind"] for o in objs}
    for obj in objs:
        validate(obj)
        if not obj["kind"].startswith("Cluster"):
            assert obj["metadata"].get("namespace") == "lull", f"{obj['kind']} {obj['metadata']['name']}"


@pytest.mark.parametrize("tree", TREES)
def test_every_ray_container_shares_the_nodes_metrics_dir(tree):
    service = next(o for o in kustomize(tree) if o["kind"] == "RayService")
    assert metrics_dir_problems(service) == []


def test_overlay_changes_workers_image_and_config():
    objs = kustomize("k8s/overlays/gpu-multinode")
    service = next(o for o in objs if o["kind"] == "RayService")
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 4)
    container = worker["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["image"] == "registry.example.com/ml/lull:0.1.0"
    assert any(o["kind"] == "ServiceMonitor" for o in objs)
    config = config_of(objs)
    assert config.replicas.max == 32 and config.model.device == "gpu"


def test_overlay_turns_on_gcs_fault_tolerance_as_the_charts_multinode_values_do():
    """The GCS's own Redis and the RayService's options, as the chart renders them for
    values-gpu-multinode.yaml; the base (the chart's defaults) has neither."""
    objs = kustomize("k8s/overlays/gpu-multinode")
    options = next(o for o in objs if o["kind"] == "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    chart = find("gpu-multinode", "RayService")[0]["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == chart
    host = options["redisAddress"].split(":")[0]
    assert {("StatefulSet", host), ("Service", host), ("NetworkPolicy", host)} <= {
        (o["kind"], o["metadata"]["name"]) for o in objs}
    base = kustomize("k8s/base")
    assert "gcsFaultToleranceOptions" not in next(o for o in base if o["kind"] == "RayService")["spec"]["rayClusterConfig"]
    assert not [o for o in base if "gcs" in o["metadata"]["name"]]


@pytest.mark.parametrize("tree", TREES)
def test_serve_runs_the_engines_as_build_app_means(tree):
    """The overlay's Serve config carries its own config.yaml's bounds and its GPU nodes."""
    objs = kustomize(tree)
    service = next(o for o in objs if o["kind"] == "RayService")
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    data = yaml.safe_load(config_map_of(objs)["data"]["config.yaml"])
    assert engine_scaling_problems(serve, data, workers) == []


@pytest.mark.parametrize("tree", TREES)
def test_the_dram_tier_fits_the_workers_shm_and_gateways_have_their_resource(tree):
    """The overlay's config.yaml carries what the chart would derive from its pods."""
    objs = kustomize(tree)
    service = next(o for o in objs if o["kind"] == "RayService")
    assert tier_problems(service, config_of(objs)) == []


def _rules(obj: dict) -> list[tuple[set, set, set]]:
    return [(set(r.get("apiGroups", [])), set(r["resources"]), set(r["verbs"])) for r in obj["rules"]]


def test_controller_rbac_reads_nodes_and_patches_its_rayservice():
    objs = kustomize("k8s/base")
    service = next(o for o in objs if o["kind"] == "RayService")
    account = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    assert any(o["kind"] == "ServiceAccount" and o["metadata"]["name"] == account for o in objs)

    def granted(role_kind: str, binding_kind: str) -> list[tuple[set, set, set]]:
        bound = {b["roleRef"]["name"] for b in objs if b["kind"] == binding_kind
                 and any(s["kind"] == "ServiceAccount" and s["name"] == account and s.get("namespace", "lull") == "lull"
                         for s in b["subjects"])}
        return [rule for o in objs if o["kind"] == role_kind and o["metadata"]["name"] in bound for rule in _rules(o)]

    cluster_rules = granted("ClusterRole", "ClusterRoleBinding")
    assert any("" in g and "nodes" in r and {"get", "list"} <= v for g, r, v in cluster_rules)
    namespace_rules = granted("Role", "RoleBinding")
    assert any("ray.io" in g and "rayservices" in r and {"get", "patch"} <= v for g, r, v in namespace_rules)
    # Least privilege: nothing may write nodes, and no wildcard anywhere.
    for groups, resources, verbs in cluster_rules + namespace_rules:
        assert "*" not in groups | resources | verbs
        assert not ("nodes" in resources and verbs - {"get", "list", "watch"})
