"""Frozen batch norm: ``FrozenBatchNorm1d/2d/3d``, batch norm whose statistics and affine are fixed.

The fine-tuning answer to small batches (torchvision's ``FrozenBatchNorm2d``, detectron2's): in training and
in evaluation alike, y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, through bnlab's
evaluation operator. All four are buffers, not parameters, so no optimizer moves them and ``model.train()``
changes nothing; gradients flow to the input. The state_dict has torchvision's keys (weight, bias,
running_mean, running_var), and a batch-norm state_dict's ``num_batches_tracked`` is dropped on loading, as
torchvision does. Not a batch-norm layer to ``bnlab.recalibrate`` or ``bnlab check``: it takes no batch
statistics. ``bnlab.convert(model, to="frozen")`` freezes a model's batch norms with their current values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bnlab.nn import functional
from bnlab.nn.batchnorm import _NormLayer

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNorm(_NormLayer):
    """Shared by FrozenBatchNorm1d/2d/3d: torchvision's constructor (``num_features``, ``eps``) and state."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a positive number, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return functional.local_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps, True, False
        )  # fmt: skip

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a batch-norm layer's count: nothing to freeze
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm for input (N, C) or (N, C, L)."""

    _input_dims = (2, 3)
    _input_text = "2D or 3D"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm for input (N, C, H, W); loads torchvision's ``FrozenBatchNorm2d`` state_dict."""

    _input_dims = (4,)
    _input_text = "4D"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm for input (N, C, D, H, W)."""

    _input_dims = (5,)
    _input_text = "5D"
