"""bnlab's batch norm as PyTorch operators, so that everything PyTorch does to a model sees it.

Three operators in the ``bnlab`` namespace, defined with ``torch.library``::

    bnlab::batch_norm_train(x, weight?, bias?, eps, relu) -> (y, stats)        batch statistics
    bnlab::batch_norm_backward(x, weight?, stats, dy, y?) -> (dx, dweight, dbias)
    bnlab::batch_norm_eval(x, weight?, bias?, mean, var, eps, relu) -> y         population statistics

``stats`` is float64 (3, C) [mean, biased var, invstd]; ``y`` in backward masks dy under a fused
ReLU. Each has a fake (meta) implementation, so torch.compile, torch.export and FakeTensor
tracing know output shapes without running it, and a registered autograd formula (the closed
form; for ``batch_norm_train`` under ``create_graph`` it differentiates ``naive_batch_norm`` instead,
so higher derivatives are exact). The implementations are the compiled kernels where they apply
(float32/float64 CPU tensors, contiguous or channels_last) and the tensor ops of
``statistics.py`` everywhere else (CUDA, half precision, no compiler).

The operators are functional: updating the running statistics is left to ordinary in-place tensor
ops in ``functional.py``, which every tracer records. (An operator that mutated its inputs could not
have an autograd formula registered.)

Why operators and not a plain ``autograd.Function`` calling ctypes: a ctypes call is invisible to
PyTorch, so ``torch.jit.trace`` recorded an uninitialised output (silently wrong numbers) and
``torch.export`` could not run it on fake tensors. Through the dispatcher, tracing records
``bnlab::batch_norm_*``, export and compile see one opaque node with known shapes, and the ctypes
call only ever receives real tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import kernels
from bnlab.nn import statistics

_library = torch.library.Library("bnlab", "DEF")
_library.define("batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, float eps, bool relu) -> (Tensor, Tensor)")
_library.define(
    "batch_norm_backward(Tensor x, Tensor? weight, Tensor stats, Tensor dy, Tensor? y) -> (Tensor, Tensor, Tensor)"
)
_library.define(
    "batch_norm_eval(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, bool relu) -> Tensor"
)

batch_norm_train = torch.ops.bnlab.batch_norm_train.default
batch_norm_backward = torch.ops.bnlab.batch_norm_backward.default
batch_norm_eval = torch.ops.bnlab.batch_norm_eval.default


def check_shapes(x: Tensor, **per_feature: Tensor | None) -> None:
    """x is (N, C, *) and every per-feature tensor has C values (the kernels index them by feature)."""
    if x.dim() < 2 or x.shape[1] < 1:
        raise ValueError(f"batch norm expects input of shape (N, C, *) with C >= 1, got shape {list(x.shape)}")
    for name, t in per_feature.items():
        if t is not None and tuple(t.shape) != (x.shape[1],):
            raise ValueError(
                f"batch norm got {x.shape[1]} features (dim 1 of input shape {list(x.shape)}) but its {name} has "
                f"shape {list(t.shape)}; the layer's num_features must match the input"
            )


def check_values_per_feature(x: Tensor) -> None:
    """Batch statistics need two or more values per feature."""
    if x.numel() // x.shape[1] <= 1:
        raise ValueError(
            f"batch norm in training needs more than one value per feature, got input of shape "
            f"{list(x.shape)}; use a batch of two or more samples, or call model.eval() to "
            "normalize with the running statistics."
        )


# ---- implementations (real tensors) ----


def _train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool) -> tuple[Tensor, Tensor]:
    check_shapes(x, weight=weight, bias=bias)
    check_values_per_feature(x)
    if kernels.usable(x, weight, bias):
        return kernels.forward_train(x, weight, bias, eps, relu)
    return statistics.forward_train(x, weight, bias, eps, relu)


def _backward(
    x: Tensor, weight: Tensor | None, stats: Tensor, dy: Tensor, y: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    check_shapes(x, weight=weight)
    if stats.shape != (3, x.shape[1]) or dy.shape != x.shape or (y is not None and y.shape != x.shape):
        raise ValueError(f"bnlab::batch_norm_backward: stats, dy or y do not match x of shape {list(x.shape)}")
    if kernels.usable(x, weight) and dy.dtype == x.dtype:
        if dy.stride() != x.stride():  # the kernels walk x, dy and y together
            dy = torch.empty_like(x).copy_(dy)
        return kernels.backward(x, weight, stats, dy, y)
    return statistics.backward(x, weight, stats, dy, y)


def _eval(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float, relu: bool
) -> Tensor:
    check_shapes(x, weight=weight, bias=bias, running_mean=mean, running_var=var)
    invstd = torch.rsqrt(var.double() + eps)
    if kernels.usable(x, weight, bias):
        return kernels.normalize(x, weight, bias, mean.double().contiguous(), invstd, relu)
    return statistics.normalize(x, weight, bias, mean.double(), invstd, relu)


_library.impl("batch_norm_train", _train, "CompositeExplicitAutograd")
_library.impl("batch_norm_backward", _backward, "CompositeExplicitAutograd")
_library.impl("batch_norm_eval", _eval, "CompositeExplicitAutograd")


# ---- fake implementations: shapes, dtypes and layouts only ----


@torch.library.register_fake("bnlab::batch_norm_train")
def _train_fake(x, weight, bias, eps, relu):
    check_shapes(x, weight=weight, bias=bias)
    check_values_per_feature(x)
    return torch.empty_like(x), x.new_empty((3, x.shape[1]), dtype=torch.float64)


@torch.library.register_fake("bnlab::batch_norm_backward")
def _backward_fake(x, weight, stats, dy, y):
    return torch.empty_like(x), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


@torch.library.register_fake("bnlab::batch_norm_eval")
def _eval_fake(x, weight, bias, mean, var, eps, relu):
    check_shapes(x, weight=weight, bias=bias, running_mean=mean, running_var=var)
    return torch.empty_like(x)


# ---- autograd ----
#
# Each operator's Autograd kernel is an autograd.Function whose forward redispatches below autograd,
# to whatever comes next for these tensors (the implementations above, a FakeTensor's fake one, a
# tracer's proxy). Written here rather than with torch.library.register_autograd, whose generic
# wrapper costs about as much per call as the whole seed-network BN layer at its smallest shapes.


def _autograd_kernel(op: torch._ops.OpOverload, function: type[torch.autograd.Function]):
    below = torch._C._after_autograd_keyset

    def kernel(keyset: torch._C.DispatchKeySet, *args):
        if torch._C.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(keyset & below, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, *args)

    return kernel


class _Train(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, x, weight, bias, eps, relu):  # type: ignore[override]
        with torch._C._AutoDispatchBelowAutograd():
            y, stats = batch_norm_train.redispatch(keyset, x, weight, bias, eps, relu)
        ctx.save_for_backward(x, weight, bias, stats, y if relu else None)
        ctx.eps, ctx.relu = eps, relu
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, dy, _dstats):  # type: ignore[override]
        x, weight, bias, stats, y = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:4]
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            grads = _differentiable_backward(x, weight, bias, dy, ctx.eps, ctx.relu)
        else:
            grads = batch_norm_backward(x, weight, stats, dy, y)
        return (None, *(g if need else None for g, need in zip(grads, needs, strict=True)), None, None)


def _differentiable_backward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, dy: Tensor, eps: float, relu: bool
) -> list[Tensor | None]:
    """Gradients of ``naive_batch_norm``, built with create_graph so they can be differentiated again."""
    # saved tensors that require grad stay connected to the graph: second derivatives reach the inputs
    inputs = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (x, weight, bias)]
    with torch.enable_grad():
        y = statistics.naive_batch_norm(*inputs, eps=eps, relu=relu)
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy, create_graph=True))
    return [None if t is None else next(grads) for t in inputs]


class _Eval(torch.autograd.Function):
    """y = (x - mean) * scale + bias is affine in x: its backward is tensor ops, so it differentiates again too."""

    @staticmethod
    def forward(ctx, keyset, x, weight, bias, mean, var, eps, relu):  # type: ignore[override]
        with torch._C._AutoDispatchBelowAutograd():
            y = batch_norm_eval.redispatch(keyset, x, weight, bias, mean, var, eps, relu)
        ctx.save_for_backward(x, weight, mean, var, y if relu else None)
        ctx.eps, ctx.bias_dtype = eps, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mean, var, y = ctx.saved_tensors
        acc = statistics.compute_dtype(x)
        invstd = torch.rsqrt(var.to(acc) + ctx.eps)
        dz = (dy if y is None else torch.where(y > 0, dy, 0)).to(acc)
        needs = ctx.needs_input_grad
        dx = dweight = dbias = None
        if needs[1]:
            scale = invstd if weight is None else invstd * weight.to(acc)
            dx = (dz * statistics.per_feature(scale, x)).to(x.dtype)
        if needs[2]:
            xhat = (x.to(acc) - statistics.per_feature(mean.to(acc), x)) * statistics.per_feature(invstd, x)
            dweight = (dz * xhat).sum(statistics.reduce_dims(x)).to(weight.dtype)
        if needs[3]:
            dbias = dz.sum(statistics.reduce_dims(x)).to(ctx.bias_dtype)
        return None, dx, dweight, dbias, None, None, None, None


_library.impl("batch_norm_train", _autograd_kernel(batch_norm_train, _Train), "Autograd", with_keyset=True)
_library.impl("batch_norm_eval", _autograd_kernel(batch_norm_eval, _Eval), "Autograd", with_keyset=True)
