"""The Lull Serve platform in a test process: Ray, a real Redis, `controller.app:build_app`.

One piece of setup for every end-to-end module; each says only what differs
(its LULL_* settings and app args). Starting it takes about a minute here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

import ray
from ray import serve

from controller.names import RAY_NAMESPACE, SERVE_APP
from workers.redis_server import LocalRedis

BASE_ENV = {"LULL_TIERS__DRAM_CAPACITY_GIB": "0.05", "LULL_TIERS__SHARED_CAPACITY_GIB": "0.05"}
BASE_APP_ARGS = {"engine_num_cpus": 0.5, "gateway_num_cpus": 0.25, "cpu_kv_cache_gib": 1}


@contextmanager
def serve_platform(env: dict[str, str], app_args: dict, *, port: int, redis_maxmemory: str = "64mb"):
    """Start the platform on 127.0.0.1:`port`; yields the LocalRedis; stops everything after."""
    env = {**BASE_ENV, **env}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # Ray's workers inherit the driver's environment at ray.init
    dram_dir = tempfile.mkdtemp(prefix="lull-test-dram-", dir="/dev/shm")
    ray.init(num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE, log_to_driver=False)
    redis = LocalRedis(redis_maxmemory).start()
    try:
        from controller.app import build_app

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({**BASE_APP_ARGS, **app_args, "dram_dir": dram_dir, "redis_url": redis.url}),
                  name=SERVE_APP, route_prefix="/")
        yield redis
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(dram_dir, ignore_errors=True)
