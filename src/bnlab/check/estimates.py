"""The BN layers' own state, and their stored statistics against statistics recomputed from the data.

Recomputing is ``bnlab.recalibrate`` (every BN layer in training mode with an exact average, the rest of
the model in eval mode, weights frozen), run on the model itself: the caller puts the buffers back. A
hook measures alongside the variance within single samples, which is what a layer trained on batches
of one accumulates. Comparing stored with recomputed statistics tells how far each layer drifted, and
recognises two causes by their pattern: batch-of-one and momentum-too-small. Recurrent
``SequenceBatchNorm`` layers keep a table of statistics per time step; they are not compared here
(their rows see differently many steps), only scored with the rest of the model (``cost.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnlab.check.report import Finding
from bnlab.check.rules import DRIFT_LIMIT, FAST_MOMENTUM, FEW_SAMPLES, ONE_SAMPLE_GAP, ONE_SAMPLE_SIDE
from bnlab.nn.ghost import _GhostBatchNorm, virtual_batches
from bnlab.nn.precise import recalibrate
from bnlab.nn.renorm import _BatchRenorm

__all__ = [
    "Estimate",
    "keeps_statistics",
    "recompute",
    "small_batch_findings",
    "state_findings",
    "statistics_findings",
]

# Findings about a layer's statistics that make comparing them with the data pointless.
SETTLED = ("no-running-stats", "nonfinite-stats", "stats-at-init")


@dataclass(frozen=True)
class Estimate:
    """A layer's population statistics recomputed from the data, and the variance within single samples,
    per channel, in float64 and in the layer's running-variance convention (unbiased or not)."""

    mean: Tensor
    var: Tensor
    one_sample_var: Tensor


def keeps_statistics(layer: nn.Module) -> bool:
    return layer.running_mean is not None and layer.running_var is not None


def _per_channel(layer: nn.Module) -> bool:
    """Statistics of one row, a value per channel (every BN layer but a recurrent one's per-step tables)."""
    return keeps_statistics(layer) and layer.running_mean.dim() == 1


def _batches_tracked(layer: nn.Module) -> int:
    """num_batches_tracked; for a per-step table, the count of its most updated row."""
    count = layer.num_batches_tracked
    return 0 if count is None else int(count.max())


def state_findings(layers: list[tuple[str, nn.Module]]) -> list[Finding]:
    """What the layers show by themselves: mode, options and the state of their statistics."""
    findings = []
    for name, layer in layers:
        if layer.training:
            findings.append(Finding("training-mode", name))
        if not keeps_statistics(layer):
            findings.append(Finding("no-running-stats", name))
            continue
        momentum = layer.momentum
        if momentum is not None and momentum >= FAST_MOMENTUM:
            findings.append(Finding("momentum-too-large", name, f"momentum {momentum:g} (decay {1 - momentum:g})"))
        mean, var = layer.running_mean, layer.running_var
        if not (mean.isfinite().all() and var.isfinite().all()):
            bad = "running_mean" if not mean.isfinite().all() else "running_var"
            findings.append(Finding("nonfinite-stats", name, f"{bad} has NaN or infinite values"))
        elif bool((mean == 0).all() and (var == 1).all()):
            rows = f" in each of its {mean.shape[0]} time-step rows" if mean.dim() > 1 else ""
            findings.append(Finding("stats-at-init", name, f"num_batches_tracked = {_batches_tracked(layer)}{rows}"))
    return findings


def small_batch_findings(layers: list[tuple[str, nn.Module]], train_batch_size: int | None) -> list[Finding]:
    """The layers whose training statistics came from fewer than ``FEW_SAMPLES`` samples: the training batch
    (when known) or a ghost layer's virtual batch, if smaller; batch renorm layers (a fix) are left out."""
    findings = []
    for name, layer in layers:
        if isinstance(layer, _BatchRenorm):
            continue
        sizes = {"training batch": train_batch_size}
        if isinstance(layer, _GhostBatchNorm):  # its smallest virtual batch, the last of an uneven batch
            full, rest = virtual_batches(train_batch_size or layer.virtual_batch_size, layer.virtual_batch_size, 1)
            sizes["virtual batch"] = min([layer.virtual_batch_size] * full + [rest] * bool(rest))
        known = {what: n for what, n in sizes.items() if n is not None}
        if not known:
            continue
        what, samples = min(known.items(), key=lambda item: item[1])
        if samples < FEW_SAMPLES:
            findings.append(Finding("small-batch", name, f"statistics of {samples} samples (the {what})"))
    return findings


def recompute(
    model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Tensor, batch_size: int
) -> dict[str, Estimate]:
    """Recompute every BN layer's statistics from ``inputs`` (``bnlab.recalibrate``, batches of ``batch_size``,
    this process alone) and return those of the per-channel layers the data reached.

    Leaves the recomputed statistics in the layers, so the caller can score the model with them; it
    must put the stored ones back.
    """
    within = {name: _WithinSample() for name, layer in layers if _per_channel(layer)}
    handles = [layer.register_forward_pre_hook(within[name]) for name, layer in layers if name in within]
    try:
        recalibrate(model, inputs, samples=len(inputs), batch_size=batch_size, batch_dim=0)
    finally:
        for handle in handles:
            handle.remove()
    estimates = {}
    for name, layer in layers:
        if name in within and within[name].samples:  # skips layers the forward pass never reached
            unbiased = getattr(layer, "unbiased_running_var", True)
            mean, var = (t.to(torch.float64, copy=True) for t in (layer.running_mean, layer.running_var))
            estimates[name] = Estimate(mean, var, within[name].variance(unbiased))
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


def statistics_findings(
    layers: list[tuple[str, nn.Module]], estimates: dict[str, Estimate]
) -> tuple[list[Finding], dict[str, float]]:
    """Stored statistics (in the layers again) against the recomputed ones.

    Returns the cause findings (batch-of-one, else momentum-too-small) and every compared layer's drift:
    ``max(shift, stretch)`` of its median channel (rules.py), the evidence behind stale-stats.
    """
    findings, drift = [], {}
    for name, layer in layers:
        if name not in estimates:
            continue
        estimate, eps = estimates[name], layer.eps
        mean, var = estimate.mean, estimate.var
        stored_mean, stored_var = layer.running_mean.double(), layer.running_var.double()
        log_ratio = torch.log((stored_var + eps) / (var + eps))  # stored vs recomputed variance
        shift = (stored_mean - mean).abs() / (var + eps).sqrt()
        stretch = 0.5 * log_ratio.abs()  # |log| of the standard deviations' ratio
        drift[name] = _typical(shift, stretch)
        gap = torch.log((estimate.one_sample_var + eps) / (var + eps))  # one-sample vs recomputed variance
        telling = gap < -ONE_SAMPLE_GAP  # channels where the two hypotheses differ enough to tell apart
        if telling.float().mean() >= 0.5 and (log_ratio[telling] / gap[telling]).median() > ONE_SAMPLE_SIDE:
            evidence = (
                f"median channel: running_var is {log_ratio.median().exp():.3g}x the data's variance; "
                f"one-sample training would give {gap.median().exp():.3g}x"
            )
            findings.append(Finding("batch-of-one", name, evidence))
            continue
        momentum, count = layer.momentum, _batches_tracked(layer)
        if drift[name] <= DRIFT_LIMIT or momentum is None or count == 0:
            continue
        share = (1 - momentum) ** count  # of the initial mean 0 and variance 1 still in the statistics
        residue_shift = share * mean.abs() / (var + eps).sqrt()
        residue_stretch = 0.5 * torch.log((share + (1 - share) * var + eps) / (var + eps)).abs()
        if _typical(residue_shift, residue_stretch) > DRIFT_LIMIT:
            batches = f"{count} batch" if count == 1 else f"{count} batches"
            evidence = (
                f"momentum {momentum:g} after {batches}: {share:.0%} is still the initial value; median channel: "
                f"mean off by {shift.median():.2f} std, std off by a factor {stretch.median().exp():.2f}"
            )
            findings.append(Finding("momentum-too-small", name, evidence))
    return findings, drift


def _typical(shift: Tensor, stretch: Tensor) -> float:
    """How far off the median channel's statistics are: mean in standard deviations, or |log| of the std ratio."""
    return torch.maximum(shift, stretch).median().item()
