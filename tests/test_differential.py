"""The compiled kernels, the tensor-op path and torch.nn.BatchNorm, compared on random cases and special values.

Each case draws a rank (2-D to 5-D), a shape, a dtype, a layout (contiguous, channels_last(_3d), a
strided slice), the layer's options and a kind of special value (NaN, +inf, -inf, both, huge,
denormal, a constant feature, a large mean with a tiny spread), then trains a layer for two steps
and evaluates it, forward and backward, three ways: bnlab with its compiled kernels, bnlab with its
tensor ops (``use_kernels(False)``) and torch.nn.BatchNorm with the same options (bnlab's fused
ReLU: torch.relu after the layer), the gradients with or without ``create_graph``. Compared: y, dx,
dweight, dbias, running_mean, running_var and num_batches_tracked, with ``assert_same`` (the same
NaN, +inf and -inf places; finite values within ``TOLERANCE``):

- kernels against tensor ops, always: they are one set of operations (what they do with
  non-finite and huge values: ``bnlab/nn/statistics.py``'s docstring);
- both against ``reference``, always: those semantics in float64, differentiated by autograd;
- both against torch.nn, except where bnlab deliberately differs from it (below): there torch.nn's
  non-finite pattern is compared, not its values (and for huge values not even that).

The deliberate differences:
- a large mean with a tiny spread, or a constant feature: torch.nn subtracts a rounded mean, off by
  about 7e-4 at mean 1e4 in float32 (a constant feature normalizes to noise of ulp(value) / sqrt(eps)
  instead of to its bias); bnlab's shifted moments keep the mean exact;
- huge finite values (1e30, 3e38; 1e200 in float64): torch.nn sums a feature in its dtype, so two
  values of 3e38 overflow its mean to inf and its outputs to NaN, and a constant 3e38 feature
  normalizes to -inf; bnlab's sums keep the mean exact, and a variance beyond float32's range is inf
  (the feature normalizes to its bias, as torch.nn does with one huge value);
- float16/bfloat16: torch.nn keeps a low-precision layer's batch mean in the layer's dtype and
  rounds dx's intermediates to it, so where the spread is small next to the mean, or dx cancels
  (few values per feature), it is off by percents (bfloat16, N=2: y = -1.047 for -1); bnlab's
  statistics and arithmetic are float32, within one final rounding of the reference;
- unbiased_running_var=False has no torch.nn counterpart: its running variance, and the eval step
  that normalizes with it, are compared with the reference only.

Without the kernels (no compiler, or BNLAB_KERNELS=0) the tensor ops alone are compared with the
reference and torch.nn. The random cases run on one thread (on two cores shared with other work,
OpenMP's waits made each case six times slower); ``test_large_inputs_split_across_threads_agree``
covers the kernels' threads. Deterministic: hypothesis derandomized, no example database.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import kernels

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)
# finite values: |actual - expected| <= rtol * |expected| + atol * max(1, largest finite |expected|, a scale)
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (4e-3, 2e-3),  # one rounding of the output to float16: 2^-11
    torch.bfloat16: (3e-2, 1.6e-2),  # and to bfloat16: 2^-8
}
SPECIALS = ["none", "nan", "+inf", "-inf", "both infs", "huge", "denormal", "constant", "large mean"]
# where torch.nn's finite values are off (module docstring): its non-finite pattern is compared, not its values
TORCH_INACCURATE = {"huge", "constant", "large mean"}
BNLAB = {2: bnlab.BatchNorm1d, 3: bnlab.BatchNorm1d, 4: bnlab.BatchNorm2d, 5: bnlab.BatchNorm3d}
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


@dataclass
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype
    param_dtype: torch.dtype
    layout: str
    affine: bool
    bias: bool
    relu: bool
    momentum: float | None
    unbiased: bool
    track: bool
    eps: float
    special: str
    at_first: bool  # a special value at each feature's first position (the shift bnlab's moments use)
    create_graph: bool  # gradients that can be differentiated again (bnlab: another formula, naive_batch_norm's)
    seed: int


@st.composite
def cases(draw) -> Case:
    rank = draw(st.sampled_from([2, 3, 4, 5]))
    spatial = {2: [], 3: [draw(st.sampled_from([1, 2, 3, 5, 9, 65]))]}.get(rank)
    if spatial is None:  # 4-D and 5-D: sizes that make short (periodic) and long (per-feature) runs
        spatial = [draw(st.sampled_from([1, 2, 3, 5, 9])) for _ in range(rank - 2)]
    values_per_sample = int(torch.tensor(spatial).prod()) if spatial else 1
    n = draw(st.integers(1 if values_per_sample > 1 else 2, 7))
    c = draw(st.sampled_from([1, 3, 5, 7]))
    layouts = ["contiguous", "sliced", *{4: ["channels_last"], 5: ["channels_last_3d"]}.get(rank, [])]
    dtype = draw(st.sampled_from(DTYPES))
    affine = draw(st.booleans())
    return Case(
        shape=(n, c, *spatial),
        dtype=dtype,
        param_dtype=draw(st.sampled_from([dtype, torch.float32])) if dtype in LOW_PRECISION else dtype,
        layout=draw(st.sampled_from(layouts)),
        affine=affine,
        bias=affine and draw(st.booleans()),
        relu=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.5, 1.0, None])),
        unbiased=draw(st.booleans()),
        track=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        special=draw(st.sampled_from(SPECIALS)),
        at_first=draw(st.booleans()),
        create_graph=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _huge(dtype: torch.dtype) -> list[float]:
    """Finite values whose squares overflow the dtype the statistics are computed in (float16's are float32)."""
    return {torch.float64: [1e200, 1e300], torch.float16: [3e4, 6e4]}.get(dtype, [1e30, 3e38])


def make_input(case: Case, g: torch.Generator) -> torch.Tensor:
    """x of the case's dtype and layout, holding its special values."""
    shape, dtype = case.shape, case.dtype
    by_feature = torch.randn(shape[1], shape[0], *shape[2:], generator=g, dtype=torch.float64) * 2 + 0.5
    flat = by_feature[int(torch.randint(shape[1], (), generator=g))].view(-1)  # one feature's values, a view
    count = flat.numel()

    def positions(k: int) -> torch.Tensor:
        picked = torch.randperm(count, generator=g)[:k]
        return torch.cat([torch.zeros(1, dtype=torch.long), picked]) if case.at_first else picked

    if case.special == "nan":
        flat[positions(1)] = float("nan")
    elif case.special in ("+inf", "-inf"):
        flat[positions(2)] = float(case.special)
    elif case.special == "both infs":
        flat[positions(1)] = float("inf")
        flat[positions(1)] = -float("inf")
    elif case.special == "huge":  # of one sign per case: no difference of two values (or of x and a mean) overflows
        sign = 1.0 if case.seed % 2 else -1.0
        huge = _huge(dtype)
        flat[positions(2)] = sign * huge[int(torch.randint(len(huge), (), generator=g))]
    elif case.special == "denormal":
        by_feature *= {torch.float64: 1e-310, torch.float16: 1e-6}.get(dtype, 1e-40)
    elif case.special == "constant":
        flat.fill_(float(torch.randn((), generator=g, dtype=torch.float64)) * 1e3)
    elif case.special == "large mean":  # a spread of a few units in the last place of the mean
        mean = {torch.float32: 1e4, torch.float64: 1e3}.get(dtype, 1e3)
        # (a float64 mean is only as exact as a float64: 1e3 +- 1e-3 is the float64 counterpart)
        spread = 1e-3 if dtype == torch.float64 else 4 * float(torch.finfo(dtype).eps) * mean
        by_feature = mean + (by_feature - 0.5) / 2 * spread
    x = by_feature.transpose(0, 1).contiguous().to(dtype)
    if case.layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if case.layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if case.layout == "sliced":  # every other value of a wider tensor: no layout the kernels take directly
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def bnlab_paths() -> list[str]:
    return ["kernels", "tensor ops"] if kernels.available() else ["tensor ops"]


def make_layers(case: Case, g: torch.Generator) -> dict[str, torch.nn.Module]:
    rank = len(case.shape)
    options = dict(momentum=case.momentum, affine=case.affine, track_running_stats=case.track, eps=case.eps)
    ours = BNLAB[rank](
        case.shape[1], **options, bias=case.bias, unbiased_running_var=case.unbiased, fused_relu=case.relu,
        dtype=case.param_dtype,
    )  # fmt: skip
    theirs = TORCH[rank](case.shape[1], **options, bias=case.bias, dtype=case.param_dtype)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.copy_(torch.randn(case.shape[1], generator=g))
    if case.track:
        with torch.no_grad():  # population statistics that are not the initial 0 and 1
            theirs.running_mean.copy_(torch.randn(case.shape[1], generator=g))
            theirs.running_var.copy_(torch.rand(case.shape[1], generator=g) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return {path: copy.deepcopy(ours) for path in bnlab_paths()} | {"torch.nn": theirs}


def step(name: str, layer: torch.nn.Module, case: Case, x: torch.Tensor, dy: torch.Tensor, index: int) -> dict:
    """One forward and backward (training for steps 0 and 1, eval for step 2): the tensors compared."""
    layer.train(index < 2)
    xi = x.detach().clone().requires_grad_()
    leaves = {"dx": xi, "dweight": layer.weight if case.affine else None, "dbias": layer.bias if case.bias else None}
    leaves = {key: leaf for key, leaf in leaves.items() if leaf is not None}
    with kernels.use_kernels(name == "kernels"):
        y = layer(xi)
        if name == "torch.nn" and case.relu:
            y = torch.relu(y)
        grads = torch.autograd.grad(y, list(leaves.values()), dy, create_graph=case.create_graph)
    out = {f"y{index}": y.detach()} | {f"{key}{index}": g.detach() for key, g in zip(leaves, grads, strict=True)}
    if case.track and index == 1:
        out |= {"running_mean": layer.running_mean.clone(), "running_var": layer.running_var.clone()}
        out["num_batches_tracked"] = layer.num_batches_tracked.clone()
    return out


def reference(
    case: Case, layer: torch.nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]], buffers: list[torch.Tensor]
) -> dict:
    """bnlab's semantics in float64: exact statistics, the variance rounded to the compute dtype; autograd gradients.

    The eval step normalizes with ``buffers``, the running statistics every layer is given for it. Besides
    the tensors, ``dx_scale{step}``: the size of the terms dx is the difference of (invstd * |weight| * |dy|),
    which its rounding errors are relative to.
    """
    acc = torch.float32 if case.dtype in LOW_PRECISION else case.dtype
    dims = [0, *range(2, len(case.shape))]
    view = (1, -1) + (1,) * (len(case.shape) - 2)
    weight = layer.weight.detach().double().requires_grad_() if case.affine else None
    bias = layer.bias.detach().double().requires_grad_() if case.bias else None
    running = [layer.running_mean.double(), layer.running_var.double()] if case.track else None
    count = 0
    out = {}
    for step, (x, dy) in enumerate(inputs):
        x64 = x.detach().double().requires_grad_()
        if step < 2 or not case.track:
            # around a value of each feature (a finite one), so that a large mean costs float64 nothing
            shift = x64.detach().transpose(0, 1).reshape(x.shape[1], -1)[:, 0].nan_to_num(0.0, 0.0, 0.0)
            centered = x64 - shift.view(view)
            offset = centered.mean(dims)  # a sum: inf for a feature holding one infinity
            var = centered.var(dims, correction=0).to(acc).double()
            mean = shift + offset
        else:
            mean, var = (b.double() for b in buffers)
            centered, offset = x64, mean
        y = (centered - offset.view(view)) * torch.rsqrt(var.view(view) + case.eps)
        if weight is not None:
            y = y * weight.view(view)
        if bias is not None:
            y = y + bias.view(view)
        if case.relu:
            y = F.relu(y)
        grads = torch.autograd.grad(y, [t for t in (x64, weight, bias) if t is not None], dy.double())
        out |= {f"y{step}": y.detach(), f"dx{step}": grads[0]}
        k = torch.rsqrt(var.detach() + case.eps) * (1 if weight is None else weight.detach().abs())
        k = k[torch.isfinite(k)]
        out[f"dx_scale{step}"] = float(k.max()) * float(dy.double().abs().max()) if k.numel() else 0.0
        if weight is not None:
            out[f"dweight{step}"] = grads[1]
        if bias is not None:
            out[f"dbias{step}"] = grads[2]
        if step < 2 and running is not None:
            count += 1
            momentum = 1 / count if case.momentum is None else case.momentum
            m = x.numel() // x.shape[1]
            batch = [mean.detach(), var.detach() * (m / (m - 1) if case.unbiased else 1)]
            running = [(1 - momentum) * r + momentum * b for r, b in zip(running, batch, strict=True)]
        if step == 1 and running is not None:
            out |= {"running_mean": running[0], "running_var": running[1]}
            out["num_batches_tracked"] = torch.tensor(2)
    return out


def assert_same(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 0) -> None:
    """The same NaN, +inf and -inf positions; finite values within TOLERANCE of dtype (expected rounded to actual's
    dtype), the absolute part relative to the largest of 1, the largest finite |expected| and ``scale``."""
    assert actual.shape == expected.shape, what
    expected = expected.to(actual.dtype)
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    rtol, atol = TOLERANCE[dtype]
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, float(finite.abs().max()) if finite.numel() else 0.0, scale)
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def compare(case: Case) -> None:
    g = torch.Generator().manual_seed(case.seed)
    layers = make_layers(case, g)
    inputs = [(make_input(case, g), torch.randn(case.shape, generator=g).to(case.dtype)) for _ in range(3)]
    paths = bnlab_paths()
    initial = copy.deepcopy(layers[paths[0]])
    results = {name: {} for name in layers}
    buffers = []
    for index, (x, dy) in enumerate(inputs):
        if index == 2 and case.track:
            # Eval normalizes with the buffers, whose last-place rounding can differ by path; at a large mean
            # that moves y far (docs/norm.md, "Accuracy"), so every layer gets the same: the first path's.
            buffers = [layers[paths[0]].running_mean.clone(), layers[paths[0]].running_var.clone()]
            for layer in layers.values():
                layer.running_mean.copy_(buffers[0])
                layer.running_var.copy_(buffers[1])
        for name, layer in layers.items():
            results[name] |= step(name, layer, case, x, dy, index)
    expected = reference(case, initial, inputs, buffers)
    first = results[paths[0]]
    scales = {f"dx{index}": expected.pop(f"dx_scale{index}") for index in range(len(inputs))}
    assert all(results[path].keys() == expected.keys() for path in paths)
    for key, value in first.items():
        scale = scales.get(key, 0.0)
        if len(paths) == 2:
            assert_same(value, results["tensor ops"][key], case.dtype, f"{key}: kernels vs tensor ops", scale)
        for path in paths:
            assert_same(results[path][key], expected[key], case.dtype, f"{key}: {path} vs the float64 reference", scale)
        biased = case.track and not case.unbiased and (key == "running_var" or key.endswith("2"))
        if case.special == "huge" or biased:  # no torch.nn counterpart (module docstring)
            continue
        theirs = results["torch.nn"][key]
        if case.special not in TORCH_INACCURATE and case.dtype not in LOW_PRECISION:
            assert_same(value, theirs, case.dtype, f"{key}: {paths[0]} vs torch.nn", scale)
        else:  # the same non-finite pattern only
            for test in (torch.isnan, torch.isposinf, torch.isneginf):
                assert torch.equal(test(value), test(theirs.to(value.dtype))), f"{key}: {test.__name__} vs torch.nn"
    layout = {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}.get(case.layout)
    if layout is not None:  # the output keeps the input's layout
        assert all(results[path]["y0"].is_contiguous(memory_format=layout) for path in paths)


@settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(cases())
def test_kernels_tensor_ops_and_torch_agree(case):
    torch.set_num_threads(1)  # conftest restores it
    compare(case)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("special", ["nan", "+inf", "huge", "large mean"])
def test_large_inputs_split_across_threads_agree(layout, special):
    """Large enough (> 2 * 32768 values) that the kernels split the work across threads and add partial sums."""
    case = Case(
        shape=(16, 3, 40, 40), dtype=torch.float32, param_dtype=torch.float32, layout=layout, affine=True,
        bias=True, relu=False, momentum=0.1, unbiased=True, track=True, eps=1e-5, special=special, at_first=False,
        create_graph=False, seed=0,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))  # conftest restores it
    compare(case)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "tensor-ops"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0), (0, 3, 2, 2), (0, 3, 2, 2, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_an_empty_batch_behaves_as_in_torch_nn(use_kernels, training, shape, momentum):
    """bnlab raised on N=0 in training; torch.nn returns an empty output, zero weight and bias gradients, leaves the
    running statistics as they are and counts the batch in num_batches_tracked."""
    theirs = TORCH[len(shape)](3, momentum=momentum)
    with torch.no_grad():
        for tensor in (theirs.weight, theirs.bias, theirs.running_mean):
            tensor.copy_(torch.randn(3))
    ours = BNLAB[len(shape)](3, momentum=momentum)
    ours.load_state_dict(theirs.state_dict())
    results = []
    for layer in (theirs, ours):
        layer.train(training)
        x = torch.randn(shape, requires_grad=True)
        with kernels.use_kernels(use_kernels):
            y = layer(x)
            y.sum().backward()
        results.append((y, x.grad, layer.weight.grad, layer.bias.grad, *layer.buffers()))
    for expected, actual in zip(*results, strict=True):
        assert actual.dtype == expected.dtype and actual.stride() == expected.stride()
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert results[1][0].requires_grad


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "tensor-ops"])
def test_an_empty_batch_through_the_operators(use_kernels):
    """The operators themselves, every option: nothing normalized, nothing updated, zero sums in the backward."""
    x = torch.randn(0, 3, 5, dtype=torch.float16)
    weight, bias = torch.randn(3), torch.randn(3)
    running = [torch.randn(3), torch.rand(3)]
    before = [r.clone() for r in running]
    with kernels.use_kernels(use_kernels):
        y, stats = torch.ops.bnlab.batch_norm_train(x, weight, bias, *running, 0.1, 1e-3, True, True)
        grads = torch.ops.bnlab.batch_norm_backward(x, weight, stats, torch.randn(0, 3, 5).half(), y)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(stats, torch.tensor([[0.0] * 3, [0.0] * 3, [1e-3**-0.5] * 3], dtype=torch.float64))
    assert all(torch.equal(r, b) for r, b in zip(running, before, strict=True))
    assert grads[0].shape == x.shape and grads[0].dtype == x.dtype
    for grad in grads[1:]:  # in the parameters' dtype, not float16
        assert grad.dtype == torch.float32 and torch.equal(grad, torch.zeros(3))


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "tensor-ops"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float16_input_keeps_float32_parameter_gradients(use_kernels, training):
    """dweight and dbias went through the input's float16 on their way to float32 parameters: 3e5 became inf."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 2, 50, generator=g) * 3).half()
    dy = x * 30  # dweight = sum(dy * xhat), about 3e5: beyond float16
    layers = [torch.nn.BatchNorm1d(2), bnlab.BatchNorm1d(2)]
    grads = []
    for layer in layers:
        layer.train(training)
        with kernels.use_kernels(use_kernels):
            layer(x).backward(dy)
        grads.append([layer.weight.grad, layer.bias.grad])
    for theirs, ours in zip(*grads, strict=True):
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-2)
    assert grads[1][0].abs().min() > torch.finfo(torch.float16).max
