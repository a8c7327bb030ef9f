"""Scoring probes: the model's outputs for the same samples alone and inside a batch, and what feeds what.

"Alone" is a batch holding only that sample, fed as two copies of it: batch statistics are then exactly
those of the sample by itself, as TensorFlow computes them for a batch of one, where PyTorch would
refuse to normalize a single value. The batch pass is traced (which module produced which tensor), so
the probes also see a bias that feeds batch norm and batch norm that makes the model's output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from bnlab.check.report import Finding
from bnlab.check.rules import HALF_TOLERANCE, TOLERANCE
from bnlab.errors import UsageError
from bnlab.nn import is_batch_norm

__all__ = ["one_line", "scoring_findings"]


def one_line(err: BaseException) -> str:
    """An exception from the user's code as one line: the CLI prints errors on a single line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def scoring_findings(
    model: nn.Module, layers: list[tuple[str, nn.Module]], x: Tensor, labels: Tensor | None
) -> list[Finding]:
    """Score x in one batch (tracing which layer made which tensor), then each sample alone, as the model is.

    Raises UsageError when the model cannot take ``x`` or returns no tensor with a row per sample: every
    other part of the check scores the model the same way.
    """
    trace = _Trace(model, layers)
    try:
        with trace:
            batch_out = model(x)
    except Exception as err:  # any model: whatever it raises means it cannot take these inputs
        raise UsageError(
            f"the model cannot score inputs of shape {tuple(x.shape)} ({one_line(err)}); check it on data it accepts"
        ) from err
    if not isinstance(batch_out, Tensor) or batch_out.dim() == 0 or batch_out.shape[0] != len(x):
        raise UsageError(
            f"the model must return a tensor with one row per sample; for {len(x)} samples it returned "
            f"{type(batch_out).__name__}{tuple(batch_out.shape) if isinstance(batch_out, Tensor) else ''}"
        )
    findings = trace.findings(batch_out)
    # Alone: a batch of two copies has exactly the sample's own batch statistics (see the module docstring).
    alone = torch.cat([model(x[[i, i]])[:1] for i in range(len(x))]).float()
    # Reordering the same arithmetic moves float32 outputs by ~1e-6 of their size; half precision by ~1e-3.
    tolerance = TOLERANCE if batch_out.dtype in (torch.float32, torch.float64) else HALF_TOLERANCE
    batch_out = batch_out.float()
    finite = batch_out[batch_out.isfinite()]
    scale = max(finite.abs().max().item() if finite.numel() else 0.0, torch.finfo(torch.float32).tiny)

    def all_same(out: Tensor) -> bool:
        return _distance(out, out[:1]) <= tolerance * scale

    difference = _distance(alone, batch_out)
    if difference <= tolerance * scale:
        return findings
    identical = all_same(alone) and not all_same(batch_out)
    classifier = batch_out.dim() == 2 and batch_out.shape[1] > 1
    if identical:
        evidence = [f"all {len(x)} samples scored alone get the same output"]
        if classifier:
            evidence[0] += f" (class {int(alone[0].argmax())})"
    else:
        evidence = [f"outputs move by up to {difference:.3g} (largest output {scale:.3g})"]
    if classifier:
        predicted, predicted_alone = batch_out.argmax(1), alone.argmax(1)
        evidence.append(f"{int((predicted != predicted_alone).sum())} of {len(x)} predictions change")
        if labels is not None:
            accuracy, accuracy_alone = (predicted == labels).float().mean(), (predicted_alone == labels).float().mean()
            evidence.append(f"accuracy {accuracy:.2f} in a batch, {accuracy_alone:.2f} alone")
    code = "identical-when-alone" if identical else "batch-dependent"
    return [*findings, Finding(code, None, "; ".join(evidence))]


def _distance(a: Tensor, b: Tensor) -> float:
    """Largest |a - b|, where equal values (infinities included) and NaN against NaN count as 0."""
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, 0.0, (a - b).abs()).max().item()


class _Trace:
    """Records, during one forward pass, which leaf module produced each tensor (by identity).

    Outputs are kept alive until the pass is analysed, so no tensor id is reused. An in-place module
    (``ReLU(inplace=True)``) returns its input: such a tensor has several producers, in call order.
    """

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
        self.model, self.layers = model, layers
        self.producers: dict[int, list[tuple[str, nn.Module, Tensor | None]]] = {}
        self.feeding: dict[str, tuple[str, nn.Module, Tensor]] = {}  # BN layer -> (producer, its input)
        self.handles: list[Any] = []
        self.alive: list[Tensor] = []

    def __enter__(self) -> _Trace:
        for name, module in self.model.named_modules():
            if next(module.children(), None) is None or is_batch_norm(module):
                self.handles.append(module.register_forward_hook(self._record(name or "model")))
        for name, layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(self._record_input(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _record(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, Tensor):
                source = args[0] if args and isinstance(args[0], Tensor) else None
                self.producers.setdefault(id(output), []).append((name, module, source))
                self.alive.append(output)  # a freed output's id could be reused by a later, unrelated tensor

        return hook

    def _record_input(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            producers = self.producers.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
            if producers:  # the latest producer of the input at the moment BN reads it
                self.feeding[name] = (producers[-1][0], producers[-1][1], args[0])

        return hook

    def findings(self, output: Tensor) -> list[Finding]:
        findings = []
        for name, layer in self.layers:
            if name not in self.feeding:
                continue
            source, module, x = self.feeding[name]
            has_bias = getattr(module, "bias", None) is not None
            per_channel = (isinstance(module, _ConvNd) and module.out_channels == layer.num_features) or (
                isinstance(module, nn.Linear) and x.dim() == 2 and module.out_features == layer.num_features
            )
            if has_bias and per_channel:
                evidence = f"fed by {source} ({type(module).__name__}, bias=True)"
                findings.append(Finding("redundant-bias", name, evidence))
        origin = self._batch_norm_origin(output)
        if origin is not None:
            findings.append(Finding("bn-on-logits", origin))
        return findings

    def _batch_norm_origin(self, tensor: Tensor) -> str | None:
        """The BN layer that made ``tensor``, looking back through parameter-free layers only."""
        key, depth = id(tensor), 1
        while len(self.producers.get(key, ())) >= depth:
            name, module, source = self.producers[key][-depth]
            if is_batch_norm(module):
                return name
            if source is None or next(module.parameters(), None) is not None:
                return None
            depth = depth + 1 if id(source) == key else 1  # in place: the producer before this one
            key = id(source)
        return None
