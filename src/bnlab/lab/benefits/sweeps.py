"""Sweeps: networks that differ in one setting (learning rate, initialisation, activation, depth, ...),
each trained in both arms, and how claims 2-7 count, tabulate and plot them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bnlab import reports
from bnlab.config import TrainConfig
from bnlab.lab.benefits.arms import ARMS, PLAIN, WITH_BN, Lab, Lookup, SweepRuns
from bnlab.lab.benefits.evidence import range_text, spread_text
from bnlab.lab.benefits.networks import RECIPES
from bnlab.lab.curves import final
from bnlab.training import RunResult

USABLE_ACCURACY = 0.90  # a run is usable when it does not diverge and ends at or above this
USABLE_RULE = (
    f"A run is *usable* when it did not diverge and ends with at least {USABLE_ACCURACY:.0%} validation accuracy."
)
SWEEP_KEY = (
    f"Mean over seeds with min-max band (or bars); crosses at 0 mark diverged runs; the dotted line is the "
    f"{USABLE_ACCURACY:.0%} usable threshold."
)
RECIPE_HEADERS = tuple(f"{recipe}, {arm}" for recipe in RECIPES for arm in ARMS)


@dataclass
class Sweep:
    """Each base network (e.g. the paper's MLP under one recipe) at each value of one setting:
    ``specs[base][i]`` is base network ``base`` at ``values[base][i]``."""

    values: dict[str, tuple[Any, ...]]
    specs: dict[str, list[TrainConfig]]

    @classmethod
    def over(
        cls,
        bases: Mapping[str, TrainConfig],
        values: Sequence[Any] | Mapping[str, Sequence[Any]],
        vary: Callable[[TrainConfig, Any], TrainConfig],
    ) -> Sweep:
        """``values`` for every base, or {base: its own values}; ``vary(spec, value)`` sets one value."""
        per_base = values if isinstance(values, Mapping) else dict.fromkeys(bases, values)
        return cls(
            {name: tuple(per_base[name]) for name in bases},
            {name: [vary(spec, value) for value in per_base[name]] for name, spec in bases.items()},
        )

    def all_specs(self) -> list[TrainConfig]:
        return [spec for specs in self.specs.values() for spec in specs]

    def runs(self, lab: Lab, get: Lookup) -> dict[str, SweepRuns]:
        """{base: {arm: for each value, one run per seed}}."""
        return {name: lab.sweep(get, specs) for name, specs in self.specs.items()}


def usable(run: RunResult) -> bool:
    value = final(run)
    return value is not None and value >= USABLE_ACCURACY


def count_usable(per_value: list[list[RunResult]]) -> list[float]:
    """Per seed, how many of the swept values gave a usable run."""
    seeds = range(len(per_value[0]))
    return [float(sum(usable(runs[i]) for runs in per_value)) for i in seeds]


def largest_usable(values: Sequence[float], per_value: list[list[RunResult]]) -> list[float]:
    """Per seed, the largest of ``values`` whose run is usable (0 when none is)."""
    seeds = range(len(per_value[0]))
    usable_values = [[v for v, runs in zip(values, per_value, strict=True) if usable(runs[i])] for i in seeds]
    return [float(max(found, default=0)) for found in usable_values]


def usable_headline(recipe: str, by_arm: Mapping[str, list[float]], zero: str = "none", out_of: int = 0) -> str:
    """'SGD 4 of 6 with BN vs 3 without': a per-seed count or largest value, as a range, for each arm."""
    of = f" of {out_of}" if out_of else ""
    return f"{recipe} {range_text(by_arm[WITH_BN], zero)}{of} with BN vs {range_text(by_arm[PLAIN], zero)} without"


def rows_by_value(
    name: str, labels: Sequence[str], at: SweepRuns, score: Callable[[RunResult], float | None]
) -> list[tuple[str, ...]]:
    """One row per swept value: ``name``, the value's label, then each arm's score over seeds."""
    return [
        (name, label, *(spread_text([score(r) for r in at[arm][i]]) for arm in ARMS)) for i, label in enumerate(labels)
    ]


def final_accuracy_by_recipe(labels: Sequence[str], runs: Mapping[str, SweepRuns]) -> list[tuple[str, ...]]:
    """One row per swept value, one column per recipe and arm (``RECIPE_HEADERS``): final validation accuracy."""
    return [
        (label, *(spread_text([final(r) for r in runs[recipe][arm][i]]) for recipe in runs for arm in ARMS))
        for i, label in enumerate(labels)
    ]


def sweep_panel(
    title: str, xlabel: str, xs: Sequence[float], runs_at: Mapping[str, list[list[RunResult]]], **kwargs: Any
) -> reports.Panel:
    """Final validation accuracy against a swept value (one curve per seed); diverged runs are crosses at 0."""
    series, marks = {}, {}
    for label, per_x in runs_at.items():
        seeds = range(len(per_x[0]))
        series[label] = [
            [(x, final(rs[i])) for x, rs in zip(xs, per_x, strict=True) if not rs[i].diverged] for i in seeds
        ]
        marks[label] = [(x, 0.0) for x, rs in zip(xs, per_x, strict=True) for r in rs if r.diverged]
    return reports.Panel(
        title,
        xlabel,
        "final validation accuracy",
        series,
        marks=marks,
        hlines=(USABLE_ACCURACY,),
        ylim=(0, 1.02),
        xticks=() if kwargs.get("categories") else xs,
        **kwargs,
    )
