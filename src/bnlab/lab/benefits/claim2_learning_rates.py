"""Claim 2: higher learning rates become usable with batch norm."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

from bnlab.lab.benefits.arms import ARMS, Lab, Lookup
from bnlab.lab.benefits.evidence import Claim, ClaimResult, Experiment, make_table, save_figure
from bnlab.lab.benefits.networks import paper_mlp_recipes
from bnlab.lab.benefits.sweeps import (
    SWEEP_KEY,
    USABLE_RULE,
    Sweep,
    largest_usable,
    rows_by_value,
    sweep_panel,
    usable_headline,
)
from bnlab.lab.benefits.verdicts import Comparison
from bnlab.lab.curves import final

CLAIM = Claim(2, "Higher learning rates", "Higher learning rates become usable.")


def experiment(lab: Lab) -> Experiment:
    budget = lab.budget
    sweep = Sweep.over(
        paper_mlp_recipes(budget),
        {"SGD": budget.sgd_lrs, "Adam": budget.adam_lrs},
        lambda spec, lr: replace(spec, lr=lr),
    )
    return Experiment(CLAIM.number, lab.jobs(sweep.all_specs()), partial(analyse, lab, sweep))


def analyse(lab: Lab, sweep: Sweep, get: Lookup, out: Path) -> ClaimResult:
    budget = lab.budget
    comparisons, rows, panels, heads = [], [], [], []
    for recipe, at in sweep.runs(lab, get).items():
        lrs = sweep.values[recipe]
        largest = {arm: largest_usable(lrs, per_lr) for arm, per_lr in at.items()}
        comparisons.append(
            Comparison.of_arms(f"largest usable learning rate, {recipe}", largest, kind="ratio", margin=1.0)
        )
        heads.append(usable_headline(recipe, largest))
        rows += rows_by_value(recipe, [f"{lr:g}" for lr in lrs], at, final)
        panels.append(sweep_panel(f"{recipe}: final accuracy by learning rate", "learning rate", lrs, at, logx=True))
    return ClaimResult(
        CLAIM,
        setup=(
            f"The batch-norm paper's MNIST MLP (784-100-100-100-10, ReLU, Glorot-uniform weights, batches of "
            f"60, softmax cross-entropy), {budget.batches} batches per run, over a learning-rate sweep: SGD at "
            f"{', '.join(f'{lr:g}' for lr in budget.sgd_lrs)}; "
            f"Adam at {', '.join(f'{lr:g}' for lr in budget.adam_lrs)}. "
            f"{USABLE_RULE} A run whose loss becomes NaN or infinite is marked diverged."
        ),
        rule=(
            "For each optimizer: BN wins a seed when its largest usable learning rate is larger than the largest "
            "usable one without BN (ratio > 1; no usable rate counts as 0)."
        ),
        comparisons=comparisons,
        headline="largest usable learning rate: " + "; ".join(heads),
        tables=[
            (
                "Final validation accuracy by learning rate",
                make_table(["optimizer", "learning rate", *ARMS], rows),
            )
        ],
        figures=[
            save_figure(
                out, "claim2_learning_rates.png", f"Final validation accuracy by learning rate. {SWEEP_KEY}", panels
            )
        ],
    )
