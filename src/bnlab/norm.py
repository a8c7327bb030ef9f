"""bnlab's batch normalization, written from tensor ops (no ``F.batch_norm``, no ``nn.BatchNorm*``).

For a feature (channel) c, over every other axis of the batch (N, and L / H, W / D, H, W)::

    mean_c = mean(x[:, c])            var_c = mean((x[:, c] - mean_c) ** 2)    # biased, as tf.nn.moments
    y[:, c] = (x[:, c] - mean_c) / sqrt(var_c + eps) * weight_c + bias_c

In training the batch statistics are used and the population statistics follow them::

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (M values per feature)

PyTorch's ``momentum`` is ``1 - decay`` in TensorFlow's terms. PyTorch keeps an *unbiased* running
variance (the ``M / (M - 1)`` factor); the notebook (``tf.nn.moments``) keeps the biased one. That is
the one intended difference between ``BatchNorm2d(c)`` and ``BatchNorm2d.tf_style(c)``, switched by
``unbiased_running_var``. In evaluation the running statistics are used, so a sample's output does
not depend on the rest of its batch.

Gradients come from ``_BatchNormFunction``, the closed form of the original paper (Ioffe & Szegedy,
2015, section 3)::

    xhat = (x - mean) * invstd
    dweight = sum(dy * xhat)     dbias = sum(dy)
    dx = weight * invstd * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)

which saves only x, mean and invstd. Double backward differentiates ``naive_batch_norm`` instead,
so higher derivatives are exact rather than approximate.

float16/bfloat16 inputs have their statistics computed in float32. Given a ``process_group``, the
statistics (and the two sums in the backward) are combined across its processes, so every process
normalizes with the statistics of the global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "naive_batch_norm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_feature(v: Tensor, x: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, ...) so it broadcasts against x."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _moments(x: Tensor, process_group: Any | None) -> tuple[Tensor, Tensor, int]:
    """Per-feature mean and biased variance in float32 (or wider), and the count behind them."""
    xs = x.float() if x.dtype in _LOW_PRECISION else x
    var, mean = torch.var_mean(xs, _reduce_dims(x), correction=0)
    count = x.numel() // x.shape[1]
    if not _distributed(process_group):
        return mean, var, count
    # Chan et al.'s pairwise combination of (count, mean, M2): exact for any spread of means,
    # unlike summing x and x**2, which cancels catastrophically when |mean| >> std.
    local = torch.stack([torch.full_like(mean, count), mean, var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    counts, means, m2s = torch.stack(gathered).unbind(1)  # each (world, C)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return mean, m2 / total, int(total[0].item())


class _BatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with batch statistics and the closed-form backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, eps, process_group):  # type: ignore[override]
        scale = invstd if weight is None else invstd * weight
        y = (x - _per_feature(mean.to(x.dtype), x)).mul_(_per_feature(scale.to(x.dtype), x))
        if bias is not None:
            y.add_(_per_feature(bias.to(x.dtype), x))
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.count, ctx.eps, ctx.process_group = count, eps, process_group
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formula itself
            return (*_differentiable_backward(ctx, dy, x, weight, bias), None, None, None, None, None)
        dims = _reduce_dims(x)
        acc = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
        xhat = (x - _per_feature(mean.to(x.dtype), x)).mul_(_per_feature(invstd.to(x.dtype), x))
        sum_dy = dy.sum(dims, dtype=acc)
        sum_dy_xhat = (dy * xhat).sum(dims, dtype=acc)
        dweight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = sum_dy.to(bias.dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            if _distributed(ctx.process_group):
                both = torch.stack([sum_dy, sum_dy_xhat])
                dist.all_reduce(both, group=ctx.process_group)
                sum_dy, sum_dy_xhat = both.unbind(0)
            k = invstd if weight is None else invstd * weight
            # dx = k * dy - k * sum_dy / M - xhat * (k * sum_dy_xhat / M), reusing xhat's buffer
            dx = xhat.mul_(_per_feature((-k * sum_dy_xhat / ctx.count).to(x.dtype), x))
            dx.addcmul_(dy, _per_feature(k.to(x.dtype), x))
            dx.sub_(_per_feature((k * sum_dy / ctx.count).to(x.dtype), x))
        return dx, dweight, dbias, None, None, None, None, None


def _distributed(process_group: Any | None) -> bool:
    return process_group is not None and dist.get_world_size(process_group) > 1


def _differentiable_backward(ctx, dy, x, weight, bias):
    """Gradients of naive_batch_norm with create_graph=True, so they can be differentiated again."""
    if _distributed(ctx.process_group):
        raise RuntimeError(
            "bnlab batch_norm: double backward across a process group is not supported; "
            "compute higher derivatives on a single process."
        )
    with torch.enable_grad():
        inputs = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (x, weight, bias)]
        y = naive_batch_norm(*inputs, eps=ctx.eps)
        present = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(y, present, dy, create_graph=True))
    return [None if t is None else next(grads) for t in inputs]


def naive_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Training-mode batch norm as the notebook writes it; autograd differentiates every op."""
    xs = x.float() if x.dtype in _LOW_PRECISION else x
    var, mean = torch.var_mean(xs, _reduce_dims(x), keepdim=True, correction=0)
    y = (xs - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _per_feature(weight, x)
    if bias is not None:
        y = y + _per_feature(bias, x)
    return y.to(x.dtype)


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
    process_group: Any | None = None,
) -> Tensor:
    """Batch-normalize x of shape (N, C, *) over every axis but C; the functional core.

    With ``training=True`` (or no running statistics) the batch statistics normalize x, and
    ``running_mean``/``running_var``, when given, are updated in place by ``momentum``. Otherwise the
    running statistics normalize x.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects input of shape (N, C, *), got shape {tuple(x.shape)}")
    if not training and running_mean is not None and running_var is not None:
        scale = torch.rsqrt(running_var + eps)
        if weight is not None:
            scale = scale * weight
        y = (x - _per_feature(running_mean.to(x.dtype), x)) * _per_feature(scale.to(x.dtype), x)
        return y if bias is None else y + _per_feature(bias.to(x.dtype), x)

    with torch.no_grad():
        mean, var, count = _moments(x.detach(), process_group)
        if count <= 1:
            raise ValueError(
                f"batch norm in training needs more than one value per feature, got input of shape "
                f"{tuple(x.shape)}; use a batch of two or more samples, or call model.eval() to "
                "normalize with the running statistics."
            )
        if training and running_mean is not None and running_var is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            pop_var = var * (count / (count - 1)) if unbiased_running_var else var
            running_var.lerp_(pop_var.to(running_var.dtype), momentum)
        invstd = torch.rsqrt(var + eps)
    return _BatchNormFunction.apply(x, weight, bias, mean, invstd, count, eps, process_group)


class _BatchNorm(nn.Module):
    """Shared by BatchNorm1d/2d/3d; same constructor, attributes and state_dict as PyTorch's."""

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
            process_group=self.process_group if self.training else None,
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        # Like PyTorch: state dicts from before num_batches_tracked existed load with a count of 0.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and (local_metadata.get("version") or 0) < 2 and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, "
            f"unbiased_running_var={self.unbiased_running_var}"
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
