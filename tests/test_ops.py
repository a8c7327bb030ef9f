"""bnlab's batch norm is a real PyTorch operator: trace, export, compile and script reproduce eager outputs.

The failure this guards against: the compiled kernels were a ctypes call that tracing could not see,
so ``torch.jit.trace`` under ``no_grad`` recorded an uninitialised output (2% top-1 agreement).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bnlab
from bnlab import kernels


def _model(fused_relu: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3), bnlab.BatchNorm2d(8, fused_relu=fused_relu)]
    layers += [] if fused_relu else [nn.ReLU()]
    layers += [nn.Flatten(), nn.Linear(8 * 26 * 26, 16), bnlab.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # population statistics that are not the initial 0 / 1
        model.train()
        for _ in range(3):
            model(torch.randn(32, 1, 28, 28))
    return model


@pytest.fixture(params=[True, False], ids=["kernels", "tensor-ops"])
def use_kernels(request):
    with kernels.use_kernels(request.param):
        yield request.param


@pytest.fixture(params=[False, True], ids=["relu", "fused-relu"])
def fused(request):
    return request.param


def _inputs(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_trace_under_no_grad_reproduces_eager_outputs(use_kernels, fused):
    """The issue's example: 2% top-1 agreement before; bit-identical now."""
    model = _model(fused).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, _inputs(4))
        for seed in range(3):
            x = _inputs(16, seed)
            torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    assert "bnlab::batch_norm_eval" in str(traced.inlined_graph)


def test_traced_model_saves_loads_and_trains(use_kernels):
    model = _model().train()
    traced = torch.jit.trace(model, _inputs(8))  # tracing runs the model: its statistics move on
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    reference = copy.deepcopy(model)  # the state the traced module was saved with
    x = _inputs(8, 5)
    y = loaded(x)
    y_ref = reference(x)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(loaded.state_dict()["1.running_mean"], reference[1].running_mean)
    grad = dict(loaded.named_parameters())["1.weight"].grad
    torch.testing.assert_close(grad, reference[1].weight.grad)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_reproduces_eager_outputs_and_buffer_updates(use_kernels, fused, training):
    model = _model(fused).train(training)
    reference = copy.deepcopy(model)
    x = _inputs(8)
    program = torch.export.export(model, (x,))
    assert any("bnlab.batch_norm" in str(node.target) for node in program.graph.nodes)
    exported = program.module()
    torch.testing.assert_close(exported(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(exported.state_dict()["1.running_var"], reference[1].running_var)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_in_one_graph_reproduces_eager_outputs_and_gradients(use_kernels, fused, training):
    model = _model(fused).train(training)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    x = _inputs(8).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = compiled(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(model[1].weight.grad, reference[1].weight.grad)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_script_reproduces_eager_outputs(use_kernels, fused, training):
    model = _model(fused).train(training)
    reference = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    x = _inputs(8)
    torch.testing.assert_close(scripted(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(scripted.state_dict()["1.running_mean"], reference[1].running_mean)


def test_a_synchronized_layer_refuses_script_and_trace_clearly():
    layer = bnlab.BatchNorm2d(3, process_group=object())
    with pytest.raises(RuntimeError, match="with a process_group cannot be scripted"):
        torch.jit.script(layer)


def test_operators_check_their_inputs_at_trace_time():
    with pytest.raises(ValueError, match="more than one value per feature"):
        torch.export.export(bnlab.BatchNorm1d(4), (torch.randn(1, 4),))


def test_the_operators_are_registered_with_the_dispatcher():
    for name in ("batch_norm_train", "batch_norm_backward", "batch_norm_eval"):
        schema = str(getattr(torch.ops.bnlab, name).default._schema)
        assert schema.startswith(f"bnlab::{name}(")
    x = torch.randn(4, 3, 2, 2, device="meta")
    y, stats = torch.ops.bnlab.batch_norm_train(x, None, None, None, None, 0.1, 1e-5, True, False)  # fake
    assert y.shape == x.shape and stats.shape == (3, 3) and stats.dtype == torch.float64


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_and_compile_take_an_empty_batch(use_kernels, training):
    """The fake implementations accept N=0 as the real ones do (torch.nn's behaviour: an empty output)."""
    model = _model().train(training)
    reference = copy.deepcopy(model)
    x = _inputs(0)
    exported = torch.export.export(copy.deepcopy(model), (x,)).module()
    assert exported(x).shape == reference(x).shape == (0, 10)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = x.requires_grad_()
    y = compiled(x)
    y.sum().backward()
    assert y.shape == (0, 10) and x.grad.shape == x.shape
    assert torch.equal(model[1].weight.grad, torch.zeros(8))
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=0, atol=0)
    assert model[1].num_batches_tracked == reference[1].num_batches_tracked


def test_the_fake_implementations_give_an_empty_batch_and_mixed_precision_their_shapes():
    x = torch.empty(0, 3, 4, device="meta", dtype=torch.float16)
    weight = torch.empty(3, device="meta")
    y, stats = torch.ops.bnlab.batch_norm_train(x, weight, None, None, None, 0.1, 1e-5, True, False)
    assert y.shape == x.shape and stats.shape == (3, 3)
    dx, dweight, dbias = torch.ops.bnlab.batch_norm_backward(x, weight, stats, x, None)
    assert dx.dtype == torch.float16 and dweight.dtype == dbias.dtype == torch.float32


LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "transposed": lambda x: x.transpose(2, 3),  # dense, neither layout the kernels take directly
    "sliced": lambda x: x[:, :, ::2],
}


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [pytest.param(name, torch.float16, id=f"{name}-float16") for name in LAYOUTS]
    + [pytest.param("contiguous", torch.float32, id="contiguous-float32")],
)
def test_opcheck_fake_implementations_match_the_kernels_for_every_layout(use_kernels, layout, dtype):
    """torch.library.opcheck: schemas, fake implementations (shapes, dtypes, strides), AOT dispatch and autograd.

    For a transposed input the kernels returned a contiguous y where the fake implementation promises
    empty_like(x)'s strides, and code torch.compile (inductor) generated for it failed.
    """
    g = torch.Generator().manual_seed(0)
    x = LAYOUTS[layout](torch.randn(4, 3, 6, 5, generator=g).to(dtype)).requires_grad_()
    weight, bias = (torch.randn(3, generator=g).requires_grad_() for _ in range(2))
    running = [torch.zeros(3), torch.ones(3)]
    torch.library.opcheck(torch.ops.bnlab.batch_norm_train.default, (x, weight, bias, *running, 0.1, 1e-5, True, True))
    torch.library.opcheck(torch.ops.bnlab.batch_norm_eval.default, (x, weight, bias, *running, 1e-5, True))
    y, stats = torch.ops.bnlab.batch_norm_train(x.detach(), weight.detach(), None, None, None, 0.1, 1e-5, True, True)
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    torch.library.opcheck(torch.ops.bnlab.batch_norm_backward.default, (x.detach(), weight.detach(), stats, dy, y))


def test_turning_the_kernels_off_after_tracing_them_keeps_gradients():
    """The Python dispatcher cached which kernel serves AutogradCPU; after use_kernels(False) it went on asking for
    the removed C++ one, and the AOT-traced backward silently gave no gradients (opcheck: "different gradients")."""
    x = _inputs(4).requires_grad_()
    weight, bias = torch.ones(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    args = (x, weight, bias, None, None, 0.1, 1e-5, True, False)
    check = ("test_aot_dispatch_dynamic",)
    with kernels.use_kernels(True):
        torch.library.opcheck(torch.ops.bnlab.batch_norm_train.default, args, test_utils=check)
    with kernels.use_kernels(False):
        torch.library.opcheck(torch.ops.bnlab.batch_norm_train.default, args, test_utils=check)
