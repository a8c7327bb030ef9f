"""Fold eval-mode batch norm into the convolution or linear layer before it: ``bnlab.fold``.

    folded = bnlab.fold(model.eval(), example).model    # a copy: every foldable BN gone, the same outputs

In eval mode a batch-norm layer is an affine map per channel, y = x * s + t with s = weight / sqrt(running_var
+ eps) and t = bias - running_mean * s. When x is the output of a convolution or linear layer and nothing
else reads it, the map moves into that layer: its weight scaled by s along the output channels, its bias
b -> b * s + t (a bias is added where it had none). The BN layer becomes ``nn.Identity`` (an in-place
``nn.ReLU`` for a bnlab layer with ``fused_relu``). The arithmetic is done in float64 and stored in the
layer's dtype, so the copy's outputs equal the original's to float rounding.

How pairs are found, honestly for any model (FX cannot trace data-dependent control flow, and module
registration order says nothing about data flow): one forward pass of the copy on ``example`` with every
module hooked and every torch function recorded (``TorchFunctionMode``). A BN layer folds into module P when

- the tensor it normalizes is the very output of P's one call, P is a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``
  or ``Linear`` (subclasses too, such as padding wrappers, checked below), and P runs once in the pass;
- no function other than the BN layer's own reads that tensor (reading its shape does not count), and it is
  not among the model's outputs: another reader would see it change;
- the BN layer runs once, in eval mode, with running statistics (without them it normalizes by the batch:
  not an affine map).

Every fold is then checked: the folded copy's output on ``example`` must equal the original's to float
rounding; a pair whose fold changes it (a producer whose forward is not a plain convolution, such as a
weight-standardized one) is put back and reported. What cannot fold is left in place, with the reason:
BN before a convolution, BN after an activation, a producer read twice, a layer shared between call sites.
The pass sees one input: control flow that takes another path on other inputs is not covered.

Layers: torch.nn's batch norm (``SyncBatchNorm`` included), bnlab's ``BatchNorm*``, ``BatchRenorm*`` and
``GhostBatchNorm*`` (in eval all three are batch norm with the running statistics) and ``FrozenBatchNorm*``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from bnlab.errors import UsageError
from bnlab.nn.batchnorm import _BatchNorm, is_batch_norm
from bnlab.nn.frozen import _FrozenBatchNorm

__all__ = ["FoldResult", "fold", "folded_layout"]

PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
METADATA = frozenset({"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout", "names"})
METADATA_CALLS = frozenset({"size", "dim", "numel", "stride", "is_contiguous", "__len__", "is_floating_point"})


@dataclass
class FoldResult:
    """The folded copy, the (producer, BN layer) names folded, and each BN layer left with the reason."""

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch-norm layer(s), left {len(self.left)}"]
        lines += [f"  {bn} -> {producer}" for producer, bn in self.folded]
        lines += [f"  left {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)


def foldable_kind(module: nn.Module) -> bool:
    """The batch-norm layers ``fold`` knows: eval-mode affine maps from their running statistics."""
    from bnlab.nn.recurrent import SequenceBatchNorm  # recurrent.py imports the package this module is part of

    if isinstance(module, SequenceBatchNorm):
        return False  # statistics per time step: one layer, several maps
    return isinstance(module, (_FrozenBatchNorm, _BatchNorm)) or is_batch_norm(module)


def fold(model: nn.Module, example: Tensor | Sequence[Any], *, check: bool = True) -> FoldResult:
    """A copy of eval-mode ``model`` with every foldable batch-norm layer folded into the layer before it.

    ``example``: an input (or a tuple of positional inputs) for the tracing pass that finds the pairs and
    for the check (``check=False`` skips the check; not advised). Refuses a model in training mode. See the
    module docstring for the rules, and ``FoldResult`` for what it returns.

    >>> import torch, bnlab
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    >>> result = bnlab.fold(net, torch.randn(2, 1, 8, 8))
    >>> result.folded
    [('0', '1')]
    """
    norms = [name for name, m in model.named_modules() if foldable_kind(m)]
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise UsageError(
            f"fold needs an eval-mode model (a training-mode BN normalizes by the batch, which no weights can "
            f"hold); {', '.join(training[:3])}{' ...' if len(training) > 3 else ''} in training mode: call "
            "model.eval() first"
        )
    inputs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    result = FoldResult(copy.deepcopy(model))
    modules = dict(result.model.named_modules())
    with torch.no_grad():
        trace = _Trace(result.model)
        with trace:
            outputs = result.model(*inputs)
        expected = [t.clone() for t in tree_leaves(outputs) if isinstance(t, Tensor)]
        candidates = []
        for name in norms:
            producer, why = trace.producer_of(name, modules[name], outputs)
            if producer is None:
                result.left.append((name, why))
            else:
                candidates.append((producer, name))
        originals = {n: copy.deepcopy(modules[n]) for pair in candidates for n in pair}
        for producer, name in candidates:
            _fold_pair(result.model, producer, name)
        if check and not _same(result.model, inputs, expected):
            # put every pair back, then fold them one at a time, keeping each that leaves the output as it was
            for n, module in originals.items():
                _set(result.model, n, copy.deepcopy(module))
            kept = []
            for producer, name in candidates:
                _fold_pair(result.model, producer, name)
                if _same(result.model, inputs, expected):
                    kept.append((producer, name))
                    continue
                for n in (producer, name):
                    _set(result.model, n, copy.deepcopy(originals[n]))
                why = f"folding it into {producer} changed the output (its forward is not a plain map of its weight)"
                result.left.append((name, why))
            candidates = kept
        result.folded = candidates
    return result


def _fold_pair(model: nn.Module, producer: str, name: str) -> None:
    """Move BN layer ``name``'s eval affine map into ``producer``'s weight and bias; the BN layer becomes identity."""
    layer, norm = model.get_submodule(producer), model.get_submodule(name)
    mean, var = norm.running_mean.double(), norm.running_var.double()
    scale = torch.rsqrt(var + norm.eps)
    if getattr(norm, "weight", None) is not None:
        scale = scale * norm.weight.detach().double()
    shift = -mean * scale
    if getattr(norm, "bias", None) is not None:
        shift = shift + norm.bias.detach().double()
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # weight (in, out / groups, ...): out by group
        groups = layer.groups
        per_group = weight.shape[1]
        view = weight.reshape(groups, weight.shape[0] // groups, per_group, *weight.shape[2:])
        factor = scale.reshape(groups, 1, per_group, *[1] * (weight.dim() - 2))
        weight = (view * factor).reshape(weight.shape)
    else:  # weight (out, ...)
        weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    bias = shift if layer.bias is None else layer.bias.detach().double() * scale + shift
    layer.weight.data.copy_(weight)  # in place: the layout (channels_last) and the parameter object stay
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.data.copy_(bias)
    _set(model, name, _replacement(norm))


def folded_layout(model: nn.Module, pairs: Sequence[Sequence[str]]) -> nn.Module:
    """``model`` (as built, in place) in the layout a fold of ``pairs`` (``FoldResult.folded``) leaves: each
    producer with a bias, each BN layer replaced. For loading a folded state_dict into a freshly built network."""
    for producer, name in pairs:
        layer = model.get_submodule(producer)
        if layer.bias is None:
            channels = layer.weight.shape[0] if not isinstance(layer, nn.modules.conv._ConvTransposeNd) else (
                layer.weight.shape[1] * layer.groups
            )  # fmt: skip
            layer.bias = nn.Parameter(torch.zeros(channels, dtype=layer.weight.dtype, device=layer.weight.device))
        _set(model, name, _replacement(model.get_submodule(name)))
    return model


def _replacement(norm: nn.Module) -> nn.Module:
    """What a folded BN layer leaves: the ReLU bnlab's layer applied in its own pass (in place: the tensor it
    gets, the producer's output, has no other reader, or the layer would not have folded), or nothing."""
    return nn.ReLU(inplace=True) if getattr(norm, "fused_relu", False) else nn.Identity()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attribute, module)


def _same(model: nn.Module, inputs: tuple[Any, ...], expected: list[Tensor]) -> bool:
    """Whether ``model``'s outputs on ``inputs`` are ``expected`` to float rounding (loose: it catches wrong
    folds, errors of order one, not rounding)."""
    got = [t for t in tree_leaves(model(*inputs)) if isinstance(t, Tensor)]
    if len(got) != len(expected):
        return False
    for a, b in zip(got, expected, strict=True):
        tolerance = 1e-9 if a.dtype == torch.float64 else 1e-3
        scale = b.abs().max().item() if b.numel() else 0.0
        if a.shape != b.shape or (a.numel() and (a - b).abs().max().item() > tolerance * max(scale, 1.0)):
            return False
    return True


class _Trace(TorchFunctionMode):
    """One forward pass, seen module by module and function by function: each module's calls (inputs,
    output) and, for each tensor, the modules whose own code read it (the innermost one running)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: dict[nn.Module, list[tuple[tuple[Any, ...], Any]]] = {}
        self.readers: dict[int, list[nn.Module | None]] = {}  # id(tensor) -> the innermost module of each read
        self.running: list[nn.Module] = []
        self.alive: list[Any] = []  # every tensor seen, kept so that no id is reused within the pass
        self.handles: list[Any] = []

    def __enter__(self) -> _Trace:
        for module in self.model.modules():
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        super().__exit__(*exc)

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.running.append(module)
        self.calls.setdefault(module, []).append((args, None))

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.running.pop()
        calls = self.calls[module]
        calls[-1] = (calls[-1][0], output)
        self.alive.append(output)

    def __torch_function__(self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        prop = getattr(getattr(func, "__self__", None), "__name__", None)
        if not (name in METADATA_CALLS or (name == "__get__" and prop in METADATA)):
            reader = self.running[-1] if self.running else None
            for leaf in tree_leaves((args, kwargs or {})):
                if isinstance(leaf, Tensor):
                    self.readers.setdefault(id(leaf), []).append(reader)
                    self.alive.append(leaf)
        return func(*args, **(kwargs or {}))

    def producer_of(self, name: str, norm: nn.Module, outputs: Any) -> tuple[str | None, str]:
        """(the module ``norm`` folds into, ""), or (None, why not)."""
        names = {m: n for n, m in self.model.named_modules()}
        calls = self.calls.get(norm, [])
        if len(calls) != 1:
            return None, f"it runs {len(calls)} times in the pass (once is foldable)"
        if getattr(norm, "track_running_stats", True) is False or getattr(norm, "running_mean", None) is None:
            return None, "it keeps no running statistics, so in eval it normalizes by the batch: not an affine map"
        ((args, _),) = calls
        x = args[0] if args else None
        if not isinstance(x, Tensor):
            return None, "its input is not a tensor"
        made = [m for m, c in self.calls.items() if any(out is x for _, out in c) and m is not norm]  # and parents
        producer = next((m for m in made if isinstance(m, PRODUCERS)), None)
        if producer is None:
            kinds = ", ".join(sorted({type(m).__name__ for m in made if next(m.children(), None) is None}))
            return None, (f"its input comes from {kinds}, not a convolution or linear layer" if kinds else
                          "its input is not a module's output (a function's, or the model's input)")  # fmt: skip
        if len(self.calls[producer]) != 1:
            return None, f"{names[producer]} runs {len(self.calls[producer])} times (shared between call sites)"
        others = [r for r in self.readers.get(id(x), []) if r is not norm and not _inside(r, norm)]
        if others:
            who = ", ".join(sorted({names.get(r, "") or "the model's forward" for r in others if r is not None}))
            return None, f"the output of {names[producer]} is also read by {who or 'a function outside modules'}"
        if any(t is x for t in tree_leaves(outputs)):
            return None, f"the output of {names[producer]} is also one of the model's outputs"
        return names[producer], ""


def _inside(module: nn.Module | None, owner: nn.Module) -> bool:
    return module is not None and any(module is m for m in owner.modules())
