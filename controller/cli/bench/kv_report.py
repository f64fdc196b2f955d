"""``lull bench-kv``'s tables and report (markdown and a PNG of TTFT by tier)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

TIERS = ("gpu", "dram", "shared", "recompute")  # where a call's earlier KV was: the cases bench-kv times


def render(result: dict) -> list[Table]:
    repeats = result["settings"]["repeats"]
    ttft = Table(title=f"TTFT by where the KV was (median of {repeats}, ms)", caption=result["note"])
    ttft.add_column("context", justify="right")
    for tier in TIERS:
        ttft.add_column(tier, justify="right")
    moves = Table(title="KV moves (median of their samples)")
    for name in ("context", "move", "ms", "bytes", "MB/s"):
        moves.add_column(name, justify="left" if name == "move" else "right")
    for context, figures in result["contexts"].items():
        ttft.add_row(context, *(f"{figures['ttft_s'][t] * 1e3:.1f}" for t in TIERS))
        for name, m in figures["moves"].items():
            moves.add_row(context, name.replace("_to_", " -> "), f"{m['seconds'] * 1e3:.2f}", f"{m['bytes']:,}",
                          f"{m['bytes_per_s'] / 1e6:,.0f}")
    return [ttft, moves]


def write_report(folder: Path, result: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in result["contexts"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tier in TIERS:
        ax.plot(contexts, [result["contexts"][str(c)]["ttft_s"][tier] * 1e3 for c in contexts], marker="o", label=tier)
    ax.set(xscale="log", xlabel="context (tokens)", ylabel="TTFT, median (ms)", title="TTFT by where the KV was")
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = folder / "ttft_by_tier.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    s, m = result["settings"], result["machine"]
    lines = [
        "# lull bench-kv", "", f"> {result['note']}", "",
        f"Machine: {m['cpu'] or 'unknown CPU'}, {m['cpus_usable']} usable CPUs, {m['memory_bytes'] / 2**30:.0f} GiB; "
        f"vLLM {m['vllm']}, torch {m['torch']}. Model: {s['model']['name']}, {s['model']['num_layers']} layers, "
        f"{s['model']['num_kv_heads']} KV heads, dtype {s['dtype']}; {s['max_tokens']} output tokens per call, "
        f"medians of {s['repeats']} sessions per figure.", "",
        "## TTFT (ms)", "", "| context | " + " | ".join(TIERS) + " |", "|---" * (len(TIERS) + 1) + "|",
    ]
    for c in contexts:
        lines.append(f"| {c} | " + " | ".join(f"{result['contexts'][str(c)]['ttft_s'][t] * 1e3:.1f}" for t in TIERS) + " |")
    lines += ["", f"![TTFT by tier]({png.name})", "", "## Moves", "", "| context | move | ms | bytes | MB/s |",
              "|---|---|---|---|---|"]
    for c in contexts:
        for name, mv in result["contexts"][str(c)]["moves"].items():
            lines.append(f"| {c} | {name.replace('_to_', ' -> ')} | {mv['seconds'] * 1e3:.2f} | {mv['bytes']:,} | "
                         f"{mv['bytes_per_s'] / 1e6:,.0f} |")
    md = folder / "bench-kv.md"
    md.write_text("\n".join(lines) + "\n")
    return [md, png]
