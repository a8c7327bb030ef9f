"""Cross-process statistics: two processes with half a batch each match one process with all of it (batch norm
and batch renorm)."""

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


def _layer(kind: str, process_group=None):
    """Batch norm, or batch renorm with running statistics far from the batch's, so that r and d matter."""
    if kind == "batch norm":
        return norm.BatchNorm2d(3, process_group=process_group).double()
    layer = norm.BatchRenorm2d(3, warmup_steps=0, rmax=1.5, dmax=2.0, process_group=process_group).double()
    with torch.no_grad():
        layer.running_mean.fill_(1e3 + 2.0)
        layer.running_var.fill_(2.0)
    return layer


def _run(rank: int, world: int, store: str, out: str, kind: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x, dy = _batch()
        part = slice(rank * 4, rank * 4 + 4)
        layer = _layer(kind, dist.group.WORLD)
        xi = x[part].clone().requires_grad_()
        y = layer(xi)
        y.backward(dy[part])
        weight_grad = layer.weight.grad.clone()
        dist.all_reduce(weight_grad)  # what DDP does to parameter gradients
        torch.save({"y": y.detach(), "dx": xi.grad, "dw": weight_grad, "state": layer.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("kind", ["batch norm", "batch renorm"])
def test_two_processes_match_one_global_batch(tmp_path, kind):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_run, args=(2, str(tmp_path / "store"), str(tmp_path / "out"), kind), nprocs=2, join=True)
    x, dy = _batch()
    single = _layer(kind)
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
