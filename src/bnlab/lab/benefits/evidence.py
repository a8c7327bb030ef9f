"""What an experiment leaves for the report: its claim's evidence, and the helpers every claim uses to
put numbers over seeds into words, tables and figures."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab import reports
from bnlab.config import TrainConfig
from bnlab.lab.benefits.verdicts import Comparison, verdict
from bnlab.lab.curves import curve
from bnlab.lab.step_cost import StepCost
from bnlab.training import RunResult


@dataclass(frozen=True)
class Claim:
    """One claim made for batch norm: its number, a short title and the claim in full."""

    number: int
    title: str
    text: str


@dataclass
class ClaimResult:
    """One claim's evidence: what was run, the figures and tables, the comparisons and the verdict."""

    tested: Claim
    setup: str
    rule: str
    comparisons: list[Comparison]
    headline: str
    tables: list[tuple[str, reports.Table]] = field(default_factory=list)  # (caption, table)
    figures: list[reports.Image] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def number(self) -> int:
        return self.tested.number

    @property
    def title(self) -> str:
        return self.tested.title

    @property
    def claim(self) -> str:
        return self.tested.text

    @property
    def verdict(self) -> str:
        return verdict(self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "claim": self.number,
            "title": self.title,
            "text": self.claim,
            "verdict": self.verdict,
            "headline": self.headline,
            "setup": self.setup,
            "rule": self.rule,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "tables": [
                {"caption": caption, "headers": list(t.headers), "rows": [list(r) for r in t.rows]}
                for caption, t in self.tables
            ],
            "figures": [image.name for image in self.figures],
            "notes": self.notes,
        }


@dataclass
class Experiment:
    """The runs one claim needs, and how to turn them into its evidence.

    ``costs``: the setups whose arms' costs per step the claim turns steps into time with, {setup: {arm:
    config}}; the lab measures them interleaved (``lab.step_cost``) and passes them to ``analyse`` as
    ``costs={setup: {arm: StepCost}}``.
    """

    number: int
    jobs: list[TrainConfig]
    analyse: Callable[..., ClaimResult]  # (runs, output folder for figures[, costs=...]) -> result
    costs: dict[str, dict[str, TrainConfig]] = field(default_factory=dict)


# --- Numbers over seeds, in words -----------------------------------------------------------------


def spread_text(values: Sequence[float | None], digits: int = 4, missing: str = "diverged") -> str:
    """Mean (min-max) over seeds of the values there are; says in how many seeds there is none."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return missing
    text = reports.spread({"mean": statistics.fmean(present), "min": min(present), "max": max(present)}, digits)
    absent = len(values) - len(present)
    return f"{text}; {missing} in {absent}/{len(values)}" if absent else text


def mean_text(values: Sequence[float | None], digits: int = 4) -> str:
    """The mean over seeds, for headlines (tables give the spread)."""
    present = [v for v in values if v is not None]
    return f"{statistics.fmean(present):.{digits}f}" if present else "diverged"


def range_text(values: Sequence[float], zero: str = "none") -> str:
    """'0.1' when every seed agrees, '0.1-1' when they do not; 0 reads as ``zero``."""

    def text(v: float) -> str:
        return zero if v == 0 else f"{v:g}"

    low, high = min(values), max(values)
    return text(low) if low == high else f"{text(low)}-{text(high)}"


def cost_text(cost: StepCost) -> str:
    """An arm's milliseconds per step: median (min-max) over the interleaved rounds."""
    return reports.spread(
        {"mean": cost.median * 1e3, "min": min(cost.seconds) * 1e3, "max": max(cost.seconds) * 1e3}, 3
    )


def ratio_text(ratio: tuple[float, float, float]) -> str:
    """A paired cost ratio: median (min-max) over rounds."""
    return reports.spread({"mean": ratio[0], "min": ratio[1], "max": ratio[2]}, 2)


# --- Tables and figures ---------------------------------------------------------------------------


def make_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> reports.Table:
    return reports.Table(tuple(headers), tuple(tuple(r) for r in rows))


def save_figure(out: Path, name: str, caption: str, panels: Sequence[reports.Panel], ncols: int = 2) -> reports.Image:
    reports.plot_panels(out / name, panels, ncols=ncols)
    return reports.Image(name, caption)


def accuracy_ylim(values: Sequence[float | None]) -> tuple[float, float]:
    """A y range framing these accuracies, so that differences of a point or two show."""
    present = [v for v in values if v is not None]
    return max(0.0, min(present) - 0.03), min(1.0, max(present) + 0.01)


def time_panel(
    title: str, runs_by_label: Mapping[str, list[RunResult]], per_step: Mapping[str, float], **kwargs: Any
) -> reports.Panel:
    """Validation accuracy against training time, steps x the seconds per step each arm is charged
    (``step_cost.charged``); one line per run."""
    series = {
        label: [[(x * per_step[label], y) for x, y in curve(r)] for r in rs] for label, rs in runs_by_label.items()
    }
    return reports.Panel(
        title, "training seconds (steps x cost per step)", "validation accuracy", series, per_run=True, **kwargs
    )


def curve_panel(
    title: str,
    runs_by_label: Mapping[str, list[RunResult]],
    *,
    x: str = "batch",
    y: str = "val_accuracy",
    **kwargs: Any,
) -> reports.Panel:
    """One curve per label (mean and band over its runs; one line per run when x is time)."""
    xlabel = {"batch": "batch", "seconds": "training seconds"}[x]
    ylabel = {"val_accuracy": "validation accuracy", "dead_relu": "fraction of dead ReLU units"}[y]
    series = {label: [curve(r, y, x) for r in rs] for label, rs in runs_by_label.items()}
    return reports.Panel(title, xlabel, ylabel, series, per_run=x == "seconds", **kwargs)
