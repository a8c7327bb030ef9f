"""Tables, CSV, plots and documents (Markdown, self-contained HTML) shared by every experiment's report."""

from __future__ import annotations

import base64
import csv
import html
import io
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.fileio import atomic_write_bytes


def spread(stats: dict[str, float], digits: int) -> str:
    """'0.9706' for one value; '0.9650 (0.9599-0.9706)' for several."""
    if stats["min"] == stats["max"]:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def summarize(values: Sequence[float | None]) -> dict[str, float] | None:
    """Mean, min and max over the values present (seeds, runs); None when there are none."""
    present = [v for v in values if v is not None]
    return {"mean": statistics.fmean(present), "min": min(present), "max": max(present)} if present else None


def median_range(values: Sequence[float | None]) -> dict[str, float] | None:
    """Median, min and max over the values present (seeds); None when there are none. The median resists the
    one chaotic seed a deep network or an EMA can give, where ``summarize``'s mean would follow it."""
    present = [v for v in values if v is not None]
    return {"median": statistics.median(present), "min": min(present), "max": max(present)} if present else None


def median_text(stats: dict[str, float] | None, spec: str = ".4f") -> str:
    """Median (min-max): '0.9650 (0.9599-0.9706)'; one value alone when they agree; '-' for None."""
    if stats is None:
        return "-"
    median, low, high = (format(stats[k], spec) for k in ("median", "min", "max"))
    return median if low == high else f"{median} ({low}-{high})"


def spread_cell(stats: dict[str, float] | None, digits: int) -> str:
    """``spread`` for a table cell: '-' where there is nothing (e.g. precise figures without BN)."""
    return "-" if stats is None else spread(stats, digits)


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
    plot_panels(path, [Panel(title, xlabel, ylabel, curves, logx=logx)], ncols=1)


@dataclass
class Panel:
    """One set of axes. ``series`` maps a label to its runs, each a list of (x, y) points; a label is
    drawn as the mean over its runs with the min-max band. With ``categories`` the x values are
    indices into them, and each series is drawn as points with min-max bars instead of a line."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[list[tuple[float, float]]]]
    logx: bool = False
    categories: Sequence[str] = ()
    marks: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # crosses, e.g. diverged runs
    mark_label: str = "diverged"
    hlines: Sequence[float] = ()
    vlines: Sequence[float] = ()
    ylim: tuple[float, float] | None = None
    per_run: bool = False  # one line per run instead of the mean: for runs with different x values (time)
    xticks: Sequence[float] = ()  # label exactly these x values (a swept grid), plainly, even on a log axis


def plot_panels(path: Path, panels: Sequence[Panel], *, title: str | None = None, ncols: int = 2) -> None:
    """Panels in a grid, one PNG; a label keeps its colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(7 if ncols == 1 else 6 * ncols, 4.2 * nrows), dpi=120, squeeze=False
    )
    colours: dict[str, str] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels, strict=False):
        labels = [*panel.series, *(m for m in panel.marks if m not in panel.series)]
        for index, label in enumerate(labels):
            colour = colours.setdefault(label, cycle[len(colours) % len(cycle)])
            offset = (index - (len(labels) - 1) / 2) * 0.12 if panel.categories else 0.0  # side by side
            if panel.series.get(label):
                _draw_series(ax, label, panel.series[label], colour, panel, offset)
            if panel.marks.get(label):
                xs, ys = zip(*panel.marks[label], strict=True)
                xs = tuple(x + offset for x in xs)
                ax.scatter(xs, ys, marker="x", s=40, color=colour, label=f"{label}: {panel.mark_label}", zorder=3)
        for y in panel.hlines:
            ax.axhline(y, color="grey", linestyle=":", linewidth=1)
        for x in panel.vlines:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        if panel.logx:
            ax.set_xscale("log")
        if panel.categories:
            ax.set_xticks(range(len(panel.categories)), list(panel.categories), rotation=30, ha="right")
        elif panel.xticks:
            ax.set_xticks(list(panel.xticks), [f"{x:g}" for x in panel.xticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _draw_series(
    ax: Any, label: str, runs_: list[list[tuple[float, float]]], colour: str, panel: Panel, offset: float
) -> None:
    if panel.per_run:
        for i, run in enumerate(runs_):
            xs, ys = zip(*run, strict=True) if run else ((), ())
            ax.plot(xs, ys, marker="o", markersize=2, linewidth=1, color=colour, label=None if i else label)
        return
    xs = sorted({x for run in runs_ for x, _ in run})
    by_x = [[y for run in runs_ for x2, y in run if x2 == x] for x in xs]
    means = [statistics.fmean(ys) for ys in by_x]
    if panel.categories:  # points with min-max bars
        lows = [m - min(ys) for m, ys in zip(means, by_x, strict=True)]
        highs = [max(ys) - m for m, ys in zip(means, by_x, strict=True)]
        ax.errorbar([x + offset for x in xs], means, yerr=[lows, highs], fmt="o", capsize=3, color=colour, label=label)
        return
    ax.plot(xs, means, marker="o", markersize=3, label=label, color=colour)
    if len(runs_) > 1:
        ax.fill_between(xs, [min(ys) for ys in by_x], [max(ys) for ys in by_x], alpha=0.2, color=colour)


# A report is a list of blocks, rendered to Markdown or to one self-contained HTML file.


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """A paragraph; inline **bold** and `code` are kept in both renderings."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    """A PNG beside the report (``name`` relative to it), embedded in the HTML."""

    name: str
    caption: str


@dataclass(frozen=True)
class Callout:
    """A highlighted paragraph; ``tone`` (good, bad, mixed, info) colours it in HTML."""

    text: str
    tone: str = "info"


Block = Heading | Text | Bullets | Table | Image | Callout


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + block.text)
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            out.append(markdown_table(block.headers, block.rows))
        elif isinstance(block, Image):
            out.append(f"![{block.caption}]({block.name})\n\n*{block.caption}*")
        else:
            out.append(f"> {block.text}")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1, h2, h3 { line-height: 1.2; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; } th { background: #f4f4f4; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 13px; }
code { background: #f4f4f4; padding: 0 .2em; border-radius: 3px; }
.callout { padding: .6em 1em; border-left: 5px solid; border-radius: 3px; margin: 1em 0; }
.good { background: #eaf7ea; border-color: #2e8b2e; } .bad { background: #fbeaea; border-color: #b22222; }
.mixed { background: #fdf5e0; border-color: #d4a017; } .info { background: #eef3fa; border-color: #4a78b0; }
"""


def _inline_html(text: str) -> str:
    """Markdown's inline marks as HTML: `code` (taken as it is), **strong** and *emphasis*."""
    parts = re.split(r"(`[^`]+`)", html.escape(text, quote=False))
    for i, part in enumerate(parts):
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            parts[i] = f"<code>{part[1:-1]}</code>"
        else:
            part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
            parts[i] = re.sub(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"<em>\1</em>", part)
    return "".join(parts)


def render_html(blocks: Sequence[Block], *, title: str, image_dir: Path) -> str:
    """One HTML file that needs nothing beside it: the PNGs are embedded as base64 data URIs."""
    out = [f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>']
    out.append(f"<style>{_CSS}</style>\n</head>\n<body>")
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            out.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Image):
            data = base64.b64encode((image_dir / block.name).read_bytes()).decode("ascii")
            caption = _inline_html(block.caption)
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        else:
            out.append(f'<div class="callout {block.tone}">{_inline_html(block.text)}</div>')
    out.append("</body>\n</html>\n")
    return "\n".join(out)
