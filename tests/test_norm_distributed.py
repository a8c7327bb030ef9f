"""Cross-process statistics: two processes with half a batch each match one process with all of it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnlab import nn as norm

SHAPE = (8, 3, 4, 4)  # the global batch; each of the two ranks gets 4 samples


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 2 + 1e3  # a large mean: combination must be exact
    x[4:] += 5.0  # the ranks' halves have different means
    dy = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return x, dy


def _run(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x, dy = _batch()
        part = slice(rank * 4, rank * 4 + 4)
        layer = norm.BatchNorm2d(3, process_group=dist.group.WORLD).double()
        xi = x[part].clone().requires_grad_()
        y = layer(xi)
        y.backward(dy[part])
        weight_grad = layer.weight.grad.clone()
        dist.all_reduce(weight_grad)  # what DDP does to parameter gradients
        torch.save({"y": y.detach(), "dx": xi.grad, "dw": weight_grad, "state": layer.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_match_one_global_batch(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_run, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    x, dy = _batch()
    single = norm.BatchNorm2d(3).double()
    xs = x.clone().requires_grad_()
    y = single(xs)
    y.backward(dy)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        part = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(got["y"], y.detach()[part])
        torch.testing.assert_close(got["dx"], xs.grad[part])
        torch.testing.assert_close(got["dw"], single.weight.grad)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(got["state"][key], value)
