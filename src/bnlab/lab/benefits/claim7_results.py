"""Claim 7: batch norm may give better results overall, each arm at its own best learning rate."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

from bnlab.lab.benefits.arms import ARMS, PLAIN, WITH_BN, Lab, Lookup
from bnlab.lab.benefits.evidence import (
    Claim,
    ClaimResult,
    Experiment,
    accuracy_ylim,
    curve_panel,
    make_table,
    mean_text,
    range_text,
    save_figure,
    spread_text,
)
from bnlab.lab.benefits.networks import NOTEBOOK_CONVNET, PAPER_MLP, conv_eval_images
from bnlab.lab.benefits.sweeps import Sweep, rows_by_value
from bnlab.lab.benefits.verdicts import ACCURACY_MARGIN, Comparison
from bnlab.lab.curves import best

CLAIM = Claim(7, "Better results", "It may give better results overall.")


def experiment(lab: Lab) -> Experiment:
    budget = lab.budget
    models = {
        "MLP": replace(PAPER_MLP, eval_every=budget.best_eval_every[0], seconds=budget.best_seconds[0]),
        "ConvNet": replace(
            NOTEBOOK_CONVNET,
            eval_every=budget.best_eval_every[1],
            seconds=budget.best_seconds[1],
            eval_size=budget.conv_eval_size,
        ),
    }
    adam = {name: replace(spec, optimizer="adam", batches=10**9) for name, spec in models.items()}  # the clock stops
    sweep = Sweep.over(adam, budget.best_lrs, lambda spec, lr: replace(spec, lr=lr))
    return Experiment(CLAIM.number, lab.jobs(sweep.all_specs()), partial(analyse, lab, sweep))


def analyse(lab: Lab, sweep: Sweep, get: Lookup, out: Path) -> ClaimResult:
    budget = lab.budget
    comparisons, rows, choice_rows, panels, heads = [], [], [], [], []
    for name, at in sweep.runs(lab, get).items():
        seconds = sweep.specs[name][0].seconds
        chosen = {  # per seed, the run at the learning rate that did best
            arm: [max((runs[i] for runs in per_lr), key=best) for i in range(len(lab.seeds))]
            for arm, per_lr in at.items()
        }
        scores = {arm: [best(r) for r in runs] for arm, runs in chosen.items()}
        comparisons.append(
            Comparison.of_arms(
                f"{name}: best validation accuracy in {seconds:g} s of training", scores, margin=ACCURACY_MARGIN
            )
        )
        heads.append(f"{name} {mean_text(scores[WITH_BN])} with BN vs {mean_text(scores[PLAIN])} without")
        rows += rows_by_value(name, [f"{lr:g}" for lr in budget.best_lrs], at, best)
        choice_rows += [
            (
                name,
                arm,
                range_text([r.config.lr for r in runs]),
                spread_text(scores[arm]),
                spread_text([float(r.batches_done) for r in runs], 0),
                spread_text([r.seconds_per_batch * 1000 for r in runs], 2),
            )
            for arm, runs in chosen.items()
        ]
        panels.append(
            curve_panel(
                f"{name}: at each arm's best learning rate",
                chosen,
                x="seconds",
                ylim=accuracy_ylim(scores[WITH_BN] + scores[PLAIN]),
            )
        )
    return ClaimResult(
        CLAIM,
        setup=(
            f"Two networks under the same training-time budget per run: the paper's MLP (ReLU, batches of 60, "
            f"softmax cross-entropy) for {budget.best_seconds[0]:g} s and the notebook's ConvNet (batches of 64, "
            f"sigmoid cross-entropy; scored on {conv_eval_images(budget)}) for {budget.best_seconds[1]:g} s, "
            f"both with Adam at each of {', '.join(f'{lr:g}' for lr in budget.best_lrs)}. Each arm keeps, per seed, "
            "its own best learning rate; its score is the best validation accuracy it reached within the budget."
        ),
        rule=(
            "For each network: BN wins a seed when its best validation accuracy beats the best without BN by "
            f"more than {ACCURACY_MARGIN:g}."
        ),
        comparisons=comparisons,
        headline="best validation accuracy: " + "; ".join(heads),
        tables=[
            (
                "Best validation accuracy within the budget, by learning rate",
                make_table(["network", "learning rate", *ARMS], rows),
            ),
            (
                "Each arm at its own best learning rate",
                make_table(
                    ["network", "arm", "best lr", "best validation accuracy", "batches in budget", "ms/batch"],
                    choice_rows,
                ),
            ),
        ],
        figures=[
            save_figure(
                out,
                "claim7_best.png",
                "Validation accuracy by training time, each arm at its own best learning rate (one line per seed).",
                panels,
            )
        ],
        notes=[
            "The learning rate is chosen on the same validation images the accuracy is reported on, which "
            "flatters both arms alike. A time budget makes the number of batches depend on the machine and its "
            "load, so these runs are not repeatable bit for bit."
        ],
    )
