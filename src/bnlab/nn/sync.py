"""Synchronized batch norm: every process normalizes with the statistics of the whole distributed batch.

One collective per layer per direction. Forward: an all_gather of each process's (count, mean,
biased var), pooled exactly by ``statistics.combine_moments``. Backward: an all_reduce of the two
per-feature sums, ``sum(dz)`` and ``sum(dz * xhat)``, after which each process computes its slice
of dx with the global count. Parameter gradients stay local sums, as DistributedDataParallel
expects (it averages them).

Processes may hold different numbers of samples, zero included: a process with an empty batch
still joins both collectives with count 0, so its peers never wait for it in vain (the deadlock
of ``nn.SyncBatchNorm``'s early versions). One sample per process is enough when the group holds
more than one value per feature.

Unlike ``nn.SyncBatchNorm`` this runs on any device and backend (gloo on CPU, nccl on CUDA).
Collectives cannot be recorded by ``torch.jit.trace`` or ``torch.export``, so both are refused
with a message; ``torch.compile`` runs this part eagerly (a graph break).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bnlab.nn import statistics


def is_distributed(process_group: Any | None) -> bool:
    """True when ``process_group`` spans more than this process."""
    return process_group is not None and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _refuse_tracing() -> None:
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        raise RuntimeError(
            "bnlab batch norm with a process_group cannot be traced or exported: its collectives are not "
            "graph operations. Trace or export the model for inference (model.eval()), or without process_group."
        )


def global_moments(x: Tensor, process_group: Any) -> tuple[int, Tensor, Tensor]:
    """(count, mean, biased var) per feature over every process's x; one all_gather."""
    mean, var = statistics.moments(x)
    local = torch.stack([torch.full_like(mean, statistics.values_per_feature(x)), mean, var])  # (3, C) float64
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    counts, means, variances = torch.stack(gathered).unbind(1)  # each (world, C)
    total, mean, var = statistics.combine_moments(counts, means, variances)
    return int(total[0]), mean, var


class SyncBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over a process group; returns y, stats and the global count (0-dim)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu, process_group):  # type: ignore[override]
        _refuse_tracing()
        count, mean, var = global_moments(x, process_group)
        if count <= 1:
            raise ValueError(
                f"batch norm over the process group needs more than one value per feature; the group's "
                f"processes hold {count} in all (this one's input has shape {tuple(x.shape)})."
            )
        stats = statistics.make_stats(mean, var, eps)
        y = statistics.normalize(x, weight, bias, stats[0], stats[2], relu)
        ctx.save_for_backward(x, weight, stats, y if relu else None)
        ctx.count, ctx.group = count, process_group
        total = torch.tensor(count)
        ctx.mark_non_differentiable(stats, total)
        return y, stats, total

    @staticmethod
    def backward(ctx, dy, _dstats, _dcount):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "bnlab batch norm: double backward across a process group is not supported; compute higher "
                "derivatives on a single process."
            )
        x, weight, stats, y = ctx.saved_tensors
        dz, sum_dz, sum_dz_xhat = statistics.gradient_sums(x, stats, dy, y)
        grad_dtype = statistics.parameter_dtype(x, weight)  # as the local path: mixed precision keeps its range
        dweight, dbias = sum_dz_xhat.to(grad_dtype), sum_dz.to(grad_dtype)  # local: DDP reduces parameter gradients
        both = torch.stack([sum_dz, sum_dz_xhat])
        dist.all_reduce(both, group=ctx.group)
        dx = statistics.input_gradient(x, weight, stats, dz, *both.unbind(0), ctx.count)
        needs = ctx.needs_input_grad
        return dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None, None, None, None


@torch.compiler.disable
def sync_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool, process_group: Any
) -> tuple[Tensor, Tensor, int]:
    """(y, stats, global count) of training-mode batch norm over ``process_group``."""
    y, stats, count = SyncBatchNorm.apply(x, weight, bias, eps, relu, process_group)
    return y, stats, int(count)
