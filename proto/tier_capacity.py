"""How much the tiers hold: the GPU tier is a vLLM KV cache less its null block
(``engine_cache_tokens``, for the engine's registration, its override and the bench's
check); the DRAM tier fills its memory volume up to one rule, for the config
(``tiers.dram_volume_gib``), the Helm chart (which repeats it in
``templates/_helpers.tpl``; ``tests/unit/test_helm_tiers.py`` holds the two together)
and the DRAM store's check at start.

The DRAM tier lives on a tmpfs (``/dev/shm`` of the GPU worker pods). A tier larger
than the volume fills it: writes fail with ENOSPC below the tier's capacity, and on
Kubernetes a memory volume used past its size gets the pod evicted. The same volume
holds vLLM's and NCCL's shared memory, hence the headroom.
"""

from __future__ import annotations

import math

DRAM_HEADROOM_FRACTION = 0.10
DRAM_HEADROOM_MIN_GIB = 2.0


def dram_headroom_gib(volume_gib: float) -> float:
    """What the DRAM tier leaves free in its volume: 10% of it, and at least 2 GiB."""
    return max(DRAM_HEADROOM_MIN_GIB, DRAM_HEADROOM_FRACTION * volume_gib)


def dram_room_gib(volume_gib: float) -> float:
    """The largest DRAM tier a volume of ``volume_gib`` holds."""
    return max(0.0, volume_gib - dram_headroom_gib(volume_gib))


def dram_volume_needed_gib(capacity_gib: float) -> float:
    """The smallest volume that holds a DRAM tier of ``capacity_gib``, whole GiB."""
    exact = max(capacity_gib + DRAM_HEADROOM_MIN_GIB, capacity_gib / (1 - DRAM_HEADROOM_FRACTION))
    return float(math.ceil(exact - 1e-9))


def dram_fit_problem(capacity_gib: float, volume_gib: float | None) -> str | None:
    """Why a DRAM tier of ``capacity_gib`` does not fit a volume of ``volume_gib``, naming
    the fix; None when it fits, when the tier is off (0) or the volume is unknown (None)."""
    if volume_gib is None or capacity_gib == 0:
        return None
    room = dram_room_gib(volume_gib)
    if capacity_gib <= room:
        return None
    return (f"tiers.dram_capacity_gib ({capacity_gib:g}) does not fit its memory volume of {volume_gib:g} GiB "
            f"(tiers.dram_volume_gib), which must keep {dram_headroom_gib(volume_gib):g} GiB free for vLLM and "
            f"NCCL (10%, at least {DRAM_HEADROOM_MIN_GIB:g} GiB): lower tiers.dram_capacity_gib to at most "
            f"{math.floor(room * 100) / 100:g}, or give the volume at least "
            f"{dram_volume_needed_gib(capacity_gib):g} GiB (Helm: ray.gpuWorkers.shmSize)")


# vLLM keeps block 0 of its KV cache back (its null block): a cache of n blocks holds n - 1.
VLLM_NULL_BLOCKS = 1


def engine_cache_tokens(num_gpu_blocks: int, block_size: int) -> int:
    """The tokens a vLLM KV cache of ``num_gpu_blocks`` blocks holds (the GPU tier it is)."""
    return (num_gpu_blocks - VLLM_NULL_BLOCKS) * block_size
