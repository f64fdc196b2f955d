"""KV move bandwidth between device memory and (pinned) host memory, measured with the connector's
own copy code and with plain torch, for a realistic KV cache layout.

    python -m workers.copy_bandwidth                      # a GPU: Llama-3-8B-like KV, bf16
    python -m workers.copy_bandwidth --device cpu --tokens 256,1024 --layers 2

- ``lull gather``: `CopyStream.gather_chunks`, the connector's save path: a request's
  blocks, scattered through the cache, gathered per chunk on a side stream into one
  device buffer and moved into pinned host memory, the next chunk issued before the
  current one is waited on.
- ``lull scatter``: `CopyStream.scatter`, the load path, chunk by chunk from pinned buffers.
- ``torch to-host`` / ``torch to-device``: one contiguous buffer of the same bytes,
  ``copy_(non_blocking=True)`` between device memory and one pinned host buffer: the
  link's ceiling for this size, with no gather and no chunking.

Each line: operation, tokens, MiB moved, median seconds over ``--repeat`` runs (after one
warm-up), GB/s (10^9 bytes per second). Imports torch and Lull's copy modules only, never
vLLM: the GPU machine has torch with CUDA and no vLLM.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from workers.kv_copy import DEFAULT_CHUNK_BYTES, CopyStream
from workers.kv_layout import KvLayout

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.copy_bandwidth", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokens", default="1024,8192,32768", help="request sizes, comma-separated")
    p.add_argument("--num-blocks", type=int, default=0, help="cache blocks (default: twice the largest request)")
    p.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_BYTES / 2**20)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if min(args.tokens) < args.block_size or args.repeat < 1:
        p.error("every request needs at least one block, and --repeat at least 1")
    return args


def make_layout(args) -> KvLayout:
    """FlashAttention's layout, `[2, num_blocks, block_size, kv_heads, head_dim]` per layer
    (CPU: `[num_blocks, kv_heads, block_size, 2*head_dim]`)."""
    blocks = args.num_blocks or 2 * max(args.tokens) // args.block_size
    if args.device == "cpu":
        shape = (blocks, args.kv_heads, args.block_size, 2 * args.head_dim)
    else:
        shape = (2, blocks, args.block_size, args.kv_heads, args.head_dim)
    layers = {f"layers.{i}": torch.empty(shape, dtype=DTYPES[args.dtype], device=args.device).uniform_()
              for i in range(args.layers)}
    return KvLayout.from_caches(layers, blocks)


def timed(fn: Callable[[], None], sync: Callable[[], None], repeat: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(layout: KvLayout, stream: CopyStream, tokens: int, args) -> list[tuple[str, int, float]]:
    """(operation, bytes, median seconds) for one request size."""
    cuda = layout.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(layout.device)) if cuda else (lambda: None)
    n = tokens // args.block_size
    ids = torch.randperm(_num_blocks(layout))[:n].tolist()  # scattered through the cache, as in use
    nbytes = n * layout.block_nbytes
    chunks = [ids[i : i + stream.chunk_blocks] for i in range(0, n, stream.chunk_blocks)]
    hosts = [stream.host_buffer(len(c)) for c in chunks]

    def gather():
        for _ in stream.gather_chunks(ids):
            pass

    def scatter():
        for chunk, host in zip(chunks, hosts):
            stream.scatter(chunk, host)

    flat = torch.empty(nbytes, dtype=torch.uint8, device=layout.device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    return [("lull gather", nbytes, timed(gather, sync, args.repeat)),
            ("lull scatter", nbytes, timed(scatter, sync, args.repeat)),
            ("torch to-host", nbytes, timed(lambda: pinned.copy_(flat, non_blocking=True), sync, args.repeat)),
            ("torch to-device", nbytes, timed(lambda: flat.copy_(pinned, non_blocking=True), sync, args.repeat))]


def _num_blocks(layout: KvLayout) -> int:
    return layout.layers[0].shape[layout.block_dim]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    layout = make_layout(args)
    stream = CopyStream(layout, int(args.chunk_mib * 2**20))
    stream.bind_thread()
    name = torch.cuda.get_device_name(layout.device) if layout.device.type == "cuda" else "cpu"
    print(f"device {name}; {args.layers} layers x {args.kv_heads} kv heads x {args.head_dim} head dim, "
          f"{args.dtype}, block {args.block_size} tokens = {layout.block_nbytes / 2**10:.0f} KiB per block; "
          f"chunk {stream.chunk_blocks} blocks; median of {args.repeat}")
    print(f"{'operation':<16} {'tokens':>8} {'MiB':>9} {'seconds':>9} {'GB/s':>8}")
    for tokens in args.tokens:
        for op, nbytes, seconds in measure(layout, stream, tokens, args):
            print(f"{op:<16} {tokens:>8} {nbytes / 2**20:>9.1f} {seconds:>9.5f} {nbytes / seconds / 1e9:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
