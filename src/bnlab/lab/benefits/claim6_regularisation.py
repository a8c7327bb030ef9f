"""Claim 6: batch norm regularises a little (sometimes as well as dropout)."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from pathlib import Path

from bnlab import reports
from bnlab.lab.benefits.arms import PLAIN, WITH_BN, Lab, Lookup
from bnlab.lab.benefits.evidence import (
    Claim,
    ClaimResult,
    Experiment,
    accuracy_ylim,
    curve_panel,
    make_table,
    mean_text,
    save_figure,
    spread_text,
)
from bnlab.lab.benefits.networks import PAPER_MLP, RECIPES, RECIPES_TEXT
from bnlab.lab.benefits.sweeps import Sweep
from bnlab.lab.benefits.verdicts import ACCURACY_MARGIN, Comparison
from bnlab.lab.curves import final, points
from bnlab.training import RunResult

CLAIM = Claim(6, "Regularisation", "It regularises a little (sometimes as well as dropout).")
WIDE_MLP = (512, 512)  # wide enough to overfit, and for dropout to have units to spare
DROPOUT = 0.5  # on the hidden units, as Srivastava et al. (2014)


def experiment(lab: Lab) -> Experiment:
    budget = lab.budget
    overfitting = replace(
        PAPER_MLP,
        hidden=WIDE_MLP,
        batches=budget.overfit_batches,
        eval_every=max(1, budget.overfit_batches // 10),
        train_size=budget.overfit_size,
        train_eval_size=budget.overfit_size,
    )
    bases = {recipe: replace(overfitting, **settings) for recipe, settings in RECIPES.items()}
    sweep = Sweep.over(bases, (0.0, DROPOUT), lambda spec, p: replace(spec, dropout=p))
    return Experiment(CLAIM.number, lab.jobs(sweep.all_specs()), partial(analyse, lab, sweep))


def gap(run: RunResult) -> float | None:
    """Training minus validation accuracy at the end; none for a diverged run."""
    return None if run.diverged else points(run)[-1]["train_accuracy"] - points(run)[-1]["val_accuracy"]


def per_seed(values: list[float | None]) -> tuple[float, ...]:
    """A comparison's values: NaN where a run diverged, so that seed is won by neither arm."""
    return tuple(math.nan if v is None else v for v in values)


def analyse(lab: Lab, sweep: Sweep, get: Lookup, out: Path) -> ClaimResult:
    budget = lab.budget
    comparisons, rows, panels, heads = [], [], [], []
    for recipe, at in sweep.runs(lab, get).items():
        (neither, dropout), (bn, both) = at[PLAIN], at[WITH_BN]  # each arm without dropout, then with it
        nets = {"neither": neither, WITH_BN: bn, "dropout": dropout, f"{WITH_BN} + dropout": both}
        gaps = {name: [gap(r) for r in rs] for name, rs in nets.items()}
        val = {name: [final(r) for r in rs] for name, rs in nets.items()}
        rows += [
            (
                recipe,
                name,
                spread_text([final(r, "train_accuracy") for r in rs]),
                spread_text(val[name]),
                spread_text(gaps[name]),
            )
            for name, rs in nets.items()
        ]
        comparisons += [
            Comparison(
                f"train-validation accuracy gap, {recipe}",
                bn=per_seed(gaps[WITH_BN]),
                base=per_seed(gaps["neither"]),
                higher_is_better=False,
                margin=ACCURACY_MARGIN,
            ),
            Comparison(
                f"final validation accuracy, {recipe}",
                bn=per_seed(val[WITH_BN]),
                base=per_seed(val["neither"]),
                margin=ACCURACY_MARGIN,
            ),
            Comparison(
                f"final validation accuracy against dropout, {recipe}",
                bn=per_seed(val[WITH_BN]),
                base=per_seed(val["dropout"]),
                margin=-ACCURACY_MARGIN,
                baseline="dropout",
                counts=False,
            ),
        ]
        heads.append(
            f"{recipe} gap {mean_text(gaps[WITH_BN], 3)} with BN vs {mean_text(gaps['neither'], 3)} without "
            f"({mean_text(gaps['dropout'], 3)} with dropout)"
        )
        gap_curves = {
            name: [[(p["batch"], p["train_accuracy"] - p["val_accuracy"]) for p in points(r)] for r in rs]
            for name, rs in nets.items()
        }
        panels += [
            reports.Panel(f"{recipe}: train - validation accuracy", "batch", "accuracy gap", gap_curves),
            curve_panel(
                f"{recipe}: validation accuracy", nets, ylim=accuracy_ylim([v for vs in val.values() for v in vs])
            ),
        ]
    return ClaimResult(
        CLAIM,
        setup=(
            f"A wide MLP ({len(WIDE_MLP)} hidden layers of {WIDE_MLP[0]} ReLU units, batches of 60) trained on "
            f"only the first {budget.overfit_size} training images for {budget.overfit_batches} batches, so that it "
            f"overfits: without BN or dropout, with BN, with dropout ({DROPOUT:g} on the hidden units), with "
            f"both; {RECIPES_TEXT}. The gap is training accuracy (on those {budget.overfit_size} images) minus "
            "validation accuracy, both in eval mode, at the end."
        ),
        rule=(
            "For each optimizer, BN against the network with neither: BN wins a seed when its gap is smaller by "
            f"more than {ACCURACY_MARGIN:g} and, separately, when its validation accuracy is higher by more than "
            f"{ACCURACY_MARGIN:g}. 'As well as dropout' (BN's validation accuracy no more than {ACCURACY_MARGIN:g} "
            "below dropout's) is reported but not judged: one setup cannot refute 'sometimes'."
        ),
        comparisons=comparisons,
        headline="; ".join(heads),
        tables=[
            (
                "Final accuracies and their gap",
                make_table(["optimizer", "network", "train accuracy", "validation accuracy", "gap"], rows),
            )
        ],
        figures=[
            save_figure(
                out,
                "claim6_regularisation.png",
                "Left: training minus validation accuracy; right: validation accuracy (mean and min-max band "
                "over seeds).",
                panels,
            )
        ],
    )
