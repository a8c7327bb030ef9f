"""bnlab's batch normalization, written from tensor ops (no ``F.batch_norm``, no ``nn.BatchNorm*``).

For a feature (channel) c, over every other axis of the batch (N, and L / H, W / D, H, W)::

    mean_c = mean(x[:, c])            var_c = mean((x[:, c] - mean_c) ** 2)    # biased, as tf.nn.moments
    y[:, c] = (x[:, c] - mean_c) / sqrt(var_c + eps) * weight_c + bias_c       # then ReLU if fused_relu

In training the batch statistics are used and the population statistics follow them::

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (M values per feature)

PyTorch's ``momentum`` is ``1 - decay`` in TensorFlow's terms. PyTorch keeps an *unbiased* running
variance (the ``M / (M - 1)`` factor); the notebook (``tf.nn.moments``) keeps the biased one. That is
the one intended difference between ``BatchNorm2d(c)`` and ``BatchNorm2d.tf_style(c)``, switched by
``unbiased_running_var``. In evaluation the running statistics are used, so a sample's output does
not depend on the rest of its batch.

Gradients use the closed form of the original paper (Ioffe & Szegedy, 2015, section 3)::

    xhat = (x - mean) * invstd         dz = dy (times 1[y > 0] under a fused ReLU)
    dweight = sum(dz * xhat)           dbias = sum(dz)
    dx = weight * invstd * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)

saving only x, mean and invstd (and y under a fused ReLU). Double backward differentiates
``naive_batch_norm`` instead, so higher derivatives are exact.

Accuracy: statistics are taken around a per-feature shift K (the feature's first value), so a large
mean with a small spread (1e4 +- 1 in float32) costs no precision; float16/bfloat16 inputs have
their statistics computed in float32. On CPU, float32/float64 tensors (contiguous or channels_last)
go through the compiled kernels in ``kernels.py``, which compute the same formulas in fewer passes.

Given a ``process_group``, the statistics (and the two sums of the backward) are combined across its
processes, so every process normalizes with the statistics of the global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab import kernels

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "naive_batch_norm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_feature(v: Tensor, x: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, ...) so it broadcasts against x."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _distributed(process_group: Any | None) -> bool:
    return process_group is not None and dist.get_world_size(process_group) > 1


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t with x's memory layout, so both can be walked together."""
    if t.stride() == x.stride():
        return t
    if x.dim() in (4, 5) and kernels.layout(x) == 1:
        return t.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return t.contiguous()


def _check_count(x: Tensor, count: int) -> None:
    if count <= 1:
        raise ValueError(
            f"batch norm in training needs more than one value per feature, got input of shape "
            f"{tuple(x.shape)}; use a batch of two or more samples, or call model.eval() to "
            "normalize with the running statistics."
        )


def _shifted_moments(x: Tensor, process_group: Any | None) -> tuple[Tensor, Tensor, Tensor, int]:
    """(shift K, mean - K, biased var, count) per feature; float32 or wider; global across the group."""
    xs = x.float() if x.dtype in _LOW_PRECISION else x
    shift = xs[0].reshape(x.shape[1], -1)[:, 0]  # a value of each feature: x - K is small
    var, mean = torch.var_mean(xs - _per_feature(shift, x), _reduce_dims(x), correction=0)
    count = x.numel() // x.shape[1]
    if not _distributed(process_group):
        return shift, mean, var, count
    # Chan et al.'s pairwise combination of (count, mean, M2) in float64: exact for any spread of
    # means, unlike summing x and x**2, which cancels catastrophically when |mean| >> std.
    local = torch.stack([torch.full_like(mean, count), shift + mean, var * count]).double()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    counts, means, m2s = torch.stack(gathered).unbind(1)  # each (world, C)
    total = counts.sum(0)
    global_mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - global_mean) ** 2).sum(0)
    return shift, (global_mean - shift).to(mean.dtype), (m2 / total).to(var.dtype), int(total[0].item())


def _update_running(running_mean, running_var, mean, var, count, momentum, unbiased) -> None:
    if running_mean is None or running_var is None:
        return
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    pop_var = var * (count / (count - 1)) if unbiased else var
    running_var.lerp_(pop_var.to(running_var.dtype), momentum)


class _BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with batch statistics and the closed-form backward, on any device.

    Tensor ops for every input; the compiled CPU kernels when ``kernels.usable``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, unbiased, relu, group):  # type: ignore[override]
        fast = not _distributed(group) and kernels.usable(x, weight, bias, running_mean, running_var)
        if fast:
            count = x.numel() // x.shape[1]
            _check_count(x, count)
            y, stats = kernels.forward_train(x, weight, bias, eps, relu, running_mean, running_var, momentum, unbiased)
            ctx.save_for_backward(x, weight, bias, y if relu else None, stats)
        else:
            shift, mean, var, count = _shifted_moments(x, group)
            _check_count(x, count)
            _update_running(running_mean, running_var, shift + mean, var, count, momentum, unbiased)
            invstd = torch.rsqrt(var + eps)
            scale = invstd if weight is None else invstd * weight
            offset = -mean * scale if bias is None else bias - mean * scale
            # x - K is small, so folding the mean into the offset cancels nothing significant
            centered = x.to(mean.dtype) - _per_feature(shift, x)
            y = torch.addcmul(_per_feature(offset, x), centered, _per_feature(scale, x))
            if relu:
                y.relu_()
            y = y.to(x.dtype)
            ctx.save_for_backward(x, weight, bias, y if relu else None, shift, mean, invstd)
        ctx.fast, ctx.count, ctx.eps, ctx.relu, ctx.group = fast, count, eps, relu, group
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, y, *stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formula itself
            grads = _differentiable_backward(ctx, dy, x, weight, bias)
            return (*grads, None, None, None, None, None, None, None)
        if ctx.fast:  # stats: float64 [mean, invstd] from the kernels
            needs = ctx.needs_input_grad
            grads = kernels.backward(x, _like(dy, x), y, stats[0], weight, (needs[0], needs[1], needs[2]))
            return (*grads, None, None, None, None, None, None, None)
        shift, mean, invstd = stats
        acc = mean.dtype
        dz = dy if y is None else torch.where(y > 0, dy, 0)  # as ReLU's backward: no inf * 0 = nan
        xhat = (x.to(acc) - _per_feature(shift, x)).sub_(_per_feature(mean, x)).mul_(_per_feature(invstd, x))
        sum_dz = dz.sum(_reduce_dims(x), dtype=acc)
        sum_dz_xhat = (dz * xhat).sum(_reduce_dims(x), dtype=acc)
        dweight = sum_dz_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = sum_dz.to(bias.dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            if _distributed(ctx.group):
                both = torch.stack([sum_dz, sum_dz_xhat])
                dist.all_reduce(both, group=ctx.group)
                sum_dz, sum_dz_xhat = both.unbind(0)
            k = invstd if weight is None else invstd * weight
            # dx = k * dz - xhat * (k * sum_dz_xhat / M) - k * sum_dz / M, reusing xhat's buffer
            dx = xhat.mul_(_per_feature(-k * sum_dz_xhat / ctx.count, x))
            dx.addcmul_(dz, _per_feature(k, x))
            dx = dx.sub_(_per_feature(k * sum_dz / ctx.count, x)).to(x.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None


def _differentiable_backward(ctx, dy, x, weight, bias):
    """Gradients of naive_batch_norm with create_graph=True, so they can be differentiated again."""
    if _distributed(ctx.group):
        raise RuntimeError(
            "bnlab batch_norm: double backward across a process group is not supported; "
            "compute higher derivatives on a single process."
        )
    with torch.enable_grad():
        inputs = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (x, weight, bias)]
        y = naive_batch_norm(*inputs, eps=ctx.eps, relu=ctx.relu)
        present = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(y, present, dy, create_graph=True))
    return [None if t is None else next(grads) for t in inputs]


def naive_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool = False) -> Tensor:
    """Training-mode batch norm as the notebook writes it; autograd differentiates every op."""
    xs = x.float() if x.dtype in _LOW_PRECISION else x
    var, mean = torch.var_mean(xs, _reduce_dims(x), keepdim=True, correction=0)
    y = (xs - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _per_feature(weight, x)
    if bias is not None:
        y = y + _per_feature(bias, x)
    return (F.relu(y) if relu else y).to(x.dtype)


def _eval_norm(x, running_mean, running_var, weight, bias, eps, relu) -> Tensor:
    """Normalize with the population statistics: one pass through the kernels when no grad is needed."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs_grad and kernels.usable(x, weight, bias, running_mean, running_var):
        invstd = torch.rsqrt(running_var.double() + eps)
        return kernels.normalize(x, running_mean.double(), invstd, weight, bias, relu)
    acc = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y = (x.to(acc) - _per_feature(running_mean.to(acc), x)) * _per_feature(scale, x)
    if bias is not None:
        y = y + _per_feature(bias.to(acc), x)
    return (F.relu(y) if relu else y).to(x.dtype)


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
) -> Tensor:
    """Batch-normalize x of shape (N, C, *) over every axis but C; the functional core.

    With ``training=True`` (or no running statistics) the batch statistics normalize x, and
    ``running_mean``/``running_var``, when given, are updated in place by ``momentum``. Otherwise the
    running statistics normalize x. ``relu`` applies a ReLU to the result in the same pass.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects input of shape (N, C, *), got shape {tuple(x.shape)}")
    if not training and running_mean is not None and running_var is not None:
        return _eval_norm(x, running_mean, running_var, weight, bias, eps, relu)
    if not training:  # no running statistics: batch statistics, nothing to update
        running_mean = running_var = None
    return _BatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, momentum, eps, unbiased_running_var, relu, process_group
    )


class _BatchNorm(nn.Module):
    """Shared by BatchNorm1d/2d/3d; same constructor, attributes and state_dict as PyTorch's.

    Beyond PyTorch's options: ``unbiased_running_var`` (False keeps the biased variance, as
    TensorFlow), ``fused_relu`` (apply ReLU to the output in the same pass) and ``process_group``
    (normalize with the statistics of the whole distributed batch, like ``nn.SyncBatchNorm``).
    """

    _version = 2  # PyTorch's: state dicts carry num_batches_tracked
    _input_dims: tuple[int, ...] = ()

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
        bias: bool = True,
        unbiased_running_var: bool = True,
        fused_relu: bool = False,
        process_group: Any | None = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.unbiased_running_var = unbiased_running_var
        self.fused_relu = fused_relu
        self.process_group = process_group
        self.weight = nn.Parameter(torch.ones(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    @classmethod
    def tf_style(cls, num_features: int, decay: float = 0.99, eps: float = 1e-3, **kwargs: Any) -> _BatchNorm:
        """The notebook's (and Keras') conventions: decay 0.99, eps 1e-3, biased running variance."""
        return cls(num_features, eps=eps, momentum=1.0 - decay, unbiased_running_var=False, **kwargs)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in self._input_dims:
            shapes = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(f"{type(self).__name__} expects {shapes} input, got {x.dim()}D input")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got {x.shape[1]} features (dim 1) "
                f"in input of shape {tuple(x.shape)}"
            )
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        # As PyTorch: in training without tracking, the buffers (if any) are neither used nor updated.
        pass_running = not self.training or self.track_running_stats
        return batch_norm(
            x,
            self.running_mean if pass_running else None,
            self.running_var if pass_running else None,
            self.weight,
            self.bias,
            training=self.training or self.running_mean is None,
            momentum=momentum,
            eps=self.eps,
            unbiased_running_var=self.unbiased_running_var,
            relu=self.fused_relu,
            process_group=self.process_group if self.training else None,
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        # Like PyTorch: state dicts from before num_batches_tracked existed load with a count of 0.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and (local_metadata.get("version") or 0) < 2 and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def extra_repr(self) -> str:
        extra = ", fused_relu=True" if self.fused_relu else ""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, "
            f"unbiased_running_var={self.unbiased_running_var}{extra}"
        )


class BatchNorm1d(_BatchNorm):
    """Drop-in for ``nn.BatchNorm1d``: input (N, C) or (N, C, L)."""

    _input_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Drop-in for ``nn.BatchNorm2d``: input (N, C, H, W), contiguous or channels_last."""

    _input_dims = (4,)


class BatchNorm3d(_BatchNorm):
    """Drop-in for ``nn.BatchNorm3d``: input (N, C, D, H, W), contiguous or channels_last_3d."""

    _input_dims = (5,)
