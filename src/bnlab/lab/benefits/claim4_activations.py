"""Claim 4: more activation functions become viable with batch norm (sigmoids in deep nets; ReLUs die less)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

from bnlab.lab.benefits.arms import ARMS, PLAIN, WITH_BN, Lab, Lookup
from bnlab.lab.benefits.evidence import (
    Claim,
    ClaimResult,
    Experiment,
    curve_panel,
    make_table,
    mean_text,
    save_figure,
    spread_text,
)
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
from bnlab.lab.benefits.verdicts import DEAD_MARGIN, Comparison
from bnlab.lab.curves import points

CLAIM = Claim(
    4,
    "More activation functions",
    "More activation functions become viable (sigmoids in deep nets; ReLUs die less).",
)
DEEP_MLP = (100,) * 10  # deep enough for sigmoids to stall without BN


def experiment(lab: Lab) -> Experiment:
    acts = lab.budget.activations
    sweep = Sweep.over(paper_mlp_recipes(lab.budget, hidden=DEEP_MLP), acts, lambda s, act: replace(s, activation=act))
    return Experiment(CLAIM.number, lab.jobs(sweep.all_specs()), partial(analyse, lab, sweep))


def analyse(lab: Lab, sweep: Sweep, get: Lookup, out: Path) -> ClaimResult:
    budget = lab.budget
    acts = budget.activations
    runs = sweep.runs(lab, get)
    comparisons, viable_heads, dead_heads, acc_panels, dead_panels, dead_rows = [], [], [], [], [], []
    for recipe, at in runs.items():
        counts = {arm: count_usable(per_act) for arm, per_act in at.items()}
        comparisons.append(Comparison.of_arms(f"viable activation functions (of {len(acts)}), {recipe}", counts))
        viable_heads.append(usable_headline(recipe, counts, zero="0", out_of=len(acts)))
        acc_panels.append(
            sweep_panel(f"{recipe}: final accuracy by activation", "activation", range(len(acts)), at, categories=acts)
        )
        relu = {arm: per_act[acts.index("relu")] for arm, per_act in at.items()}
        dead = {arm: [points(r)[-1]["dead_relu"] for r in relu_runs] for arm, relu_runs in relu.items()}
        comparisons.append(
            Comparison.of_arms(
                f"dead ReLU units at the end, {recipe}", dead, higher_is_better=False, margin=DEAD_MARGIN
            )
        )
        dead_rows.append((recipe, *(spread_text(dead[arm], 3) for arm in ARMS)))
        dead_heads.append(f"{recipe} {mean_text(dead[WITH_BN], 3)} with BN vs {mean_text(dead[PLAIN], 3)}")
        dead_panels.append(curve_panel(f"{recipe}: dead ReLU units", relu, y="dead_relu"))
    return ClaimResult(
        CLAIM,
        setup=(
            f"A deep MLP ({len(DEEP_MLP)} hidden layers of {DEEP_MLP[0]}, Glorot-uniform weights, batches of 60) "
            f"with each of {', '.join(acts)}; {RECIPES_TEXT}, {budget.batches} batches per run. {USABLE_RULE} "
            "A ReLU unit is *dead* when it outputs zero for every scored validation image (eval mode)."
        ),
        rule=(
            "For each optimizer: BN wins a seed when more activations are viable (usable) with BN than without "
            f"(difference > 0), and, for the ReLU network, when the fraction of dead units at the end is lower "
            f"with BN by more than {DEAD_MARGIN:g}."
        ),
        comparisons=comparisons,
        headline=f"viable activations: {'; '.join(viable_heads)}; dead ReLUs at the end: {'; '.join(dead_heads)}",
        tables=[
            (
                "Final validation accuracy by activation",
                make_table(["activation", *RECIPE_HEADERS], final_accuracy_by_recipe(acts, runs)),
            ),
            ("Fraction of dead ReLU units at the end (ReLU network)", make_table(["optimizer", *ARMS], dead_rows)),
        ],
        figures=[
            save_figure(
                out, "claim4_activations.png", f"Final validation accuracy by activation. {SWEEP_KEY}", acc_panels
            ),
            save_figure(
                out,
                "claim4_dead_relus.png",
                "Fraction of the ReLU network's hidden units that are dead (zero on every scored validation image, "
                "eval mode) during training; mean and min-max band over seeds.",
                dead_panels,
            ),
        ],
    )
