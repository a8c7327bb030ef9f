"""The arithmetic a run is: floating-point operations per training step, and the machine's matmul peak.

A lab claim's *work* is the FLOPs of all its runs' training steps (evaluations excluded), counted by
PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` on one forward and backward pass of the
network (matmuls and convolutions; elementwise ops, batch norm and the optimizer are not counted, and
are a few percent of these networks' steps). Its *floor* is that work at the matmul peak: the time no
engine could beat on this machine, measured in the same process (``matmul_peak``) so that the
fraction of peak a lab reaches is a ratio of two figures taken side by side.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from bnlab.config import TrainConfig
from bnlab.models import build_network
from bnlab.training.evaluate import loss_fn

__all__ = ["matmul_peak", "num_threads", "step_flops"]


# what a training step's FLOPs depend on: the network's shape, the loss and the batch. Everything else (seed,
# optimizer, schedule, measurement) is reset so that a lab's hundreds of runs count a few networks, not each
_FLOP_FREE = {
    name: getattr(TrainConfig, name)
    for name in (
        "seed", "bn_momentum", "dropout", "optimizer", "lr", "momentum", "clip", "batches", "seconds", "train_size",
        "eval_every", "log_every", "eval_size", "train_eval_size", "dead_units", "one_at_a_time",
        "precise_samples", "checkpoint_every", "snapshots", "renorm_warmup", "classes_per_batch",
    )
}  # fmt: skip


def step_flops(config: TrainConfig) -> int:
    """FLOPs of one training step of ``config``'s network (forward and backward, batch of ``batch_size``)."""
    return _counted(config.replace(**_FLOP_FREE))


@functools.cache
def _counted(config: TrainConfig) -> int:
    model = build_network(config)
    images = torch.zeros(config.batch_size, 1, 28, 28)
    labels = torch.zeros(config.batch_size, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(config.loss, model.train()(images), labels).backward()
    return counter.get_total_flops()


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside the block (None: left as they are), restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def matmul_peak(size: int = 1024, repeats: int = 9, threads: int | None = None) -> float:
    """FLOP/s of a float32 matmul of two size x size matrices on this machine now: the median of ``repeats``,
    with ``threads`` intra-op threads (default: torch's current setting, which is left as it was)."""
    with num_threads(threads):
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up: threads, caches
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            timings.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(timings)
