"""bnlab's batch norm as PyTorch operators, so that everything PyTorch does to a model sees it.

Three operators in the ``bnlab`` namespace, defined with ``torch.library`` (with two more for
gradients that are differentiated again, below)::

    bnlab::batch_norm_train(x, weight?, bias?, running_mean(a!)?, running_var(b!)?, momentum, eps, unbiased, relu)
        -> (y, stats)                                         batch statistics; running ones follow them
    bnlab::batch_norm_backward(x, weight?, stats, dy, y?) -> (dx, dweight, dbias)
    bnlab::batch_norm_eval(x, weight?, bias?, mean, var, eps, relu) -> y         population statistics

``stats`` is float64 (3, C) [mean, biased var, invstd]; ``y`` in backward masks dy under a fused
ReLU; dweight and dbias come in ``statistics.parameter_dtype`` (never float16). Like
``aten::native_batch_norm``, the training operator updates the running statistics it is given
(``running <- (1 - momentum) * running + momentum * batch``, the variance times M / (M - 1) if
``unbiased``; an empty batch leaves them as they are), declared in its schema, so export and
compile functionalize the update and tracing records it.

Each operator has a fake (meta) implementation, so torch.compile, torch.export and FakeTensor
tracing know output shapes without running it; a tensor-op implementation (``statistics.py``) for
every device; and an autograd kernel: the closed form, or under ``create_graph`` the gradients of
``naive_batch_norm`` (``batch_norm_train_backward_differentiable``), so higher derivatives are
exact. For CPU tensors the compiled library (``bnlab.kernels``: ``operators.cpp``) registers C++
CPU and AutogradCPU kernels over these, with the same formulas through the same operators; it is
installed by the first CPU call.

Why operators and not an ``autograd.Function`` calling the kernels: a call PyTorch cannot see made
``torch.jit.trace`` record an uninitialised output (silently wrong numbers) and ``torch.export``
fail on fake tensors. Why the CPU path in C++: with the dispatcher's Python kernels, an
autograd.Function and ctypes, a call at the seed network's smallest shapes cost 1.5-1.6x the old
direct ctypes path; in C++ it costs 0.65-0.8x of it (README, "A real operator").
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import kernels
from bnlab.nn import statistics

_library = torch.library.Library("bnlab", "DEF")
_library.define(
    "batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "float momentum, float eps, bool unbiased, bool relu) -> (Tensor, Tensor)"
)
_library.define(
    "batch_norm_backward(Tensor x, Tensor? weight, Tensor stats, Tensor dy, Tensor? y) -> (Tensor, Tensor, Tensor)"
)
_library.define(
    "batch_norm_eval(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, bool relu) -> Tensor"
)
# The gradients the autograd kernels (Python here, C++ in operators.cpp) use when they will be
# differentiated again; tensor ops all through, so autograd records them. An absent weight or bias,
# or a gradient not asked for, comes back as an empty tensor.
_library.define(
    "batch_norm_train_backward_differentiable(Tensor x, Tensor? weight, Tensor? bias, Tensor dy, float eps, "
    "bool relu) -> (Tensor, Tensor, Tensor)"
)
_library.define(
    "batch_norm_eval_backward(Tensor x, Tensor? weight, Tensor mean, Tensor var, Tensor dy, Tensor? y, float eps, "
    "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)

batch_norm_train = torch.ops.bnlab.batch_norm_train.default
batch_norm_backward = torch.ops.bnlab.batch_norm_backward.default
batch_norm_eval = torch.ops.bnlab.batch_norm_eval.default
batch_norm_train_backward_differentiable = torch.ops.bnlab.batch_norm_train_backward_differentiable.default
batch_norm_eval_backward = torch.ops.bnlab.batch_norm_eval_backward.default


def check_shapes(x: Tensor, **per_feature: Tensor | None) -> None:
    """x is floating-point (N, C, *) and every per-feature tensor has C values (operators.cpp: the same checks)."""
    if x.dim() < 2 or x.shape[1] < 1:
        raise ValueError(f"batch norm expects input of shape (N, C, *) with C >= 1, got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"batch norm expects a floating-point input, got {x.dtype}")
    for name, t in per_feature.items():
        if t is not None and tuple(t.shape) != (x.shape[1],):
            raise ValueError(
                f"batch norm got {x.shape[1]} features (dim 1 of input shape {list(x.shape)}) but its {name} has "
                f"shape {list(t.shape)}; the layer's num_features must match the input"
            )


def check_values_per_feature(x: Tensor) -> None:
    """Batch statistics need two or more values per feature; none (an empty batch) is fine, as in torch.nn."""
    if x.numel() // x.shape[1] == 1:
        raise ValueError(
            f"batch norm in training needs more than one value per feature, got input of shape "
            f"{list(x.shape)}; use a batch of two or more samples, or call model.eval() to "
            "normalize with the running statistics."
        )


# ---- tensor-op implementations (real tensors) ----


def _train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    unbiased: bool,
    relu: bool,
) -> tuple[Tensor, Tensor]:
    if x.device.type == "cpu" and kernels.install():  # the first CPU call: the compiled kernels take over
        return batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps, unbiased, relu)
    check_shapes(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    check_values_per_feature(x)
    y, stats = statistics.forward_train(x, weight, bias, eps, relu)
    statistics.running_update(running_mean, running_var, stats, statistics.values_per_feature(x), momentum, unbiased)
    return y, stats


def _backward(
    x: Tensor, weight: Tensor | None, stats: Tensor, dy: Tensor, y: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    if x.device.type == "cpu" and kernels.install():
        return batch_norm_backward(x, weight, stats, dy, y)
    check_shapes(x, weight=weight)
    if stats.shape != (3, x.shape[1]) or dy.shape != x.shape or (y is not None and y.shape != x.shape):
        raise ValueError(f"bnlab::batch_norm_backward: stats, dy or y do not match x of shape {list(x.shape)}")
    return statistics.backward(x, weight, stats, dy, y)


def _eval(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float, relu: bool
) -> Tensor:
    if x.device.type == "cpu" and kernels.install():
        return batch_norm_eval(x, weight, bias, mean, var, eps, relu)
    check_shapes(x, weight=weight, bias=bias, running_mean=mean, running_var=var)
    return statistics.normalize(x, weight, bias, mean.double(), torch.rsqrt(var.double() + eps), relu)


def _train_backward_differentiable(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, dy: Tensor, eps: float, relu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``naive_batch_norm``, built with create_graph so they can be differentiated again."""
    # saved tensors that require grad stay connected to the graph: second derivatives reach the inputs
    inputs = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (x, weight, bias)]
    with torch.enable_grad():
        y = statistics.naive_batch_norm(*inputs, eps=eps, relu=relu)
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy, create_graph=True))
    dx, dweight, dbias = (x.new_empty(0) if t is None else next(grads) for t in inputs)
    return dx, dweight, dbias


def _eval_backward(
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    dy: Tensor,
    y: Tensor | None,
    eps: float,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """y = (x - mean) * scale + bias is affine in x: its gradients are tensor ops, differentiable again."""
    acc = statistics.compute_dtype(x)
    invstd = torch.rsqrt(var.to(acc) + eps)
    dz = (dy if y is None else torch.where(y <= 0, 0, dy)).to(acc)  # statistics.gradient_sums' mask
    dx = dweight = dbias = x.new_empty(0)
    if output_mask[0]:
        scale = invstd if weight is None else invstd * weight.to(acc)
        dx = (dz * statistics.per_feature(scale, x)).to(x.dtype)
    if output_mask[1]:
        xhat = (x.to(acc) - statistics.per_feature(mean.to(acc), x)) * statistics.per_feature(invstd, x)
        dweight = (dz * xhat).sum(statistics.reduce_dims(x)).to(statistics.parameter_dtype(x, weight))
    if output_mask[2]:
        dbias = dz.sum(statistics.reduce_dims(x)).to(statistics.parameter_dtype(x, weight))
    return dx, dweight, dbias


_library.impl("batch_norm_train", _train, "CompositeExplicitAutograd")
_library.impl("batch_norm_backward", _backward, "CompositeExplicitAutograd")
_library.impl("batch_norm_eval", _eval, "CompositeExplicitAutograd")
_library.impl("batch_norm_train_backward_differentiable", _train_backward_differentiable, "CompositeImplicitAutograd")
_library.impl("batch_norm_eval_backward", _eval_backward, "CompositeImplicitAutograd")


# ---- fake implementations: shapes, dtypes and layouts only ----


@torch.library.register_fake("bnlab::batch_norm_train")
def _train_fake(x, weight, bias, running_mean, running_var, momentum, eps, unbiased, relu):
    check_shapes(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    check_values_per_feature(x)
    return torch.empty_like(x), x.new_empty((3, x.shape[1]), dtype=torch.float64)


@torch.library.register_fake("bnlab::batch_norm_backward")
def _backward_fake(x, weight, stats, dy, y):
    dtype = statistics.parameter_dtype(x, weight)
    return torch.empty_like(x), x.new_empty(x.shape[1], dtype=dtype), x.new_empty(x.shape[1], dtype=dtype)


@torch.library.register_fake("bnlab::batch_norm_eval")
def _eval_fake(x, weight, bias, mean, var, eps, relu):
    check_shapes(x, weight=weight, bias=bias, running_mean=mean, running_var=var)
    return torch.empty_like(x)


# ---- autograd ----
#
# Each forward operator's Autograd kernel is an autograd.Function whose forward redispatches below
# autograd, to whatever comes next for these tensors (the implementations above, a FakeTensor's fake
# one, a tracer's proxy). Written here rather than with torch.library.register_autograd, whose
# generic wrapper costs per call about what the whole layer does at the seed network's smallest
# shapes. operators.cpp holds the C++ twin of these two classes, for CPU tensors.


def _autograd_kernel(op: torch._ops.OpOverload, function: type[torch.autograd.Function]):
    below = torch._C._after_autograd_keyset

    def kernel(keyset: torch._C.DispatchKeySet, *args):
        if torch._C.is_grad_enabled() and torch._C._any_requires_grad(*args[:3]):
            return function.apply(keyset & below, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, *args)

    return kernel


class _Train(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, x, weight, bias, running_mean, running_var, momentum, eps, unbiased, relu):  # type: ignore[override]
        with torch._C._AutoDispatchBelowAutograd():
            y, stats = batch_norm_train.redispatch(
                keyset, x, weight, bias, running_mean, running_var, momentum, eps, unbiased, relu
            )
        ctx.save_for_backward(x, weight, bias, stats, y if relu else None)
        ctx.eps, ctx.relu = eps, relu
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, dy, _dstats):  # type: ignore[override]
        x, weight, bias, stats, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            grads = batch_norm_train_backward_differentiable(x, weight, bias, dy, ctx.eps, ctx.relu)
        else:
            grads = batch_norm_backward(x, weight, stats, dy, y)
        needs = ctx.needs_input_grad[1:4]
        return (None, *(g if need else None for g, need in zip(grads, needs, strict=True)), *[None] * 6)


class _Eval(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, x, weight, bias, mean, var, eps, relu):  # type: ignore[override]
        with torch._C._AutoDispatchBelowAutograd():
            y = batch_norm_eval.redispatch(keyset, x, weight, bias, mean, var, eps, relu)
        ctx.save_for_backward(x, weight, mean, var, y if relu else None)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mean, var, y = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[1:4])
        grads = batch_norm_eval_backward(x, weight, mean, var, dy, y, ctx.eps, needs)
        return (None, *(g if need else None for g, need in zip(grads, needs, strict=True)), *[None] * 4)


_library.impl("batch_norm_train", _autograd_kernel(batch_norm_train, _Train), "Autograd", with_keyset=True)
_library.impl("batch_norm_eval", _autograd_kernel(batch_norm_eval, _Eval), "Autograd", with_keyset=True)
