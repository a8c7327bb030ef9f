"""A trained network's scores: validation, test and one-at-a-time accuracy, with the statistics it stores and
with precise ones recomputed from training images, and the lines that print them.

The end of a notebook-cadence run (``final_scores``), ``bnlab evaluate`` and ``bnlab recalibrate`` and the
precise-statistics panel all score through these, so their figures mean the same everywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bnlab.config import BATCH_NORMS, TrainConfig
from bnlab.data import MNIST, Split
from bnlab.nn.precise import Recalibration, recalibrate
from bnlab.training.evaluate import evaluate, one_at_a_time_accuracy
from bnlab.training.result import RunResult

__all__ = ["final_scores", "precise_copy", "score_lines", "scores", "training_split"]


def training_split(config: TrainConfig, data: MNIST) -> Split:
    """The training images ``config`` trains on (the first ``train_size``, or all)."""
    return data.train.head(config.train_size)


def final_scores(
    config: TrainConfig, data: MNIST, train_split: Split, result: RunResult, line: Callable[[str], None]
) -> None:
    """Validation, test and one-at-a-time accuracy with the EMA statistics, then with precise ones."""
    model = result.model
    ema = scores(model, data, config.loss, config.one_at_a_time)
    result.validation_accuracy, result.test_accuracy = ema["validation_accuracy"], ema["test_accuracy"]
    result.one_at_a_time_accuracy = ema.get("one_at_a_time_accuracy")
    precise: dict[str, Any] = {}
    if config.bn in BATCH_NORMS and config.precise_samples:
        recalibrated, done = precise_copy(model, train_split, config.precise_samples, config.batch_size, config.seed)
        precise = {"samples": done.samples, "seconds": round(done.seconds, 3)}
        precise |= scores(recalibrated, data, config.loss, config.one_at_a_time)
        line(f"Precise statistics: recomputed from {done.samples:,} training images in {done.seconds:.2f} s")
    result.precise = precise or None

    for text in score_lines(ema, precise, config.one_at_a_time):
        line(text)


def score_lines(
    scores: dict[str, float], precise: dict[str, Any] | None, one_at_a_time: int, kind: str = "EMA", final: bool = True
) -> list[str]:
    """The notebook's final lines, each score followed by its precise counterpart when there is one."""
    labels = {
        "validation_accuracy": ("Final validation accuracy" if final else "Validation accuracy", 5),
        "test_accuracy": ("Final test accuracy" if final else "Test accuracy", 5),
        "one_at_a_time_accuracy": (f"Accuracy on {one_at_a_time} samples", 2),
    }
    lines = []
    for key, (label, digits) in labels.items():
        if key in scores:
            text = f"{label}: {scores[key]:>3.{digits}f}"
            if precise and key in precise:
                text += f" ({kind} statistics), {precise[key]:.{digits}f} (precise)"
            lines.append(text)
    return lines


def scores(model: nn.Module, data: MNIST, loss: str, one_at_a_time: int) -> dict[str, float]:
    """Validation and test accuracy, and the first ``one_at_a_time`` test images classified alone."""
    out = {
        "validation_accuracy": evaluate(model, data.validation, loss)[1],
        "test_accuracy": evaluate(model, data.test, loss)[1],
    }
    if one_at_a_time:
        out["one_at_a_time_accuracy"] = one_at_a_time_accuracy(model, data.test, one_at_a_time)
    return out


def precise_copy(
    model: nn.Module, train_split: Split, samples: int, batch_size: int, seed: int
) -> tuple[nn.Module, Recalibration]:
    """A copy of ``model`` with precise statistics from ``samples`` training images (a fixed draw for ``seed``)."""
    precise = copy.deepcopy(model)
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))
    images = train_split.images[order[:samples].to(train_split.images.device)]
    return precise, recalibrate(precise, images, samples=samples, batch_size=batch_size)
