"""Claim 5: deeper networks become practical with batch norm."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

from bnlab.lab.benefits.arms import Lab, Lookup
from bnlab.lab.benefits.evidence import Claim, ClaimResult, Experiment, make_table, save_figure
from bnlab.lab.benefits.networks import RECIPES_TEXT, paper_mlp_recipes
from bnlab.lab.benefits.sweeps import (
    RECIPE_HEADERS,
    SWEEP_KEY,
    USABLE_RULE,
    Sweep,
    final_accuracy_by_recipe,
    largest_usable,
    sweep_panel,
    usable_headline,
)
from bnlab.lab.benefits.verdicts import Comparison

CLAIM = Claim(5, "Deeper networks", "Deeper networks become practical.")
WIDTH = 100  # units per hidden layer, as in the paper's MLP
TRIMMED_RULE = (
    "The full budget stops at 30 hidden layers: at 50, the first full study (docs/benefits-first-full) found no usable "
    "run in any seed, arm or recipe, so that depth decided no verdict, and its runs were a sixth of the lab's time."
)


def experiment(lab: Lab) -> Experiment:
    sweep = Sweep.over(
        paper_mlp_recipes(lab.budget), lab.budget.depths, lambda spec, d: replace(spec, hidden=(WIDTH,) * d)
    )
    return Experiment(CLAIM.number, lab.jobs(sweep.all_specs()), partial(analyse, lab, sweep))


def analyse(lab: Lab, sweep: Sweep, get: Lookup, out: Path) -> ClaimResult:
    budget = lab.budget
    depths = budget.depths
    runs = sweep.runs(lab, get)
    comparisons, heads, panels = [], [], []
    for recipe, at in runs.items():
        deepest = {arm: largest_usable(depths, per_depth) for arm, per_depth in at.items()}
        comparisons.append(
            Comparison.of_arms(f"deepest usable network (hidden layers), {recipe}", deepest, kind="ratio", margin=1.0)
        )
        heads.append(usable_headline(recipe, deepest))
        panels.append(sweep_panel(f"{recipe}: final accuracy by depth", "hidden layers", depths, at, logx=True))
    labels = [str(d) for d in depths]
    return ClaimResult(
        CLAIM,
        setup=(
            f"MLPs of {', '.join(labels)} hidden layers of {WIDTH} ReLU units (Glorot-uniform weights, batches of "
            f"60); {RECIPES_TEXT}, {budget.batches} batches per run. {USABLE_RULE}"
        ),
        rule=(
            "For each optimizer: BN wins a seed when the deepest usable network with BN is deeper than the "
            "deepest usable one without (ratio > 1; none usable counts as 0)."
        ),
        comparisons=comparisons,
        headline="deepest usable MLP (hidden layers): " + "; ".join(heads),
        tables=[
            (
                "Final validation accuracy by depth (hidden layers)",
                make_table(["depth", *RECIPE_HEADERS], final_accuracy_by_recipe(labels, runs)),
            )
        ],
        figures=[save_figure(out, "claim5_depth.png", f"Final validation accuracy by depth. {SWEEP_KEY}", panels)],
        notes=[TRIMMED_RULE] if budget.name == "full" else [],
    )
