"""bnlab's batch-norm layers: ``BatchNorm1d/2d/3d``, drop-ins for ``torch.nn``'s.

A layer owns its state (parameters, running statistics, options) and decides, per call, which
statistics to use and by what factor the running ones follow the batch; the maths is in
``statistics.py``, the operators in ``ops.py``, the choice between them in ``functional.py``.
The forward pass is TorchScript-compatible, so ``torch.jit.script`` compiles these layers too.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from bnlab.nn import functional

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "is_batch_norm"]


def copy_sharing_process_group(module: nn.Module, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy`` of a BN layer: its tensors copied, its ``process_group`` shared.

    A process group cannot be copied (a copy of the model for recalibration or evaluation must
    still reach the other processes), so the copy joins the same group.
    """
    group = getattr(module, "process_group", None)
    if group is not None:
        memo[id(group)] = group
    copied = type(module).__new__(type(module))
    memo[id(module)] = copied
    copied.__dict__.update({key: copy.deepcopy(value, memo) for key, value in module.__dict__.items()})
    return copied


def whole_number(name: str, value: Any, low: int) -> int:
    """``value`` as an int (Python's or numpy's) of at least ``low``; else a ValueError naming ``name``."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < low:
        raise ValueError(f"{name} must be a whole number, {low} or more; got {value!r}")
    return number


class _NormLayer(nn.Module):
    """A normalization layer of one input rank: ``_input_dims`` (checked per call, with the layer's name)."""

    _input_dims: tuple[int, ...] = ()
    _input_text = ""
    _layer_name = ""
    __constants__ = ("_input_dims", "_input_text", "_layer_name")  # class-level: TorchScript reads them as constants

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._layer_name = cls.__name__

    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in self._input_dims:
            raise ValueError(f"{self._layer_name} expects {self._input_text} input, got {x.dim()}D input")


class _BatchNorm(_NormLayer):
    """Shared by BatchNorm1d/2d/3d; same constructor, attributes and state_dict as PyTorch's.

    Beyond PyTorch's options: ``unbiased_running_var`` (False keeps the biased variance, as
    TensorFlow), ``fused_relu`` (apply ReLU to the output in the same pass) and ``process_group``
    (normalize with the statistics of the whole distributed batch, like ``nn.SyncBatchNorm``).

    ``observer`` (not a constructor option): while set, as ``bnlab.recalibrate`` sets it for its pass,
    a training-mode call hands its batch statistics to it (``functional.StatisticsObserver``) instead
    of updating the running ones, and synchronizes nothing.
    """

    _version = 2  # PyTorch's: state dicts carry num_batches_tracked

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
        fused_relu: bool = False,
        process_group: Any | None = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a positive number, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.unbiased_running_var = unbiased_running_var
        self.fused_relu = fused_relu
        self.process_group = process_group
        self.observer: functional.StatisticsObserver | None = None
        self.weight = nn.Parameter(torch.ones(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    @classmethod
    def tf_style(cls, num_features: int, decay: float = 0.99, eps: float = 1e-3, **kwargs: Any) -> _BatchNorm:
        """The notebook's (and Keras') conventions: decay 0.99, eps 1e-3, biased running variance."""
        return cls(num_features, eps=eps, momentum=1.0 - decay, unbiased_running_var=False, **kwargs)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.observer is not None and self.training and self.running_mean is not None:
            return self._observed(x)
        momentum = self._count_batch()
        # As PyTorch: in training without tracking, the buffers (if any) are neither used nor updated.
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        training = self.training or self.running_mean is None
        if training and self.process_group is not None:
            return self._synchronized(x, running_mean, running_var, momentum)
        return functional.local_batch_norm(
            x, running_mean, running_var, self.weight, self.bias, training, momentum, self.eps,
            self.unbiased_running_var, self.fused_relu,
        )  # fmt: skip

    def _count_batch(self) -> float:
        """The factor by which the running statistics follow this call's batch; a training call counts itself."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        return momentum

    @torch.jit.unused
    def _observed(self, x: Tensor) -> Tensor:
        return functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=True, eps=self.eps,
            relu=self.fused_relu, observer=self.observer,
        )  # fmt: skip

    @torch.jit.unused
    def _synchronized(
        self, x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float
    ) -> Tensor:
        return functional.batch_norm(
            x, running_mean, running_var, self.weight, self.bias, training=True, momentum=momentum, eps=self.eps,
            unbiased_running_var=self.unbiased_running_var, relu=self.fused_relu, process_group=self.process_group,
        )  # fmt: skip

    def __deepcopy__(self, memo: dict[int, Any]) -> _BatchNorm:
        return copy_sharing_process_group(self, memo)

    def __prepare_scriptable__(self) -> _BatchNorm:
        if self.process_group is not None:
            raise RuntimeError(
                f"torch.jit.script: {self._get_name()} with a process_group cannot be scripted (collectives are not "
                "TorchScript); script a copy without it (layer.process_group = None), e.g. for inference."
            )
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        # Like PyTorch: state dicts from before num_batches_tracked existed load with a count of 0.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and (local_metadata.get("version") or 0) < 2 and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def extra_repr(self) -> str:
        extra = ", fused_relu=True" if self.fused_relu else ""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, "
            f"unbiased_running_var={self.unbiased_running_var}{extra}"
        )


class BatchNorm1d(_BatchNorm):
    """Drop-in for ``nn.BatchNorm1d``: input (N, C) or (N, C, L)."""

    _input_dims = (2, 3)
    _input_text = "2D or 3D"


class BatchNorm2d(_BatchNorm):
    """Drop-in for ``nn.BatchNorm2d``: input (N, C, H, W), contiguous or channels_last."""

    _input_dims = (4,)
    _input_text = "4D"


class BatchNorm3d(_BatchNorm):
    """Drop-in for ``nn.BatchNorm3d``: input (N, C, D, H, W), contiguous or channels_last_3d."""

    _input_dims = (5,)
    _input_text = "5D"


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-norm layer: torch.nn's (``SyncBatchNorm`` and lazy ones included), bnlab's,
    and bnlab's recurrent ``SequenceBatchNorm`` (statistics per time step).

    Instance and group norm layers are not, though they share methods such as ``reset_running_stats``.
    """
    from bnlab.nn.recurrent import SequenceBatchNorm  # recurrent.py builds on this module

    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return False
    return isinstance(module, (_BatchNorm, _TorchBatchNorm, SequenceBatchNorm))
