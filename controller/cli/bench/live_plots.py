"""``lull bench``'s plots: throughput, the censored TTFT CDF, hit sources and tier occupancy."""

from __future__ import annotations

from pathlib import Path

SOURCE_LABELS = (("engine_cache", "engine cache"), ("dram", "DRAM load"), ("shared", "shared-tier load"),
                 ("recomputed", "recomputed"))


def plot_all(folder: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    return [_throughput(folder, records), _ttft_cdf(folder, records), _hit_sources(folder, records),
            _occupancy(folder, records)]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _throughput(folder: Path, records: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    names = [r["policy"] for r in records]
    left.bar(names, [r["output_tokens_per_s"] for r in records])
    left.set_title("Output throughput (measured)")
    left.set_ylabel("output tokens / s")
    right.bar(names, [r["ttft_mean_s"] for r in records])
    right.set_title("Mean TTFT, censored (measured)")
    right.set_ylabel("seconds")
    return _save(fig, folder / "throughput.png")


def _ttft_cdf(folder: Path, records: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in records:
        values = r["ttft_censored_s"]
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=r["policy"])
    ax.set_xscale("log")
    ax.set_xlabel("time to first token, s (calls cut or failed count their wait)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("TTFT CDF, censored (measured)")
    ax.legend(fontsize=8)
    return _save(fig, folder / "ttft_cdf.png")


def _hit_sources(folder: Path, records: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["policy"] for r in records]
    bottom = [0.0] * len(records)
    for key, label in SOURCE_LABELS:
        values = [r["hit_sources"][key] / 1e3 for r in records]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("prompt ktokens")
    ax.set_title("Where prompt tokens' KV came from (engine and connector counters)")
    ax.legend(fontsize=8)
    return _save(fig, folder / "hit_sources.png")


def _occupancy(folder: Path, records: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(records), 1, figsize=(9, 2.2 * len(records)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], records):
        occ = r["occupancy"]
        ax.stackplot(occ["t_s"], [x / 1e3 for x in occ["gpu_tokens"]], [x / 1e3 for x in occ["dram_tokens"]],
                     [x / 1e3 for x in occ["shared_tokens"]],
                     labels=("GPU tier: engine blocks in use", "DRAM (books)", "shared (books)"))
        ax.axhline(r["capacity_tokens"]["gpu_per_replica"] * r["replicas"] / 1e3, color="k", lw=0.8, ls="--")
        ax.set_title(f"{r['policy']} ({r['programs_per_replica']} programs/replica)", fontsize=9)
        ax.set_ylabel("KV ktokens")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds (dashed: the GPU tier)")
    fig.suptitle("Tier occupancy over time (measured)", fontsize=10)
    return _save(fig, folder / "occupancy.png")
