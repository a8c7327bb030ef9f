"""The data a statistics pass (``bnlab.recalibrate``) accepts, and a model's batch dimension: resolved here, once.

The forms, each with the one rule that recognises it:

==============================  ===============================================================================
form                            taken as
==============================  ===============================================================================
``Tensor``                      inputs; split along the batch dimension into batches of ``batch_size``
``(inputs, labels)``            a *tuple* of two tensors whose sizes along the batch dimension agree (labels
                                count along their dim 0, or along the inputs' batch dimension, as per-step
                                labels of time-major sequences): the inputs, split as above; labels of any
                                shape (class indices, one-hot, targets) are not used
``(inputs, mask, labels)``      a tuple of three such tensors, ``mask`` a bool tensor with its samples along the
                                inputs' batch dimension: the model is called as ``model(inputs, mask)``
``bnlab.Split``                 its images
a list, a DataLoader, any       batches, each used as it comes: a tensor, or ``(inputs, labels)`` or
other iterable                  ``(inputs, mask, labels)`` as a tuple or a list (a DataLoader collates into
                                lists); a budget of ``samples`` cuts the last batch used
==============================  ===============================================================================

So a tuple is always one set of samples and a list always batches. What fits neither rule is an error that
names the forms: a tuple whose tensors disagree in size, a list that looks like ``[inputs, labels]`` (tensors
of different ranks, or two of one size along the batch dimension but of different shapes), a batch that is
none of the three, a mask that is not bool, inputs without the batch dimension.

The batch dimension (the axis that counts samples) is 0 unless the model says otherwise:
``batch_dim=`` passed by the caller; else the model's own ``batch_dim`` attribute (``bnlab.BNLSTM`` reports
1 in nn.LSTM's default time-major layout, 0 with ``batch_first``); else, for ``torch.nn``'s recurrent layers,
their ``batch_first``. A model that merely *contains* a time-major recurrent layer could take either layout,
so without ``batch_dim`` it is refused, naming the layer, rather than guessed: cutting a (T, N, F) batch
along T would give later steps no statistics and count time steps as samples, with no error anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.errors import UsageError

__all__ = ["Batch", "batch_dim_of", "batches", "check_budget"]

FORMS = (
    "a tensor of inputs; a tuple (inputs, labels) or (inputs, mask, labels) whose sizes along the batch dimension "
    "agree; a bnlab.Split; or a list, DataLoader or iterable of batches (each a tensor or such a tuple or list)"
)


@dataclass(frozen=True)
class Batch:
    """One batch for the model: its inputs, and the mask the model takes beside them (None: called on inputs alone)."""

    inputs: Tensor
    mask: Tensor | None = None

    def size(self, batch_dim: int) -> int:
        return self.inputs.shape[batch_dim]

    def head(self, n: int, batch_dim: int) -> Batch:
        """The first ``n`` samples."""
        mask = None if self.mask is None else self.mask.narrow(batch_dim, 0, n)
        return Batch(self.inputs.narrow(batch_dim, 0, n), mask)

    def to(self, device: torch.device, dtype: torch.dtype | None) -> Batch:
        float_dtype = dtype if dtype is not None and self.inputs.is_floating_point() else None
        mask = None if self.mask is None else self.mask.to(device)
        return Batch(self.inputs.to(device, float_dtype), mask)

    def call(self, model: nn.Module) -> Any:
        return model(self.inputs) if self.mask is None else model(self.inputs, self.mask)


def check_budget(samples: Any, batch_size: Any) -> None:
    """``samples`` a whole number >= 2 or None (all the data), ``batch_size`` a whole number >= 2."""
    for name, value, optional in (("samples", samples, True), ("batch_size", batch_size, False)):
        if value is None and optional:
            continue
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not whole or value < 2:
            text = f"{value!r}" if not isinstance(value, float) or math.isfinite(value) else str(value)
            allowed = "a whole number of at least 2" + (", or None for all the data" if optional else "")
            raise UsageError(f"recalibrate: {name} must be {allowed}; got {text}")


def batch_dim_of(model: nn.Module, batch_dim: int | None = None) -> int:
    """The dimension along which ``model``'s inputs hold samples (see the module docstring)."""
    if batch_dim is not None:
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
            raise UsageError(f"recalibrate: batch_dim must be a dimension index >= 0; got {batch_dim!r}")
        return batch_dim
    declared = getattr(model, "batch_dim", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    if isinstance(model, nn.RNNBase):
        return 0 if model.batch_first else 1
    for name, module in model.named_modules():
        if module is not model and _time_major(module):
            raise UsageError(
                f"recalibrate: the model holds the time-major recurrent layer {name!r} ({type(module).__name__}, "
                "batch_first=False), so its inputs may hold samples along dim 0 or dim 1; pass batch_dim= (1 for "
                "(T, N, F) sequences, 0 for sample-first inputs) or give the model a batch_dim attribute"
            )
    return 0


def _time_major(module: nn.Module) -> bool:
    if isinstance(module, nn.RNNBase):
        return not module.batch_first
    declared = getattr(module, "batch_dim", None)
    return isinstance(declared, int) and not isinstance(declared, bool) and declared != 0


def batches(data: Any, *, samples: int | None, batch_size: int, batch_dim: int) -> tuple[str, Iterator[Batch]]:
    """(the form ``data`` was read as, its batches within the budget of ``samples`` samples along ``batch_dim``).

    From a tensor, whole batches of ``batch_size`` (as in training; fewer samples than one batch make one
    batch; with no budget, all of it); from batches, each as it comes, the last cut to the budget. Batch
    statistics need two samples: a batch of one is passed over, and a budget left under two ends the data.
    """
    from bnlab.data import Split  # data imports nothing from nn; keep nn importable on its own

    if isinstance(data, Split):
        return "a bnlab.Split (its images)", _split(Batch(data.images), samples, batch_size, batch_dim)
    if isinstance(data, Tensor):
        return "a tensor of inputs", _split(Batch(data), samples, batch_size, batch_dim)
    if isinstance(data, tuple):
        batch = _fields(data, batch_dim, "data")
        form = ("a tuple (inputs,)", "a tuple (inputs, labels)", "a tuple (inputs, mask, labels)")[len(data) - 1]
        return form, _split(batch, samples, batch_size, batch_dim)
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise UsageError(f"recalibrate: cannot read data of type {type(data).__name__}; pass {FORMS}")
    if isinstance(data, list):
        _check_list(data, batch_dim)
    return f"batches ({type(data).__name__})", _budget(_each(data, batch_dim), samples, batch_dim)


def _split(whole: Batch, samples: int | None, batch_size: int, batch_dim: int) -> Iterator[Batch]:
    """Whole batches of ``batch_size`` within a budget of ``samples`` (one smaller batch when it holds less);
    with no budget, all the data, the remainder (of two or more) a smaller last batch."""
    _check_batch_dim(whole.inputs, batch_dim, "data")
    n = whole.size(batch_dim) if samples is None else min(samples, whole.size(batch_dim))
    whole_batches = n - n % batch_size if n >= batch_size else n
    usable = n if samples is None and n % batch_size >= 2 else whole_batches
    if usable < 2:
        return
    for start in range(0, usable, batch_size):
        size = min(batch_size, usable - start)
        mask = None if whole.mask is None else whole.mask.narrow(batch_dim, start, size)
        yield Batch(whole.inputs.narrow(batch_dim, start, size), mask)


def _check_list(data: list, batch_dim: int) -> None:
    """A list of tensors is batches of inputs. Tensors of different ranks, or two of the same size along the batch
    dimension but of different shapes, are inputs and labels in a list: refused, naming the fix."""
    tensors = [t for t in data if isinstance(t, Tensor)]
    ranks = {t.dim() for t in tensors}
    pair = (
        len(data) == 2
        and len(tensors) == 2
        and all(t.dim() > batch_dim for t in tensors)
        and tensors[0].shape[batch_dim] == tensors[1].shape[batch_dim]
        and tensors[0].shape != tensors[1].shape
    )
    if len(ranks) > 1 or pair:
        shapes = ", ".join(str(list(t.shape)) for t in tensors[:3])
        raise UsageError(
            "recalibrate: a list is a sequence of batches, but these tensors differ as inputs and labels do "
            f"({shapes}); pass (inputs, labels) as a tuple, or {FORMS}"
        )


def _check_batch_dim(inputs: Tensor, batch_dim: int, where: str) -> None:
    if inputs.dim() <= batch_dim:
        raise UsageError(
            f"recalibrate: {where}: inputs of shape {list(inputs.shape)} have no batch dimension {batch_dim}"
        )


def _each(data: Iterable[Any], batch_dim: int) -> Iterator[Batch]:
    for index, item in enumerate(data):
        if isinstance(item, Tensor):
            _check_batch_dim(item, batch_dim, f"batch {index}")
            yield Batch(item)
        elif isinstance(item, (tuple, list)):
            yield _fields(tuple(item), batch_dim, f"batch {index}")
        else:
            raise UsageError(
                f"recalibrate: batch {index} is a {type(item).__name__}; each batch must be a tensor, or "
                "(inputs, labels) or (inputs, mask, labels) as a tuple or list"
            )


def _fields(fields: tuple, batch_dim: int, where: str) -> Batch:
    """A tuple of tensors as one batch: (inputs,), (inputs, labels) or (inputs, mask, labels)."""
    if not 1 <= len(fields) <= 3 or not all(isinstance(t, Tensor) for t in fields):
        kinds = ", ".join(type(t).__name__ for t in fields)
        raise UsageError(f"recalibrate: {where} is a tuple of ({kinds}); pass {FORMS}")
    inputs = fields[0]
    _check_batch_dim(inputs, batch_dim, where)
    n = inputs.shape[batch_dim]
    mask = fields[1] if len(fields) == 3 else None
    sizes = [n, *([] if mask is None else [mask.shape[batch_dim] if mask.dim() > batch_dim else -1])]
    if len(fields) > 1:
        sizes.append(_label_count(fields[-1], n, batch_dim))
    if len(set(sizes)) > 1:
        names = ("inputs", "mask", "labels") if mask is not None else ("inputs", "labels")
        described = ", ".join(f"{name} {size}" for name, size in zip(names, sizes, strict=True))
        raise UsageError(
            f"recalibrate: {where}: a tuple is one set of samples, (inputs, labels) or (inputs, mask, labels), "
            f"whose sizes along the batch dimension (dim {batch_dim} of inputs; dim 0 of labels, or theirs too) "
            f"agree; got {described}. If the model's samples are along another dimension, pass batch_dim=; to "
            "pass batches, use a list or a DataLoader"
        )
    if mask is not None and mask.dtype != torch.bool:
        raise UsageError(f"recalibrate: {where}: the mask must be a bool tensor (True where valid); got {mask.dtype}")
    return Batch(inputs, mask)


def _label_count(labels: Tensor, n: int, batch_dim: int) -> int:
    """How many samples ``labels`` label: along dim 0, or along the inputs' batch dimension (per-step labels
    (T, N) of time-major sequences) when that is where their sizes agree."""
    if labels.dim() > batch_dim and labels.shape[batch_dim] == n:
        return n
    return labels.shape[0] if labels.dim() else -1


def _budget(stream: Iterable[Batch], samples: int | None, batch_dim: int) -> Iterator[Batch]:
    """The batches within the budget; a batch of one sample is passed over (statistics need two), and what is
    left of the budget, if under two, ends the data."""
    seen = 0
    for batch in stream:
        if samples is not None and samples - seen < 2:
            return
        size = batch.size(batch_dim) if samples is None else min(batch.size(batch_dim), samples - seen)
        if size < 2:
            continue
        yield batch if size == batch.size(batch_dim) else batch.head(size, batch_dim)
        seen += size
