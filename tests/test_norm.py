"""bnlab's batch norm against PyTorch's, and against the formulas it claims to implement."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnlab import kernels
from bnlab import nn as norm

TORCH_LAYERS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
BNLAB_LAYERS = {1: norm.BatchNorm1d, 2: norm.BatchNorm2d, 3: norm.BatchNorm3d}
# (layer kind, number of spatial dims): BatchNorm1d takes (N, C) and (N, C, L)
SHAPES = [(1, 0), (1, 1), (2, 2), (3, 3)]


@st.composite
def cases(draw):
    kind, spatial = draw(st.sampled_from(SHAPES))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 5))
    size = [draw(st.integers(1, 5)) for _ in range(spatial)]
    layout = draw(st.sampled_from(["contiguous", "channels_last"])) if spatial >= 2 else "contiguous"
    options = dict(
        affine=draw(st.booleans()),
        track_running_stats=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.01, 0.5, None])),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    return kind, (n, c, *size), layout, options, dtype, seed


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return x


def _pair(kind, c, options, dtype, seed):
    ref = TORCH_LAYERS[kind](c, dtype=dtype, **options)
    ours = BNLAB_LAYERS[kind](c, dtype=dtype, **options)
    g = torch.Generator().manual_seed(seed)
    if options["affine"]:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
            ref.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_as_accurate(ours, theirs, exact, dtype):
    """ours is within float tolerance of the float64 result, or at worst twice as far as PyTorch's."""
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-10, 1e-10)
    exact = exact.to(dtype)
    allowed = atol + rtol * exact.abs() + 2 * (theirs - exact).abs()
    worst = ((ours - exact).abs() - allowed).max()
    assert worst <= 0, f"off by {worst.item():.3g} beyond the tolerance"


@settings(max_examples=80, deadline=None)
@given(cases())
def test_matches_torch_in_training_and_eval(case):
    kind, shape, layout, options, dtype, seed = case
    ref, ours = _pair(kind, shape[1], options, dtype, seed)
    exact = copy.deepcopy(ref).double()  # float64 PyTorch: the yardstick for both
    g = torch.Generator().manual_seed(seed)
    for step in range(3):  # several steps so running statistics accumulate (and momentum=None averages)
        x = _layout(torch.randn(shape, generator=g, dtype=dtype) * 3 + step, layout)
        dy = torch.randn(shape, generator=g, dtype=dtype)
        inputs = [x.clone().requires_grad_() for _ in range(2)] + [x.double().requires_grad_()]
        outputs = [layer(xi) for layer, xi in zip((ref, ours, exact), inputs, strict=True)]
        for out in outputs:
            out.backward(dy.to(out.dtype))
        _assert_as_accurate(outputs[1], outputs[0], outputs[2], dtype)
        _assert_as_accurate(inputs[1].grad, inputs[0].grad, inputs[2].grad, dtype)
        if options["affine"]:
            for name in ("weight", "bias"):
                grads = [getattr(layer, name).grad for layer in (ours, ref, exact)]
                _assert_as_accurate(grads[0], grads[1], grads[2], dtype)
        if layout == "channels_last":
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            assert outputs[1].is_contiguous(memory_format=fmt)
    for key, value in ref.state_dict().items():
        _assert_as_accurate(ours.state_dict()[key], value, exact.state_dict()[key].to(value.dtype), dtype)
    for layer in (ref, ours, exact):
        layer.eval()
    x = _layout(torch.randn(shape, generator=g, dtype=dtype), layout)
    _assert_as_accurate(ours(x), ref(x), exact(x.double()), dtype)


def test_population_update_follows_the_notebook_formula():
    layer = norm.BatchNorm2d.tf_style(3)  # decay 0.99, eps 1e-3, biased variance
    x1 = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 2 + 1
    x2 = torch.randn(8, 3, 5, 5, dtype=torch.float64) - 4
    layer.double()
    layer(x1)
    layer(x2)
    pop_mean, pop_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for x in (x1, x2):
        batch_mean = x.mean(dim=(0, 2, 3))
        batch_var = ((x - batch_mean.view(1, 3, 1, 1)) ** 2).mean(dim=(0, 2, 3))  # biased, as tf.nn.moments
        pop_mean = pop_mean * 0.99 + batch_mean * (1 - 0.99)
        pop_var = pop_var * 0.99 + batch_var * (1 - 0.99)
    torch.testing.assert_close(layer.running_mean, pop_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, pop_var, rtol=1e-12, atol=1e-12)
    assert layer.num_batches_tracked.item() == 2
    assert layer.eps == 1e-3


def test_the_one_intended_difference_is_the_unbiased_running_variance():
    torch_layer = nn.BatchNorm1d(4, momentum=0.01, eps=1e-3)
    ours = norm.BatchNorm1d.tf_style(4)
    x = torch.randn(10, 4)
    torch_layer(x)
    ours(x)
    torch.testing.assert_close(ours.running_mean, torch_layer.running_mean)
    # PyTorch's update uses var * M / (M - 1); the notebook's uses var. Undo the factor and they agree.
    torch_batch_var = (torch_layer.running_var - 0.99) / 0.01
    ours_batch_var = (ours.running_var - 0.99) / 0.01
    torch.testing.assert_close(torch_batch_var * 9 / 10, ours_batch_var, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(shape, affine):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True) + 0.5 if affine else None
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None

    def f(x, weight, bias):
        return norm.batch_norm(x, None, None, weight, bias, training=True, eps=1e-3)

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


def test_closed_form_backward_matches_autograd_through_naive_formula():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    fast = torch.autograd.grad(norm.batch_norm(x, None, None, w, b, training=True, eps=1e-3), (x, w, b), dy)
    naive = torch.autograd.grad(norm.naive_batch_norm(x, w, b, eps=1e-3), (x, w, b), dy)
    for got, expected in zip(fast, naive, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_eval_output_of_a_sample_does_not_depend_on_its_batch():
    layer = norm.BatchNorm2d.tf_style(4)
    for _ in range(5):
        layer(torch.randn(16, 4, 3, 3) * 2 + 1)
    layer.eval()
    sample = torch.randn(1, 4, 3, 3)
    alone = layer(sample)
    for others in (torch.randn(7, 4, 3, 3), torch.randn(7, 4, 3, 3) * 100 - 50):
        in_batch = layer(torch.cat([sample, others]))[:1]
        torch.testing.assert_close(in_batch, alone, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1), (1, 3, 1)])
def test_training_on_one_value_per_feature_is_a_clear_error(shape):
    layer = norm.BatchNorm2d(3) if len(shape) == 4 else norm.BatchNorm1d(3)
    with pytest.raises(ValueError, match="more than one value per feature"):
        layer(torch.randn(shape))
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape  # fine with population statistics


def test_wrong_input_rank_and_width_are_clear_errors():
    with pytest.raises(ValueError, match="expects 4D input, got 2D"):
        norm.BatchNorm2d(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="got 5 features"):
        norm.BatchNorm1d(3)(torch.randn(4, 5))


def test_state_dict_loads_into_torch_and_back_with_equal_outputs():
    ours = norm.BatchNorm2d(3)
    for _ in range(3):
        ours(torch.randn(8, 3, 4, 4) * 2 + 1)
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    ours.eval()
    ref.eval()
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(ours(x), ref(x))
    back = norm.BatchNorm2d(3)
    back.load_state_dict(ref.state_dict())
    back.eval()
    torch.testing.assert_close(back(x), ref(x))


@st.composite
def kernel_cases(draw):
    spatial = draw(st.sampled_from([0, 1, 2, 3]))
    n = draw(st.integers(2, 9))
    c = draw(st.integers(1, 12))
    # sizes that exercise both of the kernels' walks: short runs (periodic) and runs of >= 64 values
    size = [draw(st.sampled_from([1, 2, 3, 5, 9, 17])) for _ in range(spatial)]
    layout = draw(st.sampled_from(["contiguous", "channels_last"])) if spatial >= 2 else "contiguous"
    return (n, c, *size), layout, draw(st.booleans()), draw(st.sampled_from([torch.float32, torch.float64]))


@settings(max_examples=60, deadline=None)
@given(kernel_cases(), st.integers(0, 2**16))
def test_compiled_kernels_agree_with_the_tensor_op_implementation(case, seed):
    shape, layout, relu, dtype = case
    if not kernels.available():
        pytest.skip(kernels.status())
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(shape, generator=g, dtype=dtype) * 2 + 3, layout)
    dy = torch.randn(shape, generator=g, dtype=dtype)
    weight = torch.rand(shape[1], generator=g, dtype=dtype) + 0.5
    bias = torch.randn(shape[1], generator=g, dtype=dtype)
    results = []
    for use in (True, False):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, weight, bias))
        running = [torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)]
        with kernels.use_kernels(use):
            y = norm.batch_norm(xi, *running, wi, bi, training=True, momentum=0.1, eps=1e-3, relu=relu)
            y.backward(dy)
            y_eval = norm.batch_norm(x, *running, weight, bias, training=False, eps=1e-3, relu=relu)
        results.append([y, xi.grad, wi.grad, bi.grad, *running, y_eval])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, **tol)
    assert results[0][0].stride() == x.stride()  # the output keeps the input's layout


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("mean", [0.0, 1e2, 1e4, 1e6])
def test_large_mean_small_spread_stays_accurate(use_kernels, mean):
    """The guarantee: |y - y_float64| <= 2**-21 * (1 + |y|) for float32 input, whatever the mean.

    y_float64 is the float64 batch norm of the same float32 values. (PyTorch's own float32 batch
    norm is off by about 7e-4 at mean 1e4 and 4e-2 at mean 1e6 on this test.)
    """
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(32, 8, 10, 10, generator=g, dtype=torch.float64) + mean).float()
    exact = norm.naive_batch_norm(x.double(), None, None, eps=1e-5)
    with kernels.use_kernels(use_kernels):
        y = norm.batch_norm(x, None, None, training=True, eps=1e-5).double()
    assert ((y - exact).abs() <= 2**-21 * (1 + exact.abs())).all(), (y - exact).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
def test_low_precision_inputs_use_float32_statistics(dtype, param_dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 4, 6, 6, generator=g) * 3 + 20).to(dtype).requires_grad_()
    layer = norm.BatchNorm2d(4, dtype=dtype if param_dtype == "same" else torch.float32)
    y = layer(x)
    assert y.dtype == dtype
    exact = norm.naive_batch_norm(x.detach().double(), None, None, eps=1e-5)
    # only the final rounding to the low-precision type is lost: statistics were float32
    ulp = 2**-8 if dtype == torch.float16 else 2**-5
    assert ((y.double() - exact).abs() <= ulp * (1 + exact.abs())).all()
    y.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    torch.testing.assert_close(
        layer.running_mean.double(), 0.1 * x.detach().double().mean((0, 2, 3)), atol=2e-2, rtol=1e-2
    )


def test_fused_relu_equals_batch_norm_then_relu():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fused = norm.BatchNorm2d(5, fused_relu=True).double()
    plain = norm.BatchNorm2d(5).double()
    dy = torch.randn(8, 5, 4, 4, generator=g, dtype=torch.float64)
    y1 = fused(x)
    y2 = torch.relu(plain(x))
    torch.testing.assert_close(y1, y2)
    (g1,) = torch.autograd.grad(y1, x, dy)
    (g2,) = torch.autograd.grad(y2, x, dy)
    torch.testing.assert_close(g1, g2)
    assert torch.autograd.gradcheck(lambda t: fused(t), (x,))
