"""Kubernetes awareness for the autoscaler, through the official ``kubernetes`` client,
where the cluster knows something Ray does not:

- how many engine replicas the GPU nodes can hold: allocatable ``nvidia.com/gpu``
  over the Ready, schedulable nodes that match the worker group's node selector,
  packed into whole worker pods. The policy caps its max there, so it never asks
  for replicas whose pods would stay Pending.
- the RayService's GPU worker-group bounds (``minReplicas`` / ``maxReplicas``,
  counted in pods), so that Ray's autoscaler may add and remove the GPU worker pods
  the replica count needs. KubeRay's RayService controller leaves these fields out
  of the hash that decides whether a new RayCluster is rolled out, so patching them
  updates the running cluster in place (KubeRay releases that hash only
  ``replicas`` would roll out a new cluster instead).

The caller builds the API objects (``CoreV1Api``, ``CustomObjectsApi``) from the
in-cluster config; the controller's RBAC (deploy/helm/lull/templates/rbac.yaml)
grants list on nodes and get/patch on rayservices. Every call here is one or two
requests and blocks: run it off the event loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client import CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

GPU_RESOURCE = "nvidia.com/gpu"
RAY_GROUP, RAY_VERSION, RAYSERVICES = "ray.io", "v1", "rayservices"
FIELD_MANAGER = "lull-controller"
JSON_PATCH = "application/json-patch+json"

__all__ = [
    "GpuCapacity", "GpuNode", "RayServiceRef", "WorkerGroupBounds", "bounds_patch",
    "patch_worker_group_bounds", "pod_bounds", "read_gpu_capacity", "worker_group",
]


@dataclass(frozen=True)
class GpuNode:
    name: str
    gpus: int  # allocatable nvidia.com/gpu
    schedulable: bool
    why_not: str = ""  # why it is not schedulable


@dataclass(frozen=True)
class GpuCapacity:
    """The GPU nodes a worker group may land on."""

    nodes: tuple[GpuNode, ...]

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes if n.schedulable)

    def pods(self, gpus_per_pod: int) -> int:
        """Worker pods that fit: a pod's GPUs all come from one node."""
        _positive(gpus_per_pod=gpus_per_pod)
        return sum(n.gpus // gpus_per_pod for n in self.nodes if n.schedulable)

    def replica_cap(self, gpus_per_replica: int, gpus_per_pod: int) -> int:
        """Engine replicas the nodes can hold: the policy's ceiling."""
        return self.pods(gpus_per_pod) * _replicas_per_pod(gpus_per_replica, gpus_per_pod)


def read_gpu_capacity(core: CoreV1Api, label_selector: str) -> GpuCapacity:
    """List the nodes matching ``label_selector`` (the worker group's nodeSelector,
    e.g. ``nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3``). Allocatable, not capacity:
    the device plugin lowers it for unhealthy GPUs. Other workloads' GPU pods are not
    subtracted: this is a ceiling, not free capacity."""
    nodes = []
    for node in core.list_node(label_selector=label_selector).items:
        status = node.status or client.V1NodeStatus()
        gpus = int(parse_quantity((status.allocatable or {}).get(GPU_RESOURCE, "0")))
        ready = next((c.status for c in status.conditions or [] if c.type == "Ready"), "Unknown")
        why_not = ("cordoned" if node.spec and node.spec.unschedulable
                   else "" if ready == "True" else f"Ready={ready}")
        nodes.append(GpuNode(node.metadata.name, gpus, not why_not, why_not))
    return GpuCapacity(tuple(nodes))


@dataclass(frozen=True)
class WorkerGroupBounds:
    """A worker group's bounds, in pods."""

    min_replicas: int
    max_replicas: int

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas; got {self.min_replicas}, {self.max_replicas}")


def pod_bounds(min_replicas: int, max_replicas: int, gpus_per_replica: int, gpus_per_pod: int) -> WorkerGroupBounds:
    """The pods that engine replicas ``min..max`` need, a pod holding several replicas."""
    per_pod = _replicas_per_pod(gpus_per_replica, gpus_per_pod)
    return WorkerGroupBounds(math.ceil(min_replicas / per_pod), math.ceil(max_replicas / per_pod))


@dataclass(frozen=True)
class RayServiceRef:
    namespace: str
    name: str
    group: str = "gpu"  # workerGroupSpecs[].groupName


def worker_group(service: dict[str, Any], group: str) -> tuple[int, dict[str, Any]]:
    """The index and spec of worker group ``group`` in a RayService object."""
    groups = service.get("spec", {}).get("rayClusterConfig", {}).get("workerGroupSpecs") or []
    for index, spec in enumerate(groups):
        if spec.get("groupName") == group:
            return index, spec
    names = [g.get("groupName") for g in groups]
    raise LookupError(f"RayService {service['metadata']['name']} has no worker group {group!r}; it has {names}")


def bounds_patch(service: dict[str, Any], group: str, bounds: WorkerGroupBounds) -> list[dict[str, Any]]:
    """A JSON patch (RFC 6902) that sets the group's bounds, or [] if they are set.

    A merge patch cannot address one list item: it would replace every worker group.
    The ``test`` operations make the patch apply only to the object it was built from
    (same resourceVersion, group still at that index); otherwise the server refuses it
    (422) and nothing changes. ``replicas`` is moved inside the new bounds, where
    KubeRay expects it."""
    index, spec = worker_group(service, group)
    base = f"/spec/rayClusterConfig/workerGroupSpecs/{index}"
    wanted = {"minReplicas": bounds.min_replicas, "maxReplicas": bounds.max_replicas}
    replicas = spec.get("replicas")
    if replicas is not None and not bounds.min_replicas <= replicas <= bounds.max_replicas:
        wanted["replicas"] = min(max(replicas, bounds.min_replicas), bounds.max_replicas)
    changed = {k: v for k, v in wanted.items() if spec.get(k) != v}
    if not changed:
        return []
    return [
        {"op": "test", "path": "/metadata/resourceVersion", "value": service["metadata"]["resourceVersion"]},
        {"op": "test", "path": f"{base}/groupName", "value": group},
        *({"op": "add", "path": f"{base}/{k}", "value": v} for k, v in changed.items()),
    ]


def patch_worker_group_bounds(
    custom: CustomObjectsApi, ref: RayServiceRef, bounds: WorkerGroupBounds, attempts: int = 2
) -> dict[str, Any]:
    """Set the group's bounds; returns the RayService as the server has it afterwards.
    A patch refused because the object changed in between is rebuilt from a fresh
    read, up to ``attempts`` times."""
    _positive(attempts=attempts)
    for attempt in range(1, attempts + 1):
        service = _get(custom, ref)
        ops = bounds_patch(service, ref.group, bounds)
        if not ops:
            return service
        try:
            return custom.patch_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, ref.namespace, RAYSERVICES, ref.name, ops,
                field_manager=FIELD_MANAGER, _content_type=JSON_PATCH,
            )
        except ApiException as error:
            if error.status not in (409, 422) or attempt == attempts:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _get(custom: CustomObjectsApi, ref: RayServiceRef) -> dict[str, Any]:
    try:
        return custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ref.namespace, RAYSERVICES, ref.name)
    except ApiException as error:
        if error.status == 404:
            raise LookupError(
                f"RayService {ref.namespace}/{ref.name} not found; set the controller's RayService "
                f"name and namespace to the Helm release's (kubectl get rayservices -A)"
            ) from error
        raise


def _replicas_per_pod(gpus_per_replica: int, gpus_per_pod: int) -> int:
    _positive(gpus_per_replica=gpus_per_replica, gpus_per_pod=gpus_per_pod)
    if gpus_per_pod % gpus_per_replica:
        raise ValueError(
            f"a worker pod's {gpus_per_pod} GPUs must divide into replicas of {gpus_per_replica} "
            f"(engine.tensor_parallel_size); {gpus_per_pod % gpus_per_replica} would sit idle"
        )
    return gpus_per_pod // gpus_per_replica


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
