"""Swap the batch-norm implementation of any model: PyTorch's layers <-> bnlab's.

    model = convert(model, to="manual")   # nn.BatchNorm1d/2d/3d -> bnlab.BatchNorm1d/2d/3d
    model = convert(model, to="torch")    # bnlab.BatchNorm1d/2d/3d -> nn.BatchNorm1d/2d/3d

Like ``nn.SyncBatchNorm.convert_sync_batchnorm`` it works in place and returns the model: each BN
layer is replaced inside its parent, however deeply nested, and the new layer takes over the old
one's parameter and buffer *tensors* (not copies). So values, device, dtype and ``requires_grad``
cannot change, and an optimizer built before the conversion keeps updating the same tensors. Use
the return value: a model that is itself a BN layer comes back as a new module. For an independent
copy, convert ``copy.deepcopy(model)``. Hooks registered on the old layers are not carried over.

Carried over: ``eps``, ``momentum`` (``None`` included), ``affine``, ``bias``,
``track_running_stats``, the training mode, ``weight``, ``bias``, ``running_mean``,
``running_var`` and ``num_batches_tracked``. Outputs are the same before and after, in training
and in eval mode; ``state_dict`` keys are the same.

Where the two differ:

- Running variance. PyTorch's layers keep an unbiased running variance; bnlab's can keep either.
  Converting to "manual" keeps PyTorch's meaning (``unbiased_running_var=True``), so training goes
  on exactly as before. A bnlab layer with the notebook's biased running variance (``tf_style``)
  has no PyTorch equivalent: it converts with a warning. Its statistics are kept as they are (eval
  outputs do not change), but further training adds the unbiased batch variance, M / (M - 1) times
  the biased one for M values per feature.
- Fused ReLU. A bnlab layer with ``fused_relu=True`` becomes PyTorch's layer and an ``nn.ReLU``
  placed right after it in its ``nn.Sequential`` parent, under the name ``<name>_relu``. ReLU has
  no state, so ``state_dict`` keys stay the same (and match a model built with an unfused ReLU).
  Any other parent calls its children in its own ``forward``, where a ReLU cannot be added, so the
  conversion stops with an error naming the layer. Converting to "manual" never fuses: ``nn.ReLU``
  modules stay where they are.
- Process groups. A bnlab layer with a ``process_group`` becomes ``nn.SyncBatchNorm`` with that
  group. The other way round is refused: ``nn.SyncBatchNorm`` accepts any input rank, so there is
  no BatchNorm1d/2d/3d to map it to.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from bnlab.errors import UsageError
from bnlab.nn import batchnorm as norm

__all__ = ["TARGETS", "convert"]

TARGETS = ("manual", "torch", "sync")

_TO_MANUAL: dict[type[nn.Module], type[norm._BatchNorm]] = {
    nn.BatchNorm1d: norm.BatchNorm1d,
    nn.BatchNorm2d: norm.BatchNorm2d,
    nn.BatchNorm3d: norm.BatchNorm3d,
}
_TO_TORCH: dict[type[norm._BatchNorm], type[nn.Module]] = {v: k for k, v in _TO_MANUAL.items()}
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def convert(model: nn.Module, to: str, *, process_group: Any | None = None) -> nn.Module:
    """Replace every batch-norm layer in ``model`` by ``to``'s ("manual": bnlab's, "torch": PyTorch's).

    ``to="sync"``: bnlab's layers, synchronized over ``process_group`` (default: the whole default
    group), whatever they were (PyTorch's or bnlab's, recurrent ones included): what data-parallel
    training needs, on any device and backend. ``process_group`` with "manual" does the same.

    In place; returns the model (a new module if ``model`` itself is a BN layer). See the module
    docstring for what carries over and the conventions that need care.
    """
    if to not in TARGETS:
        raise UsageError(f"convert: to must be one of {', '.join(TARGETS)}; got {to!r}")
    if to == "sync" or (to == "manual" and process_group is not None):
        return _synchronized(convert(model, "manual"), process_group)
    if to == "torch" and isinstance(model, norm._BatchNorm) and model.fused_relu:
        raise UsageError(
            "convert: the model is a single bnlab BatchNorm with fused_relu=True, and PyTorch's layer has no "
            "ReLU of its own; wrap it in nn.Sequential, which convert extends with an nn.ReLU."
        )
    biased: list[str] = []
    converted = _replacement(model, "the model", to, biased)
    if converted is None:
        _convert_children(model, "", to, {}, biased)
        converted = model
    if biased:
        more = f" and {len(biased) - 1} more layers" if len(biased) > 1 else ""
        warnings.warn(
            f"convert(to='torch'): {biased[0]}{more} kept a biased running variance (unbiased_running_var=False, "
            "the notebook's convention), which torch.nn's batch norm cannot: statistics and outputs are "
            "unchanged, but further training will update running_var with the unbiased batch variance.",
            UserWarning,
            stacklevel=2,
        )
    return converted


def _synchronized(model: nn.Module, process_group: Any | None) -> nn.Module:
    from bnlab.nn.recurrent import SequenceBatchNorm  # recurrent.py builds on this package

    if process_group is None:
        if not dist.is_initialized():
            raise UsageError(
                "convert(to='sync') needs a process group: call torch.distributed.init_process_group first"
            )
        process_group = dist.group.WORLD
    for module in model.modules():
        if isinstance(module, (norm._BatchNorm, SequenceBatchNorm)):
            module.process_group = process_group
    return model


def _convert_children(
    module: nn.Module, prefix: str, to: str, done: dict[nn.Module, nn.Module], biased: list[str]
) -> None:
    """Convert the BN layers below ``module``; ``done`` keeps a layer shared by two parents shared."""
    fused = []
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if child not in done:
            new = _replacement(child, prefix + name, to, biased)
            if new is None:  # not a layer to convert: look inside it
                _convert_children(child, f"{prefix}{name}.", to, done, biased)
            done[child] = child if new is None else new
        if done[child] is not child:
            setattr(module, name, done[child])
            if to == "torch" and child.fused_relu:
                fused.append(name)
    if fused:
        _add_relus(module, prefix, fused)


def _replacement(layer: nn.Module, path: str, to: str, biased: list[str]) -> nn.Module | None:
    """The converted counterpart of a BN layer; None for any other module (or one already ``to``'s)."""
    if to == "manual" and isinstance(layer, _TorchBatchNorm):
        if isinstance(layer, nn.SyncBatchNorm):
            raise UsageError(
                f"convert: {path} is an nn.SyncBatchNorm, which takes input of any rank, so it has no "
                "bnlab BatchNorm1d/2d/3d counterpart; convert the model before "
                "nn.SyncBatchNorm.convert_sync_batchnorm, then set process_group on bnlab's layers."
            )
        if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
            raise UsageError(
                f"convert: {path} is an uninitialized {type(layer).__name__}; run one forward pass first, so "
                "that it knows its number of features."
            )
        cls = next((ours for theirs, ours in _TO_MANUAL.items() if isinstance(layer, theirs)), None)
        if cls is None:
            raise UsageError(f"convert: {path} is a {type(layer).__name__}, which bnlab has no counterpart for.")
        new: nn.Module = cls(
            layer.num_features,
            layer.eps,
            layer.momentum,
            layer.affine,
            layer.track_running_stats,
            device="meta",  # every tensor is taken over from the old layer below
            bias=layer.bias is not None,
        )
    elif to == "torch" and isinstance(layer, norm._BatchNorm):
        if layer.track_running_stats and not layer.unbiased_running_var:
            biased.append(path)
        args = (layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        if layer.process_group is not None:
            new = nn.SyncBatchNorm(*args, layer.process_group, device="meta", bias=layer.bias is not None)
        else:
            cls = next(theirs for ours, theirs in _TO_TORCH.items() if isinstance(layer, ours))
            new = cls(*args, device="meta", bias=layer.bias is not None)
    else:
        return None
    for name in _STATE:  # the same tensors: values, device, dtype and requires_grad carry over
        setattr(new, name, getattr(layer, name))
    return new.train(layer.training)


def _add_relus(parent: nn.Module, prefix: str, after: list[str]) -> None:
    """Put an nn.ReLU right after each of the ``after`` children of a Sequential; other names stay."""
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        raise UsageError(
            f"convert: {prefix}{after[0]} is a bnlab BatchNorm with fused_relu=True inside a "
            f"{type(parent).__name__}, whose own forward decides what runs after it, so the ReLU that PyTorch's "
            "layer needs cannot be added; set fused_relu=False on that layer and apply the ReLU in the forward."
        )
    children = list(parent._modules.items())
    taken = {child_name for child_name, _ in children}
    for child_name, _ in children:
        delattr(parent, child_name)
    for child_name, child in children:
        parent.add_module(child_name, child)
        if child_name in after:
            relu_name = f"{child_name}_relu"
            while relu_name in taken:
                relu_name += "_"
            taken.add(relu_name)
            parent.add_module(relu_name, nn.ReLU().train(child.training))
