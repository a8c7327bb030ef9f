"""Batch norm's family: renorm, ghost and frozen batch norm, each against a plain-PyTorch reference written here.

The references transcribe each layer's anchor: torchrl's ``BatchRenorm1d`` (its algorithm, with ``smooth=False``),
Hoffer et al.'s ghost batches (consecutive virtual batches normalized alone; running statistics from their
average, as Keras 2's ``virtual_batch_size`` keeps them) and
torchvision's ``FrozenBatchNorm2d`` (its forward and state_dict keys). Neither library is imported:
torchvision does not work beside this project's PyTorch, and torchrl brings tensordict and a compiled
extension of its own. ``test_renorm_matches_torchrls_own_code`` runs torchrl's file itself when it is
pointed at (docs/family.md has the figures).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab import kernels
from bnlab.errors import UsageError
from bnlab.nn.convert import FAMILIES, convert, group_count
from bnlab.nn.ghost import virtual_batches

F64 = torch.float64


@pytest.fixture(params=[True, False], ids=["kernels", "tensor-ops"])
def use_kernels(request):
    with kernels.use_kernels(request.param):
        yield request.param


def randn(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale + shift


def dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *[1] * (x.dim() - 2))


class RenormReference:
    """torchrl's BatchRenorm1d algorithm (smooth=False), for any rank: r and d from the running statistics
    before this batch, detached; then the running statistics follow the batch's (unbiased) ones."""

    def __init__(self, channels: int, momentum: float, eps: float, rmax: float, dmax: float, warmup: int):
        self.mean, self.var = torch.zeros(channels, dtype=F64), torch.ones(channels, dtype=F64)
        self.momentum, self.eps, self.rmax, self.dmax, self.warmup, self.steps = momentum, eps, rmax, dmax, warmup, 0
        self.weight = torch.linspace(0.5, 1.5, channels, dtype=F64).requires_grad_()
        self.bias = torch.linspace(-0.2, 0.3, channels, dtype=F64).requires_grad_()

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = x.mean(dims(x)), x.var(dims(x), correction=0)
        std, running_std = (var + self.eps).sqrt(), (self.var + self.eps).sqrt()
        r = (std.detach() / running_std).clamp(1 / self.rmax, self.rmax)
        d = ((mean.detach() - self.mean) / running_std).clamp(-self.dmax, self.dmax)
        opened = float(self.steps >= self.warmup)
        r, d = 1 + (r - 1) * opened, d * opened
        y = (x - view(mean, x)) / view(std, x) * view(r, x) + view(d, x)
        m = x.numel() // x.shape[1]  # torchrl counts x.shape[0]: the same on (N, C) input
        self.mean += self.momentum * (mean.detach() - self.mean)
        self.var += self.momentum * (var.detach() * m / (m - 1) - self.var)
        self.steps += 1
        return view(self.weight, x) * y + view(self.bias, x)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        return view(self.weight, x) * (x - view(self.mean, x)) / view((self.var + self.eps).sqrt(), x) + view(
            self.bias, x
        )


def renorm_like(reference: RenormReference, cls: type = bnlab.BatchRenorm1d, **options) -> nn.Module:
    layer = cls(
        len(reference.mean), eps=reference.eps, momentum=reference.momentum, rmax=reference.rmax,
        dmax=reference.dmax, warmup_steps=reference.warmup, dtype=F64, **options,
    )  # fmt: skip
    with torch.no_grad():
        layer.weight.copy_(reference.weight)
        layer.bias.copy_(reference.bias)
    return layer


@pytest.mark.parametrize("shape", [(16, 5), (6, 3, 4, 4)], ids=["1d", "2d"])
def test_renorm_matches_the_torchrl_algorithm_across_its_warm_up(use_kernels, shape):
    reference = RenormReference(shape[1], momentum=0.3, eps=1e-3, rmax=1.5, dmax=0.5, warmup=3)
    layer = renorm_like(reference, bnlab.BatchRenorm1d if len(shape) == 2 else bnlab.BatchRenorm2d)
    for step in range(6):  # three of batch norm, then renorm with the bounds open
        x = randn(*shape, seed=step, scale=1 + step, shift=step - 2)  # batches far from the running statistics
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y = reference.train_step(x_ref), layer(x_ours)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        dy = randn(*shape, seed=100 + step)
        y_ref.backward(dy)
        y.backward(dy)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, reference.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, reference.var, rtol=1e-12, atol=1e-12)
        layer.weight.grad = layer.bias.grad = reference.weight.grad = reference.bias.grad = None
    assert int(layer.num_batches_tracked) == 6
    x = randn(*shape, seed=50)
    torch.testing.assert_close(layer.eval()(x), reference.eval(x), rtol=1e-12, atol=1e-12)


def test_renorm_corrects_the_batch_towards_the_running_statistics_within_its_clips():
    layer = bnlab.BatchRenorm1d(3, warmup_steps=0, rmax=2.0, dmax=1.0, affine=False, dtype=F64)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 10.0, 0.3], dtype=F64))
        layer.running_var.copy_(torch.tensor([1.0, 1.0, 100.0], dtype=F64))
    x = randn(400, 3)  # mean ~0, std ~1
    y = layer(x)
    mean, std = x.mean(0), (x.var(0, correction=0) + layer.eps).sqrt()
    xhat = (x - mean) / std
    running_std = (torch.tensor([1.0, 1.0, 100.0], dtype=F64) + layer.eps).sqrt()
    r = (std / running_std).clamp(0.5, 2.0)
    d = ((mean - torch.tensor([0.0, 10.0, 0.3], dtype=F64)) / running_std).clamp(-1.0, 1.0)
    assert d[1] == -1.0 and r[2] == 0.5  # clipped: the running mean 10 sigma away, the running sigma 10x the batch's
    torch.testing.assert_close(y, xhat * r + d, rtol=1e-12, atol=1e-12)


def test_renorm_with_rmax_1_and_dmax_0_is_batch_norm(use_kernels):
    x = randn(12, 4, 3, 3, seed=1, scale=3, shift=2)
    bn, renorm = bnlab.BatchNorm2d(4, dtype=F64), bnlab.BatchRenorm2d(4, rmax=1.0, dmax=0.0, warmup_steps=0, dtype=F64)
    for layer in (bn, renorm):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = bn(xa), renorm(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
    dy = randn(*x.shape, seed=2)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(renorm.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-12)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(renorm, key), getattr(bn, key), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("warmup, expected", [("step", [0, 0, 1, 1]), ("linear", [0, 0.5, 1, 1])])
def test_the_warm_up_opens_the_bounds_from_batch_norm_to_rmax_and_dmax(warmup, expected):
    layer = bnlab.BatchRenorm1d(2, rmax=3.0, dmax=5.0, warmup_steps=4, warmup=warmup)
    for count, opened in zip((0, 2, 4, 8), expected, strict=True):
        layer.num_batches_tracked.fill_(count)
        rmax, dmax = layer.bounds()
        assert (float(rmax), float(dmax)) == pytest.approx((1 + 2 * opened, 5 * opened))


def test_a_renorm_momentum_keeps_its_own_moving_mean_and_sigma():
    layer = bnlab.BatchRenorm1d(3, momentum=0.5, renorm_momentum=0.1, warmup_steps=0, affine=False, dtype=F64)
    assert set(layer.state_dict()) >= {"renorm_mean", "renorm_std", "running_mean", "running_var"}
    x = randn(32, 3, shift=4.0)
    y = layer(x)
    mean, var = x.mean(0), x.var(0, correction=0)
    std = (var + layer.eps).sqrt()
    # r and d compared the batch with renorm_mean 0 and renorm_std 1 (their initial values)
    r, d = std.clamp(1 / 3, 3), mean.clamp(-5, 5)
    torch.testing.assert_close(y, (x - mean) / std * r + d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.renorm_mean, 0.1 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.renorm_std, 0.9 + 0.1 * std, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, 0.5 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, 0.5 + 0.5 * var * 32 / 31, rtol=1e-12, atol=1e-12)


def test_renorm_gradients_pass_gradcheck_where_r_and_d_are_clipped():
    """gradcheck's finite differences move r and d with x unless they sit at their clips; there, r and d are
    constants in fact, and the analytic gradient (which treats them as constants, as the paper says) is exact."""
    layer = bnlab.BatchRenorm1d(3, warmup_steps=0, momentum=0.0, dtype=F64)
    with torch.no_grad():
        layer.running_mean.fill_(1000.0)  # d at -dmax
        layer.running_var.fill_(1e4)  # r at 1 / rmax
    x = randn(10, 3).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradgradcheck(layer, (x,))


def ghost_reference(x: torch.Tensor, size: int, weight, bias, eps: float):
    """Each virtual batch through torch.nn.functional.batch_norm alone, and the running statistics' targets:
    the whole batch's mean and the count-weighted average of the virtual batches' unbiased variances."""
    full, rest = virtual_batches(x.shape[0], size, x[0].numel() // x.shape[1])
    chunks = list(x[: full * size].split(size)) + ([x[full * size :]] if rest else [])
    y = torch.cat([F.batch_norm(c, None, None, weight, bias, training=True, eps=eps) for c in chunks])
    counts = torch.tensor([c.numel() // c.shape[1] for c in chunks], dtype=F64)
    variances = torch.stack([c.var(dims(c), correction=1) for c in chunks])
    return y, len(chunks), x.mean(dims(x)), (counts[:, None] * variances).sum(0) / counts.sum()


@pytest.mark.parametrize(
    "shape, size, chunks",
    [((16, 4), 4, 4), ((18, 4), 4, 5), ((17, 4), 4, 4), ((10, 3, 2, 2), 4, 3), ((9, 3, 2, 2), 4, 2)],
    ids=["even", "half-a-batch-left-stands", "one-left-joins", "2d", "2d-under-half-left-joins"],
)
def test_ghost_normalizes_each_virtual_batch_alone(use_kernels, shape, size, chunks):
    layer = bnlab.GhostBatchNorm1d(shape[1], virtual_batch_size=size, momentum=0.25, dtype=F64)
    if len(shape) == 4:
        layer = bnlab.GhostBatchNorm2d(shape[1], virtual_batch_size=size, momentum=0.25, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    x = randn(*shape, seed=3, scale=2.0, shift=1.0)
    x[size:] += 3.0  # virtual batches with different means
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, count, mean, var = ghost_reference(x_ref, size, weight, bias, layer.eps)
    assert count == chunks
    y = layer(x_ours)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    dy = randn(*shape, seed=4)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, 0.25 * mean.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * var.detach(), rtol=1e-12, atol=1e-12)
    x_eval = randn(5, *shape[1:], seed=9)
    expected = F.batch_norm(x_eval, layer.running_mean, layer.running_var, layer.weight, layer.bias, eps=layer.eps)
    torch.testing.assert_close(layer.eval()(x_eval), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [8, 5], ids=["virtual-batch-is-the-batch", "batch-below-it"])
def test_ghost_with_a_virtual_batch_of_the_whole_batch_is_batch_norm(use_kernels, batch):
    x = randn(batch, 6, seed=5, scale=3)
    bn, ghost = bnlab.BatchNorm1d(6, dtype=F64), bnlab.GhostBatchNorm1d(6, virtual_batch_size=8, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = bn(xa), ghost(xb)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
    assert_same_state(ghost.state_dict(), bn.state_dict())


def test_ghost_gradients_pass_gradcheck():
    layer = bnlab.GhostBatchNorm1d(3, virtual_batch_size=4, dtype=F64)
    x = randn(11, 3).requires_grad_()  # virtual batches of 4, 4 and 3
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradgradcheck(layer, (x,))


def frozen_reference(x, weight, bias, mean, var, eps=1e-5):
    """torchvision's FrozenBatchNorm2d.forward."""
    scale = weight * (var + eps).rsqrt()
    return x * view(scale, x) + view(bias - mean * scale, x)


def test_frozen_is_fixed_in_training_and_eval_and_loads_torchvisions_state():
    state = {  # torchvision FrozenBatchNorm2d(4).state_dict()'s keys, with values that are not the initial ones
        "weight": torch.tensor([1.0, 2.0, 0.5, -1.0], dtype=F64),
        "bias": torch.tensor([0.0, 0.1, -0.2, 0.3], dtype=F64),
        "running_mean": torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64),
        "running_var": torch.tensor([4.0, 0.25, 1.0, 9.0], dtype=F64),
    }
    layer = bnlab.FrozenBatchNorm2d(4, dtype=F64)
    layer.load_state_dict(state)
    assert list(layer.state_dict()) == list(state) and not list(layer.parameters())
    x = randn(3, 4, 5, 5, seed=6).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = frozen_reference(x_ref, *state.values())
    for training in (True, False):
        torch.testing.assert_close(layer.train(training)(x), expected, rtol=1e-12, atol=1e-12)
    layer(x).sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(layer, (randn(2, 4, 2, 2).requires_grad_(),))
    layer.load_state_dict({**state, "num_batches_tracked": torch.tensor(7)})  # a batch norm's state loads too
    assert_same_state(layer.state_dict(), state)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def _trained(layer: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """A layer whose running statistics are not the initial ones, in eval mode."""
    with torch.no_grad():
        layer.train()
        for seed in range(3):
            layer(randn(*shape, seed=seed, scale=2, shift=1).to(next(layer.buffers()).dtype))
    return layer.eval()


@pytest.mark.parametrize(
    "to, options", [("renorm", {"rmax": 2.0}), ("ghost", {"virtual_batch_size": 4}), ("frozen", {})]
)
@pytest.mark.parametrize("source", ["manual", "torch"])
def test_convert_to_the_family_and_back_keeps_eval_outputs_and_the_tensors(to, options, source):
    x = randn(4, 1, 8, 8, seed=7)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 5),
                          nn.BatchNorm1d(5)).double()  # fmt: skip
    if source == "manual":
        convert(model, "manual")
    with torch.no_grad():
        model.train()
        for seed in range(3):
            model(randn(8, 1, 8, 8, seed=seed))
    model.eval()
    expected = model(x)
    weight = model[1].weight
    convert(model, to, **options)
    assert isinstance(model[1], FAMILIES[to][1]) and isinstance(model[5], FAMILIES[to][0])
    if to == "frozen":  # a copy: an optimizer built before would otherwise still move it
        assert model[1].weight.data_ptr() != weight.data_ptr() and torch.equal(model[1].weight, weight)
    else:
        assert model[1].weight is weight  # the same tensor
    exact = 0.0 if source == "manual" else 1e-12  # bnlab's evaluation operator and torch.nn's round differently
    torch.testing.assert_close(model(x), expected, rtol=exact, atol=exact)
    convert(model, source)
    assert type(model[1]) is FAMILIES[source][1]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert isinstance(model[1].weight, nn.Parameter)


def test_a_frozen_model_trains_nothing_but_what_follows_it():
    model = nn.Sequential(nn.Linear(4, 3), bnlab.BatchNorm1d(3), nn.Linear(3, 2))
    _trained(model, (16, 4))
    before = copy.deepcopy(model[1].state_dict())
    convert(model, "frozen").train()
    assert len(list(model.parameters())) == 4  # the two linear layers' weights and biases
    model(torch.randn(8, 4)).sum().backward()
    assert model[0].weight.grad is not None
    assert_same_state({k: v for k, v in before.items() if k != "num_batches_tracked"}, model[1].state_dict())


def test_convert_to_group_keeps_the_affine_and_says_what_it_drops():
    model = nn.Sequential(nn.Conv2d(1, 48, 3), nn.BatchNorm2d(48), nn.Conv2d(48, 10, 1), bnlab.BatchNorm2d(10))
    weight = model[1].weight
    with pytest.warns(UserWarning, match=r"1 and 1 more layers kept running statistics.*GroupNorm"):
        convert(model, "group")
    assert isinstance(model[1], nn.GroupNorm) and (model[1].num_groups, model[3].num_groups) == (24, 10)
    assert model[1].weight is weight
    x = torch.randn(2, 1, 6, 6)
    h = model[0](x)
    torch.testing.assert_close(model[1](h), F.group_norm(h, 24, weight, model[1].bias, model[1].eps))
    assert [group_count(c) for c in (64, 48, 10, 7, 1)] == [32, 24, 10, 7, 1]
    with pytest.raises(UsageError, match="48 channels, which 5 groups"):
        convert(nn.Sequential(nn.BatchNorm2d(48)), "group", num_groups=5)


def test_convert_refuses_what_it_cannot_do_in_one_line():
    with pytest.raises(UsageError, match="needs virtual_batch_size"):
        convert(nn.BatchNorm1d(3), "ghost")
    with pytest.raises(UsageError, match=r"unknown option rmax \(its options: virtual_batch_size\)"):
        convert(nn.BatchNorm1d(3), "ghost", virtual_batch_size=4, rmax=2)
    with pytest.raises(UsageError, match="keeps no running statistics"):
        convert(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), "frozen")
    with pytest.raises(UsageError, match=r"0: .*needs them"):
        convert(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), "renorm")
    with pytest.raises(UsageError, match="rmax must be at least 1"):
        convert(nn.BatchNorm1d(3), "renorm", rmax=0.5)
    with pytest.raises(UsageError, match=r"ghost batch norm.*no synchronized form"):
        convert(nn.Sequential(bnlab.GhostBatchNorm1d(3, virtual_batch_size=4)), "sync", process_group=object())


@pytest.mark.parametrize(
    "make",
    [
        lambda: bnlab.BatchRenorm1d(3, rmax=0.9),
        lambda: bnlab.BatchRenorm1d(3, rmax=float("inf")),
        lambda: bnlab.BatchRenorm1d(3, dmax=float("inf")),
        lambda: bnlab.FrozenBatchNorm2d(3, eps=float("inf")),
        lambda: bnlab.BatchRenorm1d(3, warmup_steps=2.5),
        lambda: bnlab.BatchRenorm1d(3, warmup="cosine"),
        lambda: bnlab.BatchRenorm1d(3, track_running_stats=False),
        lambda: bnlab.GhostBatchNorm1d(3, virtual_batch_size=1),
        lambda: bnlab.GhostBatchNorm1d(3, virtual_batch_size=4, process_group=object()),
        lambda: bnlab.FrozenBatchNorm2d(0),
    ],
    ids=[
        "rmax",
        "rmax-inf",
        "dmax-inf",
        "frozen-eps-inf",
        "warmup-steps",
        "warmup",
        "no-statistics",
        "virtual-1",
        "ghost-synced",
        "frozen-0",
    ],
)
def test_bad_options_are_refused_naming_them(make):
    with pytest.raises(ValueError):
        make()


def _family_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layers = {
        "renorm": (bnlab.BatchRenorm2d(4, warmup_steps=0, rmax=2.0, dmax=1.0), bnlab.BatchRenorm1d(6, warmup_steps=0)),
        "ghost": (bnlab.GhostBatchNorm2d(4, virtual_batch_size=4), bnlab.GhostBatchNorm1d(6, virtual_batch_size=4)),
        "frozen": (bnlab.FrozenBatchNorm2d(4), bnlab.FrozenBatchNorm1d(6)),
    }[kind]
    model = nn.Sequential(nn.Conv2d(1, 4, 3), layers[0], nn.ReLU(), nn.Flatten(), nn.Linear(144, 6), layers[1])
    if kind == "frozen":
        with torch.no_grad():
            for layer in layers:
                layer.running_var.uniform_(0.5, 2.0)
                layer.running_mean.normal_()
    else:
        _trained(model, (8, 1, 8, 8))
    return model


@pytest.fixture
def fresh_dynamo():
    """Compiled code forgotten after the test: the layers share the code objects of ``bnlab.BatchNorm*``, and
    each compile here is a recompile of them, which would leave later tests (tests/test_ops.py) past dynamo's
    limit of 8 recompiles."""
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", ["renorm", "ghost", "frozen"])
def test_the_family_exports_compiles_and_traces_like_batch_norm(use_kernels, kind, training, fresh_dynamo):
    x = randn(8, 1, 8, 8, seed=8).float()
    model = _family_model(kind).train(training)
    reference = copy.deepcopy(model)
    program = torch.export.export(copy.deepcopy(model), (x,))
    assert any("bnlab.batch_norm" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), reference(x))
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    again = copy.deepcopy(model)
    torch.testing.assert_close(compiled(x), again(x))
    for key, value in again.state_dict().items():  # the buffers moved as in eager mode
        torch.testing.assert_close(compiled_model.state_dict()[key], value, msg=key)
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(model), x, check_trace=False)  # it runs the model once: so does its twin
        twin = copy.deepcopy(model)
        twin(x)
        torch.testing.assert_close(traced(x), twin(x))


def test_recalibrate_gives_renorm_and_ghost_the_populations_exact_statistics():
    x = randn(96, 5, seed=11, scale=2.0, shift=3.0).float()
    for layer in (bnlab.BatchRenorm1d(5, warmup_steps=0), bnlab.GhostBatchNorm1d(5, virtual_batch_size=8)):
        model = nn.Sequential(layer).eval()
        done = bnlab.recalibrate(model, x, batch_size=32)
        assert done.layers == ["0"] and done.samples == 96
        torch.testing.assert_close(layer.running_mean, x.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, x.var(0, correction=1), rtol=1e-5, atol=1e-5)
        assert int(layer.num_batches_tracked) == 0  # recalibration trains nothing


def test_the_family_is_batch_norm_to_the_checker_and_frozen_is_not():
    assert bnlab.nn.is_batch_norm(bnlab.BatchRenorm2d(3)) and bnlab.nn.is_batch_norm(
        bnlab.GhostBatchNorm1d(3, virtual_batch_size=4)
    )
    assert not bnlab.nn.is_batch_norm(bnlab.FrozenBatchNorm2d(3))


def test_layers_refuse_the_wrong_rank_naming_themselves():
    with pytest.raises(ValueError, match="GhostBatchNorm2d expects 4D input"):
        bnlab.GhostBatchNorm2d(3, virtual_batch_size=2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="FrozenBatchNorm1d expects 2D or 3D input"):
        bnlab.FrozenBatchNorm1d(3)(torch.randn(4, 3, 2, 2))


def test_the_layers_move_and_cast_like_torch_nn():
    for layer in (
        bnlab.BatchRenorm1d(3, renorm_momentum=0.1),
        bnlab.GhostBatchNorm1d(3, virtual_batch_size=2),
        bnlab.FrozenBatchNorm1d(3),
    ):
        layer = layer.double()
        assert all(t.dtype == F64 for t in layer.state_dict().values() if t.is_floating_point())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = layer.train()(randn(6, 3))
        assert y.dtype == F64


TORCHRL_FILE = os.environ.get("BNLAB_TORCHRL_BATCHRENORM")


@pytest.mark.skipif(
    not TORCHRL_FILE,
    reason="torchrl is not among the test dependencies (it brings tensordict and a compiled extension built for "
    "its own PyTorch release); to compare with its code, unpack "
    "torchrl/modules/models/batchrenorm.py from its wheel (pip download torchrl --no-deps) and point "
    "BNLAB_TORCHRL_BATCHRENORM at it",
)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_renorm_matches_torchrls_own_code(dtype, tolerance):
    """torchrl's BatchRenorm1d file, loaded alone (it needs only torch), against ours: state_dicts load both
    ways, and outputs, gradients and running statistics agree over a warm-up and after it (to 2 x warm-up:
    past it torchrl's counter, whose clamp_max is not in place, doubles r - 1 and d)."""
    spec = importlib.util.spec_from_file_location("torchrl_batchrenorm", TORCHRL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    theirs = module.BatchRenorm1d(6, momentum=0.01, eps=1e-5, max_r=3.0, max_d=5.0, warmup_steps=20).to(dtype)
    ours = bnlab.BatchRenorm1d(6, momentum=0.01, eps=1e-5, rmax=3.0, dmax=5.0, warmup_steps=20, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    for step in range(39):
        x = torch.randn(8, 6, dtype=dtype) * (1 + step % 5) + step % 3
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = theirs(xa), ours(xb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        for a, b in ((ya, yb), (xa.grad, xb.grad), (theirs.running_var, ours.running_var),
                     (theirs.running_mean, ours.running_mean), (theirs.weight.grad, ours.weight.grad)):  # fmt: skip
            assert relative(b, a) < tolerance, step
    x = torch.randn(5, 6, dtype=dtype)
    assert relative(ours.eval()(x), theirs.eval()(x)) < tolerance
    theirs.load_state_dict(ours.state_dict())


def test_renorm_and_ghost_refuse_torchscript_clearly_and_frozen_scripts():
    for layer in (bnlab.BatchRenorm2d(3), bnlab.GhostBatchNorm2d(3, virtual_batch_size=2)):
        with pytest.raises(RuntimeError, match=r"is not scriptable.*convert\(copy, 'manual'\)"):
            torch.jit.script(nn.Sequential(nn.Conv2d(1, 3, 1), layer))
    frozen = _family_model("frozen")
    x = randn(2, 1, 8, 8).float()
    torch.testing.assert_close(torch.jit.script(frozen)(x), frozen(x))


def test_a_refused_conversion_leaves_the_model_as_it_was():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = bnlab.BatchNorm1d(3, fused_relu=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x)

    model = nn.Sequential(nn.BatchNorm1d(3), bnlab.BatchNorm1d(3), bnlab.GhostBatchNorm1d(3, virtual_batch_size=2))
    before = [type(m) for m in model]
    with pytest.raises(UsageError, match="ghost batch norm"):
        convert(model, "sync", process_group=object())
    assert [type(m) for m in model] == before and model[1].process_group is None
    custom = nn.Sequential(nn.BatchNorm1d(3), Custom())
    with pytest.raises(UsageError, match="fused_relu=True inside a Custom"):
        convert(custom, "frozen")
    assert type(custom[0]) is nn.BatchNorm1d and type(custom[1].norm) is bnlab.BatchNorm1d


def test_a_renorm_momentum_given_by_convert_starts_from_the_layers_statistics():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    _trained(model, (16, 4))
    convert(model, "renorm", renorm_momentum=0.01)
    layer = model[1]
    torch.testing.assert_close(layer.renorm_mean, layer.running_mean)
    torch.testing.assert_close(layer.renorm_std, (layer.running_var + layer.eps).sqrt())
    assert layer.renorm_mean.device.type == "cpu"
    model.train()(torch.randn(8, 4)).sum().backward()  # trains: no meta tensor left behind
    bnlab.BatchRenorm1d(3, renorm_momentum=0.01).load_state_dict(layer.state_dict())
    layer.reset_running_stats()
    assert bool((layer.renorm_mean == 0).all() and (layer.renorm_std == 1).all())


def test_convert_to_group_refuses_a_1d_layer_without_num_groups_and_bad_counts():
    with pytest.raises(UsageError, match=r"1d batch norm.*pass num_groups"):
        convert(nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16)), "group")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = convert(nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16)), "group", num_groups=1)
    assert model[1].num_groups == 1 and float(model(torch.randn(4, 5)).std(0).min()) > 0.01
    for bad in (0, -4, 2.0, True):
        with pytest.raises(UsageError, match="num_groups must be a whole number"):
            convert(nn.Sequential(nn.BatchNorm2d(16)), "group", num_groups=bad)


def test_options_for_layers_already_of_the_kind_are_reported_not_dropped_silently():
    model = nn.Sequential(bnlab.BatchRenorm1d(3), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match=r"0 is already of that kind: left as it is, without the options \['rmax'\]"):
        convert(model, "renorm", rmax=2.0)
    assert model[0].rmax == 3.0 and model[1].rmax == 2.0
