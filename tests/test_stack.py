"""Runs trained as one stack (bnlab.training.stack) are the runs trained one by one, member by member.

Float64 throughout, so that agreement is a property of the code and not of float32 rounding luck: loss,
parameters, running statistics and evaluations agree to 1e-10 (relative, and absolute for values near zero:
Adam divides a near-zero gradient by its own size, so a weight whose gradient is rounding noise moves by
noise-sized steps that differ between any two summation orders). In float32 the two paths
round differently (a batched matmul, a grouped convolution, the channels-merged batch norm) and a
member's numbers agree to about 1e-6 over a few steps, then drift as any two float32 runs do.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call, stack_module_state

from bnlab import kernels
from bnlab.config import TrainConfig
from bnlab.data import MNIST, Split
from bnlab.lab.benefits.networks import LAB
from bnlab.models import build_network
from bnlab.training import Hook, LoopState, fit, make_optimizer, runner, store, train
from bnlab.training.loop import fit_stack
from bnlab.training.runner import train_stack
from bnlab.training.stack import NetworkStack, StackOptimizer, stack_pays, stackable, structure

TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}  # weights, statistics and losses are of order 0.01 to 10

MLP = LAB.replace(
    model="mlp", hidden=(24, 16), init="glorot_uniform", batch_size=16, loss="softmax", batches=12, eval_every=4,
    eval_size=64, train_eval_size=32,
)  # fmt: skip
CONVNET = LAB.replace(model="convnet", depth=4, hidden=(16,), init="glorot_uniform", batch_size=16, batches=6,
                      eval_every=3, eval_size=64)  # fmt: skip


@pytest.fixture(scope="module")
def data64(small_mnist) -> MNIST:
    """The slice of MNIST in float64, for networks built in float64."""
    splits = (small_mnist.train, small_mnist.validation, small_mnist.test)
    return MNIST(*(Split(s.images[:512].double(), s.labels[:512]) for s in splits))


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def members(base: TrainConfig, bn: str, optimizer: str) -> list[TrainConfig]:
    """Three runs of one structure that differ in seed (weights and data order), learning rate and initialisation."""
    lrs = (0.02, 0.05, 0.1) if optimizer == "sgd" else (1e-3, 3e-3, 1e-2)
    inits = ("glorot_uniform", "he_normal", 0.1) if base.model == "mlp" else ("glorot_uniform",) * 3
    momentum = 0.9 if optimizer == "sgd" else 0.0
    return [
        base.replace(bn=bn, seed=seed, lr=lr, init=init, optimizer=optimizer, momentum=momentum)
        for seed, lr, init in zip((0, 1, 2), lrs, inits, strict=True)
    ]


def assert_same_run(stacked, alone) -> None:
    assert stacked.status == alone.status and stacked.batches_done == alone.batches_done
    assert [(h["batch"], h["split"]) for h in stacked.history] == [(h["batch"], h["split"]) for h in alone.history]
    for key in ("loss", "accuracy", "dead_relu"):
        got = torch.tensor([h[key] for h in stacked.history if key in h])
        torch.testing.assert_close(got, torch.tensor([h[key] for h in alone.history if key in h]), **TOLERANCE)
    expected = alone.model.state_dict()
    for name, value in stacked.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], **TOLERANCE, msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.parametrize("kernels_on", [True, False], ids=["kernels", "tensor-ops"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("bn", ["none", "torch", "manual"])
@pytest.mark.parametrize("base", [MLP, CONVNET], ids=["mlp", "convnet"])
def test_a_stack_trains_each_member_as_its_run_alone(data64, float64, base, bn, optimizer, kernels_on):
    configs = members(base, bn, optimizer)
    with kernels.use_kernels(kernels_on):
        stacked = train_stack(configs, data64, device="cpu", log=lambda _: None)
        for config, result in zip(configs, stacked, strict=True):
            alone = train(config, data64, device="cpu", log=lambda _: None, progress=False)
            assert_same_run(result, alone)


class Losses(Hook):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def after_step(self, state: LoopState) -> None:
        self.losses.append(state.loss)


def test_every_steps_loss_is_the_members_own(data64, float64):
    configs = members(MLP, "manual", "adam")
    models = [build_network(c) for c in configs]
    streams = [runner.Batches(data64.train, c.batch_size, seed=c.seed) for c in configs]
    stack = NetworkStack(models)
    optimizer = StackOptimizer(stack, "adam", [c.lr for c in configs])
    states = [LoopState(member, None) for member in stack.members]
    recorded = [Losses() for _ in configs]
    fit_stack(stack, optimizer, states, streams, steps=10, loss="softmax", hooks=[[r] for r in recorded])
    for config, record in zip(configs, recorded, strict=True):
        model = build_network(config)
        alone = LoopState(model, make_optimizer("adam", model.parameters(), config.lr, fast=False))
        expected = Losses()
        fit(alone, runner.Batches(data64.train, 16, seed=config.seed), steps=10, loss="softmax", hooks=[expected])
        torch.testing.assert_close(torch.tensor(record.losses), torch.tensor(expected.losses), **TOLERANCE)


def test_a_diverging_member_stops_alone_and_changes_no_other(data64, float64):
    configs = members(MLP.replace(hidden=(24,) * 6), "none", "sgd")
    configs[1] = configs[1].replace(lr=1e6, init=1e3)  # overflows float64 within a few steps
    stacked = train_stack(configs, data64, device="cpu", log=lambda _: None)
    assert [r.status for r in stacked] == ["completed", "diverged", "completed"]
    assert stacked[1].batches_done < MLP.batches and "loss became" in stacked[1].message
    for index in (0, 2):
        assert_same_run(stacked[index], train(configs[index], data64, device="cpu", log=lambda _: None))


def test_an_interrupted_stack_resumes_from_its_members_checkpoints(data64, float64, tmp_path, monkeypatch):
    configs = [c.replace(checkpoint_every=4) for c in members(MLP, "manual", "sgd")]
    whole = train_stack(configs, data64, device="cpu", log=lambda _: None)
    dirs = [tmp_path / f"member{m}" for m in range(len(configs))]

    class Interrupting(runner.Batches):  # the 11th batch of the first member: after the checkpoints of step 8
        drawn = 0

        def next_indices(self):
            if Interrupting.drawn == 3 * 10:
                raise KeyboardInterrupt
            Interrupting.drawn += 1
            return super().next_indices()

    monkeypatch.setattr(runner, "Batches", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        train_stack(configs, data64, run_dirs=dirs, device="cpu", log=lambda _: None)
    monkeypatch.undo()
    for path in dirs:
        assert store.read_summary(path)["status"] == "interrupted"
        assert store.load_checkpoint(path)["step"] == 8
    resumed = train_stack(configs, data64, run_dirs=dirs, resume=True, device="cpu", log=lambda _: None)
    for again, first in zip(resumed, whole, strict=True):
        assert_same_run(again, first)
    for path in dirs:
        assert json.loads((path / "config.json").read_text())["stack"] == 3
        assert store.read_summary(path)["status"] == "completed"


def test_only_runs_of_one_structure_stack():
    assert stackable(MLP) and stackable(CONVNET)
    assert stack_pays(MLP) and not stack_pays(CONVNET)  # a ConvNet stack is slower than its runs alone
    assert not stack_pays(MLP.replace(dropout=0.5))
    assert not stackable(MLP.replace(dropout=0.5)) and not stackable(MLP.replace(optimizer="rmsprop"))
    assert not stackable(MLP.replace(seconds=1.0)) and not stackable(TrainConfig(model="lstm", bn="manual"))
    assert structure(MLP.replace(seed=3, lr=0.5, init=0.1)) == structure(MLP)
    assert structure(MLP.replace(batch_size=32)) != structure(MLP) and structure(MLP.replace(bn="torch")) != (
        structure(MLP)
    )
    with pytest.raises(Exception, match="one structure"):
        train_stack([MLP, MLP.replace(hidden=(8,))], device="cpu")


def test_the_stacked_operators_vmap_forward_and_backward(float64):
    """bnlab's operators under torch.vmap (nn/batching.py): each member's batch norm, as the operator alone."""
    torch.manual_seed(0)
    x, dy = torch.randn(3, 8, 5, 4, 4), torch.randn(3, 8, 5, 4, 4)
    weight, bias = torch.rand(3, 5) + 0.5, torch.randn(3, 5)
    mean, var = torch.zeros(3, 5), torch.ones(3, 5)
    y, stats = torch.vmap(
        lambda *a: torch.ops.bnlab.batch_norm_train(*a, 0.1, 1e-5, True, True), in_dims=(0, 0, 0, 0, 0)
    )(x, weight, bias, mean, var)
    grads = torch.vmap(torch.ops.bnlab.batch_norm_backward)(x, weight, stats, dy, y)
    evaluated = torch.vmap(lambda *a: torch.ops.bnlab.batch_norm_eval(*a, 1e-5, False))(x, weight, bias, mean, var)
    for m in range(3):
        one_mean, one_var = torch.zeros(5), torch.ones(5)
        y1, s1 = torch.ops.bnlab.batch_norm_train(x[m], weight[m], bias[m], one_mean, one_var, 0.1, 1e-5, True, True)
        torch.testing.assert_close(y[m], y1, **TOLERANCE)
        torch.testing.assert_close(stats[m], s1, **TOLERANCE)
        torch.testing.assert_close(mean[m], one_mean, **TOLERANCE)  # the stacked running statistics, updated
        torch.testing.assert_close(var[m], one_var, **TOLERANCE)
        for got, expected in zip(
            grads, torch.ops.bnlab.batch_norm_backward(x[m], weight[m], s1, dy[m], y1), strict=True
        ):
            torch.testing.assert_close(got[m], expected, **TOLERANCE)
        e1 = torch.ops.bnlab.batch_norm_eval(x[m], weight[m], bias[m], one_mean, one_var, 1e-5, False)
        torch.testing.assert_close(evaluated[m], e1, **TOLERANCE)


def test_unstacked_running_statistics_are_refused_under_vmap(float64):
    model = build_network(MLP.replace(bn="manual"))
    params, _ = stack_module_state([model, build_network(MLP.replace(bn="manual", seed=1))])
    buffers = dict(model.named_buffers())  # one set of buffers for two members
    with pytest.raises(RuntimeError, match="running statistics are not vmapped"):
        torch.vmap(lambda p, x: functional_call(model, (p, buffers), (x,)))(params, torch.rand(2, 8, 784))


def test_a_members_checkpoint_holds_its_own_tensors_only(data64, float64, tmp_path):
    """A member's weights are views of the whole stack; its checkpoint must not carry the other members'."""
    configs = [c.replace(checkpoint_every=0) for c in members(MLP, "manual", "adam")]
    dirs = [tmp_path / f"member{m}" for m in range(len(configs))]
    train_stack(configs, data64, run_dirs=dirs, device="cpu", log=lambda _: None)
    alone = tmp_path / "alone"
    train(configs[0], data64, run_dir=alone, device="cpu", log=lambda _: None, progress=False)
    sizes = {(path / store.CHECKPOINT).stat().st_size for path in (*dirs, alone)}
    assert max(sizes) - min(sizes) < 2048, sizes  # the same tensors, whatever trained them


class StopAt(Hook):
    def __init__(self, step: int) -> None:
        self.at = step

    def after_step(self, state: LoopState) -> None:
        if state.step == self.at:
            state.stop, state.message = "enough", f"stopped at {state.step}"


def test_a_member_stopped_by_a_hook_is_left_as_it_stopped(data64, float64):
    """The others' later steps went on updating its statistics and Adam moments in the shared stack."""
    configs = members(MLP, "manual", "adam")
    stack = NetworkStack([build_network(c) for c in configs])
    optimizer = StackOptimizer(stack, "adam", [c.lr for c in configs])
    states = [LoopState(member, None) for member in stack.members]
    streams = [runner.Batches(data64.train, 16, seed=c.seed) for c in configs]
    fit_stack(stack, optimizer, states, streams, steps=10, loss="softmax", hooks=[[], [StopAt(3)], []])
    assert [s.step for s in states] == [10, 3, 10] and states[1].stop == "enough"
    model = build_network(configs[1])
    alone = LoopState(model, make_optimizer("adam", model.parameters(), configs[1].lr, fast=False))
    fit(alone, runner.Batches(data64.train, 16, seed=configs[1].seed), steps=3, loss="softmax")
    expected = model.state_dict()
    for name, value in stack.members[1].state_dict().items():
        torch.testing.assert_close(value, expected[name], **TOLERANCE, msg=lambda text, name=name: f"{name}: {text}")
    saved = optimizer.member_state_dict(1)
    assert {float(entry["step"]) for entry in saved["state"].values()} == {3.0}
    torch.testing.assert_close(saved["state"][0]["exp_avg"], alone.optimizer.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_resting_member_keeps_its_weights_and_optimizer_state(float64, optimizer):
    """step(active) with a member not active: its slices are as they were, the others' as if it were not there."""
    configs = [MLP.replace(seed=s, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0) for s in range(3)]

    def stepped(active: list[bool]) -> tuple[NetworkStack, StackOptimizer]:
        torch.manual_seed(0)
        stack = NetworkStack([build_network(c) for c in configs])
        optimizer_ = StackOptimizer(stack, optimizer, [0.1, 0.2, 0.3], configs[0].momentum)
        for _ in range(2):
            optimizer_.zero_grad()
            stack(torch.randn(3, 8, 1, 28, 28, dtype=torch.float64)).square().sum().backward()
            optimizer_.step(torch.tensor(active))
        return stack, optimizer_

    everyone, _ = stepped([True, True, True])
    resting, resting_optimizer = stepped([True, False, True])
    untouched, untouched_optimizer = stepped([False, False, False])
    for name, p in resting.params.items():
        torch.testing.assert_close(p[1], untouched.params[name][1], rtol=0, atol=0)
        torch.testing.assert_close(p[[0, 2]], everyone.params[name][[0, 2]], rtol=0, atol=0)
        for k, v in resting_optimizer.state.get(name, {}).items():
            torch.testing.assert_close(v[1], untouched_optimizer.state[name][k][1], rtol=0, atol=0)
    assert resting_optimizer.member_steps == [2, 0, 2]
