"""The connector's batched copy code (`workers.kv_layout`, `workers.kv_copy`) on CPU tensors
shaped as vLLM's backends shape them: the bytes of a batch equal the bytes block by block,
in the stored format, and a round trip restores the blocks. The CUDA stream path is the
same code with a side stream and events; it runs in the bandwidth script on a GPU."""

from __future__ import annotations

import pytest
import torch

from workers.copy_bandwidth import main as bandwidth_main
from workers.kv_copy import CopyStream
from workers.kv_layout import KvLayout

NUM_BLOCKS = 12


def caches(shape_of_layer, dtype=torch.float16, layers=3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {f"model.layers.{i}.attn": torch.randn(shape_of_layer, generator=gen).to(dtype) for i in range(layers)}


LAYOUTS = {
    "cpu": (NUM_BLOCKS, 2, 16, 2 * 8),  # [num_blocks, kv_heads, block_size, 2*head_dim]
    "flash": (2, NUM_BLOCKS, 16, 2, 8),  # [2, num_blocks, block_size, kv_heads, head_dim]
}


def per_block_bytes(layout: KvLayout, block_id: int) -> bytes:
    """The stored format, one block at a time: its slice in each layer, layer after layer."""
    return b"".join(layer.select(layout.block_dim, block_id).contiguous().view(torch.uint8).reshape(-1)
                    .numpy().tobytes() for layer in layout.layers)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_batched_gather_equals_block_by_block_and_round_trips(name):
    layout = KvLayout.from_caches(caches(LAYOUTS[name]), NUM_BLOCKS)
    assert layout.block_dim == (0 if name == "cpu" else 1)
    ids = [5, 0, 9, 3]
    stream = CopyStream(layout, chunk_bytes=layout.block_nbytes * 3)  # two chunks: 3 blocks, then 1
    chunks = list(stream.gather_chunks(ids))
    assert [list(c) for c, _ in chunks] == [[5, 0, 9], [3]]
    rows = torch.cat([host for _, host in chunks])
    assert rows.shape == (len(ids), layout.block_nbytes)
    for i, b in enumerate(ids):
        assert rows[i].numpy().tobytes() == per_block_bytes(layout, b)

    before = {b: per_block_bytes(layout, b) for b in range(NUM_BLOCKS)}
    targets = [1, 2, 4, 6]
    stream.scatter(targets, rows)
    for src, dst in zip(ids, targets):
        assert per_block_bytes(layout, dst) == before[src]
    for untouched in set(range(NUM_BLOCKS)) - set(targets):
        assert per_block_bytes(layout, untouched) == before[untouched]


def test_scatter_refuses_rows_of_another_block_size():
    layout = KvLayout.from_caches(caches(LAYOUTS["cpu"]), NUM_BLOCKS)
    with pytest.raises(ValueError, match="blocks hold"):
        layout.scatter(torch.tensor([0]), torch.zeros((1, layout.block_nbytes + 2), dtype=torch.uint8))


def test_bandwidth_script_runs_tiny_on_cpu(capsys):
    assert bandwidth_main(["--device", "cpu", "--layers", "2", "--kv-heads", "2", "--head-dim", "8",
                           "--block-size", "16", "--num-blocks", "64", "--tokens", "64,256", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("lull gather", "lull scatter", "torch to-host", "torch to-device"):
        assert label in out
    assert "GB/s" in out
