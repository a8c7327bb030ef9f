"""``batch_norm``, the functional form every bnlab layer calls: it picks the operator that keeps the running statistics.

In training (or without running statistics) the batch statistics normalize x, through
``bnlab::batch_norm_train`` or, given a ``process_group`` of several processes, the synchronized
version in ``sync.py``; ``running_mean``/``running_var``, when given, then follow the batch's::

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (M values per feature)

(PyTorch's ``momentum`` is ``1 - decay`` in TensorFlow's terms.) The ``M / (M - 1)`` factor makes
the running variance unbiased, as PyTorch keeps it; ``unbiased_running_var=False`` keeps the biased
one, as the notebook's ``tf.nn.moments`` does. In evaluation ``bnlab::batch_norm_eval`` normalizes
with the running statistics, so a sample's output does not depend on the rest of its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bnlab.nn import (
    batching,  # noqa: F401 (registers their vmap rules)
    ops,  # noqa: F401 (registers the bnlab:: operators called below)
    statistics,
    sync,
)

__all__ = ["StatisticsObserver", "batch_norm", "local_batch_norm", "normalize_by_batch"]

StatisticsObserver = Callable[[int, Tensor, Tensor, Tensor, Tensor], None]
"""observer(count, mean, var, running_mean, running_var): takes a training call's batch statistics (``count``
values per feature, float64 mean and biased variance) in place of the running-statistics update, with the
buffers they would have updated (``bnlab.recalibrate`` pools them exactly)."""


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    unbiased_running_var: bool = True,
    relu: bool = False,
    process_group: Any | None = None,
    observer: StatisticsObserver | None = None,
) -> Tensor:
    """Batch-normalize x of shape (N, C, *) over every axis but C.

    ``relu`` applies a ReLU to the result in the same pass. ``process_group``: in training, the
    statistics are those of every process's x together (see ``sync.py``). ``observer``: in training
    with running statistics, the batch's statistics go to it (this process's alone) and the running
    ones stay as they are.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects input of shape (N, C, *), got shape {tuple(x.shape)}")
    if observer is not None and training and running_mean is not None and running_var is not None:
        return observed_batch_norm(x, running_mean, running_var, weight, bias, eps, relu, observer)
    batch_statistics = training or running_mean is None or running_var is None
    if not (batch_statistics and sync.is_distributed(process_group)):
        return local_batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum, eps, unbiased_running_var, relu
        )
    y, stats, count = normalize_by_batch(x, weight, bias, eps, relu, process_group)
    if training and running_mean is not None and running_var is not None:
        statistics.running_update(running_mean, running_var, stats, count, momentum, unbiased_running_var)
    return y


def local_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    unbiased_running_var: bool,
    relu: bool,
) -> Tensor:
    """``batch_norm`` on this process's batch alone; positional, and TorchScript-compatible for the layers."""
    if not training and running_mean is not None and running_var is not None:
        return torch.ops.bnlab.batch_norm_eval(x, weight, bias, running_mean, running_var, eps, relu)
    update = training and running_mean is not None and running_var is not None
    y, _ = torch.ops.bnlab.batch_norm_train(
        x, weight, bias, running_mean if update else None, running_var if update else None, momentum, eps,
        unbiased_running_var, relu,
    )  # fmt: skip
    return y


def observed_batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
    observer: StatisticsObserver,
) -> Tensor:
    """x normalized with its batch statistics, which go to ``observer`` instead of into the running ones."""
    y, stats, count = normalize_by_batch(x, weight, bias, eps, relu)
    observer(count, stats[0], stats[1], running_mean, running_var)
    return y


def normalize_by_batch(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool, process_group: Any | None = None
) -> tuple[Tensor, Tensor, int]:
    """(y, stats, count): x normalized with its batch statistics (over ``process_group``'s processes, given one),
    those statistics, float64 (3, C), and the values per feature they were taken over. No running statistics
    change: the caller decides what follows them (the layers of the batch-norm family do)."""
    if sync.is_distributed(process_group):
        return sync.sync_batch_norm(x, weight, bias, eps, relu, process_group)
    y, stats = torch.ops.bnlab.batch_norm_train(x, weight, bias, None, None, 0.0, eps, True, relu)
    return y, stats, statistics.values_per_feature(x)
