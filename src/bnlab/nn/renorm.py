"""Batch renormalization (Ioffe 2017): ``BatchRenorm1d/2d/3d``, batch norm whose training output follows the
moving statistics, so that small or non-i.i.d. batches train the network that inference runs.

In training, with the batch's mean and sigma_B = sqrt(var + eps) and the moving mean and sigma::

    xhat = (x - mean_B) / sigma_B               (bnlab's batch-norm operator, no affine)
    y    = weight * (xhat * r + d) + bias        r, d: ``statistics.renorm_correction``, constants to backward

r = 1 and d = 0 is batch norm. Clipped to [1 / rmax, rmax] and [-dmax, dmax], they are opened over a warm-up
of ``warmup_steps`` training calls: ``warmup="step"`` keeps batch norm (bounds 1 and 0) for the whole warm-up
and then uses ``rmax``/``dmax``, as torchrl's ``BatchRenorm1d`` does with ``smooth=False``; ``"linear"``
widens the bounds from batch norm's to ``rmax``/``dmax`` in a straight line over the warm-up, the shape of
the paper's schedule (rmax 1 -> 3, dmax 0 -> 5). torchrl's ``smooth=True`` scales r - 1 and d themselves
instead of their bounds, so it differs from both.

The moving statistics that r and d compare the batch with are the running ones, which inference uses, as
torchrl keeps them; ``renorm_momentum`` gives them their own moving mean and sigma instead (Keras'
``renorm_momentum``: the running statistics still follow ``momentum``, for inference alone). In evaluation
this is batch norm with the running statistics. ``process_group`` synchronizes the batch statistics as in
``bnlab.BatchNorm*``; ``bnlab.recalibrate`` sets the running statistics exactly, and leaves a separate
renorm mean and sigma as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bnlab.nn import functional, statistics
from bnlab.nn.batchnorm import _BatchNorm, whole_number

__all__ = ["WARMUPS", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]

WARMUPS = ("step", "linear")


class _BatchRenorm(_BatchNorm):
    """Shared by BatchRenorm1d/2d/3d: ``bnlab.BatchNorm*``'s constructor, state and options, and renorm's own."""

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
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 10_000,
        warmup: str = "step",
        renorm_momentum: float | None = None,
        **options: Any,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                "batch renorm corrects the batch statistics towards the running ones, so it needs them: "
                "track_running_stats=False leaves none (use bnlab.BatchNorm* for that)"
            )
        if not (1.0 <= rmax < math.inf and 0.0 <= dmax < math.inf):
            raise ValueError(f"rmax must be at least 1 and dmax at least 0, both finite; got rmax={rmax}, dmax={dmax}")
        warmup_steps = whole_number("warmup_steps", warmup_steps, 0)
        if warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {', '.join(WARMUPS)}; got {warmup!r}")
        if renorm_momentum is not None and not 0.0 <= renorm_momentum <= 1.0:
            raise ValueError(f"renorm_momentum must be in [0, 1] or None; got {renorm_momentum}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, **options)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.warmup = warmup_steps, warmup
        self.renorm_momentum = renorm_momentum
        if renorm_momentum is not None:
            factory = {"device": device, "dtype": dtype}
            self.register_buffer("renorm_mean", torch.zeros(num_features, **factory))
            self.register_buffer("renorm_std", torch.ones(num_features, **factory))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.renorm_momentum is not None:
            self.renorm_mean.zero_()
            self.renorm_std.fill_(1.0)

    def bounds(self) -> tuple[Tensor, Tensor]:
        """(rmax, dmax) for the next training call, by the warm-up; tensors, so tracing and export follow the
        count of batches instead of baking in one call's value."""
        done = self.num_batches_tracked.double()
        if self.warmup_steps == 0:
            opened = torch.ones_like(done)
        elif self.warmup == "step":
            opened = (done >= self.warmup_steps).double()
        else:
            opened = (done / self.warmup_steps).clamp(max=1.0)
        return 1.0 + (self.rmax - 1.0) * opened, self.dmax * opened

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input(x)
        rmax, dmax = self.bounds()
        observer = self.observer
        momentum = 0.0 if observer is not None else self._count_batch()
        process_group = None if observer is not None else self.process_group
        xhat, stats, count = functional.normalize_by_batch(x, None, None, self.eps, False, process_group)
        if self.renorm_momentum is None:
            mean, std = self.running_mean, torch.sqrt(self.running_var.double() + self.eps)
        else:
            mean, std = self.renorm_mean, self.renorm_std
        r, d = statistics.renorm_correction(stats, mean, std, rmax, dmax)
        acc = statistics.compute_dtype(x)
        scale, shift = r.to(acc), d.to(acc)
        if self.weight is not None:
            scale, shift = self.weight.to(acc) * scale, self.weight.to(acc) * shift
        if self.bias is not None:
            shift = shift + self.bias.to(acc)
        y = torch.addcmul(statistics.per_feature(shift, x), xhat.to(acc), statistics.per_feature(scale, x))
        y = (y.relu() if self.fused_relu else y).to(x.dtype)
        if observer is not None:  # recalibration: the statistics go to it, nothing follows them here
            observer(count, stats[0], stats[1], self.running_mean, self.running_var)
            return y
        statistics.running_update(
            self.running_mean, self.running_var, stats, count, momentum, self.unbiased_running_var
        )  # fmt: skip
        if self.renorm_momentum is not None and count > 0:
            a = self.renorm_momentum
            self.renorm_mean.mul_(1 - a).add_(stats[0].to(self.renorm_mean.dtype), alpha=a)
            self.renorm_std.mul_(1 - a).add_((1.0 / stats[2]).to(self.renorm_std.dtype), alpha=a)
        return y

    def __prepare_scriptable__(self) -> _BatchRenorm:
        raise RuntimeError(
            f"torch.jit.script: {self._get_name()} is not scriptable (its training path calls the observer and the "
            "synchronized path, which TorchScript cannot compile); use torch.jit.trace, torch.export or "
            "torch.compile, or script an inference copy converted to batch norm (bnlab.convert(copy, 'manual'))"
        )

    def extra_repr(self) -> str:
        own = f"rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}, warmup={self.warmup!r}"
        if self.renorm_momentum is not None:
            own += f", renorm_momentum={self.renorm_momentum}"
        return f"{super().extra_repr()}, {own}"


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization for input (N, C) or (N, C, L); torchrl's ``BatchRenorm1d`` loads into it."""

    _input_dims = (2, 3)
    _input_text = "2D or 3D"


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization for input (N, C, H, W)."""

    _input_dims = (4,)
    _input_text = "4D"


class BatchRenorm3d(_BatchRenorm):
    """Batch renormalization for input (N, C, D, H, W)."""

    _input_dims = (5,)
    _input_text = "5D"
