"""Claim 1: networks train faster with batch norm, in wall-clock training time, though each step costs more."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from functools import partial
from pathlib import Path

from bnlab.config import TrainConfig
from bnlab.lab.benefits.arms import ARMS, PLAIN, WITH_BN, Lab, Lookup
from bnlab.lab.benefits.budgets import Budget
from bnlab.lab.benefits.evidence import (
    Claim,
    ClaimResult,
    Experiment,
    cost_text,
    curve_panel,
    make_table,
    ratio_text,
    save_figure,
    spread_text,
    time_panel,
)
from bnlab.lab.benefits.networks import NOTEBOOK_CONVNET, PAPER_MLP, RECIPES, conv_eval_images
from bnlab.lab.benefits.verdicts import SPEEDUP_MARGIN, Comparison
from bnlab.lab.curves import first_reaching
from bnlab.lab.step_cost import StepCost, charged, method
from bnlab.training import RunResult

CLAIM = Claim(
    1, "Networks train faster", "Networks train faster (each iteration is slower, but convergence comes much sooner)."
)
THRESHOLDS = (0.90, 0.95, 0.97)  # validation accuracies to reach


def convnet(budget: Budget) -> TrainConfig:
    """The notebook's ConvNet and procedure for ``budget``: claim 1's runs, and claim 7's at its lr of 0.002."""
    return replace(
        NOTEBOOK_CONVNET,
        batches=budget.speed_batches[1],
        eval_every=budget.speed_eval_every[1],
        eval_size=budget.conv_eval_size,
    )


def experiment(lab: Lab) -> Experiment:
    budget = lab.budget
    setups = {
        "MLP": replace(
            PAPER_MLP,
            activation="sigmoid",
            **RECIPES["SGD"],
            batches=budget.speed_batches[0],
            eval_every=budget.speed_eval_every[0],
        ),
        "ConvNet": convnet(budget),
    }
    return Experiment(
        CLAIM.number, lab.jobs(list(setups.values())), partial(analyse, lab, setups), costs=lab.cost_setups(setups)
    )


def analyse(
    lab: Lab, setups: dict[str, TrainConfig], get: Lookup, out: Path, costs: dict[str, dict[str, StepCost]]
) -> ClaimResult:
    budget = lab.budget
    comparisons, rows, cost_rows, panels, heads = [], [], [], [], []
    for name, spec in setups.items():
        arms = lab.arms(get, spec)
        cost = costs[name]
        per_step = charged(cost, PLAIN)
        for threshold in THRESHOLDS:
            steps = {arm: [steps_to(r, threshold) for r in arms[arm]] for arm in ARMS}
            secs = {arm: [n * per_step[arm] for n in steps[arm]] for arm in ARMS}
            rows.append(
                (
                    name,
                    f"{threshold:.0%}",
                    *(spread_text(v, 0, "never") for v in steps.values()),
                    *(spread_text(v, 2, "never") for v in secs.values()),
                )
            )
            reached = [math.isfinite(a) or math.isfinite(b) for a, b in zip(*secs.values(), strict=True)]
            if any(reached):
                comparisons.append(
                    Comparison.of_arms(
                        f"{name}: training seconds to {threshold:.0%} validation accuracy",
                        secs,
                        kind="ratio",
                        higher_is_better=False,
                        margin=SPEEDUP_MARGIN,
                        counts=all(reached),  # a seed where neither arm got there says nothing about speed
                    )
                )
        ratio = cost[WITH_BN].ratio(cost[PLAIN])
        cost_rows.append((name, *(cost_text(cost[arm]) for arm in ARMS), ratio_text(ratio)))
        hlines = {"hlines": THRESHOLDS, "ylim": (0, 1.02)}
        panels += [
            curve_panel(f"{name}: validation accuracy by batch", arms, **hlines),
            time_panel(f"{name}: validation accuracy by training time", arms, per_step, **hlines),
        ]
        heads.append(speed_headline(name, arms, per_step, ratio[0]))
    return ClaimResult(
        CLAIM,
        setup=(
            f"Two setups, each trained without and with BN from the same initial weights on the same batches. "
            f"**MLP**: the paper's MLP with its sigmoid units, plain SGD at 0.1, "
            f"{budget.speed_batches[0]} batches of 60, scored on the 5,000 validation images every "
            f"{budget.speed_eval_every[0]} batches. **ConvNet**: the notebook's network and procedure (19 conv "
            f"layers, Adam 0.002, batches of 64, sigmoid cross-entropy), {budget.speed_batches[1]} batches, scored "
            f"on {conv_eval_images(budget)} every {budget.speed_eval_every[1]} batches. Time is training steps "
            f"x the arm's cost per step, measured interleaved ({method(*budget.cost_slices)}), so the "
            "neighbours' load cannot flip it."
        ),
        rule=(
            "For each setup and each accuracy threshold: BN wins a seed when the time without BN divided by "
            f"the time with BN exceeds {SPEEDUP_MARGIN:g}, i.e. BN gets there at least 10% sooner in training "
            "time, steps x cost per step (never reaching counts as infinitely late). A threshold is judged only "
            "when, in every seed, at least one arm reached it within the budget; one that neither arm reached in some "
            "seed is reported, not judged, since that seed says nothing about speed. The slower iteration is "
            "part of the claim, so it is reported, not judged."
        ),
        comparisons=comparisons,
        headline="; ".join(heads),
        tables=[
            (
                "Batches and training seconds to reach each validation accuracy (mean, min-max over seeds)",
                make_table(
                    ["setup", "accuracy", *(f"batches, {arm}" for arm in ARMS), *(f"seconds, {arm}" for arm in ARMS)],
                    rows,
                ),
            ),
            (
                f"Cost of one training step, measured interleaved ({method(*budget.cost_slices)}): median (min-max) "
                "over rounds; the ratio is taken round by round",
                make_table(["setup", *(f"ms/step, {arm}" for arm in ARMS), f"{WITH_BN} / {PLAIN}"], cost_rows),
            ),
        ],
        figures=[
            save_figure(
                out,
                "claim1_speed.png",
                "Validation accuracy by batch (mean and min-max band over seeds) and by training time (one line "
                "per seed); dotted lines at 90, 95 and 97%.",
                panels,
            )
        ],
    )


def steps_to(run: RunResult, accuracy: float) -> float:
    """Training steps until ``run`` first reached ``accuracy`` (at an evaluation); inf if never."""
    point = first_reaching(run, accuracy)
    return point["batch"] if point is not None else math.inf


def seconds_text(values: list[float]) -> str:
    """Mean seconds over the seeds that got there, and in how many seeds it never did."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "never"
    text = f"{statistics.fmean(finite):.1f} s"
    return text if len(finite) == len(values) else f"{text} (never in {len(values) - len(finite)}/{len(values)} seeds)"


def speed_headline(name: str, arms: dict[str, list[RunResult]], per_step: dict[str, float], ratio: float) -> str:
    """The highest threshold BN reached in every seed, and how long each arm took to get there."""
    text = f"a BN step costs {ratio:.2f}x, median of interleaved rounds"
    for threshold in reversed(THRESHOLDS):
        seconds = {arm: [steps_to(r, threshold) * per_step[arm] for r in runs] for arm, runs in arms.items()}
        if all(math.isfinite(s) for s in seconds[WITH_BN]):
            with_bn, without = seconds_text(seconds[WITH_BN]), seconds_text(seconds[PLAIN])
            return f"{name}: {threshold:.0%} after {with_bn} with BN vs {without} without ({text})"
    return f"{name}: BN did not reach {THRESHOLDS[0]:.0%} in every seed ({text})"
