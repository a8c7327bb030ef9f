"""The batch-norm maths, in tensor ops: statistics, their exact combination, normalization, gradients.

For a feature (channel) c, over every other axis of x (N, C, *)::

    mean_c = mean(x[:, c])      var_c = mean((x[:, c] - mean_c) ** 2)      invstd_c = 1 / sqrt(var_c + eps)
    y[:, c] = (x[:, c] - mean_c) * invstd_c * weight_c + bias_c            (then ReLU if asked)

Gradients use the closed form of Ioffe & Szegedy (2015, section 3), with M values per feature::

    xhat = (x - mean) * invstd       dz = dy (times 1[y > 0] under a fused ReLU)
    dweight = sum(dz * xhat)         dbias = sum(dz)
    dx = weight * invstd * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)

Every function here is pure and device-agnostic. They are the tensor-op implementation behind
bnlab's operators (``ops.py``, used where the compiled kernels are not), the synchronized batch
norm (``sync.py``) and precise statistics (``precise.py``). Statistics travel as float64
``stats = [mean, biased var, invstd]`` of shape (3, C), what the operators save for backward.

Accuracy: moments are taken around a per-feature shift K (the feature's first value), so a large
mean with a small spread (1e4 +- 1 in float32) costs no precision; the float64 mean is applied as
a pair hi + lo of x's type, so x - mean is as exact as that type allows. float16/bfloat16 inputs
are computed in float32.

Non-finite and huge values (the compiled kernels, ``kernels/batch_norm.h``, do the same operations):
a feature holding a NaN, or both infinities, gets a NaN mean and variance; one holding one
infinity gets that infinity as its mean and a NaN variance (torch.nn's statistics); either way
its outputs are NaN, and so are the running statistics that follow. A variance beyond the
compute dtype's range is inf, so the feature normalizes to its bias (torch.nn too). Under a fused
ReLU the gradient is dropped where y <= 0 and passed where y is NaN, as torch.relu's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the arithmetic runs in: float32 for half-precision inputs, else x's own."""
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def parameter_dtype(x: Tensor, weight: Tensor | None) -> torch.dtype:
    """The dtype of the weight and bias gradients: the compute dtype, or the weight's if wider.

    Not x's: float16 input with float32 parameters (mixed precision) would round their gradients to
    float16, or overflow them to inf. Autograd casts them to each parameter's own dtype.
    """
    acc = compute_dtype(x)
    return acc if weight is None else torch.promote_types(acc, weight.dtype)


def reduce_dims(x: Tensor) -> list[int]:
    """Every axis of x (N, C, *) but the feature axis."""
    return [0, *range(2, x.dim())]


def per_feature(v: Tensor, x: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, ...), so it broadcasts against x."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def values_per_feature(x: Tensor) -> int:
    """M, the number of values each feature's statistics are taken over."""
    return x.numel() // x.shape[1]


def shift(xs: Tensor) -> Tensor:
    """A value of each feature of xs (N, C, *), (C,): the first, or 0 where that is not finite (x - inf would be
    -inf or NaN everywhere); zeros for an empty batch. Moments taken around it lose nothing to a large mean."""
    if xs.numel() == 0:
        return xs.new_zeros(xs.shape[1])
    return xs[0].reshape(xs.shape[1], -1)[:, 0].nan_to_num(0.0, 0.0, 0.0)


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased var) per feature of x (N, C, *), float64 (C,); zeros for an empty batch.

    The variance is one of the compute dtype (inf beyond its range); the mean is float64.
    """
    if x.shape[0] == 0 or x.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        return zeros, zeros.clone()
    xs = x.to(compute_dtype(x))
    k = shift(xs)
    deviations = xs - per_feature(k, x)
    var, mean = torch.var_mean(deviations, reduce_dims(x), correction=0)
    # var_mean's running (Welford) mean is NaN for a feature holding one infinity; the mean is that infinity
    mean = torch.where(mean.isnan(), deviations.mean(reduce_dims(x)), mean)
    return k.double() + mean.double(), var.double()


def combine_moments(counts: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pool K groups' (count, mean, biased var), each (K, C) in float64, into the whole's (count, mean, var).

    Chan, Golub & LeVeque's pairwise formula: M2 = sum(M2_k) + sum(n_k * (mean_k - mean) ** 2). Exact
    for any spread of group means, unlike summing x and x ** 2, which cancels catastrophically when
    |mean| >> std. Groups of count 0 contribute nothing; a total of 0 gives mean 0 and var 0.
    """
    total = counts.sum(0)
    safe = total.clamp(min=1)
    mean = (counts * means).sum(0) / safe
    m2 = (counts * variances).sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, mean, m2 / safe


def mean_of_moments(counts: Tensor, means: Tensor, variances: Tensor, unbiased: bool) -> tuple[Tensor, Tensor]:
    """(mean, var) the running statistics of ghost batch norm follow: K virtual batches' (count, mean, biased var),
    each (K, C) float64, averaged weighted by count; each variance made unbiased (n / (n - 1)) first if asked.

    The mean is the whole batch's; the variance is the average *within* a virtual batch, what the training
    normalization divided by, not the whole batch's (which adds the spread of the virtual batches' means).
    """
    total, mean, _ = combine_moments(counts, means, variances)
    var = variances * (counts / (counts - 1).clamp(min=1)) if unbiased else variances
    return mean, (counts * var).sum(0) / total.clamp(min=1)


def renorm_correction(
    stats: Tensor, mean: Tensor, std: Tensor, rmax: float | Tensor, dmax: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Batch renormalization's (r, d) per feature, float64 (C,) (Ioffe 2017, algorithm 1)::

        r = clip(sigma_B / sigma, 1 / rmax, rmax)      d = clip((mu_B - mu) / sigma, -dmax, dmax)

    for the batch's ``stats`` (sigma_B = sqrt(var_B + eps) = 1 / invstd) and the moving ``mean`` and ``std``.
    x normalized by the batch, times r plus d, is x normalized by the moving statistics, as far as the clips
    allow; r and d are constants to the gradient (they come from statistics, not from the graph).
    """
    rmax, dmax = (torch.as_tensor(b, dtype=torch.float64, device=stats.device) for b in (rmax, dmax))
    std = std.double()
    r = torch.clamp(1.0 / stats[2] / std, 1.0 / rmax, rmax)
    d = torch.clamp((stats[0] - mean.double()) / std, -dmax, dmax)
    return r, d


def make_stats(mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """float64 (3, C) [mean, biased var, invstd], the operators' saved statistics."""
    return torch.stack([mean, var, torch.rsqrt(var + eps)])


def _split(mean: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """float64 mean -> (hi, lo) of ``dtype`` with hi + lo = mean to float64 precision."""
    hi = mean.to(dtype)
    return hi, (mean - hi.double()).to(dtype)


def normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, relu: bool
) -> Tensor:
    """(x - mean) * invstd * weight + bias, ReLU'd if asked; mean and invstd float64 (C,). Output in x's dtype."""
    acc = compute_dtype(x)
    hi, lo = _split(mean, acc)
    scale = invstd.to(acc) if weight is None else invstd.to(acc) * weight.to(acc)
    offset = -lo * scale if bias is None else bias.to(acc) - lo * scale
    # x - hi is exact where x is near the mean; lo carries the rest of the float64 mean
    y = torch.addcmul(per_feature(offset, x), x.to(acc) - per_feature(hi, x), per_feature(scale, x))
    if relu:
        y = y.relu_()
    return y.to(x.dtype)


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool
) -> tuple[Tensor, Tensor]:
    """(y, stats): x normalized with its batch statistics, and those statistics."""
    stats = make_stats(*moments(x), eps)
    return normalize(x, weight, bias, stats[0], stats[2], relu), stats


def gradient_sums(x: Tensor, stats: Tensor, dy: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(dz, sum(dz), sum(dz * xhat)) per feature; the sums float64 (C,)."""
    acc = compute_dtype(x)
    dz = dy if y is None else torch.where(y <= 0, 0, dy)  # torch.relu's backward: no inf * 0 = nan; NaN y passes
    hi, lo = _split(stats[0], acc)
    xhat = (x.to(acc) - per_feature(hi, x)).sub_(per_feature(lo, x)).mul_(per_feature(stats[2].to(acc), x))
    sum_dz = dz.sum(reduce_dims(x), dtype=acc).double()
    sum_dz_xhat = (dz * xhat).sum(reduce_dims(x), dtype=acc).double()
    return dz, sum_dz, sum_dz_xhat


def input_gradient(
    x: Tensor, weight: Tensor | None, stats: Tensor, dz: Tensor, sum_dz: Tensor, sum_dz_xhat: Tensor, count: int
) -> Tensor:
    """dx = k * (dz - sum_dz / M - xhat * sum_dz_xhat / M), k = invstd * weight, for M = ``count`` values."""
    acc = compute_dtype(x)
    invstd = stats[2]
    k = invstd if weight is None else invstd * weight.double()
    # dx = k * dz - k * invstd * sum_dz_xhat / M * (x - mean) - k * sum_dz / M, in x's precision
    a, b = k.to(acc), (k * invstd * sum_dz_xhat / count).to(acc)
    d = (k * sum_dz / count).to(acc)
    hi, lo = _split(stats[0], acc)
    centered = (x.to(acc) - per_feature(hi, x)).sub_(per_feature(lo, x))
    dx = centered.mul_(per_feature(-b, x)).addcmul_(dz.to(acc), per_feature(a, x)).sub_(per_feature(d, x))
    return dx.to(x.dtype)


def backward(
    x: Tensor, weight: Tensor | None, stats: Tensor, dy: Tensor, y: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of ``forward_train`` on this process's batch alone."""
    dz, sum_dz, sum_dz_xhat = gradient_sums(x, stats, dy, y)
    dx = input_gradient(x, weight, stats, dz, sum_dz, sum_dz_xhat, values_per_feature(x))
    dtype = parameter_dtype(x, weight)
    return dx, sum_dz_xhat.to(dtype), sum_dz.to(dtype)


def naive_batch_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5, relu: bool = False
) -> Tensor:
    """Training-mode batch norm as the notebook writes it; autograd differentiates every op (double backward).

    Taken around ``shift`` (a constant, so the derivatives are the formula's): without it, the gradients under
    create_graph were off by 7.5e-4 at mean 1e4 in float32, where the closed form's are within 1e-7. Values
    near 3e38 made them NaN where the closed form's are 0 (a variance beyond float32 normalizes to the bias),
    as three backward formulas overflow there: a plain sum's mean, var_mean's (it recomputes that mean) and
    square's (2 * d). Hence Welford's mean from var_mean, and the variance as the mean of d * d.
    """
    xs = x.to(compute_dtype(x))
    dims = reduce_dims(x)
    centered = xs - per_feature(shift(xs.detach()), x)
    empty = x.numel() == 0  # (var_mean would warn: an empty output, any statistics do)
    mean = centered.sum(dims, keepdim=True) if empty else torch.var_mean(centered, dims, keepdim=True, correction=0)[1]
    deviations = centered - mean
    var = (deviations * deviations).mean(dims, keepdim=True)
    y = deviations * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * per_feature(weight, x)
    if bias is not None:
        y = y + per_feature(bias, x)
    return (F.relu(y) if relu else y).to(x.dtype)


def running_update(
    running_mean: Tensor | None, running_var: Tensor | None, stats: Tensor, count: int, momentum: float, unbiased: bool
) -> None:
    """running <- (1 - momentum) * running + momentum * batch; the variance made unbiased (M / (M - 1)) if asked.

    torch.nn's formula, not ``lerp_``'s, which differs where a statistic is infinite: lerp(inf, x, 0.1) is NaN
    where torch.nn keeps inf. A batch of no values (count 0) leaves the running statistics as they are (torch.nn).
    """
    if count == 0:
        return
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(stats[0].to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        var = stats[1] * (count / (count - 1)) if unbiased else stats[1]
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
