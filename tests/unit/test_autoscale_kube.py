"""controller/autoscale/kube.py against recorded API responses: no Kubernetes API
server runs here. The real ``kubernetes`` client (its API classes, serialization,
content-type choice and error handling) talks to ``RecordedApiServer``, which
replaces the urllib3 pool under the client's REST layer and answers from the JSON
in tests/fixtures/k8s/: a NodeList of H100 nodes (one with an unhealthy GPU, one
cordoned, one NotReady), the RayService the Helm chart renders with the multi-node
GPU values as the API server returns it (server fields and status added), and the
API server's Status bodies for a missing object and for a failed JSON-patch test.
A PATCH is applied to the stored object (RFC 6902 test/add/replace, as the API
server does), and the result is validated against KubeRay's RayService CRD schema."""

from __future__ import annotations

import copy
import http
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.autoscale.kube import (
    RayServiceRef,
    WorkerGroupBounds,
    bounds_patch,
    patch_worker_group_bounds,
    pod_bounds,
    read_gpu_capacity,
    worker_group,
)
from tests.k8s_validation import validate

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "k8s"
SELECTOR = "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3"
REF = RayServiceRef("lull", "lull", "gpu")
SERVICE_PATH = "/apis/ray.io/v1/namespaces/lull/rayservices/lull"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@dataclass
class Response:
    """What urllib3 returns with ``preload_content=False``, as far as the client reads it."""

    status: int
    data: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})

    @property
    def reason(self) -> str:
        return http.HTTPStatus(self.status).phrase


@dataclass
class RecordedApiServer:
    """Stands in for the client's urllib3 ``PoolManager``: answers GETs from stored
    objects (recorded responses), applies PATCHes to them, and keeps every request."""

    objects: dict[str, Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    before_patch: Callable[[dict[str, Any]], None] | None = None  # another writer, racing us

    def request(self, method: str, url: str, body: str | None = None, headers: dict | None = None, **_: Any) -> Response:
        parts = urlsplit(url)
        self.requests.append({"method": method, "path": parts.path, "query": parse_qs(parts.query),
                              "headers": dict(headers or {}), "body": json.loads(body) if body else None})
        stored = self.objects.get(parts.path)
        if stored is None:
            return Response(404, (FIXTURES / "status-rayservice-not-found.json").read_bytes())
        if method == "PATCH":
            assert headers["Content-Type"] == "application/json-patch+json", headers
            if self.before_patch:
                self.before_patch(stored)
            try:
                patched = apply_json_patch(stored, json.loads(body))
            except PatchTestFailed:
                return Response(422, (FIXTURES / "status-patch-test-failed.json").read_bytes())
            patched["metadata"]["resourceVersion"] = str(int(stored["metadata"]["resourceVersion"]) + 1)
            patched["metadata"]["generation"] += 1
            self.objects[parts.path] = stored = patched
        return Response(200, json.dumps(stored).encode())

    def methods(self) -> list[str]:
        return [r["method"] for r in self.requests]


class PatchTestFailed(Exception):
    pass


def apply_json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 test, add and replace; enough for what kube.py sends."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key = int(last) if isinstance(target, list) else last
        if op["op"] == "test":
            if target[key] != op["value"]:
                raise PatchTestFailed(op)
        elif op["op"] in ("add", "replace"):
            target[key] = op["value"]
        else:
            raise AssertionError(f"unexpected op {op}")
    return doc


def api(server: RecordedApiServer) -> client.ApiClient:
    api_client = client.ApiClient(client.Configuration(host="https://10.96.0.1:443"))
    api_client.rest_client.pool_manager = server
    return api_client


@pytest.fixture
def server() -> RecordedApiServer:
    return RecordedApiServer({
        "/api/v1/nodes": fixture("nodelist-gpu-h100.json"),
        SERVICE_PATH: fixture("rayservice-lull.json"),
    })


def test_recorded_rayservice_is_valid_for_kuberays_crd():
    validate(fixture("rayservice-lull.json"))


def test_gpu_capacity_counts_ready_schedulable_nodes_in_whole_pods(server):
    capacity = read_gpu_capacity(client.CoreV1Api(api(server)), SELECTOR)
    [request] = server.requests
    assert (request["method"], request["path"], request["query"]) == ("GET", "/api/v1/nodes", {"labelSelector": [SELECTOR]})
    assert [(n.gpus, n.schedulable, n.why_not) for n in capacity.nodes] == [
        (8, True, ""), (8, True, ""), (7, True, ""), (8, False, "cordoned"), (8, False, "Ready=Unknown"),
    ]
    assert capacity.gpus == 23
    # The chart's worker pods take 8 GPUs: the node with 7 healthy GPUs holds none.
    assert capacity.pods(8) == 2 and capacity.replica_cap(gpus_per_replica=2, gpus_per_pod=8) == 8
    assert capacity.pods(1) == 23 and capacity.replica_cap(1, 4) == 20


def test_no_matching_nodes_cap_at_zero():
    server = RecordedApiServer({"/api/v1/nodes": fixture("nodelist-empty.json")})
    assert read_gpu_capacity(client.CoreV1Api(api(server)), "gpu=none").replica_cap(1, 8) == 0


def test_pod_bounds_follow_the_charts_packing_and_refuse_idle_gpus():
    assert pod_bounds(2, 16, gpus_per_replica=2, gpus_per_pod=8) == WorkerGroupBounds(1, 4)
    assert pod_bounds(0, 5, 1, 1) == WorkerGroupBounds(0, 5)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        pod_bounds(1, 4, gpus_per_replica=3, gpus_per_pod=8)
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        WorkerGroupBounds(3, 2)


def test_patch_sets_the_bounds_with_a_guarded_json_patch(server):
    result = patch_worker_group_bounds(client.CustomObjectsApi(api(server)), REF, WorkerGroupBounds(1, 6))
    get, patch = server.requests
    assert (get["method"], get["path"], patch["method"], patch["path"]) == ("GET", SERVICE_PATH, "PATCH", SERVICE_PATH)
    assert patch["query"] == {"fieldManager": ["lull-controller"]}
    base = "/spec/rayClusterConfig/workerGroupSpecs/0"
    assert patch["body"] == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "48213377"},
        {"op": "test", "path": f"{base}/groupName", "value": "gpu"},
        {"op": "add", "path": f"{base}/maxReplicas", "value": 6},
    ]
    group = worker_group(result, "gpu")[1]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (1, 6, 1)
    validate(result)


def test_patch_moves_replicas_inside_new_bounds_and_validates_against_the_crd():
    original = fixture("rayservice-lull.json")
    for bounds, replicas in [(WorkerGroupBounds(2, 3), 2), (WorkerGroupBounds(0, 0), 0), (WorkerGroupBounds(0, 9), None)]:
        ops = bounds_patch(original, "gpu", bounds)
        moved = [o["value"] for o in ops if o["path"].endswith("/replicas")]
        assert moved == ([] if replicas is None else [replicas])
        patched = apply_json_patch(original, ops)
        validate(patched)  # the CRD's openAPIV3Schema, strict about unknown fields
        group = worker_group(patched, "gpu")[1]
        assert (group["minReplicas"], group["maxReplicas"]) == (bounds.min_replicas, bounds.max_replicas)
        assert group["replicas"] == (1 if replicas is None else replicas)


def test_bounds_already_set_send_no_patch(server):
    result = patch_worker_group_bounds(client.CustomObjectsApi(api(server)), REF, WorkerGroupBounds(1, 4))
    assert server.methods() == ["GET"] and result == fixture("rayservice-lull.json")


def test_a_patch_refused_because_the_object_changed_is_rebuilt_from_a_fresh_read(server):
    def ray_autoscaler_scales_up(stored: dict) -> None:
        if stored["metadata"]["resourceVersion"] == "48213377":  # only the first time
            stored["metadata"]["resourceVersion"] = "48213390"
            worker_group(stored, "gpu")[1]["replicas"] = 2

    server.before_patch = ray_autoscaler_scales_up
    result = patch_worker_group_bounds(client.CustomObjectsApi(api(server)), REF, WorkerGroupBounds(1, 8))
    assert server.methods() == ["GET", "PATCH", "GET", "PATCH"]
    assert server.requests[3]["body"][0]["value"] == "48213390"
    group = worker_group(result, "gpu")[1]
    assert (group["replicas"], group["maxReplicas"]) == (2, 8), "the other writer's change survives"


def test_a_patch_refused_every_time_raises_the_api_error(server):
    def always_racing(stored: dict) -> None:
        stored["metadata"]["resourceVersion"] = str(int(stored["metadata"]["resourceVersion"]) + 5)

    server.before_patch = always_racing
    with pytest.raises(ApiException) as error:
        patch_worker_group_bounds(client.CustomObjectsApi(api(server)), REF, WorkerGroupBounds(1, 8), attempts=2)
    assert error.value.status == 422 and server.methods() == ["GET", "PATCH"] * 2


def test_missing_rayservice_or_group_names_the_fix(server):
    custom = client.CustomObjectsApi(api(server))
    with pytest.raises(LookupError, match=r"RayService lull/other not found.*kubectl get rayservices"):
        patch_worker_group_bounds(custom, RayServiceRef("lull", "other"), WorkerGroupBounds(1, 2))
    with pytest.raises(LookupError, match=r"no worker group 'tpu'; it has \['gpu'\]"):
        patch_worker_group_bounds(custom, RayServiceRef("lull", "lull", "tpu"), WorkerGroupBounds(1, 2))
