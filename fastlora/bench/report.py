"""Writers of the suite's results: CSV rows (appended, with GPU name, versions, timestamp and
config), markdown tables and PNG plots of speedup against M per shape."""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
from collections import defaultdict

import torch


def environment(device_name: str) -> dict:
    """Columns every CSV row carries: where, with what, and when it ran."""
    import bitsandbytes
    import peft
    import triton

    import fastlora

    return {"gpu": device_name, "torch": torch.__version__, "cuda": torch.version.cuda or "",
            "triton": triton.__version__, "bitsandbytes": bitsandbytes.__version__,
            "peft": peft.__version__, "fastlora": fastlora.__version__,
            "python": platform.python_version(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def check_csv_columns(path: str, columns: list[str]) -> bool:
    """Whether rows with `columns` can be appended to `path`: True when it is new or empty,
    False when its header is exactly `columns`; ValueError when it holds other columns (the
    suite checks this before a run, so a long run never ends in this error)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return True
    with open(path, newline="", encoding="utf-8") as fh:
        existing = next(csv.reader(fh), [])
    if existing != list(columns):
        raise ValueError(f"{path} holds rows with other columns; write to another folder "
                         "(--out) or move that file away")
    return False


def append_csv(path: str, rows: list[dict]) -> None:
    """Append `rows` to the CSV at `path` (header written when the file is new)."""
    if not rows:
        return
    columns = list(rows[0])
    new = check_csv_columns(path, columns)
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A GitHub markdown table of `rows`; columns: (key, header) pairs."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """The same table aligned for a terminal."""
    body = [[_cell(r.get(k, "")) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def plot_speedup(rows: list[dict], path: str, title: str, value_key: str,
                 baseline: str) -> None:
    """One subplot per shape: `value_key` (a speedup over `baseline`) against M (log2 axis),
    one line per provider. rows: one mode and one rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_shape: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        value = r.get(value_key)
        if isinstance(value, float) and not math.isnan(value):
            by_shape[r["shape"]][r["provider"]].append((r["m"], value))
    if not by_shape:
        return
    cols = min(4, len(by_shape))
    nrows = math.ceil(len(by_shape) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (shape, lines) in zip(axes.flat, sorted(by_shape.items())):
        for provider, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3,
                    label=provider)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(f"speedup vs {baseline}")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(by_shape):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smoke_result(checks: list) -> dict:
    """The smoke tables' columns for one provider's fastlora.numerics comparisons: the worst
    output (largest error over its bound), its error and bound, and the status ("ok", or
    "FAIL: " and every broken bound)."""
    worst = max(checks, key=lambda c: c.max_err / c.bound if c.bound else float("inf"))
    status = "ok" if all(c.ok for c in checks) else "FAIL: " + "; ".join(
        c.message() for c in checks if not c.ok)
    return {"worst": worst.name, "max_err": worst.max_err, "bound": worst.bound,
            "status": status}
