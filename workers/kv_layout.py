"""Whole blocks of a vLLM KV cache across all layers, gathered and scattered in one batch.

vLLM hands the connector one tensor per attention layer. Their layouts differ
by backend (CPU: `[num_blocks, kv_heads, block_size, 2*head_dim]`; FlashAttention:
`[2, num_blocks, block_size, kv_heads, head_dim]`), but in each the block
index is one dimension of the same size, `num_blocks`. A block's bytes are its
slice along that dimension, layer after layer, so the same bytes load back into
the same layout on any replica of the same model.

`gather` and `scatter` move many blocks at once between the cache and a contiguous
`[blocks, block_nbytes]` byte buffer on the cache's device, one indexed copy per
layer (never one per block and layer); row i holds block i's bytes in the stored
format. Moving that buffer across the host link is `workers.kv_copy`'s job. Imports
torch only: the GPU bandwidth script runs it where vLLM is not installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


def _layer_index(name: str) -> int:
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else 0


@dataclass
class KvLayout:
    layers: list[torch.Tensor]
    block_dim: int

    @classmethod
    def from_caches(cls, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> "KvLayout":
        layers = [kv_caches[name] for name in sorted(kv_caches, key=_layer_index)]
        shape = layers[0].shape
        # Prefer the outermost matching dimension; dims of other sizes are heads, tokens or K/V.
        dims = [d for d in range(min(2, len(shape))) if shape[d] == num_blocks]
        if not dims:
            raise ValueError(f"cannot find the block dimension ({num_blocks} blocks) in KV cache shape {tuple(shape)}")
        return cls(layers, dims[0])

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def layer_nbytes(self) -> list[int]:
        """Bytes of one block in each layer, in layer order."""
        return [layer.select(self.block_dim, 0).numel() * layer.element_size() for layer in self.layers]

    @property
    def block_nbytes(self) -> int:
        return sum(self.layer_nbytes())

    def _block_shape(self, layer: torch.Tensor) -> tuple[int, ...]:
        return tuple(layer.select(self.block_dim, 0).shape)

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Copy blocks `block_ids` (a long tensor on the cache's device) into `out`, a
        `[len(block_ids), block_nbytes]` uint8 tensor on the same device, row per block."""
        offset, n = 0, len(block_ids)
        for layer, nbytes in zip(self.layers, self.layer_nbytes()):
            rows = out[:, offset : offset + nbytes].view(layer.dtype).view(n, *self._block_shape(layer))
            rows.copy_(layer.index_select(self.block_dim, block_ids).movedim(self.block_dim, 0))
            offset += nbytes

    def scatter(self, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Write rows of `src` (`[len(block_ids), block_nbytes]` uint8, on the cache's device)
        into blocks `block_ids`: the inverse of `gather`."""
        if src.shape[1] != self.block_nbytes:
            raise ValueError(f"blocks hold {src.shape[1]} bytes, this model's blocks hold {self.block_nbytes}")
        offset, n = 0, len(block_ids)
        for layer, nbytes in zip(self.layers, self.layer_nbytes()):
            rows = src[:, offset : offset + nbytes].view(layer.dtype).view(n, *self._block_shape(layer))
            layer.index_copy_(self.block_dim, block_ids, rows.movedim(0, self.block_dim))
            offset += nbytes
