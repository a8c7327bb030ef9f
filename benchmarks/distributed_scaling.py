"""Data-parallel scaling of the seed network on this machine: 1, 2 and 4 processes, gloo (nccl on CUDA).

    python benchmarks/distributed_scaling.py [--steps 60] [--procs 1,2,4]

The global batch stays 64 (the notebook's), so N processes each train on 64 / N images per step
(strong scaling). Per setup, median milliseconds per step (the loop's clock, after 10 warm-up
steps), scaling efficiency = T(1) / (N * T(N)), and the payload each process sends per step:
- gradients: every parameter, once per step (DistributedDataParallel's all_reduce), computed from
  the parameter count;
- synchronized BN: counted by wrapping the collectives bnlab calls (per BN layer an all_gather of
  3 x C float64 forward, an all_reduce of 2 x C float64 backward);
- the loop's own agreement: the global loss (2 numbers) and the stop vote (1 number).
Two BN setups side by side: bnlab's synchronized BN, and PyTorch's DDP with unsynchronized
``nn.BatchNorm2d`` (each process normalizes with its own shard's statistics). Each process gets
cores / N threads. A 2-core machine cannot show a speed-up past 2 processes; the figures say what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnlab.bench import StepTimes, describe_machine
from bnlab.config import TrainConfig
from bnlab.data import load_mnist
from bnlab.reports import markdown_table
from bnlab.training import fit
from bnlab.training.distributed import ShardedBatches, World
from bnlab.training.runner import prepare


class PayloadCounter:
    """Bytes sent through the Python-level collectives (what bnlab itself calls), per step."""

    def __init__(self) -> None:
        self.bytes = 0
        self.all_gather, self.all_reduce = dist.all_gather, dist.all_reduce

    def install(self) -> None:
        def all_gather(tensors, tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self.all_gather(tensors, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self.all_reduce(tensor, *args, **kwargs)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce


def _worker(rank: int, size: int, store: str, out: str, bn: str, steps: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        world = World(rank, size, dist.group.WORLD)
        data = load_mnist()
        config = TrainConfig(bn="manual" if bn == "bnlab sync" else "torch")
        state, batches = prepare(config, data, torch.device("cpu"), world=world if bn == "bnlab sync" else None)
        if bn != "bnlab sync":  # PyTorch's DDP around PyTorch's unsynchronized BN
            state.model = torch.nn.parallel.DistributedDataParallel(state.model)
            batches = ShardedBatches(batches, world)
        counter = PayloadCounter()
        counter.install()
        timer = StepTimes()
        fit(state, batches, steps=10, loss=config.loss, world=world)  # warm-up
        counted = counter.bytes
        fit(state, batches, steps=10 + steps, loss=config.loss, hooks=[timer], world=world)
        params = sum(p.numel() * p.element_size() for p in state.module.parameters())
        result = {
            "step_ms": statistics.median(timer.times) * 1e3,
            "python_collective_bytes": (counter.bytes - counted) / steps,
            "gradient_bytes": params,
        }
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def measure(size: int, bn: str, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(size, f"{tmp}/store", f"{tmp}/out", bn, steps), nprocs=size, join=True)
        per_rank = [torch.load(Path(f"{tmp}/out.{rank}"), weights_only=True) for rank in range(size)]
    return {
        "step_ms": max(r["step_ms"] for r in per_rank),  # the slowest process sets the pace
        "bytes": per_rank[0]["python_collective_bytes"] + per_rank[0]["gradient_bytes"],
        "bn_bytes": per_rank[0]["python_collective_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    print(describe_machine())
    sizes = [int(n) for n in args.procs.split(",")]
    rows, results = [], []
    for bn in ("bnlab sync", "torch DDP, unsynchronized BN"):
        base = None
        for size in sizes:
            r = measure(size, bn, args.steps) if size > 1 else measure_single(bn, args.steps)
            base = base or r["step_ms"]
            efficiency = base / (size * r["step_ms"])
            results.append({"bn": bn, "processes": size, **r, "efficiency": efficiency})
            rows.append([bn, str(size), f"{r['step_ms']:.1f}", f"{efficiency:.0%}", f"{r['bytes'] / 1024:.0f}",
                         f"{r['bn_bytes'] / 1024:.1f}"])  # fmt: skip
    print("\nSeed network, global batch 64, median ms per step\n")
    headers = [
        "BN",
        "processes",
        "ms/step",
        "scaling efficiency",
        "KiB sent per process per step",
        "of which BN + loop",
    ]
    print(markdown_table(headers, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe_machine(), "results": results}, indent=2))


def measure_single(bn: str, steps: int) -> dict[str, float]:
    """One process, no group: the baseline (nothing communicated)."""
    torch.set_num_threads(os.cpu_count() or 1)
    data = load_mnist()
    config = TrainConfig(bn="manual" if bn == "bnlab sync" else "torch")
    state, batches = prepare(config, data, torch.device("cpu"))
    timer = StepTimes()
    fit(state, batches, steps=10, loss=config.loss)
    fit(state, batches, steps=10 + steps, loss=config.loss, hooks=[timer])
    return {"step_ms": statistics.median(timer.times) * 1e3, "bytes": 0.0, "bn_bytes": 0.0}


if __name__ == "__main__":
    main()
