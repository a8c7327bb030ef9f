"""Is batch norm being used correctly? Findings about a model's BN layers, each with a fix.

    report = check_model(model)          # data: MNIST's test split unless given
    print(report.format()); report.passed

Three kinds of evidence, none of which changes the model (modes, buffers and settings are put back):

- the layers as they are: mode, options, running statistics and their counter;
- the model scoring the first ``samples`` inputs inside one batch and each alone, in the mode it
  was handed over in. "Alone" is a batch holding only that sample, fed as two copies of it: batch
  statistics are then exactly those of the sample by itself, as TensorFlow computes them for a
  batch of one, where PyTorch would refuse to normalize a single value;
- every BN layer's population statistics re-estimated from the first ``stats_samples`` inputs with
  the current weights (batches of ``batch_size``, BN in training mode with an exact average, the
  rest of the model in eval mode), together with the variance within single samples, which is what
  a layer trained on batches of one accumulates.

``docs/check.md`` explains every finding, its detection rule and its fix. Errors make the report
fail; warnings (wasted parameters, risky settings) do not.
"""

from __future__ import annotations

import importlib
import math
import re
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from bnlab.data import Split, load_mnist
from bnlab.errors import BnlabError, UsageError
from bnlab.nn import is_batch_norm
from bnlab.nn.precise import recalibrate

__all__ = [
    "RULES",
    "Finding",
    "Report",
    "Rule",
    "batch_norm_layers",
    "check_model",
    "load_model_spec",
]

ERROR, WARNING = "error", "warning"

# Detection thresholds (docs/check.md gives the reasoning).
FAST_MOMENTUM = 0.5  # momentum-too-large: the statistics average fewer than 2 / momentum - 1 = 3 batches
STALE_LIMIT = 0.5  # stale-stats: median channel's mean off by 0.5 std, or its std off by e**0.5 = 1.65x
ONE_SAMPLE_GAP = math.log(2.0)  # batch-of-one: channels whose one-sample variance is < 1/2 the population's
ONE_SAMPLE_SIDE = 0.5  # batch-of-one: running_var nearer (in log) the one-sample variance than the population's


@dataclass(frozen=True)
class Rule:
    """One kind of finding: what it means and how to fix it."""

    code: str
    severity: str
    title: str
    explanation: str
    fix: str


_RECOMPUTE = (
    "recompute them with the final weights: `bnlab recalibrate RUN_DIR` for a bnlab run, or "
    "bnlab.recalibrate(model, training_images) for any model"
)

RULES: dict[str, Rule] = {
    rule.code: rule
    for rule in (
        Rule(
            "training-mode",
            ERROR,
            "batch norm left in training mode",
            "In training mode batch norm normalizes each sample with the mean and variance of the batch it "
            "arrives in, not with the population statistics it learned: a prediction depends on the other "
            "samples of the batch, and a sample scored alone normalizes to beta.",
            "Call model.eval() before inference (and model.train() before training again).",
        ),
        Rule(
            "no-running-stats",
            ERROR,
            "no population statistics",
            "Built with track_running_stats=False, the layer keeps no running mean and variance, so even in "
            "eval mode it normalizes with the statistics of the current batch: predictions depend on the "
            "batch, and a sample scored alone normalizes to beta.",
            "Build the layer with track_running_stats=True (the default) and train it.",
        ),
        Rule(
            "nonfinite-stats",
            ERROR,
            "population statistics are NaN or infinite",
            "running_mean or running_var holds NaN or infinity, so every output in eval mode does too. "
            "Training diverged, or the statistics overflowed in float16.",
            "Go back to a checkpoint from before the divergence and lower the learning rate, or keep batch "
            "norm in float32 (autocast does).",
        ),
        Rule(
            "stats-at-init",
            ERROR,
            "population statistics never updated",
            "running_mean is still all 0 and running_var all 1, their initial values: the layer never ran in "
            "training mode on data (or its momentum is 0), so in eval mode it normalizes with mean 0 and "
            "variance 1 instead of its inputs' statistics.",
            f"Train with the model in training mode (model.train()), or {_RECOMPUTE}.",
        ),
        Rule(
            "batch-of-one",
            ERROR,
            "statistics collected one sample at a time",
            "The running variance matches the spread within single samples, not across the data: what the "
            "layer accumulates when trained on batches of one. A batch of one has no spread across samples "
            "(where a feature has one value per sample its variance is 0 and the layer outputs beta whatever "
            "the input), so in eval mode the layer divides by a variance far smaller than its inputs have.",
            "Train with batches of several samples (16 or more is safe); where only tiny batches fit, use "
            f"GroupNorm or LayerNorm instead of batch norm. To rescue this model, {_RECOMPUTE}.",
        ),
        Rule(
            "momentum-too-small",
            ERROR,
            "momentum so small that the statistics barely track the data",
            "With momentum m (1 - decay), after n training batches a share (1 - m)^n of the running "
            "statistics is still their initial value (mean 0, variance 1). For this layer that share alone puts "
            f"the statistics off the data's by more than the stale-stats limit (median channel's mean off by "
            f"{STALE_LIMIT} standard deviations, or its standard deviation by a factor {math.exp(STALE_LIMIT):.2f}), "
            "and they are: in eval mode the layer normalizes with a blend of its inputs' statistics and 0 / 1.",
            "Train for more batches or raise momentum (PyTorch's default is 0.1; decay 0.99 is momentum 0.01), "
            f"or {_RECOMPUTE}.",
        ),
        Rule(
            "stale-stats",
            ERROR,
            "population statistics do not match the data",
            "Re-estimated on the data with the current weights, the layer's input has another mean or "
            f"variance than its running statistics say: for the median channel the mean is off by more than "
            f"{STALE_LIMIT} standard deviations or the standard deviation by more than a factor "
            f"{math.exp(STALE_LIMIT):.2f}, so in eval mode the layer shifts and scales its outputs away from what "
            "the next layer was trained on. Usual causes: statistics lagging the weights (weights changed after "
            "the statistics were collected, momentum too small), or data preprocessed differently from the "
            "training data.",
            f"Preprocess inference data exactly as in training; {_RECOMPUTE}.",
        ),
        Rule(
            "momentum-too-large",
            WARNING,
            "momentum so large that the statistics follow only the last batches",
            "PyTorch's momentum is the weight of the newest batch (1 - decay in TensorFlow and Keras terms). At "
            f"{FAST_MOMENTUM} or more the running statistics average the last 2 / momentum - 1 <= 3 batches "
            "(momentum 1: the last batch alone), so they are as noisy as a single batch's. A Keras decay "
            "(0.99) passed as PyTorch's momentum does this.",
            "Use momentum=0.1 (PyTorch's default) or 0.01; for a decay d, pass momentum=1 - d.",
        ),
        Rule(
            "batch-dependent",
            ERROR,
            "predictions change with the batch",
            "Scored alone and inside a batch, the same samples get different outputs: some layer normalizes "
            "with batch statistics at inference, so a prediction depends on the rest of its batch.",
            "Call model.eval(), and give every BN layer population statistics (see the layer findings).",
        ),
        Rule(
            "identical-when-alone",
            ERROR,
            "every sample gets the same prediction when scored alone",
            "Scored one at a time every sample gets the same output, while inside a batch the outputs differ. "
            "A BN layer using batch statistics sees a single value per feature in a batch of one: its variance "
            "is 0, the layer outputs beta whatever the input, and everything after it is constant.",
            "Call model.eval() so that batch norm uses its population statistics, and make sure they were "
            "tracked in training (track_running_stats=True).",
        ),
        Rule(
            "redundant-bias",
            WARNING,
            "bias before batch norm is redundant",
            "The layer feeding this BN adds a bias per channel, which BN's mean subtraction removes again, in "
            "training and in eval: wasted parameters that learn nothing. BN's beta already is the bias.",
            "Build the layer that feeds batch norm with bias=False.",
        ),
        Rule(
            "bn-on-logits",
            WARNING,
            "batch norm on the model's output",
            "The model's output comes straight from this BN layer (through parameter-free layers at most), so "
            "every class score is normalized across the batch: each class gets the same mean and spread of "
            "scores over a batch, and in training each prediction depends on the rest of the batch.",
            "End a classifier with a plain linear layer: remove the BN after it (keep BN on hidden layers). "
            "Ignore this for a model whose normalized outputs are intended, such as an embedding.",
        ),
    )
}


@dataclass(frozen=True)
class Finding:
    """One problem: which rule, where (a BN layer's name, or None for the whole model), and the numbers."""

    code: str
    layer: str | None = None
    evidence: str = ""

    @property
    def rule(self) -> Rule:
        return RULES[self.code]

    @property
    def severity(self) -> str:
        return self.rule.severity

    def to_dict(self) -> dict[str, Any]:
        rule = self.rule
        return {
            "code": self.code,
            "severity": rule.severity,
            "layer": self.layer,
            "title": rule.title,
            "evidence": self.evidence,
            "explanation": rule.explanation,
            "fix": rule.fix,
        }


@dataclass
class Report:
    """What ``check_model`` found. ``passed``: no errors (warnings allowed)."""

    layers: list[str]  # the BN layers, by name
    samples: int  # scored alone and in a batch
    stats_samples: int  # used to re-estimate population statistics
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def passed(self) -> bool:
        return not self.errors

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "layers": self.layers,
            "samples": self.samples,
            "stats_samples": self.stats_samples,
            "findings": [f.to_dict() for f in self.findings],
        }

    def format(self, width: int = 100) -> str:
        """Plain text: a paragraph per kind of finding, with the layers concerned, then the verdict."""
        lines = [
            f"{len(self.layers)} batch-norm layers; {self.samples} samples scored alone and in a batch; "
            f"statistics re-estimated on {self.stats_samples} samples"
        ]
        found = [code for code in RULES if code in self.codes()]
        for code in found:
            group = [f for f in self.findings if f.code == code]
            rule = group[0].rule
            lines += ["", f"{rule.severity.upper()} {code}: {rule.title}"]
            if any(f.evidence for f in group):
                lines += [f"  {f.layer or 'model'}: {f.evidence}" for f in group]
            else:
                names = [f.layer or "model" for f in group]
                shown = names if len(names) <= 5 else [*names[:3], "...", names[-1]]
                lines.append("  " + ", ".join(shown) + (f" ({len(names)} layers)" if len(names) > 1 else ""))
            for paragraph in (rule.explanation, f"Fix: {rule.fix}"):
                lines.append(textwrap.fill(paragraph, width, initial_indent="  ", subsequent_indent="  "))
        errors = [code for code in found if RULES[code].severity == ERROR]
        warnings = [code for code in found if RULES[code].severity == WARNING]
        verdict = f"FAIL: errors: {', '.join(errors)}" if errors else "PASS"
        if warnings:
            verdict += f"{';' if errors else ':'} warnings: {', '.join(warnings)}"
        lines += ["", verdict if found else "PASS: batch norm is used correctly"]
        return "\n".join(lines)


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every batch-norm layer: PyTorch's (SyncBatchNorm included) and bnlab's."""
    return [(name or "model", m) for name, m in model.named_modules() if is_batch_norm(m)]


def check_model(
    model: nn.Module,
    data: Split | Tensor | None = None,
    *,
    samples: int = 100,
    stats_samples: int = 1024,
    batch_size: int = 64,
    data_dir: str | Path | None = None,
) -> Report:
    """Check how ``model`` uses batch norm, as it is (its mode included), on ``data``.

    ``data``: a Split (images and labels) or a tensor of inputs; MNIST's test split (from ``data_dir``
    or the usual places) when None. Inputs go to the model's device and floating dtype. The model is
    left exactly as it was.
    """
    for name, value in (("samples", samples), ("stats_samples", stats_samples), ("batch_size", batch_size)):
        if value < 2:
            raise UsageError(f"{name} must be at least 2 (batch statistics need two samples); got {value}")
    if data is None:
        data = load_mnist(data_dir).test
    inputs, labels = (data.images, data.labels) if isinstance(data, Split) else (data, None)
    if len(inputs) < 2:
        raise UsageError(f"check_model needs at least 2 inputs, got {len(inputs)}")
    inputs = _to_model(inputs[: max(samples, stats_samples)], model)  # only these are ever scored
    layers = batch_norm_layers(model)
    report = Report(
        layers=[name for name, _ in layers],
        samples=min(samples, len(inputs)),
        stats_samples=min(stats_samples, len(inputs)),
        findings=_layer_findings(layers),
    )
    # Layers whose statistics are missing or already known wrong are not compared with the data.
    settled = {f.layer for f in report.findings if f.code in ("no-running-stats", "nonfinite-stats", "stats-at-init")}
    with torch.no_grad(), _unchanged(model):
        x = inputs[: report.samples]
        y = None if labels is None else labels[: report.samples].to(x.device)
        report.findings += _scoring_findings(model, layers, x, y)
        estimates = _reestimate(model, layers, inputs[: report.stats_samples], batch_size) if layers else {}
    # The layers hold their own statistics again: compare them with the estimates.
    compared = [(name, layer) for name, layer in layers if name not in settled]
    report.findings += _statistics_findings(compared, estimates)
    order = {code: i for i, code in enumerate(RULES)}
    names = {name: i for i, name in enumerate(report.layers)}
    report.findings.sort(key=lambda f: (order[f.code], names.get(f.layer, -1)))
    return report


def _to_model(inputs: Tensor, model: nn.Module) -> Tensor:
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else inputs.device
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    if inputs.is_floating_point() and dtype is not None:
        return inputs.to(device, dtype)
    return inputs.to(device)


def _layer_findings(layers: list[tuple[str, nn.Module]]) -> list[Finding]:
    """What the layers show by themselves: mode, options and the state of their statistics."""
    findings = []
    for name, layer in layers:
        if layer.training:
            findings.append(Finding("training-mode", name))
        if layer.running_mean is None or layer.running_var is None:
            findings.append(Finding("no-running-stats", name))
            continue
        momentum = layer.momentum
        if momentum is not None and momentum >= FAST_MOMENTUM:
            findings.append(Finding("momentum-too-large", name, f"momentum {momentum:g} (decay {1 - momentum:g})"))
        mean, var = layer.running_mean, layer.running_var
        count = _batches_tracked(layer)
        if not (mean.isfinite().all() and var.isfinite().all()):
            bad = "running_mean" if not mean.isfinite().all() else "running_var"
            findings.append(Finding("nonfinite-stats", name, f"{bad} has NaN or infinite values"))
        elif bool((mean == 0).all() and (var == 1).all()):
            findings.append(Finding("stats-at-init", name, f"num_batches_tracked = {count}"))
    return findings


@contextmanager
def _unchanged(model: nn.Module) -> Iterator[None]:
    """Probe the model itself, then put back every module's mode and every buffer."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, b, b.clone()) for m in model.modules() for name, b in m.named_buffers(recurse=False)]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, name, original, saved in buffers:
            setattr(m, name, original)
            original.copy_(saved)


def _scoring_findings(
    model: nn.Module, layers: list[tuple[str, nn.Module]], x: Tensor, labels: Tensor | None
) -> list[Finding]:
    """Score x in one batch (tracing which layer made which tensor), then each sample alone."""
    trace = _Trace(model, layers)
    try:
        with trace:
            batch_out = model(x)
    except Exception as err:  # any model: whatever it raises means it cannot take these inputs
        raise UsageError(
            f"the model cannot score inputs of shape {tuple(x.shape)} ({_one_line(err)}); check it on data it accepts"
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
    tolerance = 1e-3 if batch_out.dtype in (torch.float32, torch.float64) else 3e-2
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


def _reestimate(
    model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Tensor, batch_size: int
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per layer with running statistics: its population mean and variance recomputed from ``inputs``
    (``bnlab.recalibrate`` in batches of ``batch_size``, on this process alone), and the variance
    within single samples, in the layer's running-variance convention. Leaves the buffers changed.
    """
    within = {name: _WithinSample() for name, layer in layers if layer.running_mean is not None}
    handles = [layer.register_forward_pre_hook(within[name]) for name, layer in layers if name in within]
    try:
        recalibrate(model, inputs, samples=len(inputs), batch_size=batch_size)
    finally:
        for handle in handles:
            handle.remove()
    estimates = {}
    for name, layer in layers:
        if name in within and within[name].samples:  # skips layers the forward pass never reached
            unbiased = getattr(layer, "unbiased_running_var", True)
            mean, var = (t.to(torch.float64, copy=True) for t in (layer.running_mean, layer.running_var))
            estimates[name] = (mean, var, within[name].variance(unbiased))
    return estimates


class _WithinSample:
    """A BN pre-hook summing, per channel, the variance of each sample's own values (0 for one value)."""

    def __init__(self) -> None:
        self.total: Tensor | float = 0.0
        self.samples = 0
        self.values = 1  # values per channel in one sample

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        self.values = x[0, 0].numel()
        if self.values > 1:
            per_sample = x.flatten(2).var(-1, correction=0)
        else:
            per_sample = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        self.total = self.total + per_sample.sum(0)
        self.samples += x.shape[0]

    def variance(self, unbiased: bool) -> Tensor:
        mean = self.total / self.samples
        return mean * self.values / (self.values - 1) if unbiased and self.values > 1 else mean


def _statistics_findings(
    layers: list[tuple[str, nn.Module]], estimates: dict[str, tuple[Tensor, Tensor, Tensor]]
) -> list[Finding]:
    """Stored running statistics against the re-estimated ones: batch-of-one, else stale."""
    findings = []
    for name, layer in layers:
        if name not in estimates:
            continue
        mean, var, one_sample = estimates[name]
        eps = layer.eps
        stored_mean, stored_var = layer.running_mean.double(), layer.running_var.double()
        log_ratio = torch.log((stored_var + eps) / (var + eps))  # stored vs re-estimated variance
        gap = torch.log((one_sample + eps) / (var + eps))  # one-sample vs re-estimated variance
        telling = gap < -ONE_SAMPLE_GAP  # channels where the two hypotheses differ enough to tell apart
        if telling.float().mean() >= 0.5 and (log_ratio[telling] / gap[telling]).median() > ONE_SAMPLE_SIDE:
            evidence = (
                f"median channel: running_var is {log_ratio.median().exp():.3g}x the data's variance; "
                f"one-sample training would give {gap.median().exp():.3g}x"
            )
            findings.append(Finding("batch-of-one", name, evidence))
            continue
        shift = (stored_mean - mean).abs() / (var + eps).sqrt()
        stretch = 0.5 * log_ratio.abs()  # |log| of the standard deviations' ratio
        if _typical(shift, stretch) <= STALE_LIMIT:
            continue
        evidence = (
            f"median channel: mean off by {shift.median():.2f} std, std off by a factor {stretch.median().exp():.2f}"
        )
        momentum, count = layer.momentum, _batches_tracked(layer)
        if momentum is not None and count > 0:
            share = (1 - momentum) ** count  # of the initial mean 0 and variance 1 still in the statistics
            residue_shift = share * mean.abs() / (var + eps).sqrt()
            residue_stretch = 0.5 * torch.log((share + (1 - share) * var + eps) / (var + eps)).abs()
            if _typical(residue_shift, residue_stretch) > STALE_LIMIT:
                batches = f"{count} batch" if count == 1 else f"{count} batches"
                residue = f"momentum {momentum:g} after {batches}: {share:.0%} is still the initial value"
                findings.append(Finding("momentum-too-small", name, f"{residue}; {evidence}"))
                continue
        findings.append(Finding("stale-stats", name, evidence))
    return findings


def _typical(shift: Tensor, stretch: Tensor) -> float:
    """How far off the median channel's statistics are: mean in standard deviations, or |log| of the std ratio."""
    return torch.maximum(shift, stretch).median().item()


def _batches_tracked(layer: nn.Module) -> int:
    return int(layer.num_batches_tracked) if layer.num_batches_tracked is not None else 0


_SPEC = re.compile(r"^[A-Za-z_][\w.]*$")


def _one_line(err: Exception) -> str:
    """An exception from the user's code as one line: the CLI prints errors on a single line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def load_model_spec(spec: str, device: str | torch.device = "cpu") -> nn.Module:
    """The model ``bnlab check`` takes: a bnlab checkpoint or run directory, or ``module:factory``.

    A checkpoint gives the seed ConvNet in eval mode; ``module:factory`` imports ``module`` (it must
    be importable) and calls ``factory()`` with no arguments; the model keeps the mode it returns in.
    """
    from bnlab.training import load_model, resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(device)
    if Path(spec).exists():
        return load_model(spec, device).model
    module_name, colon, factory_name = spec.partition(":")
    if not colon:
        raise UsageError(
            f"{spec!r} is neither a checkpoint nor a run directory that exists, nor module:factory "
            "(a Python function that returns the model, e.g. mymodels:build)"
        )
    if not (_SPEC.match(module_name) and _SPEC.match(factory_name)):
        raise UsageError(f"{spec!r} is not module:factory; write it like mypackage.models:build_model")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name + ".").startswith(err.name + "."):
            raise BnlabError(f"importing {module_name} failed: {_one_line(err)}") from err
        raise UsageError(
            f"cannot import {module_name} (no module named {err.name!r}); run bnlab from the folder that holds it, "
            "or add that folder to PYTHONPATH"
        ) from None
    except Exception as err:  # the module's own code failed
        raise BnlabError(f"importing {module_name} failed: {_one_line(err)}") from err
    factory: Any = module
    for part in factory_name.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"{module_name} has no {factory_name!r}; check the name after the colon in {spec!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"{spec} is not a function that returns a model but a value of type {type(factory).__name__}")
    try:
        model = factory()
    except Exception as err:  # the factory's own code failed
        raise BnlabError(f"{spec}() failed: {_one_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a value of type {type(model).__name__}, not a torch.nn.Module")
    return model.to(device)
