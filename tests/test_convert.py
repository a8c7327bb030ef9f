"""bnlab.convert: PyTorch's batch norm <-> bnlab's in any model, outputs, state and training unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bnlab import nn as norm
from bnlab.data import Batches
from bnlab.errors import UsageError
from bnlab.models import build_model
from bnlab.nn.batchnorm import _BatchNorm
from bnlab.nn.convert import convert
from bnlab.training import loss_fn

TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def warm_up(model: nn.Module, *inputs: torch.Tensor) -> None:
    """A few training-mode passes, so that no statistic or counter is at its initial value."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(*inputs)


def assert_same_state(state_a: dict, state_b: dict) -> None:
    """Same keys in the same order, same values exactly."""
    assert list(state_a) == list(state_b)
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (*TORCH_BN, _BatchNorm))]


def quietly(model: nn.Module, to: str) -> nn.Module:
    """convert, ignoring the biased-variance warning (test_biased_running_variance_warns covers it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return convert(model, to)


@pytest.mark.parametrize("source, target", [("manual", "torch"), ("torch", "manual")])
@pytest.mark.parametrize("training", [True, False])
def test_seed_convnet_keeps_outputs_state_and_mode(source, target, training):
    # float64: float32 rounding, different in the two implementations, grows through 20 normalized layers
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = build_model(source, seed=0).double()
    warm_up(model, x)
    model.train(training)
    reference = copy.deepcopy(model)
    converted = quietly(model, target)
    assert converted is model  # in place, like nn.SyncBatchNorm.convert_sync_batchnorm
    assert_same_state(converted.state_dict(), reference.state_dict())
    layers = batch_norms(converted)
    assert len(layers) == 20
    assert all(isinstance(m, _BatchNorm) == (target == "manual") for m in layers)
    assert all(m.training == training for m in converted.modules())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x))


def test_fused_relu_becomes_a_relu_after_the_layer_with_the_same_state_dict_keys():
    model = quietly(build_model("manual", seed=0), "torch")
    assert [name for name, _ in model.blocks[0].named_children()] == ["conv", "norm", "norm_relu"]
    assert isinstance(model.blocks[0].norm_relu, nn.ReLU) and isinstance(model.hidden.norm_relu, nn.ReLU)
    model.load_state_dict(build_model("torch", seed=1).state_dict())  # strict: the keys are PyTorch mode's
    back = convert(model, "manual")
    assert not any(m.fused_relu for m in batch_norms(back))  # never fused on the way back: the ReLUs stay
    assert isinstance(back.blocks[0].norm_relu, nn.ReLU)


@pytest.mark.parametrize("source, target", [("manual", "torch"), ("torch", "manual")])
def test_training_continues_identically(source, target, small_mnist):
    model = build_model(source, seed=0).double()  # float32 rounding would grow through the deep net's gradients
    reference = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, reference)]  # built before converting
    for layer in batch_norms(reference):
        # From now on PyTorch's layers add the unbiased batch variance (what the warning says); bnlab's
        # keep the source's convention, which for PyTorch's layers is the unbiased one already.
        layer.unbiased_running_var = True
    model = quietly(model, target)
    batches = Batches(small_mnist.train, 32, seed=0)
    for _ in range(3):
        images, labels = next(batches)
        images = images.double()
        for m, optimizer in zip((model, reference), optimizers, strict=True):
            optimizer.zero_grad()
            loss_fn("sigmoid", m(images), labels).backward()
            optimizer.step()
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    for key in state:
        torch.testing.assert_close(state[key], expected[key], msg=lambda m, key=key: f"{key}: {m}")
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images))


class Foreign(nn.Module):
    """Standard torch.nn parts: Sequentials in a ModuleDict in a custom Module, every BN rank and option."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleDict(
            {
                "volume": nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4, momentum=None)),
                "image": nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, affine=False)),
                "sequence": nn.Sequential(nn.Conv1d(1, 5, 3, padding=1), nn.BatchNorm1d(5, eps=1e-3, momentum=0.3)),
            }
        )
        self.head = nn.Sequential(nn.Linear(15, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        self.untracked = nn.BatchNorm1d(3, track_running_stats=False)

    def forward(self, volume: torch.Tensor, image: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        features = [
            self.branches["volume"](volume).relu().mean((2, 3, 4)),
            self.branches["image"](image).relu().mean((2, 3)),
            self.branches["sequence"](sequence).mean(2),
        ]
        return self.untracked(self.head(torch.cat(features, 1)))


def foreign_inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 1, 4, 5, 6), (8, 1, 7, 7), (8, 1, 9)]
    return tuple(torch.randn(shape, generator=generator, dtype=dtype) * 3 + 1 for shape in shapes)


@pytest.mark.parametrize("training", [True, False])
def test_nested_model_of_standard_parts_converts_both_ways(training):
    inputs = foreign_inputs()
    model = Foreign()
    warm_up(model, *inputs)
    model.train(training)
    original, reference = repr(model), copy.deepcopy(model)

    manual = convert(model, "manual")
    layers = batch_norms(manual)
    assert [type(m) for m in layers] == [norm.BatchNorm3d, norm.BatchNorm2d, *[norm.BatchNorm1d] * 3]
    volume, image, sequence, _, untracked = layers
    assert volume.momentum is None and not image.affine and image.weight is None
    assert (sequence.eps, sequence.momentum) == (1e-3, 0.3) and not untracked.track_running_stats
    assert all(m.unbiased_running_var and not m.fused_relu for m in layers)
    assert_same_state(manual.state_dict(), reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(manual(*inputs), reference(*inputs))
    for key, value in manual.state_dict().items():  # a training-mode pass updates both alike (to rounding)
        torch.testing.assert_close(value, reference.state_dict()[key], msg=lambda m, key=key: f"{key}: {m}")

    state = copy.deepcopy(manual.state_dict())
    back = convert(manual, "torch")
    assert repr(back) == original
    assert_same_state(back.state_dict(), state)
    with torch.no_grad():
        torch.testing.assert_close(back(*inputs), reference(*inputs))


def test_the_same_tensors_carry_over_so_device_dtype_and_requires_grad_stay():
    model = Foreign().double()
    warm_up(model, *foreign_inputs(torch.float64))
    bn = model.head[1]
    bn.bias.requires_grad_(False)
    tensors = {name: getattr(bn, name) for name in ("weight", "bias", "running_mean", "running_var")}
    converted = convert(model, "manual").head[1]
    for name, tensor in tensors.items():
        assert getattr(converted, name) is tensor
    assert converted.weight.dtype == torch.float64 and converted.weight.device == tensors["weight"].device
    assert converted.weight.requires_grad and not converted.bias.requires_grad


def test_idempotent_and_shared_layers_stay_shared():
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    once = convert(model, "manual")
    assert isinstance(once[0], norm.BatchNorm1d) and once[0] is once[2]
    layer = once[0]
    twice = convert(once, "manual")
    assert twice is once and twice[0] is layer and twice[2] is layer
    assert convert(nn.Linear(3, 2), "torch").__class__ is nn.Linear  # nothing to convert


def test_a_lone_layer_is_returned_converted():
    layer = nn.BatchNorm2d(3)
    converted = convert(layer, "manual")
    assert isinstance(converted, norm.BatchNorm2d) and converted.weight is layer.weight


def test_bnlab_options_pytorch_has_too():
    group = object()  # stands for a torch.distributed process group; never used without a forward pass
    model = nn.Sequential(norm.BatchNorm2d(4, bias=False), norm.BatchNorm1d(4, process_group=group))
    converted = convert(model, "torch")
    assert type(converted[0]) is nn.BatchNorm2d and converted[0].bias is None and converted[0].weight is not None
    assert type(converted[1]) is nn.SyncBatchNorm and converted[1].process_group is group


def test_biased_running_variance_warns():
    with pytest.warns(UserWarning, match=r"blocks\.0\.norm and 19 more layers kept a biased running variance"):
        convert(build_model("manual", seed=0), "torch")


class CallsItsChildren(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = norm.BatchNorm1d(4, fused_relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


@pytest.mark.parametrize(
    "model, to, fragment",
    [
        (nn.BatchNorm2d(3), "tensorflow", "to must be one of manual, torch, renorm, ghost, frozen, sync, group; got"),
        (nn.Sequential(nn.SyncBatchNorm(3)), "manual", "0 is an nn.SyncBatchNorm, which takes input of any rank"),
        (nn.Sequential(nn.LazyBatchNorm2d()), "manual", "run one forward pass first"),
        (nn.Sequential(nn.Sequential(CallsItsChildren())), "torch", "0.0.norm is a bnlab BatchNorm with fused_relu"),
        (norm.BatchNorm1d(4, fused_relu=True), "torch", "wrap it in nn.Sequential"),
    ],
)
def test_what_cannot_be_converted_is_refused_by_name(model, to, fragment):
    with pytest.raises(UsageError, match="convert: ") as error:
        convert(model, to)
    assert fragment in str(error.value)
