"""Elastic engine replicas on a live platform: Serve adds one under load, removes one when
idle, and the removed replica's sessions are drained to the shared tier first.

The platform (`controller.assembly:build_app`, vLLM on CPU, real Redis, real Ray) starts with
one engine replica and may grow to two; the autoscaling windows are seconds instead of
minutes. The scenario is `lull bench-elastic`'s (`controller.cli.bench.elastic`), driven here
through the gateway's REST API; the test checks what the benchmark reports.
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE
from controller.cli.bench.elastic import ElasticBench
from loadgen.clients import RestClient
from tests.integration.live_platform import serve_platform

PORT, GRPC_PORT = 8772, 9772
WINDOWS = {"LULL_AUTOSCALING__SCALE_UP_WINDOW_S": "2", "LULL_AUTOSCALING__SCALE_DOWN_WINDOW_S": "4",
           "LULL_AUTOSCALING__COOLDOWN_S": "2", "LULL_AUTOSCALING__TARGET_GATE_WAIT_S": "0.05",
           "LULL_ENGINE__MAX_MODEL_LEN": "1024"}


@pytest.fixture(scope="module")
def platform():
    args = {"replicas": {"initial": 1, "max": 2}, "tiers": {"gpu_tier_tokens": 2500},
            "gateway": {"default_max_tokens": 8, "grpc_port": GRPC_PORT}}
    with serve_platform(WINDOWS, args, port=PORT, redis_maxmemory="64mb") as redis:
        yield redis


def test_a_replica_is_added_under_load_and_one_drained_when_idle_with_no_session_lost(platform):
    controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)

    async def scenario() -> dict:
        client = RestClient(f"http://127.0.0.1:{PORT}")
        try:
            bench = ElasticBench(client, controller, sessions=8, max_tokens=8, gap_s=0.3, spread_calls=2,
                                 deadline_s=400, say=lambda line: print(line, flush=True))
            return await bench.run()
        finally:
            await client.close()

    result = asyncio.run(scenario())
    print(result)
    assert (result["replicas_before"], result["replicas_peak"]) == (1, 2)
    assert result["decisions"]["up"]["reason"] in ("gate-wait", "waiting-set")
    assert result["decisions"]["down"]["reason"] == "underused"
    assert result["sessions_lost"] == 0, result["failures"]
    drain = result["drain"]
    assert not drain["timed_out"] and drain["lost_sessions"] == 0
    assert drain["saved_sessions"] == result["drained_sessions"] >= 1  # every kept session it had
    assert result["recompute_avoided_tokens"] > 0  # they resumed from KV, not by recomputing
    snap = ray.get(controller.snapshot.remote())
    assert len([t for t in snap["tiers"] if t["tier"] == "gpu"]) == 1
    assert drain["replica_id"] not in {t["replica"] for t in snap["tiers"]}
