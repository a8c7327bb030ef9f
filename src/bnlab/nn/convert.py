"""Swap the batch-norm layers of any model: PyTorch's <-> bnlab's, and to batch norm's family.

    model = convert(model, to="manual")   # nn.BatchNorm1d/2d/3d (or any of the family) -> bnlab.BatchNorm1d/2d/3d
    model = convert(model, to="torch")    # bnlab's -> nn.BatchNorm1d/2d/3d
    model = convert(model, to="renorm", rmax=3.0, dmax=5.0, warmup_steps=5000)   # -> bnlab.BatchRenorm*
    model = convert(model, to="ghost", virtual_batch_size=16)                    # -> bnlab.GhostBatchNorm*
    model = convert(model, to="frozen")   # -> bnlab.FrozenBatchNorm*: statistics and affine fixed as they are
    model = convert(model, to="group")    # -> nn.GroupNorm (``group_count``'s rule, or num_groups=G)

Like ``nn.SyncBatchNorm.convert_sync_batchnorm`` it works in place and returns the model: each BN
layer is replaced inside its parent, however deeply nested, and the new layer takes over the old
one's parameter and buffer *tensors* (not copies). So values, device, dtype and ``requires_grad``
cannot change, and an optimizer built before the conversion keeps updating the same tensors. Use
the return value: a model that is itself a BN layer comes back as a new module. For an independent
copy, convert ``copy.deepcopy(model)``. Hooks registered on the old layers are not carried over.

The batch-norm family (``FAMILIES``): batch norm (PyTorch's, bnlab's), batch renorm, ghost batch norm and
frozen batch norm, each in 1d/2d/3d; a layer of any of them converts to any other of the same rank, and a
layer already of the target's kind is left as it is. Options after ``to`` go to the new layers'
constructors (renorm's ``rmax``, ``dmax``, ``warmup_steps``, ``warmup``, ``renorm_momentum``; ghost's
``virtual_batch_size``, which it needs; group's ``num_groups``).

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
- Frozen. Its weight and bias become buffers holding copies (an optimizer built before the
  conversion would otherwise still move them; an affine-free layer gets ones and zeros), its running
  statistics buffers holding the same tensors; a layer without running statistics cannot be frozen
  (an error names it). Converted back, they become parameters again (the frozen layer's storage) with
  ``num_batches_tracked`` 0 and torch.nn's momentum 0.1; eval outputs are the same both ways.
- Renorm and ghost keep batch norm's state exactly, so eval outputs do not change; training differs
  by design (renorm with rmax=1, dmax=0 and ghost with a virtual batch of the whole batch are batch
  norm). Renorm's own moving mean and sigma (``renorm_momentum``) are dropped when converting away.
- Group. ``nn.GroupNorm`` takes the weight and bias (the same tensors), not the running statistics,
  which it has no place for: it normalizes each sample by its own groups' statistics, so outputs
  change, in training and in eval. A warning says so, naming the layers.
- Process groups. A bnlab layer with a ``process_group`` becomes ``nn.SyncBatchNorm`` with that
  group. The other way round is refused: ``nn.SyncBatchNorm`` accepts any input rank, so there is
  no BatchNorm1d/2d/3d to map it to. Frozen and group layers take no batch statistics, so a
  ``process_group`` has nothing to synchronize there and is dropped (with a warning); ghost batch
  norm has no synchronized form, so converting a synchronized layer to it is refused.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from bnlab.errors import UsageError
from bnlab.nn import batchnorm as norm
from bnlab.nn.batchnorm import whole_number
from bnlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNorm
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = ["FAMILIES", "FUSES_RELU", "TARGETS", "convert", "group_count"]

FAMILIES: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "manual": (norm.BatchNorm1d, norm.BatchNorm2d, norm.BatchNorm3d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "renorm": (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d),
    "ghost": (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d),
    "frozen": (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d),
}
"""Batch norm's family, by kind, each kind's layers for inputs of rank 2-3, 4 and 5."""
TARGETS = (*FAMILIES, "sync", "group")
_OPTIONS = {
    "renorm": ("rmax", "dmax", "warmup_steps", "warmup", "renorm_momentum"),
    "ghost": ("virtual_batch_size",),
    "group": ("num_groups",),
}
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
FUSES_RELU = ("manual", "renorm", "ghost")  # the kinds with a fused_relu option
MAX_GROUPS = 32  # Wu & He's default


def group_count(channels: int, at_most: int = MAX_GROUPS) -> int:
    """GroupNorm's groups for ``channels``: ``at_most`` (32, Wu & He's default), or the largest divisor of
    ``channels`` below it (GroupNorm needs groups that divide the channels): 64 -> 32, 48 -> 24, 10 -> 10."""
    return max(g for g in range(1, min(at_most, channels) + 1) if channels % g == 0)


def convert(model: nn.Module, to: str, *, process_group: Any | None = None, **options: Any) -> nn.Module:
    """Replace every batch-norm layer in ``model`` by ``to``'s kind (see ``TARGETS`` and the module docstring).

    ``to="sync"``: bnlab's layers, synchronized over ``process_group`` (default: the whole default
    group): PyTorch's become bnlab's, and bnlab's (renorm and recurrent ones included) join the group;
    what data-parallel training needs, on any device and backend. ``process_group`` with "manual" does the
    same. ``options``: the new layers' own constructor options (renorm, ghost, group).

    In place; returns the model (a new module if ``model`` itself is a BN layer). See the module
    docstring for what carries over and the conventions that need care.
    """
    if to not in TARGETS:
        raise UsageError(f"convert: to must be one of {', '.join(TARGETS)}; got {to!r}")
    unknown = sorted(set(options) - set(_OPTIONS.get(to, ())))
    if unknown:
        allowed = ", ".join(_OPTIONS.get(to, ())) or "none"
        raise UsageError(f"convert(to={to!r}): unknown option {', '.join(unknown)} (its options: {allowed})")
    if to == "ghost" and "virtual_batch_size" not in options:
        raise UsageError("convert(to='ghost') needs virtual_batch_size=, the samples per virtual batch")
    if to == "sync" or (to == "manual" and process_group is not None):
        for name, module in model.named_modules():  # before anything changes
            if isinstance(module, FAMILIES["ghost"]):
                raise UsageError(
                    f"convert(to='sync'): {name or 'the model'} is a ghost batch norm, which normalizes each "
                    "virtual batch by its own statistics and has no synchronized form; convert it to 'manual' first"
                )
        return _synchronized(_convert(model, "manual", ("torch",), {}), process_group)
    if to in ("torch", "frozen", "group") and isinstance(model, norm._BatchNorm) and model.fused_relu:
        raise UsageError(
            f"convert: the model is a single bnlab BatchNorm with fused_relu=True, and the {to} layer has no "
            "ReLU of its own; wrap it in nn.Sequential, which convert extends with an nn.ReLU."
        )
    return _convert(model, to, tuple(kind for kind in FAMILIES if kind != to), options)


def _convert(model: nn.Module, to: str, sources: tuple[str, ...], options: dict[str, Any]) -> nn.Module:
    """The conversion of the layers of the ``sources`` kinds to ``to``'s, then one warning per kind of loss.

    Every replacement is built, and every refusal raised, before the model changes: a refused conversion
    leaves it as it was.
    """
    notes: dict[str, list[str]] = {}
    converted = _replacement(model, "the model", to, sources, options, notes)
    if converted is None:
        plan: list[tuple[nn.Module, str, str, nn.Module, nn.Module]] = []
        _plan_children(model, "", to, sources, options, {}, notes, plan)
        fused: dict[nn.Module, tuple[str, list[str]]] = {}
        for parent, prefix, name, old, new in plan:
            if new is not old and to not in FUSES_RELU and getattr(old, "fused_relu", False):
                _check_relu_parent(parent, prefix + name)
                fused.setdefault(parent, (prefix, []))[1].append(name)
        for parent, _, name, old, new in plan:
            if new is not old:
                setattr(parent, name, new)
        for parent, (prefix, names) in fused.items():
            _add_relus(parent, prefix, names)
        converted = model
    for why, paths in notes.items():
        more = f" and {len(paths) - 1} more layers" if len(paths) > 1 else ""
        warnings.warn(f"convert(to={to!r}): {paths[0]}{more} {why}", UserWarning, stacklevel=3)
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


def _plan_children(
    module: nn.Module,
    prefix: str,
    to: str,
    sources: tuple[str, ...],
    options: dict[str, Any],
    done: dict[nn.Module, nn.Module],
    notes: dict[str, list[str]],
    plan: list[tuple[nn.Module, str, str, nn.Module, nn.Module]],
) -> None:
    """(parent, its prefix, name, layer, replacement) for every child below ``module``; the model unchanged.
    ``done`` keeps a layer shared by two parents shared."""
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if child not in done:
            new = _replacement(child, prefix + name, to, sources, options, notes)
            if new is None:  # not a layer to convert: look inside it
                _plan_children(child, f"{prefix}{name}.", to, sources, options, done, notes, plan)
            done[child] = child if new is None else new
        plan.append((module, prefix, name, child, done[child]))


def _kind(layer: nn.Module, path: str) -> tuple[str, int] | None:
    """(the family kind, the rank index) of a batch-norm layer; None for any other module."""
    if isinstance(layer, nn.SyncBatchNorm):
        return "torch", -1  # any rank: refused where a rank is needed
    for kind, classes in FAMILIES.items():
        for rank, cls in enumerate(classes):
            if isinstance(layer, cls):
                return kind, rank
    if isinstance(layer, (_TorchBatchNorm, norm._BatchNorm)):
        if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
            raise UsageError(
                f"convert: {path} is an uninitialized {type(layer).__name__}; run one forward pass first, so "
                "that it knows its number of features."
            )
        raise UsageError(f"convert: {path} is a {type(layer).__name__}, which bnlab has no counterpart for.")
    return None


def _replacement(
    layer: nn.Module, path: str, to: str, sources: tuple[str, ...], options: dict[str, Any], notes: dict[str, list[str]]
) -> nn.Module | None:
    """The converted counterpart of a BN layer of the ``sources`` kinds; None for any other module."""
    from bnlab.nn.recurrent import SequenceBatchNorm  # recurrent.py builds on this package

    found = _kind(layer, path)
    if found is not None and found[0] == to and options:
        notes.setdefault(f"is already of that kind: left as it is, without the options {sorted(options)}", []).append(
            path
        )
    if isinstance(layer, SequenceBatchNorm) and to in ("renorm", "ghost", "frozen", "group"):
        notes.setdefault("is a recurrent SequenceBatchNorm (statistics per time step): left as it is", []).append(path)
    if found is None or found[0] not in sources:
        return None
    rank = found[1]
    if rank < 0 and to != "torch":
        raise UsageError(
            f"convert: {path} is an nn.SyncBatchNorm, which takes input of any rank, so it has no "
            "bnlab BatchNorm1d/2d/3d counterpart; convert the model before "
            "nn.SyncBatchNorm.convert_sync_batchnorm, then set process_group on bnlab's layers."
        )
    frozen = isinstance(layer, _FrozenBatchNorm)
    tracked = layer.running_mean is not None
    group = getattr(layer, "process_group", None)
    if group is not None and to in ("frozen", "group"):
        notes.setdefault(
            "had a process_group, which a layer without batch statistics has no use for: dropped", []
        ).append(path)
    if to == "frozen":
        if not tracked:
            raise UsageError(
                f"convert(to='frozen'): {path} keeps no running statistics (track_running_stats=False), so there "
                "is nothing to freeze it with; train it with statistics, or leave it as it is"
            )
        new: nn.Module = FAMILIES["frozen"][rank](layer.num_features, layer.eps, device="meta")
        ones = torch.ones_like(layer.running_mean)
        # copies: an optimizer built before the conversion still holds the parameters, and would move them
        new.weight = ones if layer.weight is None else layer.weight.detach().clone()
        new.bias = torch.zeros_like(ones) if layer.bias is None else layer.bias.detach().clone()
        new.running_mean, new.running_var = layer.running_mean, layer.running_var
        return new.train(layer.training)
    if to == "group":
        if tracked:
            notes.setdefault(
                "kept running statistics, which GroupNorm has no place for: dropped. GroupNorm normalizes each "
                "sample by its own groups' statistics, so outputs change, in training and in eval",
                [],
            ).append(path)
        channels = layer.num_features
        if "num_groups" not in options and rank == 0:
            raise UsageError(
                f"convert(to='group'): {path} is a 1d batch norm, whose (N, C) input would give GroupNorm "
                f"{channels} / groups values per sample and group ({group_count(channels)} groups: "
                f"{channels // group_count(channels)}, so the output would be constant or nearly); pass num_groups "
                "(1 is layer norm) if that is what you want"
            )
        try:
            groups = whole_number("num_groups", options.get("num_groups", group_count(channels)), 1)
        except ValueError as error:
            raise UsageError(f"convert(to='group'): {error}") from None
        if channels % groups:
            raise UsageError(f"convert(to='group'): {path} has {channels} channels, which {groups} groups don't divide")
        affine = frozen or layer.weight is not None
        new = nn.GroupNorm(groups, channels, layer.eps, affine, device="meta")
        if affine:  # the same tensors, as parameters (a frozen layer's are buffers)
            bias = layer.bias if layer.bias is not None else torch.zeros_like(layer.weight)
            new.weight, new.bias = (t if isinstance(t, nn.Parameter) else nn.Parameter(t) for t in (layer.weight, bias))
        return new.train(layer.training)
    return _batch_norm_replacement(layer, path, to, rank, options, notes)


def _batch_norm_replacement(
    layer: nn.Module, path: str, to: str, rank: int, options: dict[str, Any], notes: dict[str, list[str]]
) -> nn.Module:
    """``layer`` as a batch norm of ``to``'s kind ("manual", "torch", "renorm" or "ghost"), on the same tensors."""
    frozen = isinstance(layer, _FrozenBatchNorm)
    args = (layer.num_features, layer.eps) + ((0.1, True, True) if frozen else (
        layer.momentum, layer.affine, layer.track_running_stats
    ))  # fmt: skip
    bias = frozen or layer.bias is not None
    ours = isinstance(layer, norm._BatchNorm)
    if to == "torch":
        if ours and layer.track_running_stats and not layer.unbiased_running_var:
            notes.setdefault(
                "kept a biased running variance (unbiased_running_var=False, the notebook's convention), which "
                "torch.nn's batch norm cannot: statistics and outputs are unchanged, but further training will "
                "update running_var with the unbiased batch variance.",
                [],
            ).append(path)
        group = getattr(layer, "process_group", None)
        if group is not None:
            new = nn.SyncBatchNorm(*args, group, device="meta", bias=bias)
        else:
            new = FAMILIES["torch"][rank](*args, device="meta", bias=bias)
    else:
        own = {"unbiased_running_var": layer.unbiased_running_var, "fused_relu": layer.fused_relu} if ours else {}
        if ours and layer.process_group is not None:
            own["process_group"] = layer.process_group
        try:
            new = FAMILIES[to][rank](*args, device="meta", bias=bias, **own, **options)
        except ValueError as error:
            raise UsageError(f"convert(to={to!r}): {path}: {error}") from None
    if frozen:
        new.weight, new.bias = nn.Parameter(layer.weight), nn.Parameter(layer.bias)
        new.running_mean, new.running_var = layer.running_mean, layer.running_var
        new.num_batches_tracked = torch.zeros((), dtype=torch.long, device=layer.running_mean.device)
    else:
        for name in _STATE:  # the same tensors: values, device, dtype and requires_grad carry over
            setattr(new, name, getattr(layer, name))
    if getattr(new, "renorm_momentum", None) is not None:  # renorm's own moving statistics start from the layer's
        new.renorm_mean = new.running_mean.detach().clone()
        new.renorm_std = torch.sqrt(new.running_var.detach() + new.eps)
    return new.train(layer.training)


def _check_relu_parent(parent: nn.Module, path: str) -> None:
    """A fused ReLU can be carried out of a layer only into a plain nn.Sequential parent."""
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        raise UsageError(
            f"convert: {path} is a bnlab BatchNorm with fused_relu=True inside a {type(parent).__name__}, whose "
            "own forward decides what runs after it, so the ReLU that the new layer needs cannot be added; set "
            "fused_relu=False on that layer and apply the ReLU in the forward."
        )


def _add_relus(parent: nn.Module, prefix: str, after: list[str]) -> None:
    """Put an nn.ReLU right after each of the ``after`` children of a Sequential (``_check_relu_parent``'s);
    other names stay."""
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
