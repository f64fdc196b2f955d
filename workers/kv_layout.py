"""Reading and writing one block of a vLLM KV cache across all layers, whatever the layout.

vLLM hands the connector one tensor per attention layer. Their layouts differ
by backend (CPU: `[num_blocks, kv_heads, block_size, 2*head_dim]`; FlashAttention:
`[2, num_blocks, block_size, kv_heads, head_dim]`), but in each the block
index is one dimension of the same size, `num_blocks`. A block's bytes are its
slice along that dimension, layer after layer, so the same bytes load back into
the same layout on any replica of the same model.
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
    def block_nbytes(self) -> int:
        return sum(layer.select(self.block_dim, 0).numel() * layer.element_size() for layer in self.layers)

    def read_block(self, block_id: int) -> bytes:
        parts = [layer.select(self.block_dim, block_id).contiguous().cpu().reshape(-1).view(torch.uint8)
                 for layer in self.layers]
        return torch.cat(parts).numpy().tobytes()

    def write_block(self, block_id: int, data: bytes) -> None:
        if len(data) != self.block_nbytes:
            raise ValueError(f"block holds {len(data)} bytes, this model's blocks hold {self.block_nbytes}")
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        offset = 0
        for layer in self.layers:
            dst = layer.select(self.block_dim, block_id)
            n = dst.numel() * layer.element_size()
            src = flat[offset : offset + n].view(layer.dtype).reshape(dst.shape)
            dst.copy_(src.to(dst.device, non_blocking=False))
            offset += n
