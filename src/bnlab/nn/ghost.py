"""Ghost batch norm (Hoffer et al. 2017): ``GhostBatchNorm1d/2d/3d``, batch norm over virtual sub-batches.

In training, a batch of N samples is cut into virtual batches of ``virtual_batch_size`` consecutive samples
(Hoffer et al.'s chunks), and each is normalized by its own statistics: the noise of a small batch, with a
large batch's throughput. Keras 2's ``virtual_batch_size`` interleaves instead (its virtual batch j holds
samples j, j + N/v, ...): the same in distribution for a shuffled batch, not in its numbers. The virtual
batches are computed as one call of bnlab's batch-norm operator, side by side along the feature axis
(``batching.merge_members``, the layout of bnlab's vmap rule).

Uneven batches: N = q * v + r. The r samples left over form one more, smaller virtual batch if they are at
least half a virtual batch; fewer (or a single value per feature, over which no statistics can be taken) join
the virtual batch before them: their statistics would be far noisier than the rest's. A batch of v
samples or fewer is one virtual batch, which is batch norm itself.

Running statistics: one update per training call, by ``momentum`` as in batch norm, towards the virtual
batches' average statistics (``statistics.mean_of_moments``): the whole batch's mean, and the average
within-virtual-batch variance (each made unbiased first, with ``unbiased_running_var``), which is what the
training normalization divided by. (The whole batch's variance also counts the spread between the virtual
batches' means: the same in expectation for i.i.d. batches, larger for batches drawn from few classes.)
``bnlab.recalibrate`` sets the population's exact mean and variance instead, as for any batch-norm layer.
Evaluation is batch norm with the running statistics (without them, ``track_running_stats=False``, with the
whole batch's statistics, as batch norm).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnlab.nn import batching, functional, statistics
from bnlab.nn.batchnorm import _BatchNorm, whole_number

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "virtual_batches"]


def virtual_batches(samples: int, size: int, values_per_sample: int) -> tuple[int, int]:
    """(the number of full virtual batches, the samples of the last, uneven one: 0 if none) for a batch of
    ``samples`` cut into virtual batches of ``size``. A remainder of under half a virtual batch, or of one value
    per feature, joins the virtual batch before it: its statistics would be far noisier than the others'.
    """
    full, rest = divmod(samples, size)
    if rest and full and (2 * rest < size or rest * values_per_sample < 2):
        return full - 1, size + rest
    return full, rest


class _GhostBatchNorm(_BatchNorm):
    """Shared by GhostBatchNorm1d/2d/3d: ``bnlab.BatchNorm*``'s constructor and state, and ``virtual_batch_size``."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        virtual_batch_size: int,
        **options: Any,
    ) -> None:
        virtual_batch_size = whole_number("virtual_batch_size", virtual_batch_size, 2)
        if options.get("process_group") is not None:
            raise ValueError(
                "ghost batch norm normalizes each virtual batch by its own statistics, so it has no synchronized "
                "form; for more samples per statistic use bnlab.BatchNorm* with process_group"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.process_group is not None:
            raise RuntimeError(f"{self._get_name()} has no synchronized form; set its process_group to None")
        if not self.training or x.shape[0] <= self.virtual_batch_size:
            return super().forward(x)
        size, features = self.virtual_batch_size, x.shape[1]
        per_sample = int(x[0].numel()) // features  # ints, also while tracing (which fixes the batch size)
        full, rest = virtual_batches(int(x.shape[0]), size, per_sample)
        outputs, stats, counts = [], [], []
        if full:  # the full virtual batches as one call: members' features side by side
            block = x[: full * size].reshape(full, size, *x.shape[1:])
            weight = None if self.weight is None else self.weight.repeat(full)
            bias = None if self.bias is None else self.bias.repeat(full)
            y, s, _ = functional.normalize_by_batch(
                batching.merge_members(block, 0, full), weight, bias, self.eps, self.fused_relu
            )  # fmt: skip
            outputs.append(batching.split_members(y, full).movedim(1, 0).reshape(full * size, *x.shape[1:]))
            stats.append(s.view(3, full, features))
            counts += [size * per_sample] * full
        if rest:
            y, s, count = functional.normalize_by_batch(
                x[full * size :], self.weight, self.bias, self.eps, self.fused_relu
            )  # fmt: skip
            outputs.append(y)
            stats.append(s.view(3, 1, features))
            counts.append(count)
        means, variances = torch.cat(stats, 1)[:2].unbind(0)  # each (K, C)
        per_batch = torch.tensor(counts, dtype=torch.float64, device=x.device)[:, None].expand_as(means)
        if self.observer is not None and self.running_mean is not None:  # recalibration: the whole batch's moments
            total, mean, var = statistics.combine_moments(per_batch, means, variances)
            self.observer(int(total[0]), mean, var, self.running_mean, self.running_var)
        else:
            momentum = self._count_batch()
            if self.track_running_stats and self.running_mean is not None:
                mean, var = statistics.mean_of_moments(per_batch, means, variances, self.unbiased_running_var)
                statistics.running_update(
                    self.running_mean, self.running_var, torch.stack([mean, var]), sum(counts), momentum, False
                )  # fmt: skip
        return torch.cat(outputs)

    def __prepare_scriptable__(self) -> _GhostBatchNorm:
        raise RuntimeError(
            f"torch.jit.script: {self._get_name()} is not scriptable (its virtual batches are cut in Python); use "
            "torch.jit.trace, torch.export or torch.compile, or script an inference copy converted to batch norm "
            "(bnlab.convert(copy, 'manual')): in eval mode the two are the same"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm for input (N, C) or (N, C, L)."""

    _input_dims = (2, 3)
    _input_text = "2D or 3D"


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm for input (N, C, H, W)."""

    _input_dims = (4,)
    _input_text = "4D"


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost batch norm for input (N, C, D, H, W)."""

    _input_dims = (5,)
    _input_text = "5D"
