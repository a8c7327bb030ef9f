"""Tables, CSV and plots shared by every experiment's report."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnlab.runs import atomic_write_bytes


def spread(stats: dict[str, float], digits: int) -> str:
    """'0.9706' for one value; '0.9650 (0.9599-0.9706)' for several."""
    if stats["min"] == stats["max"]:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def flatten_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """{"a": {"mean": 1}} -> {"a_mean": 1}, for CSV."""
    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, dict):
                out.update({f"{key}_{k}": v for k, v in value.items()})
            else:
                out[key] = value
        flat.append(out)
    return flat


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def validation_curve(
    history: Sequence[dict[str, Any]], batches: int, final_accuracy: float | None
) -> list[tuple[int, float]]:
    """(batch, validation accuracy) points of a run; the final evaluation is plotted at ``batches``."""
    points = [(h["batch"], h["accuracy"]) for h in history if h["split"] == "validation"]
    if final_accuracy is not None:
        points.append((batches, final_accuracy))
    return points


def plot_curves(
    path: Path,
    curves: dict[str, list[list[tuple[float, float]]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> None:
    """One line per label (the mean over its runs) with the min-max band when there are several."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, runs_ in curves.items():
        xs = sorted({x for run in runs_ for x, _ in run})
        by_x = [[y for run in runs_ for x2, y in run if x2 == x] for x in xs]
        means = [statistics.fmean(ys) for ys in by_x]
        (line,) = ax.plot(xs, means, marker="o", markersize=3, label=label)
        if len(runs_) > 1:
            ax.fill_between(xs, [min(ys) for ys in by_x], [max(ys) for ys in by_x], alpha=0.2, color=line.get_color())
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
