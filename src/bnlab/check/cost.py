"""What the stored statistics cost: held-out inputs scored with them and with statistics recomputed from other inputs.

This judges stale statistics by their effect, on any model (recurrent per-step tables included), rather
than by how far some layer's numbers moved: a drift that changes no prediction is harmless, and many
small drifts can add up to a large loss. rules.py (``stale-stats``) gives the thresholds and why.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bnlab.check.report import Finding, StatisticsCost
from bnlab.check.rules import ACCURACY_LOSS, CHANGED_LIMIT, ERROR_SHARE, NOISE_FACTOR, NOISE_Z, OUTPUT_LIMIT

__all__ = ["measures_accuracy", "score", "stale_finding", "statistics_cost"]

SCORING_BATCH = 512  # eval mode: the batch size changes no output, only the speed


def score(model: nn.Module, inputs: Tensor) -> Tensor:
    """The model's outputs for ``inputs`` (as float32), in batches, in the mode it is in (eval, for this)."""
    return torch.cat([model(inputs[i : i + SCORING_BATCH]).float() for i in range(0, len(inputs), SCORING_BATCH)])


def _classifier(outputs: Tensor) -> bool:
    """Outputs (N, classes): class scores, whose largest is the prediction."""
    return outputs.dim() == 2 and outputs.shape[1] > 1


def measures_accuracy(outputs: Tensor, labels: Tensor | None) -> bool:
    """Whether the cost can be measured in accuracy: class scores, and a label per sample."""
    return _classifier(outputs) and labels is not None and labels.shape == outputs.shape[:1]


def statistics_cost(
    stored: Tensor, recomputed: Tensor, labels: Tensor | None, recomputed_again: Tensor | None = None
) -> StatisticsCost:
    """Compare the outputs of the same held-out inputs with the stored and with the recomputed statistics.

    With labels and class scores: accuracy, against a floor, the model's own errors and the paired
    noise. Otherwise ``recomputed_again`` (outputs with statistics recomputed from yet other inputs)
    is required: how much two recomputations differ is the noise the stored statistics are judged by.
    """
    if measures_accuracy(stored, labels):
        right_stored, right_recomputed = stored.argmax(1) == labels, recomputed.argmax(1) == labels
        n = len(labels)
        only_recomputed = int((right_recomputed & ~right_stored).sum())
        only_stored = int((right_stored & ~right_recomputed).sum())
        # the paired difference's standard error: only inputs one of the two gets right carry information
        noise = math.sqrt(max(only_recomputed + only_stored - (only_recomputed - only_stored) ** 2 / n, 0.0)) / n
        accuracy_stored = right_stored.float().mean().item()
        accuracy_recomputed = right_recomputed.float().mean().item()
        return StatisticsCost(
            "accuracy",
            loss=accuracy_recomputed - accuracy_stored,
            limit=max(ACCURACY_LOSS, ERROR_SHARE * (1 - accuracy_recomputed), NOISE_Z * noise),
            stored=accuracy_stored,
            recomputed=accuracy_recomputed,
            noise=noise,
        )
    if recomputed_again is None:
        raise ValueError("without labels, the noise comes from a second recomputation: pass recomputed_again")
    metric, limit, difference = (
        ("changed predictions", CHANGED_LIMIT, _changed)
        if _classifier(stored)
        else ("output change", OUTPUT_LIMIT, _moved)
    )
    loss, noise = difference(stored, recomputed), difference(recomputed_again, recomputed)
    return StatisticsCost(metric, loss=loss, limit=max(limit, NOISE_FACTOR * noise), noise=noise)


def _changed(outputs: Tensor, reference: Tensor) -> float:
    """The share of predicted classes that differ."""
    return (outputs.argmax(1) != reference.argmax(1)).float().mean().item()


def _moved(outputs: Tensor, reference: Tensor) -> float:
    """How far the outputs are from the reference, relative to the reference's spread over the samples."""
    moved = torch.linalg.vector_norm(torch.nan_to_num(outputs - reference, nan=math.inf)).item()
    spread = torch.linalg.vector_norm(reference - reference.mean(0)).item()
    return moved / spread if spread > 0 else (0.0 if moved == 0 else math.inf)


def stale_finding(cost: StatisticsCost, drift: dict[str, float]) -> Finding | None:
    """stale-stats when the cost is over its limit, naming the layers whose statistics drifted most."""
    if not cost.stale:
        return None
    evidence = cost.describe()
    most = sorted(drift.items(), key=lambda item: -item[1])[:3]
    if most:
        layers = ", ".join(f"{name} ({value:.2f})" for name, value in most)
        evidence += f"; drifted most (median channel's max(shift, stretch)): {layers}"
    return Finding("stale-stats", None, evidence)
