"""Claim 3: weights are easier to initialise with batch norm."""

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
    count_usable,
    final_accuracy_by_recipe,
    sweep_panel,
    usable_headline,
)
from bnlab.lab.benefits.verdicts import Comparison

CLAIM = Claim(3, "Easier initialisation", "Weights are easier to initialise.")


def experiment(lab: Lab) -> Experiment:
    budget = lab.budget
    inits: list[str | float] = [*budget.init_stds, *budget.init_schemes]
    sweep = Sweep.over(paper_mlp_recipes(budget), inits, lambda spec, init: replace(spec, init=init))
    return Experiment(CLAIM.number, lab.jobs(sweep.all_specs()), partial(analyse, lab, inits, sweep))


def init_label(init: str | float) -> str:
    return init if isinstance(init, str) else f"std {init:g}"


def analyse(lab: Lab, inits: list[str | float], sweep: Sweep, get: Lookup, out: Path) -> ClaimResult:
    budget = lab.budget
    runs = sweep.runs(lab, get)
    labels = [init_label(i) for i in inits]
    comparisons, heads, panels = [], [], []
    for recipe, at in runs.items():
        counts = {arm: count_usable(per_init) for arm, per_init in at.items()}
        comparisons.append(Comparison.of_arms(f"usable initialisations (of {len(inits)}), {recipe}", counts))
        heads.append(usable_headline(recipe, counts, zero="0", out_of=len(inits)))
        panels.append(
            sweep_panel(
                f"{recipe}: final accuracy by initialisation",
                "initial weights",
                range(len(inits)),
                at,
                categories=labels,
            )
        )
    return ClaimResult(
        CLAIM,
        setup=(
            f"The paper's MLP (ReLU) with every Linear layer drawn from a normal of standard deviation "
            f"{', '.join(f'{s:g}' for s in budget.init_stds)}, or by the schemes {', '.join(budget.init_schemes)}; "
            f"{RECIPES_TEXT}, {budget.batches} batches per run. {USABLE_RULE}"
        ),
        rule=(
            "For each optimizer: BN wins a seed when more initialisations are usable with BN than without "
            "(difference > 0)."
        ),
        comparisons=comparisons,
        headline="usable initialisations: " + "; ".join(heads),
        tables=[
            (
                "Final validation accuracy by initialisation",
                make_table(["init", *RECIPE_HEADERS], final_accuracy_by_recipe(labels, runs)),
            )
        ],
        figures=[
            save_figure(
                out,
                "claim3_initialisation.png",
                f"Final validation accuracy by initial weights. {SWEEP_KEY}",
                panels,
            )
        ],
    )
