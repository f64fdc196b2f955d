"""What ``lull bench`` reads from and sets on the running platform, through Ray: the
controller (policy switches, the books' capacities, tier occupancy), the engine replicas
(vLLM's own counters) and the node agents (bytes moved, the KV connector's counters).

Every figure the bench reports about the engine comes from here, from the engine's and
the connector's own counters, never from the controller's books:

- the engine's real KV cache: vLLM's ``vllm:cache_config_info`` (``num_gpu_blocks``,
  one of them vLLM's null block, and ``block_size``);
- prompt tokens by source: vLLM's ``vllm:prompt_tokens_by_source`` (computed, local
  prefix-cache hit, external = the connector's loads), and the connector's loads split
  by where the KV came from (``loaded_tokens_dram``, ``loaded_tokens_shared``);
- busy time: the connector's ``busy_seconds`` (forward passes that computed tokens).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from controller.cli.bench.leftovers import LeftoverWait
from proto.tier_capacity import engine_cache_tokens
from proto.names import CONTROLLER_ACTOR, ENGINE_DEPLOYMENT, RAY_NAMESPACE, SERVE_APP, node_agent_actor

ENGINE_FREE_S = 30.0  # how long the engines may take to free the closed sessions' blocks
ENGINE_COUNTERS = ("vllm:prompt_tokens_by_source_total", "vllm:generation_tokens_total",
                   "vllm:num_preemptions_total")
CONNECTOR_COUNTERS = ("loaded_tokens", "loaded_tokens_dram", "loaded_tokens_shared", "busy_seconds", "busy_steps",
                      "save_refused", "load_seconds", "save_seconds")
# Lull's own series on each node's merged metrics endpoint: where a call's time went outside the engine.
NODE_SERIES = ("lull:gate_wait_seconds_sum", "lull:gate_wait_seconds_count", "lull:kv_move_duration_seconds_sum",
               "lull:kv_move_duration_seconds_count")


@dataclass(frozen=True)
class EngineCache:
    """One replica's KV cache as vLLM allocated it."""

    num_gpu_blocks: int  # vLLM's pool, its null block included
    block_size: int

    @property
    def tokens(self) -> int:
        """The tokens the cache can hold: the pool less the null block vLLM keeps back."""
        return engine_cache_tokens(self.num_gpu_blocks, self.block_size)


def engine_cache(metrics_text: str) -> EngineCache | None:
    """The cache a replica reports in ``vllm:cache_config_info``; None when it reports none."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info" and sample.labels.get("num_gpu_blocks", "None") != "None":
                return EngineCache(int(sample.labels["num_gpu_blocks"]), int(sample.labels["block_size"]))
    return None


def check_equal_capacity(gpu_tier: dict[str, int], caches: dict[str, EngineCache | None]) -> int:
    """The GPU tier per replica, once every engine's real KV cache is shown to hold exactly
    the tier the controller books on it, and every replica's tier is the same; raises
    ValueError naming the replica and the fix otherwise. A benchmark on a cache larger than
    the tier would let a policy's "demoted" sessions keep hitting in the engine."""
    if not gpu_tier:
        raise ValueError("the controller knows no engine replica yet; wait for `lull up` to finish")
    for replica, booked in sorted(gpu_tier.items()):
        cache = caches.get(replica)
        if cache is None:
            raise ValueError(f"engine replica {replica} does not report its KV cache (vllm:cache_config_info); "
                             "the bench cannot show that it holds only the GPU tier")
        if cache.tokens != booked:
            raise ValueError(f"engine replica {replica}'s KV cache holds {cache.tokens:,} tokens "
                             f"({cache.num_gpu_blocks} blocks of {cache.block_size}, one kept back by vLLM) but the "
                             f"controller's GPU tier is {booked:,}: policies would not run on equal HBM. Start the "
                             f"platform with `lull up --gpu-tier-tokens N`, which sizes the engine's cache to the tier")
    if len(set(gpu_tier.values())) > 1:
        raise ValueError(f"the replicas' GPU tiers differ ({sorted(set(gpu_tier.values()))}); the bench needs one size")
    return next(iter(gpu_tier.values()))


def engine_usage(metrics_text: str) -> float:
    """The fraction of its KV cache an engine has in blocks in use (vLLM's kv_cache_usage_perc)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(metrics_text)
               for sample in family.samples if sample.name == "vllm:kv_cache_usage_perc")


def counter_totals(metrics_text: str) -> dict[str, float]:
    """vLLM's counters the bench reads, summed over label sets (``..._total{source=}`` by source)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in ENGINE_COUNTERS:
                key = sample.name + (f":{sample.labels['source']}" if "source" in sample.labels else "")
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


class Platform:
    """The running platform as the bench sees it (controller actor, node agents, engines)."""

    def __init__(self, address: str):
        import ray

        if not ray.is_initialized():  # a test drives the bench from the process that started Ray
            ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="ERROR")
        self.controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
        self._model: str | None = None  # the served model's name, for the engine probes
        self.agents = []
        for node in ray.nodes():
            if node["Alive"]:
                try:
                    self.agents.append(ray.get_actor(node_agent_actor(node["NodeID"]), namespace=RAY_NAMESPACE))
                except ValueError:  # a node without an agent moves no KV
                    pass
        # Where each node serves its merged metrics, as its agent bound it (lull up binds
        # loopback, a cluster the pod IP): the controller's gate waits and the agents' moves.
        urls = ray.get([agent.metrics_url.remote() for agent in self.agents]) if self.agents else []
        self.metrics_urls = sorted({url for url in urls if url})

    async def snapshot(self) -> dict:
        return await self.controller.snapshot.remote()

    async def replicas(self) -> list[dict]:
        """The replicas as they registered: id, node, GPU and DRAM tokens."""
        return await self.controller.replicas.remote()

    async def switch(self, policy: str, tick_s: float | None = None, dram_tokens: int | None = None,
                     shared_tokens: int | None = None, say=print) -> None:
        """Wait until the books are empty (closed sessions released, sessions other clients
        left open expired: ``leftovers``), saying how it goes, then switch, with
        this policy's DRAM tokens per replica, shared tokens and backstop tick (None: the
        registered capacities and the tick as it is)."""
        wait = LeftoverWait()
        while True:
            done, line = wait.step(await self.snapshot(), time.monotonic())
            if done:
                break
            if line:
                say(line)
            await self.controller.plan_step.remote()  # releases closed sessions now, not on the tick
            await asyncio.sleep(0.5)
        await self.controller.set_policy.remote(policy, tick_s=tick_s, dram_tokens=dram_tokens)
        if shared_tokens is not None:
            await self.controller.set_shared_capacity.remote(shared_tokens)

    async def engine_ttft(self, replica_id: str, prompt_ids: list[int]) -> float:
        """Seconds to the first token of a one-token completion of ``prompt_ids``, asked of the
        replica's vLLM server directly (no gateway, no session: vLLM's prefix cache alone)."""
        import json

        from ray import serve

        from proto.engine_call import EngineCall

        handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, SERVE_APP)
        if self._model is None:
            models = EngineCall("GET", "/v1/models", b"")
            parts = [p async for p in handle.options(session_id=replica_id, stream=True).http.remote(models)]
            self._model = json.loads(b"".join(p for p in parts if isinstance(p, bytes)))["data"][0]["id"]
        body = {"model": self._model, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0.0, "stream": True}
        call = EngineCall("POST", "/v1/completions", json.dumps(body).encode(),
                          headers=(("content-type", "application/json"),))
        started, first = time.monotonic(), None
        async for part in handle.options(session_id=replica_id, stream=True).http.remote(call):
            if isinstance(part, dict) and part.get("status", 200) != 200:
                raise RuntimeError(f"the engine refused the probe: HTTP {part['status']}")
            if isinstance(part, bytes) and first is None:
                first = time.monotonic() - started
        if first is None:
            raise RuntimeError("the engine's probe answer carried no token")
        return first

    async def wait_engines_free(self, replica_ids: list[str], timeout_s: float = ENGINE_FREE_S) -> None:
        """Wait until no engine holds KV blocks in use (vLLM's kv_cache_usage_perc, the
        connector's held requests) with every session closed; raises naming the replica
        that still does: a run after it would not have the whole GPU tier."""
        deadline = time.monotonic() + timeout_s
        while True:
            usage = {r: engine_usage(text) for r, text in (await self.engine_metrics(replica_ids)).items()}
            held = {}
            for stats in await asyncio.gather(*(a.connector_stats.remote() for a in self.agents)):
                held.update({r: v.get("held_requests", 0) for r, v in stats.items() if r in replica_ids})
            busy = {r: (usage[r], held.get(r, 0)) for r in replica_ids if usage[r] > 0 or held.get(r, 0)}
            if not busy:
                return
            if time.monotonic() > deadline:
                replica, (used, holds) = next(iter(busy.items()))
                raise RuntimeError(f"engine replica {replica} still uses {used:.0%} of its KV cache ({holds} held "
                                   f"requests) {timeout_s:g} s after every session closed: KV leaked, and the next "
                                   "policy would not run on the whole GPU tier")
            await asyncio.sleep(0.5)

    async def engine_metrics(self, replica_ids: list[str]) -> dict[str, str]:
        """Each replica's own metrics (Prometheus text), asked of that replica."""
        from ray import serve

        handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, SERVE_APP)
        texts = await asyncio.gather(*(handle.options(session_id=r).metrics_text.remote() for r in replica_ids))
        return dict(zip(replica_ids, texts))

    async def engine_caches(self, replica_ids: list[str]) -> dict[str, EngineCache | None]:
        return {r: engine_cache(text) for r, text in (await self.engine_metrics(replica_ids)).items()}

    async def counters(self, replica_ids: list[str]) -> dict[str, float]:
        """The engines' and connectors' counters, summed over the replicas."""
        totals: dict[str, float] = {}
        for text in (await self.engine_metrics(replica_ids)).values():
            for key, value in counter_totals(text).items():
                totals[key] = totals.get(key, 0.0) + value
        for key, value in (await self.node_series()).items():
            totals[key] = totals.get(key, 0.0) + value
        for stats in await asyncio.gather(*(a.connector_stats.remote() for a in self.agents)):
            for replica, values in stats.items():
                if replica in replica_ids:
                    for key in CONNECTOR_COUNTERS:
                        totals[f"connector:{key}"] = totals.get(f"connector:{key}", 0.0) + values.get(key, 0)
        return totals

    async def node_series(self) -> dict[str, float]:
        """``NODE_SERIES`` from every node's merged endpoint, summed over label sets; raises
        RuntimeError naming an endpoint that does not answer (its gate waits and moves would
        silently read as none)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        totals: dict[str, float] = {}
        async with httpx.AsyncClient(timeout=10.0) as http:
            for url in self.metrics_urls:
                try:
                    response = await http.get(url)
                    response.raise_for_status()
                except httpx.HTTPError as error:
                    raise RuntimeError(f"the node metrics endpoint {url} does not answer ({error!r}); "
                                       "the bench cannot count gate waits and moves") from error
                text = response.text
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name in NODE_SERIES:
                            key = "node:" + sample.name + (f":{sample.labels['kind']}" if "kind" in sample.labels else "")
                            totals[key] = totals.get(key, 0.0) + sample.value
        return totals

    async def move_bytes(self) -> dict[tuple[str, str], float] | None:
        """Bytes the node agents moved so far, by (src tier, dst tier); None with no agent."""
        from prometheus_client.parser import text_string_to_metric_families

        if not self.agents:
            return None
        totals: dict[tuple[str, str], float] = {}
        for text in await asyncio.gather(*(a.metrics_text.remote() for a in self.agents)):
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "lull:kv_move_bytes_total":
                        key = (sample.labels["src_tier"], sample.labels["dst_tier"])
                        totals[key] = totals.get(key, 0.0) + sample.value
        return totals


def moved(before, after) -> tuple[int | None, int | None]:
    """HBM<->DRAM and DRAM<->shared bytes between two `move_bytes` readings."""
    if before is None or after is None:
        return None, None
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}

    def between(a: str, b: str) -> int:
        return int(sum(v for (src, dst), v in delta.items() if {src, dst} == {a, b}))

    return between("gpu", "dram"), between("dram", "shared")


def tier_use(snap: dict) -> dict[str, int]:
    """The summed used tokens of each tier kind in a controller snapshot."""
    used = {"gpu": 0, "dram": 0, "shared": 0}
    for t in snap["tiers"]:
        if t["tier"] in used:
            used[t["tier"]] += t["used_tokens"]
    return used
