"""Scoring a network: loss, accuracy, the one-at-a-time check, dead units. Always in eval mode, modes restored."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.data import Split


def loss_fn(kind: str, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Loss of (N, classes) logits against (N,) integer labels: the mean over samples, or with ``reduction="sum"``
    their sum (a shard's part of a larger batch's mean; 0 for no samples)."""
    if kind == "sigmoid":  # the notebook: mean over N x classes of sigmoid CE against one-hot
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        if reduction == "sum":  # each sample's mean over the classes, summed
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[1]
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, labels, reduction=reduction)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; every module's own mode is put back after, even on error."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def evaluate(model: nn.Module, split: Split, loss: str = "sigmoid", chunk: int = 256) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split in eval mode.

    Chunks of a few hundred images keep activations in cache: on a 2-core CPU, 256 scores the
    5,000 validation images about twice as fast as 2,500.
    """
    with eval_mode(model), torch.inference_mode():
        total_loss = torch.zeros((), device=split.labels.device)
        correct = torch.zeros((), device=split.labels.device, dtype=torch.long)
        for start in range(0, len(split), chunk):
            images, labels = split.images[start : start + chunk], split.labels[start : start + chunk]
            logits = model(images)
            total_loss += loss_fn(loss, logits, labels) * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum()
    n = len(split)
    return total_loss.item() / n, correct.item() / n


def one_at_a_time_accuracy(model: nn.Module, split: Split, count: int = 100) -> float:
    """Accuracy on the first ``count`` samples, each classified alone (batch of one, eval mode)."""
    count = min(count, len(split))
    correct = 0
    with eval_mode(model), torch.inference_mode():
        for i in range(count):
            logits = model(split.images[i : i + 1])
            correct += int(logits.argmax(1).item() == split.labels[i].item())
    return correct / count if count else float("nan")


class UnitPeaks:
    """Each hidden unit's largest output over an evaluation pass (a unit: a dense feature or a conv
    channel); a ReLU unit whose largest output is zero is dead for that data."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = blocks
        self.peaks: list[Tensor | None] = [None] * len(blocks)

    def __enter__(self) -> UnitPeaks:
        self.handles = [b.register_forward_hook(partial(self._record, i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _record(self, index: int, _module: nn.Module, _inputs: Any, output: Tensor) -> None:
        peak = output.amax(dim=[d for d in range(output.dim()) if d != 1])
        previous = self.peaks[index]
        self.peaks[index] = peak if previous is None else torch.maximum(previous, peak)

    def dead_fraction(self) -> float:
        peaks = [p for p in self.peaks if p is not None]
        return sum(int((p <= 0).sum()) for p in peaks) / sum(p.numel() for p in peaks)
