"""The seed ConvNet's structure, padding and initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab import nn as norm
from bnlab.errors import UsageError
from bnlab.models import SameConv2d, build_model, same_padding, summary
from bnlab.nn.batchnorm import _BatchNorm


@pytest.mark.parametrize("bn", ["none", "torch", "manual"])
def test_layer_schedule(bn):
    model = build_model(bn)
    convs = [block.conv for block in model.blocks]
    assert len(convs) == 19
    assert [c.out_channels for c in convs] == [4 * d for d in range(1, 20)]
    assert [c.stride[0] for c in convs] == [2 if d % 3 == 0 else 1 for d in range(1, 20)]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert model.hidden.linear.out_features == 100 and model.logits.out_features == 10
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, _BatchNorm))]
    if bn == "none":
        assert norms == [] and all(c.bias is not None for c in convs)
    else:
        assert len(norms) == 20  # 19 convs + the hidden dense; never the logits
        assert all(c.bias is None for c in convs) and model.hidden.linear.bias is None
        assert model.logits.bias is not None
        expected = (nn.BatchNorm2d, nn.BatchNorm1d) if bn == "torch" else (norm.BatchNorm2d, norm.BatchNorm1d)
        assert all(type(n) in expected for n in norms)
        assert all(n.eps == 1e-3 and abs(n.momentum - 0.01) < 1e-12 for n in norms)


def test_spatial_sizes_and_output_shape():
    model = build_model("manual")
    sizes = []
    x = torch.zeros(2, 1, 28, 28)
    for block in model.blocks:
        x = block(x)
        sizes.append(x.shape[-1])
    assert sorted(set(sizes), reverse=True) == [28, 14, 7, 4, 2, 1]
    assert x.shape == (2, 76, 1, 1)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("size", range(1, 30))
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_padding_gives_ceil_output(size, stride):
    conv = SameConv2d(1, 1, 3, stride)
    assert conv(torch.zeros(1, 1, size, size)).shape[-1] == math.ceil(size / stride)


def test_same_padding_puts_the_odd_pad_bottom_right_as_tensorflow():
    assert same_padding(28, 3, 2) == (0, 1)
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(1, 3, 2) == (1, 1)
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # TF: pad 0 top/left and 1 bottom/right; output (i, j) sums rows 2i..2i+2, cols 2j..2j+2
    assert conv(x).squeeze().tolist() == [[45.0, 39.0], [66.0, 50.0]]


def test_initialisation_follows_the_notebook():
    layers = build_model("torch", seed=1)
    low_level = build_model("manual", seed=1)
    w = layers.blocks[5].conv.weight
    fan_in, fan_out = w.shape[1] * 9, w.shape[0] * 9
    assert w.abs().max() <= math.sqrt(6 / (fan_in + fan_out))  # Glorot uniform
    assert w.std() > 0.8 * math.sqrt(2 / (fan_in + fan_out))
    kernels = torch.cat([b.conv.weight.flatten() for b in low_level.blocks])
    assert kernels.abs().max() <= 0.1  # normal(0, 0.05) truncated at two std
    assert 0.040 < kernels.std() < 0.047  # a normal truncated at 2 std has std 0.88 * 0.05
    dense = low_level.hidden.linear.weight  # dense layers still come from tf.layers: Glorot uniform
    assert 0.1 < dense.abs().max() <= math.sqrt(6 / (76 + 100))
    for model in (layers, low_level):
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, norm.BatchNorm2d)):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(build_model("none").blocks[0].conv.bias == 0)


def test_same_seed_same_weights_and_shared_kernels_across_modes():
    a, b = build_model("none", seed=3), build_model("none", seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with_bn = build_model("torch", seed=3)
    assert torch.equal(a.blocks[7].conv.weight, with_bn.blocks[7].conv.weight)
    assert not torch.equal(a.blocks[7].conv.weight, build_model("none", seed=4).blocks[7].conv.weight)


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="bn must be one of"):
        build_model("batchnorm")
    with pytest.raises(UsageError, match="activation"):
        build_model("none", activation="relu6")


def test_summary_lists_layers_shapes_and_counts():
    text = summary(build_model("manual"))
    assert "blocks.18.conv  SameConv2d        (N, 76, 1, 1)" in text
    assert "hidden.norm     BatchNorm1d+ReLU  (N, 100)" in text
    total = sum(p.numel() for p in build_model("manual").parameters())
    assert f"trainable parameters: {total:,}" in text
