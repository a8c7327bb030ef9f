"""Precise batch-norm statistics: recompute every BN layer's population statistics with the weights frozen.

    bnlab.recalibrate(model, train_images, samples=8192, batch_size=64)

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.errors import UsageError
from bnlab.nn import functional, statistics
from bnlab.nn.batchnorm import is_batch_norm

__all__ = ["Recalibration", "recalibrate"]


@dataclass
class Recalibration:
    """What ``recalibrate`` did: the layers it updated (by name), the data it used, and how long it took."""

    layers: list[str]
    samples: int
    batches: int
    seconds: float
    skipped: list[str] = field(default_factory=list)  # BN layers without running statistics, or never reached


class _Pool:
    """Exact per-element (count, mean, M2) of what one running-statistics buffer's elements normalized.

    Keyed by the buffer's storage, so views (a recurrent layer's rows) pool into the right elements.
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
        if running_var.storage_offset() - running_mean.storage_offset() != self.offset:
            raise UsageError("recalibrate: a BN layer's running mean and variance are not used as a pair")
        at = slice(running_mean.storage_offset(), running_mean.storage_offset() + running_mean.numel())
        counts = torch.stack([self.count[at], torch.full_like(mean, float(n))])
        total, pooled_mean, pooled_var = statistics.combine_moments(
            counts, torch.stack([self.mean[at], mean]), torch.stack([self.m2[at] / counts[0].clamp(min=1), var])
        )
        self.count[at], self.mean[at], self.m2[at] = total, pooled_mean, pooled_var * total

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


class _Observer:
    """Stands in for the running-statistics update during the pass: records, normalizes locally, keeps nothing.

    One pool per BN layer, made before the pass in the model's module order, so that every process of
    a group holds the same pools in the same order, whatever data it saw.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        self.pools: dict[int, _Pool] = {}
        for layer in layers:
            unbiased = getattr(layer, "unbiased_running_var", True)  # torch.nn's layers keep it unbiased
            self.pools[_key(layer.running_mean)] = _Pool(layer.running_mean, layer.running_var, unbiased)

    def record(self, n: int, mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor) -> None:
        pool = self.pools.get(_key(running_mean))
        if pool is None:
            raise UsageError(
                "recalibrate: a batch_norm call updates running statistics that belong to no BN layer of the model; "
                "keep running statistics in a BN layer (bnlab.BatchNorm*, SequenceBatchNorm or torch.nn's)"
            )
        pool.add(n, mean, var, running_mean, running_var)

    def __call__(self, x, running_mean, running_var, weight, bias, eps, unbiased, relu) -> Tensor:
        """bnlab's batch_norm during the pass: normalize with the batch's statistics, and record those."""
        y, stats = torch.ops.bnlab.batch_norm_train(x, weight, bias, None, None, 0.0, eps, True, relu)
        self.record(statistics.values_per_feature(x), stats[0], stats[1], running_mean, running_var)
        return y


def _key(running_mean: Tensor) -> int:
    return running_mean.untyped_storage().data_ptr()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module itself under torch.compile's and DistributedDataParallel's wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _batches(
    data: Any, samples: int, batch_size: int, device: torch.device, dtype: torch.dtype | None
) -> Iterator[Tensor]:
    """Input batches from a tensor, an (inputs, labels) pair, a Split, or an iterable of batches."""
    from bnlab.data import Split  # data imports nothing from nn; keep nn importable on its own

    if isinstance(data, Split):
        data = data.images
    elif _is_pair(data):
        data = data[0]
    if isinstance(data, Tensor):
        n = min(samples, len(data))
        usable = n - n % batch_size if n >= batch_size else n  # equal batches, as in training
        chunks: Iterable[Any] = (data[i : i + batch_size] for i in range(0, usable, batch_size))
    else:
        chunks = data
    seen = 0
    for chunk in chunks:
        x = chunk[0] if isinstance(chunk, (tuple, list)) else chunk
        if not isinstance(x, Tensor):
            raise UsageError(f"recalibrate: a batch must be a tensor or (inputs, labels); got {type(x).__name__}")
        x = x[: samples - seen]  # the last batch cut to the budget ...
        if len(x) < 2:  # ... unless too little of it is left for batch statistics
            return
        yield x.to(device, dtype) if (dtype is not None and x.is_floating_point()) else x.to(device)
        seen += len(x)


def _is_pair(data: Any) -> bool:
    """An (inputs, labels) tuple: two tensors of one length, the labels one-dimensional (a list is batches)."""
    return (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and data[1].dim() == 1
        and len(data[0]) == len(data[1])
    )


def recalibrate(
    model: nn.Module,
    data: Any,
    *,
    samples: int = 8192,
    batch_size: int = 64,
    process_group: Any | None = None,
) -> Recalibration:
    """Recompute the population statistics of every BN layer in ``model`` from ``data``; see the module docstring.

    ``data``: a tensor of inputs (split into batches of ``batch_size``), an ``(inputs, labels)`` tuple,
    a ``bnlab.Split``, or an iterable of batches (a list, a generator, a DataLoader: tensors or
    ``(inputs, labels)`` each, whose own batch size then applies). At most ``samples`` inputs are
    used: from a tensor, whole batches of ``batch_size`` (as in training); from batches, the last one
    cut to fit. ``Recalibration.samples`` says how many were used. Inputs go to the model's device
    (and floating dtype). BN layers are torch.nn's (``SyncBatchNorm`` included), bnlab's and bnlab's
    recurrent ``SequenceBatchNorm``.
    """
    if samples < 2 or batch_size < 2:
        raise UsageError(f"recalibrate needs samples and batch_size of at least 2; got {samples} and {batch_size}")
    start = time.perf_counter()
    model = _unwrap(model)
    named = [(name or "model", m) for name, m in model.named_modules() if is_batch_norm(m)]
    layers = [(name, m) for name, m in named if m.running_mean is not None and m.running_var is not None]
    saved = [(m, name, b.clone()) for _, m in layers for name, b in m.named_buffers(recurse=False) if b is not None]
    modes = [(m, m.training) for m in model.modules()]
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    observer = _Observer([m for _, m in layers])
    hooks = []
    count = batches = 0
    distributed = process_group is not None and dist.is_initialized() and dist.get_world_size(process_group) > 1
    try:
        model.eval()
        for _, layer in layers:
            layer.train()
            if not hasattr(layer, "unbiased_running_var"):  # torch.nn's: its own forward runs, the hook records
                hooks.append(layer.register_forward_pre_hook(_torch_layer_hook(observer)))
                if isinstance(layer, nn.SyncBatchNorm):  # its forward would synchronize (and needs CUDA)
                    layer.forward = _local_forward(layer)  # an instance attribute, removed below
        with torch.no_grad(), functional.observing(observer):
            for x in _batches(data, samples, batch_size, device, dtype):
                model(x)
                count, batches = count + len(x), batches + 1
        if not batches and not distributed:  # a process of a group may hold no data: its peers may
            raise UsageError("recalibrate: the data holds no batch; pass at least two inputs")
        pools = list(observer.pools.values())
        states = [pool.state() for pool in pools]
        if distributed:  # every process joins, whatever its share: one all_gather for every layer
            states = _across(states, process_group)
        for m, name, value in saved:  # back to the stored state; only the pooled statistics are written below
            getattr(m, name).copy_(value)
        for pool, state in zip(pools, states, strict=True):
            pool.write(state)
    except BaseException:
        for m, name, value in saved:
            getattr(m, name).copy_(value)
        raise
    finally:
        for hook in hooks:
            hook.remove()
        for _, layer in layers:
            layer.__dict__.pop("forward", None)
        for module, training in modes:
            module.training = training
    reached = {key for key, pool in observer.pools.items() if bool((pool.count > 0).any())}
    updated = [name for name, m in layers if _key(m.running_mean) in reached]
    if layers and not updated and not distributed:
        raise UsageError("recalibrate: no BN layer received any data")
    skipped = [name for name, _ in named if name not in updated]
    return Recalibration(updated, count, batches, time.perf_counter() - start, skipped)


def _torch_layer_hook(observer: _Observer):
    """Before a torch.nn layer's own forward: record the moments of its input."""

    def hook(layer: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        observer.record(statistics.values_per_feature(x), *statistics.moments(x), layer.running_mean, layer.running_var)

    return hook


def _local_forward(layer: nn.Module):
    """``SyncBatchNorm``'s forward for the pass: this process's batch statistics, nothing synchronized."""

    def forward(x: Tensor) -> Tensor:
        return functional.local_batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps, True, False)

    return forward


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
