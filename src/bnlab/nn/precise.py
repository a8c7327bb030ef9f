"""Precise batch-norm statistics: recompute every BN layer's population statistics with the weights frozen.

    bnlab.recalibrate(model, train_images, samples=8192, batch_size=64)

What it reads: the data forms of ``bnlab.nn.data_forms`` (a tensor, a tuple ``(inputs, labels)`` or
``(inputs, mask, labels)``, a Split, batches), each recognised by one rule, never guessed; samples
counted along the model's batch dimension (0, or what the model reports, or ``batch_dim=``).

Why: in training, a BN layer's running statistics are an exponential moving average (EMA) of batch
statistics. With momentum 0.01 (decay 0.99) they describe the weights of roughly the last hundred
steps, while an optimizer like Adam is still moving them, so eval-mode accuracy can fall far below
what the weights can do (the notebook's network: 0.72 test accuracy with the EMA, 0.97 with precise
statistics, same weights). Wu & Johnson ("Rethinking 'Batch' in BatchNorm", 2021) call this EMA's
instability and recommend precise BN; fvcore and pycls ship it.

The estimator: the data is fed through the model in batches of ``batch_size``. Every BN layer
normalizes each batch with that batch's own statistics, exactly as in training (so each layer sees
the inputs it saw in training), and the batch's per-feature (count, mean, biased variance) is
recorded. They are pooled exactly by ``statistics.combine_moments`` (Chan et al.): the result is the
mean and variance of *every value the layer normalized*, each batch weighted by its size, an
unbiased estimate of the population's (the variance made unbiased, N / (N - 1), where the layer keeps
an unbiased running variance, as PyTorch's do; bnlab's ``tf_style`` layers keep the biased one).
Unlike averaging per-batch variances (what a cumulative moving average does) it includes the spread
*between* batch means (the law of total variance). 10^3-10^4 samples are enough (Wu & Johnson).

Which statistics: a BN layer's running buffers, element by element. A layer called several times in
one forward pass (shared between call sites) gets the statistics of everything it normalizes, as its
running average does in training. A recurrent ``SequenceBatchNorm`` keeps a row per time step: each
row gets the statistics of its step's inputs, and the last row those of every step from it on.

What changes: only the BN layers' ``running_mean`` and ``running_var``. Weights are frozen (no
gradients); only the BN layers compute batch statistics during the pass: dropout and everything else
stay in eval mode (``torch.optim.swa_utils.update_bn`` switches dropout on, a known flaw). Modes,
counters and process groups come back afterwards, and a pass that fails leaves every statistic as
it was.

Across processes: with ``process_group``, each process passes its own shard of the data and every
layer gets the statistics of all shards together (one all_gather at the end, so shards may differ
in size, even be empty).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.errors import UsageError
from bnlab.nn import functional, statistics
from bnlab.nn.batchnorm import is_batch_norm
from bnlab.nn.data_forms import batch_dim_of, batches, check_budget

__all__ = ["Recalibration", "recalibrate"]


@dataclass
class Recalibration:
    """What ``recalibrate`` did: the layers it updated (by name), the data it used, and how long it took."""

    layers: list[str]
    samples: int
    batches: int
    seconds: float
    skipped: list[str] = field(default_factory=list)  # BN layers without running statistics, or never reached
    form: str = ""  # what the data was read as (bnlab.nn.data_forms)
    batch_dim: int = 0  # the inputs' dimension that counted samples


class _Pool:
    """Exact per-element (count, mean, M2) of what one layer's running-statistics elements normalized.

    Indexed by position in the buffers' storage, so views (a recurrent layer's rows) pool into the right
    elements. A pool is its layer's observer (``functional.StatisticsObserver``).
    """

    def __init__(self, running_mean: Tensor, running_var: Tensor, unbiased: bool) -> None:
        self.mean_storage = _whole(running_mean)
        self.var_storage = _whole(running_var)
        self.offset = running_var.storage_offset() - running_mean.storage_offset()  # mean element i <-> var i + offset
        self.unbiased = unbiased
        size = self.mean_storage.numel()
        device = running_mean.device
        self.count = torch.zeros(size, dtype=torch.float64, device=device)
        self.mean = torch.zeros(size, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(size, dtype=torch.float64, device=device)

    def add(self, n: int, mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor) -> None:
        """Pool one batch's statistics (n values per feature, float64 mean and biased var) into its elements."""
        same = running_mean.untyped_storage().data_ptr() == self.mean_storage.untyped_storage().data_ptr()
        if not same or running_var.storage_offset() - running_mean.storage_offset() != self.offset:
            raise UsageError(
                "recalibrate: a BN layer normalized with running statistics that are not its own pair of buffers; "
                "keep each layer's running_mean and running_var in that layer"
            )
        at = slice(running_mean.storage_offset(), running_mean.storage_offset() + running_mean.numel())
        counts = torch.stack([self.count[at], torch.full_like(mean, float(n))])
        total, pooled_mean, pooled_var = statistics.combine_moments(
            counts, torch.stack([self.mean[at], mean]), torch.stack([self.m2[at] / counts[0].clamp(min=1), var])
        )
        self.count[at], self.mean[at], self.m2[at] = total, pooled_mean, pooled_var * total

    __call__ = add

    def state(self) -> Tensor:
        return torch.stack([self.count, self.mean, self.m2 / self.count.clamp(min=1)])  # (3, size): count, mean, var

    def write(self, state: Tensor) -> None:
        count, mean, var = state
        seen = count > 0
        if self.unbiased:
            var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), var)
        self.mean_storage[seen] = mean[seen].to(self.mean_storage.dtype)
        index = seen.nonzero().squeeze(1) + self.offset
        self.var_storage[index] = var[seen].to(self.var_storage.dtype)


def _whole(t: Tensor) -> Tensor:
    """A flat tensor over the whole storage of ``t`` (so its views' elements can be indexed directly)."""
    return t.new_empty(0).set_(t.untyped_storage())


def _unwrap(model: nn.Module) -> nn.Module:
    """The module itself under torch.compile's and DistributedDataParallel's wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def recalibrate(
    model: nn.Module,
    data: Any,
    *,
    samples: int | None = 8192,
    batch_size: int = 64,
    batch_dim: int | None = None,
    process_group: Any | None = None,
) -> Recalibration:
    """Recompute the population statistics of every BN layer in ``model`` from ``data``; see the module docstring.

    ``data``, in one of the forms of ``bnlab.nn.data_forms`` (checked, never guessed): a tensor of inputs
    (split into batches of ``batch_size``); a tuple ``(inputs, labels)``, labels of any shape, or
    ``(inputs, mask, labels)``, whose sizes along the batch dimension agree; a ``bnlab.Split``; or a list,
    DataLoader or iterable of batches (a tensor or such a tuple or list each, used at its own size). At
    most ``samples`` inputs are used (``None``: all): from a tensor, whole batches of ``batch_size`` (as in
    training); from batches, the last one cut to fit. ``batch_dim``: the dimension along which the inputs
    hold samples, if not 0 and the model does not say (``BNLSTM`` does: 1 unless ``batch_first``). Inputs
    go to the model's device (and floating dtype). BN layers are torch.nn's (``SyncBatchNorm`` included),
    bnlab's and bnlab's recurrent ``SequenceBatchNorm``.

    How each layer is observed, one mechanism for all: every BN layer normalizes each batch through
    ``functional.batch_norm`` with an ``observer``, its pool, which receives the batch statistics in place
    of the running update; bnlab's layers pass their ``observer`` attribute, and torch.nn's get, for the
    pass, a forward that makes the same call (so ``SyncBatchNorm`` synchronizes nothing and needs no GPU).
    """
    check_budget(samples, batch_size)
    start = time.perf_counter()
    model = _unwrap(model)
    dim = batch_dim_of(model, batch_dim)
    form, stream = batches(data, samples=samples, batch_size=batch_size, batch_dim=dim)
    named = [(name or "model", m) for name, m in model.named_modules() if is_batch_norm(m)]
    layers = [(name, m) for name, m in named if m.running_mean is not None and m.running_var is not None]
    saved = [(m, name, b.clone()) for _, m in layers for name, b in m.named_buffers(recurse=False) if b is not None]
    modes = [(m, m.training) for m in model.modules()]
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    # One pool per layer, made before the pass in module order, so that every process of a group holds
    # the same pools in the same order, whatever data it saw. A layer shared by several call sites is one
    # layer: its pool pools all its calls.
    if not layers:
        raise UsageError(
            "recalibrate: the model has no batch-norm layer with running statistics (torch.nn's BatchNorm*, bnlab's "
            "or SequenceBatchNorm, with track_running_stats=True): there is nothing to recalibrate"
        )
    pools = {id(m): _Pool(m.running_mean, m.running_var, getattr(m, "unbiased_running_var", True)) for _, m in layers}
    count = seen_batches = 0
    distributed = process_group is not None and dist.is_initialized() and dist.get_world_size(process_group) > 1
    try:
        model.eval()
        for _, layer in layers:
            layer.train()
            _observe(layer, pools[id(layer)])
        with torch.no_grad():
            for batch in stream:
                batch.to(device, dtype).call(model)
                count, seen_batches = count + batch.size(dim), seen_batches + 1
        if not seen_batches and not distributed:  # a process of a group may hold no data: its peers may
            raise UsageError("recalibrate: the data holds no batch of two or more samples; pass at least two inputs")
        states = [pool.state() for pool in pools.values()]
        if distributed:  # every process joins, whatever its share: one all_gather for every layer
            states = _across(states, process_group)
        for m, name, value in saved:  # back to the stored state; only the pooled statistics are written below
            getattr(m, name).copy_(value)
        for pool, state in zip(pools.values(), states, strict=True):
            pool.write(state)
    except BaseException:
        for m, name, value in saved:
            getattr(m, name).copy_(value)
        raise
    finally:
        for _, layer in layers:
            _unobserve(layer)
        for module, training in modes:
            module.training = training
    # the layers reached, from the statistics written: with a process group, every shard's together
    updated = [name for (name, _), state in zip(layers, states, strict=True) if bool((state[0] > 0).any())]
    if not updated:
        raise UsageError("recalibrate: no BN layer received any data")
    skipped = [name for name, _ in named if name not in updated]
    return Recalibration(updated, count, seen_batches, time.perf_counter() - start, skipped, form=form, batch_dim=dim)


def _observe(layer: nn.Module, pool: _Pool) -> None:
    """Route ``layer``'s batch-norm calls through the functional core with ``pool`` as their observer."""
    if hasattr(layer, "observer"):  # bnlab's layers: they pass it themselves
        layer.observer = pool
        return

    def forward(x: Tensor) -> Tensor:  # torch.nn's: the same call, for the pass (an instance attribute)
        return functional.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, training=True, eps=layer.eps,
            observer=pool,
        )  # fmt: skip

    layer.forward = forward


def _unobserve(layer: nn.Module) -> None:
    if hasattr(layer, "observer"):
        layer.observer = None
    else:
        layer.__dict__.pop("forward", None)


def _across(states: list[Tensor], process_group: Any) -> list[Tensor]:
    """Every process's pooled statistics pooled again over the group, with one all_gather."""
    if not states:
        return []
    local = torch.cat(states, dim=1)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    counts, means, variances = torch.stack(gathered).unbind(1)  # each (world, elements)
    merged = torch.stack(statistics.combine_moments(counts, means, variances))
    return list(merged.split([s.shape[1] for s in states], dim=1))
