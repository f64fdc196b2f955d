"""The comparison report of ``lull sim``: a markdown table of every policy side by
side, the cost model's description, and PNG plots, each marked *simulated*."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = (
    ("policy", "policy", "{}"),
    ("programs_per_replica", "programs/replica", "{}"),
    ("output_tokens_per_s", "output tok/s", "{:.1f}"),
    ("limit_fraction", "of the limit", "{}"),
    ("requests_per_s", "req/s", "{:.3f}"),
    ("ttft_mean_s", "TTFT mean s", "{:.2f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
    ("ttft_censored_mean_s", "censored TTFT mean s", "{:.2f}"),
    ("calls_past_gate_timeout", "calls past gate timeout", "{:,}"),
    ("programs_zero_progress", "programs with no output", "{}"),
    ("program_output_p10", "program output p10 tok", "{:,.0f}"),
    ("jain_fairness", "Jain fairness", "{:.3f}"),
    ("recompute_tokens", "recompute tok", "{:,}"),
    ("bytes_hbm_dram", "HBM<->DRAM GB", None),
    ("bytes_dram_shared", "DRAM<->shared GB", None),
)


def markdown_table(records: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    rows = []
    for record in records:
        cells = []
        for key, _, fmt in COLUMNS:
            value = record[key]
            cells.append(f"{value / 1e9:,.1f}" if fmt is None else fmt.format(value))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def write_report(folder: Path, records: list[dict], describe: str, notes: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = [_occupancy_plot(folder, records)]
    if len({r["programs_per_replica"] for r in records}) > 1:
        written.append(_sweep_plot(folder, records))
    first = records[0]
    lines = [
        "# lull sim: policy comparison (simulated)",
        "",
        f"All figures are **simulated**: profile `{first['profile']}`, {first['replicas']} "
        f"replica(s), {first['duration_s']:g} s simulated, {first['arrival']} arrivals, seed "
        f"{first['seed']}. Workload: {notes}.",
        "",
        markdown_table(records),
        "",
        f"Starvation (simulated): censored TTFT counts the waits still open at the end; a call "
        f"past the gate timeout waited over the live `gateway.gate_timeout_s` "
        f"({first['gate_timeout_s']:g} s) to run and would have failed live (not enforced here); "
        f"program output is output tokens per program; Jain's index is over them.",
        "",
        "The limit (computed, `loadgen.sim.limit`): what no policy can exceed, the least of the "
        "programs' demand at their fastest pace and the engines' compute and memory time; \"of the "
        "limit\" is each run's share of it.",
        "",
        *[f"- {n} programs/replica: {limit:,.1f} output tok/s ({binding} binds)" for n, limit, binding in
          dict.fromkeys((r["programs_per_replica"], r["limit_output_tokens_per_s"], r["limit_binding"])
                        for r in records) if limit is not None],
        "",
        "Memory (equal off-GPU bytes unless `--unequal-memory`):",
        "",
        *[f"- {policy}: {memory}" for policy, memory in
          dict.fromkeys((r["policy"], r["memory"]) for r in records)],
        "",
        *[f"![{p.stem}]({p.name})" for p in written],
        "",
        "## Cost model",
        "",
        describe,
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return [path, *written]


def _occupancy_plot(folder: Path, records: list[dict]) -> Path:
    most = max(r["programs_per_replica"] for r in records)
    shown = [r for r in records if r["programs_per_replica"] == most]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.4 * len(shown)), sharex=True, squeeze=False)
    for ax, record in zip(axes[:, 0], shown):
        occ = record["occupancy"]
        t = [x / 60 for x in occ["t_s"]]
        scale = 1e6
        ax.stackplot(t, [g / scale for g in occ["gpu_tokens"]], [d / scale for d in occ["dram_tokens"]],
                     [s / scale for s in occ["shared_tokens"]], labels=("GPU HBM", "CPU DRAM", "shared"))
        ax.set_title(f"{record['policy']} (simulated, {most} programs/replica)", fontsize=9)
        ax.set_ylabel("KV Mtokens")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("simulated time (min)")
    fig.suptitle("Tier occupancy over time (simulated)")
    fig.tight_layout()
    path = folder / "occupancy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _sweep_plot(folder: Path, records: list[dict]) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for policy in dict.fromkeys(r["policy"] for r in records):
        points = sorted((r["programs_per_replica"], r) for r in records if r["policy"] == policy)
        xs = [x for x, _ in points]
        left.plot(xs, [r["output_tokens_per_s"] for _, r in points], marker="o", label=policy)
        right.plot(xs, [r["ttft_mean_s"] for _, r in points], marker="o", label=policy)
    left.set_title("Throughput (simulated)")
    left.set_xlabel("programs per replica")
    left.set_ylabel("output tokens / s")
    right.set_title("Mean TTFT (simulated)")
    right.set_xlabel("programs per replica")
    right.set_ylabel("seconds")
    right.set_yscale("log")
    left.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "sweep.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
