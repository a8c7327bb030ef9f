"""What a training step costs, measured so that load cannot flip a comparison: the arms interleaved.

A run's wall-clock time depends on the machine and on everything else it runs: timed one after the
other, two arms of a comparison see different neighbours, and a 1.3x cost ratio reads as 3x on a busy
day. So the lab never times runs. It counts steps (to a threshold, within a budget), and it measures
each arm's cost per step here, all arms of a comparison in one process, taking turns in short slices
over many rounds: whatever the load does in a round, it does to every arm alike, and the per-round
ratio between arms keeps its value. Time is then steps x cost, at the median cost over rounds.

A slice is ``fit`` on the arm's network as a single run trains (``runner.prepare``: channels_last,
fused Adam, bnlab's kernels), at one thread as the lab's workers train, continuing from the previous
slice: the cost of a step of one run alone on one core of this machine, whatever engine trained the
lab's runs. Each arm is charged the reference arm's median cost times its paired ratio (``charged``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bnlab.config import TrainConfig
from bnlab.data import MNIST
from bnlab.training.loop import fit
from bnlab.training.runner import prepare
from bnlab.training.work import num_threads

__all__ = ["ROUNDS", "SLICE_STEPS", "StepCost", "charged", "interleaved_costs", "method"]

ROUNDS = 9  # rounds of the arms taking turns: enough for a median and a spread
SLICE_STEPS = 20  # steps per slice: short against the load's swings, long against timer and switch overhead


def method(rounds: int = ROUNDS, slice_steps: int = SLICE_STEPS) -> str:
    """How the costs were measured, in words, for reports."""
    return f"{rounds} rounds of {slice_steps}-step slices, the arms taking turns in one process"


@dataclass(frozen=True)
class StepCost:
    """One arm's seconds per training step, one figure per round (its slices timed between the other arms')."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def ratio(self, other: StepCost) -> tuple[float, float, float]:
        """(median, min, max) over rounds of this cost over ``other``'s, round by round (a paired ratio)."""
        ratios = [a / b for a, b in zip(self.seconds, other.seconds, strict=True)]
        return statistics.median(ratios), min(ratios), max(ratios)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.seconds), "max": max(self.seconds), "rounds": list(self.seconds)}


def charged(costs: Mapping[str, StepCost], reference: str) -> dict[str, float]:
    """The seconds per step each arm is charged: the ``reference`` arm its median over rounds, every other arm
    that times the median of its round-by-round ratio to the reference. The ratio, not each arm's own median,
    is what load cannot move: a round's load hits both arms of the round alike and cancels in their ratio,
    where two medians taken apart can fall in different rounds, even in different regimes of a busy machine."""
    base = costs[reference].median
    return {arm: base if arm == reference else base * cost.ratio(costs[reference])[0] for arm, cost in costs.items()}


def interleaved_costs(
    configs: Mapping[str, TrainConfig],
    data: MNIST,
    device: torch.device,
    *,
    rounds: int = ROUNDS,
    slice_steps: int = SLICE_STEPS,
    warmup: int = 5,
    threads: int = 1,
) -> dict[str, StepCost]:
    """Each config's seconds per training step, the configs taking turns: every round trains ``slice_steps``
    steps of each in turn (the order rotated each round), after ``warmup`` steps of each (allocations,
    caches). A network that diverges is built again and its slice goes on. At ``threads`` torch threads: one,
    as the lab's workers train (and on a busy 2-core machine two threads swing between regimes)."""
    with num_threads(threads):
        return _interleaved(configs, data, device, rounds, slice_steps, warmup)


def _interleaved(
    configs: Mapping[str, TrainConfig], data: MNIST, device: torch.device, rounds: int, slice_steps: int, warmup: int
) -> dict[str, StepCost]:
    names = list(configs)
    prepared = {name: prepare(config, data, device) for name, config in configs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in names}

    def steps(name: str, count: int) -> float:
        taken = elapsed = 0.0
        for _ in range(count):  # a slice that diverges is finished on a fresh network: a step costs what it costs
            state, batches = prepared[name]
            if state.stop is not None:
                prepared[name] = state, batches = prepare(configs[name], data, device)
            before, done = state.clock, state.step
            fit(state, batches, steps=state.step + int(count - taken), loss=configs[name].loss)
            taken, elapsed = taken + state.step - done, elapsed + state.clock - before
            if taken >= count:
                return elapsed / taken
        raise RuntimeError(f"{name}: its network diverges within every step; a cost needs a network that trains")

    for name in names:
        steps(name, warmup)
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            seconds[name].append(steps(name, slice_steps))
    return {name: StepCost(tuple(times)) for name, times in seconds.items()}
