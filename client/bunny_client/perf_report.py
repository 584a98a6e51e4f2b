"""Benchmark report: a text table, CSV, JSON and a PNG of throughput and latency against batch size."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .perf_stats import BatchStats

COLUMNS = (  # field, header, format
    ("batch_size", "batch", "{:>5d}"),
    ("requests_per_s", "req/s", "{:>8.2f}"),
    ("output_tokens_per_s", "out tok/s", "{:>10.1f}"),
    ("ttft_mean_ms", "TTFT ms", "{:>9.1f}"),
    ("ttft_p90_ms", "TTFT p90", "{:>9.1f}"),
    ("itl_mean_ms", "ITL ms", "{:>8.2f}"),
    ("tokens_per_request", "tok/req", "{:>8.1f}"),
    ("failed", "failed", "{:>6d}"),
)


def format_table(rows: list[BatchStats]) -> str:
    widths = [len(fmt.format(0 if "d}" in fmt else 0.0)) for _, _, fmt in COLUMNS]
    lines = [" ".join(f"{h:>{w}}" for (_, h, _), w in zip(COLUMNS, widths))]
    for row in rows:
        lines.append(" ".join(fmt.format(getattr(row, f)) for f, _, fmt in COLUMNS))
    return "\n".join(lines)


def write_csv(rows: list[BatchStats], path: Path) -> None:
    fields = list(rows[0].as_dict()) if rows else [f for f, _, _ in COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())


def write_json(rows: list[BatchStats], path: Path, meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "results": [r.as_dict() for r in rows]}, indent=1) + "\n")


def _panel(ax, x, title: str, left: list[tuple], left_label: str, right: tuple, right_label: str) -> None:
    """One subplot: series on the left axis, one series on a twin right axis. A series is (ys, style, label)."""
    for ys, style, label in left:
        ax.plot(x, ys, style, label=label)
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel(left_label)
    twin = ax.twinx()
    ys, style, label, color = right
    twin.plot(x, ys, style, color=color, label=label)
    twin.set_ylabel(right_label)
    ax.set_title(title)
    ax.legend(handles=ax.get_lines() + twin.get_lines(), loc="upper left")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)


def plot_png(rows: list[BatchStats], path: Path, title: str = "bunny on Triton") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.batch_size for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    _panel(ax1, x, "throughput", [([r.output_tokens_per_s for r in rows], "o-", "output tokens/s")],
           "output tokens/s", ([r.requests_per_s for r in rows], "s--", "requests/s", "tab:orange"), "requests/s")
    _panel(ax2, x, "latency", [([r.ttft_mean_ms for r in rows], "o-", "TTFT mean"),
                               ([r.ttft_p90_ms for r in rows], "^:", "TTFT p90")],
           "first-token latency (ms)", ([r.itl_mean_ms for r in rows], "s--", "inter-token latency", "tab:red"),
           "inter-token latency (ms)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[BatchStats], out_dir: Path, meta: dict, stem: str = "perf") -> dict[str, Path]:
    """Write <stem>.csv, <stem>.json, <stem>.png and <stem>.txt into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("csv", "json", "png", "txt")}
    write_csv(rows, paths["csv"])
    write_json(rows, paths["json"], meta)
    plot_png(rows, paths["png"], title=meta.get("title", "bunny on Triton"))
    paths["txt"].write_text(format_table(rows) + "\n")
    return paths
