"""The Lull Serve platform in a test process: Ray, a real Redis, `controller.assembly:build_app`.

One piece of setup for every end-to-end module; each says only what differs (its
LULL_* settings, and its app args: config overrides ``{section: {setting: value}}``, as
`build_app` takes them). Starting it takes about a minute here.

`serve_platform` runs one Ray node; `serve_two_node_platform` runs two Ray nodes on
this host (`ray.cluster_utils.Cluster`: a head and a worker, each its own raylet),
one engine replica on each and the gateway on the head, so a test can remove the
worker node while the gateway keeps serving. Ray's node health checks keep their
defaults: a removed node is declared dead after about 10 s, as in production.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray import serve

from proto.names import RAY_NAMESPACE, SERVE_APP
from tests.support import INTERNAL_TOKEN
from workers.redis_server import LocalRedis

BASE_ENV = {"LULL_TIERS__DRAM_CAPACITY_GIB": "0.05", "LULL_TIERS__SHARED_CAPACITY_GIB": "0.05",
            "LULL_INTERNAL_TOKEN": INTERNAL_TOKEN}
# float32, not the default `auto` (bfloat16 on this CPU): the tests compare greedy outputs
# across replicas and batches, and bfloat16's rounding flips the random tiny model's
# near-tied tokens with the batch it runs in.
BASE_APP_ARGS = {"cluster": {"engine_cpus": 0.5, "gateway_cpus": 0.25},
                 "engine": {"cpu_kv_cache_space_gib": 1, "dtype": "float32"}}
# Two nodes: each holds one engine (2 x 0.75 > 1) and the head holds the gateway beside it.
NODE_CPUS, ENGINE_CPUS, GATEWAY_CPUS = 1.0, 0.75, 0.25


@dataclass
class TwoNodePlatform:
    redis: LocalRedis
    cluster: object  # ray.cluster_utils.Cluster
    head_id: str
    worker: object  # the worker's ray._private.node.Node (for Cluster.remove_node)
    worker_id: str


@contextmanager
def _environment(env: dict[str, str], dram_root: str = "/dev/shm") -> Iterator[str]:
    """LULL_* settings in os.environ (Ray's workers inherit the driver's environment when
    their raylet starts) and a DRAM-tier root in ``dram_root``; yields the root, restores both after."""
    env = {**BASE_ENV, **env}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dram_dir = tempfile.mkdtemp(prefix="lull-test-dram-", dir=dram_root)
    try:
        yield dram_dir
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(dram_dir, ignore_errors=True)


def app_overrides(*layers: dict) -> dict:
    """Config overrides merged setting by setting, later layers winning."""
    merged: dict = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return merged


def _deploy(app_args: dict, dram_dir: str, redis: LocalRedis, port: int, **serve_options) -> None:
    from controller.assembly import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port}, **serve_options)
    # Everything on loopback, as `lull up` binds it by default (the node agents' gRPC and the
    # metrics endpoint listen on the Ray node's IP otherwise).
    here = {"tiers": {"dram_dir": dram_dir, "redis_url": redis.url, "node_agent_host": "127.0.0.1"}}
    serve.run(build_app(app_overrides(BASE_APP_ARGS, app_args, here)), name=SERVE_APP, route_prefix="/")


@contextmanager
def serve_platform(env: dict[str, str], app_args: dict, *, port: int, redis_maxmemory: str = "64mb",
                   dram_root: str = "/dev/shm"):
    """Start the platform on 127.0.0.1:`port`, its DRAM tier in a folder of ``dram_root``; yields
    the LocalRedis; stops everything after."""
    with _environment(env, dram_root) as dram_dir:
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE, log_to_driver=False)
        redis = LocalRedis(redis_maxmemory).start()
        try:
            _deploy(app_args, dram_dir, redis, port)
            yield redis
        finally:
            serve.shutdown()
            ray.shutdown()
            redis.stop()


@contextmanager
def serve_two_node_platform(env: dict[str, str], app_args: dict, *, port: int, redis_maxmemory: str = "64mb"):
    """The platform on a head and a worker Ray node of this host, with two engine replicas
    (one per node) and the gateway on the head; yields a TwoNodePlatform. The controller
    actor goes where Ray puts it (it has no placement constraint): on either node.

    Serve spreads replicas but places the gateway anywhere, and the gateway must not sit on
    the node a test removes: the worker's CPUs are held by a pinned placeholder actor until
    the head is full (an engine and the gateway), so the second engine can only go there.
    """
    from ray.cluster_utils import Cluster

    with _environment(env) as dram_dir:
        with _ray_address_file_kept():
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
        redis = None
        try:
            worker = cluster.add_node(num_cpus=NODE_CPUS)
            ray.init(address=cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False)
            head_id = cluster.head_node.node_id
            redis = LocalRedis(redis_maxmemory).start()
            placeholder = _hold_cpus(worker.node_id, NODE_CPUS)
            releaser = threading.Thread(target=_release_when(_head_full, placeholder), daemon=True)
            releaser.start()
            args = app_overrides(app_args, {"replicas": {"initial": 2},
                                            "cluster": {"engine_cpus": ENGINE_CPUS, "gateway_cpus": GATEWAY_CPUS}})
            # One proxy: a second one on this host could not bind the same port.
            _deploy(args, dram_dir, redis, port, proxy_location="HeadOnly")
            releaser.join()
            yield TwoNodePlatform(redis, cluster, head_id, worker, worker.node_id)
        finally:
            serve.shutdown()
            ray.shutdown()
            if redis is not None:
                redis.stop()
            cluster.shutdown()


@contextmanager
def _ray_address_file_kept() -> Iterator[None]:
    """Undo what `Cluster` writes in /tmp/ray/ray_current_cluster: there, a plain `ray.init()`
    of any other process on this host would join this test's cluster instead of starting its own."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    previous = open(path).read() if os.path.exists(path) else None
    try:
        yield
    finally:
        if previous is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            with open(path, "w") as f:
                f.write(previous)


def actor_nodes() -> dict[str, set[str]]:
    """Class name -> the nodes where its live actors run (Serve replicas are `ServeReplica:<app>:<deployment>`).
    Ray's GCS actor table, read directly: the state API needs the dashboard, which tests leave out."""
    from ray._private.state import actors

    nodes: dict[str, set[str]] = {}
    for actor in actors().values():
        if actor["State"] == "ALIVE":
            nodes.setdefault(actor["ActorClassName"], set()).add(actor["Address"]["NodeID"])
    return nodes


@ray.remote
class _Placeholder:
    def ready(self) -> bool:
        return True


def _hold_cpus(node_id: str, cpus: float):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = _Placeholder.options(num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id, soft=False)).remote()
    ray.get(actor.ready.remote(), timeout=60)
    return actor


def _head_full() -> bool:
    return ray.available_resources().get("CPU", 0.0) < 1e-6  # the worker is held: what is left is the head's


def _release_when(condition: Callable[[], bool], placeholder, timeout_s: float = 300.0) -> Callable[[], None]:
    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.2)
        ray.kill(placeholder)

    return run
