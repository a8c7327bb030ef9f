"""bnlab.recalibrate: exact population statistics with frozen weights, for any model's BN layers."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnlab
from bnlab.errors import UsageError


def _net(bn_layer: type[nn.Module] = bnlab.BatchNorm2d, **options) -> nn.Sequential:
    torch.manual_seed(0)
    dense = bnlab.BatchNorm1d(6, **options) if bn_layer is bnlab.BatchNorm2d else nn.BatchNorm1d(6)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), bn_layer(4, **options), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(4 * 6 * 6, 6), dense, nn.ReLU(), nn.Linear(6, 3),
    )  # fmt: skip


def _inputs(n: int = 96) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 2


def _layer_inputs(model: nn.Sequential, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What BN layers 1 and 6 see when every BN normalizes each batch with its own statistics (dropout off)."""
    first, second = [], []
    for chunk in x.split(batch_size):
        h = model[0](chunk)
        first.append(h)
        h = nn.functional.batch_norm(h, None, None, model[1].weight, model[1].bias, training=True, eps=model[1].eps)
        second.append(model[5](model[3](torch.relu(h))))
    return torch.cat(first), torch.cat(second)


@pytest.mark.parametrize("bn_layer", [bnlab.BatchNorm2d, nn.BatchNorm2d], ids=["bnlab", "torch"])
def test_the_statistics_are_those_of_every_value_each_layer_normalized(bn_layer):
    model = _net(bn_layer).eval()
    x = _inputs()
    with torch.no_grad():
        first, second = _layer_inputs(model, x, 32)
    done = bnlab.recalibrate(model, x, batch_size=32)
    assert done.layers == ["1", "6"] and (done.samples, done.batches) == (96, 3)
    for layer, values, dims in ((model[1], first, (0, 2, 3)), (model[6], second, (0,))):
        torch.testing.assert_close(layer.running_mean, values.mean(dims), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, values.var(dims, correction=1), rtol=1e-4, atol=1e-5)


def test_a_biased_running_variance_stays_biased():
    model = _net(bnlab.BatchNorm2d, unbiased_running_var=False).eval()
    x = _inputs()
    with torch.no_grad():
        first, _ = _layer_inputs(model, x, 32)
    bnlab.recalibrate(model, x, batch_size=32)
    torch.testing.assert_close(model[1].running_var, first.var((0, 2, 3), correction=0), rtol=1e-4, atol=1e-5)


def test_weights_modes_momenta_and_counters_are_left_alone_and_dropout_stays_off():
    model = _net().train()
    model[4].p = 1.0  # dropout that zeroes everything: were it on, the dense BN would see only zeros
    weights = {k: v.clone() for k, v in model.named_parameters()}
    counters = model[1].num_batches_tracked.clone()
    bnlab.recalibrate(model, _inputs(), batch_size=32)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert torch.equal(model[1].num_batches_tracked, counters) and model[1].momentum == 0.1
    assert model[6].running_var.min() > 1e-3  # the dense BN saw real inputs: dropout was off


def test_a_failing_pass_leaves_every_statistic_as_it_was():
    model = _net().eval()
    before = copy.deepcopy(model.state_dict())
    batches = [_inputs(32), _inputs(32), torch.randn(32, 2, 8, 8)]  # the last batch has the wrong channels
    with pytest.raises(RuntimeError):
        bnlab.recalibrate(model, batches)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and "forward" not in model[1].__dict__


def test_inputs_as_pairs_splits_and_loaders_agree():
    x = _inputs()
    labels = torch.zeros(len(x), dtype=torch.long)
    results = []
    for data in (
        x,
        (x, labels),
        bnlab.Split(x, labels),
        torch.utils.data.DataLoader(list(zip(x, labels, strict=True)), 32),
    ):
        model = _net().eval()
        bnlab.recalibrate(model, data, batch_size=32)
        results.append(model[1].running_var.clone())
    assert all(torch.allclose(r, results[0]) for r in results)


def test_a_layer_called_twice_gets_the_statistics_of_both_calls():
    layer = bnlab.BatchNorm1d(3)
    model = nn.Sequential(layer, nn.Linear(3, 3), layer)
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3) * 5)
        model[1].bias.fill_(7.0)
    x = torch.randn(64, 3)
    bnlab.recalibrate(model, x, batch_size=64)
    both = torch.cat([x, nn.functional.batch_norm(x, None, None, training=True) * 5 + 7])
    torch.testing.assert_close(layer.running_mean, both.mean(0), rtol=1e-5, atol=1e-5)


def test_recurrent_statistics_per_step_and_beyond_the_table():
    lstm = bnlab.BNLSTM(2, 4, max_steps=3).eval()
    x = torch.randn(5, 16, 2) * torch.arange(1, 6).view(5, 1, 1)  # time-major, every step a different spread
    done = bnlab.recalibrate(lstm, [x], batch_size=16)
    assert done.layers == ["layers.0.bn_ih", "layers.0.bn_hh", "layers.0.bn_c"]
    projected = x @ lstm.layers[0].weight_ih.T  # the input term of steps 0..4; steps 2, 3 and 4 share row 2
    torch.testing.assert_close(lstm.layers[0].bn_ih.running_mean[0], projected[0].mean(0))
    torch.testing.assert_close(lstm.layers[0].bn_ih.running_mean[2], projected[2:].reshape(-1, 16).mean(0))


def test_models_without_data_or_with_bad_sizes_are_refused():
    with pytest.raises(UsageError, match="no batch"):
        bnlab.recalibrate(_net(), [])
    for bad in (1, 2.5, math.nan, math.inf, True, "64"):
        with pytest.raises(UsageError, match="samples must be a whole number of at least 2"):
            bnlab.recalibrate(_net(), _inputs(), samples=bad)
    with pytest.raises(UsageError, match="batch_size must be a whole number of at least 2"):
        bnlab.recalibrate(_net(), _inputs(), batch_size=1)


# --- The data forms (bnlab.nn.data_forms): every form, each kind of model, against a full-batch computation ---


def _one_hot(n: int) -> torch.Tensor:
    return nn.functional.one_hot(torch.arange(n) % 10, 10).float()


class _Masked(nn.Module):
    """A model that takes (inputs, mask): padded positions are zeroed before its BN (the mask marks the valid ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), bnlab.BatchNorm2d(4)
        self.masks_seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.masks_seen.append(mask)
        return self.bn(self.conv(x * mask.view(-1, 1, 1, 1)))


FORMS = {
    "tensor": lambda x: x,
    "tuple with class labels": lambda x: (x, torch.arange(len(x)) % 10),
    "tuple with one-hot labels": lambda x: (x, _one_hot(len(x))),
    "split": lambda x: bnlab.Split(x, torch.arange(len(x)) % 10),
    "list of tensors": lambda x: list(x.split(32)),
    "list of tuples": lambda x: list(zip(x.split(32), _one_hot(len(x)).split(32), strict=True)),
    "dataloader (lists)": lambda x: torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, _one_hot(len(x))), 32
    ),
    "generator": lambda x: (chunk for chunk in x.split(32)),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bn_layer", [bnlab.BatchNorm2d, nn.BatchNorm2d], ids=["bnlab", "torch"])
def test_every_form_gives_the_full_batch_statistics(form, bn_layer):
    x = _inputs()
    model = _net(bn_layer).eval()
    with torch.no_grad():
        first, second = _layer_inputs(model, x, 32)
    done = bnlab.recalibrate(model, FORMS[form](x), batch_size=32)
    assert (done.samples, done.batches, done.batch_dim) == (96, 3, 0), done
    for layer, values, dims in ((model[1], first, (0, 2, 3)), (model[6], second, (0,))):
        torch.testing.assert_close(layer.running_mean, values.mean(dims), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, values.var(dims, correction=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["tensor", "tuple with one-hot labels", "list of tuples", "dataloader (lists)"])
def test_the_budget_counts_samples_whatever_the_form(form):
    """One-hot labels once made a pair look like two batches: all of x was one batch, then labels went in."""
    model = _net().eval()
    done = bnlab.recalibrate(model, FORMS[form](_inputs()), samples=40, batch_size=32)
    expected = (32, 1) if form in ("tensor", "tuple with one-hot labels") else (40, 2)  # whole batches from a tensor
    assert (done.samples, done.batches) == expected


def test_an_mlp_pair_with_one_hot_labels_is_a_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), bnlab.BatchNorm1d(6)).eval()
    x = torch.randn(64, 10) * 2 + 1  # as wide as the one-hot labels: a list of the two would not be told apart
    done = bnlab.recalibrate(model, (x, _one_hot(64)), batch_size=32)
    assert (done.samples, done.batches, done.form) == (64, 2, "a tuple (inputs, labels)")
    with torch.no_grad():
        torch.testing.assert_close(model[1].running_mean, model[0](x).mean(0), rtol=1e-5, atol=1e-5)


def test_inputs_mask_and_labels_call_the_model_with_its_mask():
    model = _Masked().eval()
    x, mask = _inputs(64), torch.arange(64) % 4 != 0
    done = bnlab.recalibrate(model, (x, mask, _one_hot(64)), batch_size=32)
    assert done.form == "a tuple (inputs, mask, labels)" and [len(m) for m in model.masks_seen] == [32, 32]
    with torch.no_grad():
        values = model.conv(x * mask.view(-1, 1, 1, 1))
    torch.testing.assert_close(model.bn.running_mean, values.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("form", ["tensor", "tuple with one-hot labels", "list of tensors"])
def test_recurrent_layers_split_and_count_along_their_batch_dimension(batch_first, form):
    """Time-major (T, N, F) data was once cut along time: later steps got no statistics, samples counted steps."""
    lstm = bnlab.BNLSTM(2, 4, max_steps=6, batch_first=batch_first).eval()
    sequences = torch.randn(96, 6, 2, generator=torch.Generator().manual_seed(2)) * torch.arange(1, 7).view(1, 6, 1)
    data = sequences if batch_first else sequences.transpose(0, 1).contiguous()
    if form == "tuple with one-hot labels":
        data = (data, _one_hot(96))
    elif form == "list of tensors":
        data = list(data.split(32, dim=0 if batch_first else 1))
    done = bnlab.recalibrate(lstm, data, batch_size=32)
    assert (done.samples, done.batches, done.batch_dim) == (96, 3, 0 if batch_first else 1)
    projected = sequences @ lstm.layers[0].weight_ih.T  # the input term, (N, T, 4H): its statistics ignore batching
    torch.testing.assert_close(lstm.layers[0].bn_ih.running_mean, projected.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lstm.layers[0].bn_ih.running_var, projected.var(0), rtol=1e-4, atol=1e-5)


class _TimeMajorWrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = bnlab.BNLSTM(2, 4, max_steps=6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def test_a_model_holding_a_time_major_layer_needs_its_batch_dim():
    model = _TimeMajorWrapper().eval()
    data = torch.randn(6, 64, 2)
    with pytest.raises(UsageError, match=r"time-major recurrent layer 'rnn'.*batch_dim"):
        bnlab.recalibrate(model, data)
    assert bnlab.recalibrate(model, data, batch_size=32, batch_dim=1).samples == 64
    model.batch_dim = 1  # or the model says so itself
    assert bnlab.recalibrate(model, data, batch_size=32).batches == 2


def test_the_sequence_classifier_takes_images_along_dim_0(small_mnist):
    from bnlab.config import TrainConfig
    from bnlab.models import build_network

    model = build_network(TrainConfig(model="lstm", bn="manual", task="row", batch_size=32)).eval()
    done = bnlab.recalibrate(model, small_mnist.train.images[:64], batch_size=32)
    assert (done.samples, done.batch_dim) == (64, 0)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ((torch.randn(64, 1, 8, 8), torch.zeros(32)), "sizes along the batch dimension"),
        ((torch.randn(64, 1, 8, 8), torch.ones(64, dtype=torch.bool).float(), torch.zeros(64)), "must be a bool"),
        ([torch.randn(64, 1, 8, 8), torch.zeros(64, 10)], "differ as inputs and labels do"),
        ([torch.randn(64, 1, 8, 8), torch.zeros(64, 1, 1, 10)], "differ as inputs and labels do"),
        ((torch.randn(64, 1, 8, 8), "labels"), "a tuple of"),
        ([{"x": torch.randn(8, 1, 8, 8)}], "batch 0 is a dict"),
        ({"x": torch.randn(8, 1, 8, 8)}, "cannot read data of type dict"),
        (42, "cannot read data of type int"),
    ],
    ids=[
        "sizes-disagree",
        "mask-not-bool",
        "list-of-inputs-and-labels",
        "list-of-equal-ranks",
        "not-tensors",
        "dict-batch",
        "dict",
        "int",
    ],
)
def test_data_that_fits_no_form_is_refused_naming_the_forms(data, fragment):
    model = _net().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match=fragment):
        bnlab.recalibrate(model, data, batch_size=32)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _shard_worker(rank: int, store: str, out: str, shards: list[int]) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(shards))
    try:
        x = _inputs(sum(shards))
        start = sum(shards[:rank])
        model = _net().eval()
        bnlab.recalibrate(model, x[start : start + shards[rank]], batch_size=16, process_group=dist.group.WORLD)
        torch.save(model.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_across_processes_the_statistics_are_those_of_every_shard(tmp_path):
    shards = [64, 0]  # uneven, one empty: the empty process still joins the collective
    mp.spawn(_shard_worker, args=(str(tmp_path / "store"), str(tmp_path / "out"), shards), nprocs=2, join=True)
    single = _net().eval()
    bnlab.recalibrate(single, _inputs(64), batch_size=16)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_batches_of_one_are_passed_over_and_no_budget_means_all_the_data():
    model = _net().eval()
    done = bnlab.recalibrate(model, [_inputs(10), _inputs(1), _inputs(39)], batch_size=32)
    assert (done.samples, done.batches) == (49, 2)  # the one-sample batch could give no statistics
    assert bnlab.recalibrate(model, _inputs(100), samples=None, batch_size=64).samples == 100
    assert bnlab.recalibrate(model, _inputs(100), batch_size=64).samples == 64  # a budget: whole batches


def test_per_step_labels_of_time_major_sequences_are_labels():
    lstm = bnlab.BNLSTM(2, 4, max_steps=6).eval()
    sequences, per_step = torch.randn(6, 32, 2), torch.zeros(6, 32, dtype=torch.long)  # (T, N)
    done = bnlab.recalibrate(lstm, (sequences, per_step), batch_size=16)
    assert (done.samples, done.batch_dim, done.form) == (32, 1, "a tuple (inputs, labels)")


def test_models_without_running_statistics_and_absent_batch_dims_are_refused():
    with pytest.raises(UsageError, match="no batch-norm layer with running statistics"):
        bnlab.recalibrate(nn.Sequential(nn.Linear(4, 4)), torch.randn(8, 4))
    for data in (torch.randn(8, 4), [torch.randn(8, 4)], bnlab.Split(torch.randn(8, 4), torch.zeros(8))):
        with pytest.raises(UsageError, match="have no batch dimension 5"):
            bnlab.recalibrate(nn.Sequential(bnlab.BatchNorm1d(4)), data, batch_dim=5)
