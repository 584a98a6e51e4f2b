"""The run's printed table and its plot: output tokens/s against batch size, one line per system."""
from __future__ import annotations

from pathlib import Path

SYSTEMS = ("engine", "engine-tp", "baseline engine", "triton", "transformers")   # engine-tp: --tensor-parallel-size N


def _rows_by_batch(result: dict) -> dict[int, dict]:
    return {r["batch_size"]: r for r in result.get("rows", [])}


def format_model(model: dict) -> str:
    """One model's section: tokens/s per batch size per system, then the single-number measurements."""
    systems = [s for s in SYSTEMS if s in model["systems"]]
    by = {s: _rows_by_batch(model["systems"][s]) for s in systems}
    sizes = sorted({b for rows in by.values() for b in rows})
    head = f"{'batch':>5} " + " ".join(f"{s + ' tok/s':>18}" for s in systems)
    if {"engine", "transformers"} <= set(systems):
        head += f" {'engine/hf':>10}"
    # triton runs at --tensor-parallel-size: compare it with the engine at the same size
    same_tp = "engine-tp" if "engine-tp" in systems else "engine"
    if {same_tp, "triton"} <= set(systems):
        head += f" {'triton/' + same_tp:>17}"
    if {"engine", "baseline engine"} <= set(systems):
        head += f" {'engine/base':>12}"
    lines = [f"== {model['name']}: {model['spec']['params_total'] / 1e6:.0f}M params "
             f"({model['spec']['params_llm_total'] / 1e6:.0f}M LLM), {model['spec']['dtype']}, "
             f"{model['workload']['max_tokens']} new tokens, {model['workload']['rounds']} round(s)", head]
    for b in sizes:
        tok = {s: by[s].get(b, {}).get("output_tokens_per_s") for s in systems}
        line = f"{b:>5} " + " ".join(f"{tok[s]:>18.1f}" if tok[s] else f"{'-':>18}" for s in systems)
        if {"engine", "transformers"} <= set(systems):
            line += f" {tok['engine'] / tok['transformers']:>10.2f}" if tok["engine"] and tok["transformers"] else f" {'-':>10}"
        if {same_tp, "triton"} <= set(systems):
            line += f" {tok['triton'] / tok[same_tp]:>17.2f}" if tok[same_tp] and tok["triton"] else f" {'-':>17}"
        if {"engine", "baseline engine"} <= set(systems):
            base = tok["baseline engine"]
            line += f" {tok['engine'] / base:>12.2f}" if tok["engine"] and base else f" {'-':>12}"
        lines.append(line)
    lines.append("")
    for s in systems:
        r = model["systems"][s]
        extra = ""
        if "kv_blocks_used_max" in r:
            extra += f", KV blocks max {r['kv_blocks_used_max']:.0f}/{r['kv_blocks_total']:.0f}"
        if "kv_excess_blocks_per_seq_max" in r:
            extra += (f" (over live need: max {r['kv_excess_blocks_max']:.0f}, {r['kv_excess_blocks_per_seq_max']:.2f}/seq, "
                      f"steps over need+1/seq: {r['kv_steps_over_need_plus_one']})")
        if r.get("tensor_parallel_size", 1) > 1:
            extra += f", {r['tensor_parallel_size']} ranks, weights per rank " + "/".join(
                f"{m['weights_bytes'] / 2**20:.0f}" for m in r["rank_memory"]) + " MiB"
        elif r.get("server_params", {}).get("tensor_parallel_size", "1") != "1":
            extra += f", {r['server_params']['tensor_parallel_size']} ranks"
        if "peak_device_bytes" in r:
            extra += f", peak device mem {r['peak_device_bytes'] / 2**30:.2f} GiB"
        if r.get("contention") is not None:
            extra += f", others' CPU share {100 * r['contention']:.0f}%"
        lines.append(f"{s:>15}: TTFT 1 image {1000 * r['ttft_1image_s']:.0f} ms (median of 3: "
                     f"{1000 * r['ttft_1image_median_s']:.0f} ms), peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB{extra}")
    roof = model.get("roofline")
    if roof:
        frac = roof.get("fraction_of_roofline")
        lines.append(f"    roofline: {roof['decode_weight_bytes'] / 1e6:.0f} MB weights/step at "
                     f"{roof['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s -> {roof['roofline_tok_s']:.1f} tok/s; "
                     f"engine batch-1 decode {roof.get('engine_batch1_decode_tok_s', 0):.1f} tok/s"
                     + (f" = {100 * frac:.0f}% of roofline" if frac else ""))
        if roof.get("read_bandwidth_bytes_per_s"):
            read = roof.get("fraction_of_read_bandwidth")
            lines.append(f"    read bandwidth (sum of 1 GiB) {roof['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; batch-1 "
                         f"decode reads weights at " + (f"{100 * read:.0f}% of it" if read else "-"))
    if "outputs_agree" in model:
        lines.append(f"    engine vs transformers greedy tokens, first request: {model['outputs_agree']}")
    lines += format_scenarios(model.get("scenarios", {}), model.get("baseline_commit"))
    return "\n".join(lines)


def _ms(seconds) -> str:
    return f"{1000 * seconds:.0f} ms" if seconds is not None else "-"


def _stall_line(r: dict) -> str:
    return (f"long prompt ({r['long_prompt_tokens']} tokens) {_ms(r['long_prompt_latency_s'])}; "
            f"{r['num_streams']} streams' gaps median {_ms(r['gap_median_s'])}, p99 {_ms(r['gap_p99_s'])}, "
            f"longest {_ms(r['gap_max_s'])} ({100 * r['gap_max_over_latency']:.0f}% of the prompt's latency); "
            f"steady decode {_ms(r['steady_itl_median_s'])}")


def _arrivals_line(r: dict) -> str:
    return (f"{r['requests']} image requests at {r['rate_per_s']}/s: TTFT p50 {_ms(r['ttft_p50_s'])}, "
            f"p99 {_ms(r['ttft_p99_s'])}; inter-token p50 {_ms(r['itl_p50_s'])}, p99 {_ms(r['itl_p99_s'])} "
            f"({r['itl_p99_over_p50']:.1f}x), max {_ms(r['itl_max_s'])}; {r['output_tokens_per_s']:.0f} tok/s")


def _same_image_line(r: dict) -> str:
    on, off = r["cache_on"]["ttft_s"], r["cache_off"]["ttft_s"]
    parts = [f"{name} {_ms(on[name])} vs {_ms(off[name])} without ({r['speedup'][name]:.1f}x)" for name in r["speedup"]]
    return f"first request {_ms(on['first'])}; second request TTFT with the encoder cache: " + "; ".join(parts)


def format_scenarios(scenarios: dict, baseline_commit: str | None) -> list[str]:
    """One line per scenario run (labels: after, before = the baseline revision, extra models)."""
    if not scenarios:
        return []
    lines = ["", "serving under load (engine in-process)" + (f"; before = {baseline_commit[:10]}" if baseline_commit
                                                              else "")]
    for kind, line in (("stall", _stall_line), ("arrivals", _arrivals_line), ("same-image", _same_image_line)):
        for label, r in scenarios.get(kind, {}).items():
            lines.append(f"  {kind.replace('-', ' ')} ({label}): " + (r["error"] if "error" in r else line(r)))
    return lines


def format_targets(model: dict) -> str:
    checks = model.get("targets", {})
    return "\n".join(f"    target {name}: {'MET' if ok else 'not met'} ({detail})" for name, (ok, detail) in checks.items())


def plot(models: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for s, style in zip(SYSTEMS, ("o-", "d-.", "x-.", "s--", "^:")):
            rows = model["systems"].get(s, {}).get("rows")
            if rows:
                ax.plot([r["batch_size"] for r in rows], [r["output_tokens_per_s"] for r in rows], style, label=s)
        ax.set_xlabel("concurrent requests (batch size)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{model['name']} model, {model['workload']['max_tokens']} new tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
