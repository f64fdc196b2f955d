"""The chart's Ray pods (deploy/helm/lull): gRPC reaches a pod that listens, the gateways
run one per pod and as many as gateway.replicas, probes check what matters without
blocking KubeRay's start, PodDisruptionBudgets, and the model's volume, download and
token. Rendered and validated offline; the download itself cannot run here (no network):
only files/model/fetch.py's skip and its error are run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from controller.assembly.app import actor_options
from proto import names
from proto.model_ref import local_model_dir, parse_model_ref
from tests.k8s_validation import validate
from tests.unit.test_helm_chart import CHART, VALUE_SETS, find, loaded_config
from tests.unit.test_helm_tiers import ray_containers, render

FETCH = CHART / "files" / "model" / "fetch.py"


def groups(service: dict) -> dict[str, dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def first(objs: list[dict], kind: str, name: str | None = None) -> dict:
    return next(o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))


@pytest.mark.parametrize("which", VALUE_SETS)
def test_grpc_reaches_only_pods_that_listen_on_it(which):
    service = find(which, "Service", "lull-gateway")[0]
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    for role, group in groups(find(which, "RayService")[0]).items():
        template = group["template"]
        listening = any(p["name"] == grpc["targetPort"] for c in template["spec"]["containers"] for p in c["ports"])
        assert selects(service["spec"]["selector"], template["metadata"]["labels"]) == listening == (role == "gateway")


@pytest.mark.parametrize("which", VALUE_SETS)
def test_one_gateway_per_gateway_pod_and_as_many_as_asked(which):
    service = find(which, "RayService")[0]
    gateway = groups(service)["gateway"]
    config = loaded_config(find(which, "ConfigMap", "lull-config")[0])
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    count = next(d for d in serve["applications"][0]["deployments"] if d["name"] == names.GATEWAY_DEPLOYMENT)
    assert gateway["replicas"] == gateway["minReplicas"] == gateway["maxReplicas"] == count["num_replicas"] == 2
    # Each gateway asks for 1 unit of the resource each gateway pod offers once: one per pod.
    assert config.cluster.gateway_resource == names.GATEWAY_RESOURCE
    assert actor_options(config)["gateway"]["resources"] == {names.GATEWAY_RESOURCE: 1.0}
    assert "resources" not in groups(service)["gpu"]["rayStartParams"]
    assert "resources" not in groups(service)["head"]["rayStartParams"]


def test_gateway_replicas_are_configurable():
    objs = render({"gateway": {"replicas": 3}})
    service = first(objs, "RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert groups(service)["gateway"]["replicas"] == 3
    assert [d.get("num_replicas") for d in serve["applications"][0]["deployments"]] == [3, None]
    with pytest.raises(Exception, match="schema"):
        render({"gateway": {"replicas": 0}})


def probe_target(probe: dict) -> tuple[str, object]:
    kind = next(k for k in ("httpGet", "tcpSocket", "exec") if k in probe)
    return kind, probe[kind].get("path", probe[kind].get("port"))


@pytest.mark.parametrize("which", VALUE_SETS)
def test_probes_check_what_matters_on_each_pod(which):
    containers = ray_containers(find(which, "RayService")[0])
    for container in containers.values():
        assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(container), container["name"]
        assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 300
    ready = {name: probe_target(c["readinessProbe"]) for name, c in containers.items()}
    # KubeRay deploys the Serve app only once the head is ready, and the app starts the
    # gateways and node agents: the head's readiness must not wait for them.
    assert ready["ray-head"] == ("httpGet", "/api/gcs_healthz")
    assert ready["ray-gateway"] == ("tcpSocket", "grpc")
    assert ready["ray-worker"] == ("tcpSocket", "node-agent")
    for name, container in containers.items():
        ports = {p["name"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            kind, target = probe_target(container[probe])
            port = container[probe][kind]["port"]
            assert isinstance(port, int) or port in ports, f"{name} {probe} probes a port it lacks: {port}"


def test_a_gateway_without_grpc_is_ready_when_it_answers_http():
    containers = ray_containers(first(render({"config": {"gateway": {"grpc_port": 0}}}), "RayService"))
    assert probe_target(containers["ray-gateway"]["readinessProbe"]) == ("httpGet", "/health")
    assert all(p["name"] != "grpc" for c in containers.values() for p in c["ports"])


@pytest.mark.parametrize("which", VALUE_SETS)
def test_drains_take_one_gateway_and_one_gpu_worker_at_a_time(which):
    budgets = find(which, "PodDisruptionBudget")
    pods = groups(find(which, "RayService")[0])
    covered = {role for role, g in pods.items() for b in budgets
               if selects(b["spec"]["selector"]["matchLabels"], g["template"]["metadata"]["labels"])}
    assert covered == {"gateway", "gpu"} and {b["spec"]["maxUnavailable"] for b in budgets} == {1}
    assert not [o for o in render({"podDisruptionBudget": {"enabled": False}}) if o["kind"] == "PodDisruptionBudget"]


def init_env(group: dict) -> dict[str, object]:
    [init] = group["template"]["spec"]["initContainers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in init["env"]}


@pytest.mark.parametrize("which", VALUE_SETS)
def test_an_hf_model_is_downloaded_once_into_the_cache_every_pod_mounts(which):
    config = loaded_config(find(which, "ConfigMap", "lull-config")[0])
    assert parse_model_ref(config.model.path).kind == "hf"
    [claim] = find(which, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for role, group in groups(find(which, "RayService")[0]).items():
        env = init_env(group)
        assert env["LULL_MODEL_DIR"] == local_model_dir(config.model.path)
        assert env["LULL_MODEL_FILES"] == ("all" if role == "gpu" else "metadata")
        spec = group["template"]["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "models")
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        mount = next(m for c in spec["containers"] for m in c["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] and local_model_dir(config.model.path).startswith(mount["mountPath"] + "/")
    token = init_env(groups(find(which, "RayService")[0])["gpu"]).get("HF_TOKEN")
    assert token == ({"secretKeyRef": {"name": "lull-hf-token", "key": "hf-token"}} if which == "gpu-multinode" else None)


def test_a_pvc_model_is_mounted_read_only_without_a_download():
    path = "pvc://model-store/llama/70b"
    objs = render({"config": {"model": {"path": path}}})
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    for group in groups(first(objs, "RayService")).values():
        spec = group["template"]["spec"]
        assert "initContainers" not in spec
        volume = next(v for v in spec["volumes"] if v["name"] == "models")
        assert volume["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
        mount = next(m for c in spec["containers"] for m in c["volumeMounts"] if m["name"] == "models")
        assert local_model_dir(path).startswith(mount["mountPath"] + "/") and mount["readOnly"]
    for obj in objs:
        validate(obj)


def test_a_local_model_uses_the_users_volume_and_a_cache_may_be_any_claim():
    volume = {"name": "weights", "hostPath": {"path": "/mnt/models", "type": "Directory"}}
    objs = render({"config": {"model": {"path": "/mnt/models/qwen"}}, "ray": {
        "extraVolumes": [volume], "extraVolumeMounts": [{"name": "weights", "mountPath": "/mnt/models"}]}})
    for group in groups(first(objs, "RayService")).values():
        spec = group["template"]["spec"]
        assert "initContainers" not in spec and "models" not in {v["name"] for v in spec["volumes"]}
        assert volume in spec["volumes"]
    for obj in objs:
        validate(obj)
    existing = render({"modelCache": {"existingClaim": "shared-cache"}})
    assert not [o for o in existing if o["kind"] == "PersistentVolumeClaim"]
    head = groups(first(existing, "RayService"))["head"]["template"]["spec"]
    assert next(v for v in head["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["claimName"] == "shared-cache"
    per_pod = groups(first(render({"modelCache": {"create": False}}), "RayService"))["gpu"]["template"]["spec"]
    assert next(v for v in per_pod["volumes"] if v["name"] == "models") == {"name": "models", "emptyDir": {}}


def test_the_schema_refuses_a_bare_hugging_face_id():
    with pytest.raises(Exception, match="schema"):
        render({"config": {"model": {"path": "Qwen/Qwen2.5-7B-Instruct"}}})


def run_fetch(tmp_path, files: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LULL_MODEL_DIR": str(tmp_path), "LULL_MODEL_REPO": "Qwen/Qwen2.5-7B-Instruct",
           "LULL_MODEL_REVISION": "main", "LULL_MODEL_FILES": files, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", FETCH.read_text()], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_download_is_skipped_once_done_and_says_what_to_fix_when_it_fails(tmp_path):
    """HF_HUB_OFFLINE=1 stands in for a network this machine does not have."""
    failed = run_fetch(tmp_path, "all")
    assert failed.returncode == 1 and "cannot download hf://Qwen/Qwen2.5-7B-Instruct@main" in failed.stderr
    assert "modelCache.hfTokenSecret" in failed.stderr and not (tmp_path / ".lull-complete").exists()
    (tmp_path / "config.json").write_text("{}")  # a head pod fetched the config and tokenizer
    (tmp_path / ".lull-metadata").touch()
    assert run_fetch(tmp_path, "metadata").returncode == 0
    # A GPU worker still needs the weights: a Hub it cannot reach is a failure, never a
    # half-filled folder taken for a complete one.
    assert run_fetch(tmp_path, "all").returncode == 1 and not (tmp_path / ".lull-complete").exists()
    (tmp_path / ".lull-complete").touch()
    done = run_fetch(tmp_path, "all")
    assert done.returncode == 0 and "model already in" in done.stdout
