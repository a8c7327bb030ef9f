"""bnlab.recalibrate: exact population statistics with frozen weights, for any model's BN layers."""

from __future__ import annotations

import copy
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
    batches = [_inputs(32), torch.randn(32, 2, 8, 8)]  # the second batch has the wrong number of channels
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
    with pytest.raises(UsageError, match="at least 2"):
        bnlab.recalibrate(_net(), _inputs(), samples=1)


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
