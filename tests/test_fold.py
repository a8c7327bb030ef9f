"""``bnlab.fold``: eval-mode batch norm folded into the convolution or linear layer before it, exactly (to float
rounding), for every producer and BN kind; and what cannot fold is left in place with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab import kernels
from bnlab.errors import UsageError
from bnlab.models import SeedConvNet
from bnlab.nn import is_batch_norm
from bnlab.nn.fold import fold

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # relative to the output's largest magnitude


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine far from the defaults, so that a fold that drops any of them shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) * 2 - 1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 1.5 + 0.5)
                if getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)
    return model


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= TOLERANCE[b.dtype] * max(scale, 1e-30)


NORMS_2D = {
    "torch": lambda c: nn.BatchNorm2d(c),
    "torch-no-affine": lambda c: nn.BatchNorm2d(c, affine=False),
    "bnlab": lambda c: bnlab.BatchNorm2d(c),
    "bnlab-relu": lambda c: bnlab.BatchNorm2d(c, fused_relu=True),
    "renorm": lambda c: bnlab.BatchRenorm2d(c),
    "ghost": lambda c: bnlab.GhostBatchNorm2d(c, virtual_batch_size=4),
    "frozen": lambda c: bnlab.FrozenBatchNorm2d(c),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("norm", list(NORMS_2D))
def test_every_bn_kind_folds_into_a_conv_exactly(norm, dtype):
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), NORMS_2D[norm](6), nn.Tanh())).eval()
    model = model.to(dtype)
    x = torch.randn(5, 3, 9, 9, dtype=dtype)
    result = fold(model, x)
    assert result.folded == [("0", "1")] and result.left == []
    assert isinstance(result.model[1], nn.ReLU if norm == "bnlab-relu" else nn.Identity)
    assert_same(result.model(x), model(x))
    assert is_batch_norm(model[1]) or isinstance(model[1], bnlab.FrozenBatchNorm2d)  # the original is untouched


PRODUCERS = {  # a layer, its BN, the input shape
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, padding_mode="reflect"), 1, (3, 4, 17)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False, padding_mode="circular", padding=1), 2,
                      (3, 4, 8, 8)),
    "conv2d-replicate": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, padding_mode="replicate"), 2,
                         (3, 4, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding="same"), 3, (2, 2, 5, 5, 5)),
    "convtranspose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1), 1, (3, 4, 7)),
    "convtranspose2d-groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2, bias=False), 2,
                               (3, 4, 5, 5)),
    "convtranspose3d": (lambda: nn.ConvTranspose3d(2, 4, 2, stride=2), 3, (2, 2, 3, 3, 3)),
    "linear": (lambda: nn.Linear(7, 5), 1, (6, 7)),
    "linear-no-bias": (lambda: nn.Linear(7, 5, bias=False), 1, (6, 7)),
}  # fmt: skip
BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", list(PRODUCERS))
def test_every_producer_folds_exactly(kind, dtype):
    make, dims, shape = PRODUCERS[kind]
    layer = make()
    channels = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
    model = with_statistics(nn.Sequential(layer, BATCH_NORMS[dims](channels))).eval().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    result = fold(model, x)
    assert result.folded == [("0", "1")], result
    assert_same(result.model(x), model(x))
    assert result.model[0].bias is not None and result.model[0].bias.dtype == dtype


@pytest.mark.parametrize("bn", ["torch", "manual"])
def test_the_seed_network_folds_every_bn_in_channels_last_and_float64(bn):
    model = with_statistics(SeedConvNet(bn, generator=torch.Generator().manual_seed(1))).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    result = fold(model, x)
    assert len(result.folded) == 20 and result.left == []
    assert not any(is_batch_norm(m) for m in result.model.modules())
    assert result.model.blocks[4].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same(result.model(x), model(x))
    model64 = copy.deepcopy(model).double()
    assert_same(fold(model64, x.double()).model(x.double()), model64(x.double()))


def test_the_folded_program_exports_and_equals_eager():
    model = with_statistics(SeedConvNet("manual", depth=6)).eval()
    x = torch.randn(4, 1, 28, 28)
    folded = fold(model, x).model
    program = torch.export.export(folded, (x,))
    assert not any("batch_norm" in str(node.target) for node in program.graph.nodes)
    assert_same(program.module()(x), model(x))


def test_kernels_off_fold_the_same():
    model = with_statistics(SeedConvNet("manual", depth=4)).eval()
    x = torch.randn(3, 1, 28, 28)
    with kernels.use_kernels(False):
        result = fold(model, x)
        assert len(result.folded) == 5
        assert_same(result.model(x), model(x))


class Unfoldable(nn.Module):
    """BN first, BN after a ReLU, a conv read twice, a conv's output returned, a shared conv, no statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.after_relu = nn.BatchNorm2d(4)
        self.read_twice = nn.Conv2d(4, 4, 1)
        self.bn_read_twice = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.returned = nn.Conv2d(4, 4, 1)
        self.bn_returned = nn.BatchNorm2d(4)
        self.plain = nn.Conv2d(4, 4, 1)
        self.no_stats = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        x = self.after_relu(self.relu(self.conv(self.first(x))))
        y = self.read_twice(x)
        x = self.bn_read_twice(y) + y
        x = self.bn_shared(self.shared(self.shared(x)))
        z = self.returned(x)
        x = self.no_stats(self.plain(self.bn_returned(z)))
        if x.mean() > 1e9:  # data-dependent control flow: FX cannot trace this model
            x = -x
        return x, z


def test_what_cannot_fold_is_left_with_its_reason_and_the_outputs_stay():
    model = with_statistics(Unfoldable()).eval()
    x = torch.randn(2, 2, 6, 6)
    result = fold(model, x)
    reasons = dict(result.left)
    assert result.folded == []
    assert "model's input" in reasons["first"]
    assert "comes from ReLU" in reasons["after_relu"]
    assert "also read by the model's forward" in reasons["bn_read_twice"]
    assert "runs 2 times" in reasons["bn_shared"]
    assert "one of the model's outputs" in reasons["bn_returned"]
    assert "no running statistics" in reasons["no_stats"]
    for got, want in zip(result.model(x), model(x), strict=True):
        assert torch.equal(got, want)
    assert "left 6" in str(result)


class StandardizedConv(nn.Conv2d):
    """Weight standardization: its forward renormalizes the weight, so scaling the weight does nothing."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_producer_whose_forward_is_not_its_weights_map_is_caught_by_the_check():
    model = with_statistics(
        nn.Sequential(StandardizedConv(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    ).eval()
    x = torch.randn(3, 2, 8, 8)
    result = fold(model, x)
    assert result.folded == [("2", "3")]
    assert result.left[0][0] == "1" and "changed the output" in result.left[0][1]
    assert_same(result.model(x), model(x))


def test_batch_norm_after_an_in_place_relu_is_left():
    """ReLU(inplace=True) returns the conv's own output tensor: the BN reads the conv's output object, but the
    ReLU read it first, so the fold is refused (folding would move the BN before the ReLU)."""
    model = with_statistics(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(3))).eval()
    x = torch.randn(2, 1, 7, 7)
    result = fold(model, x)
    assert result.folded == [] and "also read by 1" in dict(result.left)["2"]
    assert torch.equal(result.model(x), model(x))


def test_a_training_mode_model_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(UsageError, match=r"eval-mode model.*model.eval\(\)"):
        fold(model, torch.randn(2, 1, 5, 5))
    model.eval()[1].train()
    with pytest.raises(UsageError, match="1 in training mode"):
        fold(model, torch.randn(2, 1, 5, 5))
