"""Data-parallel training on torch.distributed: N processes that behave like one process with the whole batch.

    bnlab train --nproc 2                                     # this machine, two worker processes
    torchrun --nnodes 2 --nproc-per-node 4 -m bnlab.cli train # several machines: the same program

What changes with N processes, and what does not:
- **Data.** Every process draws the same global batch (the single-process order: same seed) and
  keeps its own contiguous shard of it (``tensor_split``: sizes differ by at most one, and a process
  may get none).
- **Batch norm** is synchronized: ``bnlab.convert(model, to="sync")`` makes every BN layer (PyTorch's
  or bnlab's) a bnlab layer with the process group, so statistics, and the gradients through them,
  are those of the global batch.
- **Gradients**: DistributedDataParallel averages them over processes (gloo on CPU, nccl on CUDA).
  Each process's loss is its shard's *sum* scaled by N / global batch size, so the average is the
  gradient of the global batch's mean loss whatever the shard sizes; the logged loss is the
  global batch's mean (one all_reduce of two numbers per step).
- **Decisions** to stop (a NaN loss, a diverged evaluation on rank 0, a time budget) are agreed
  by all processes after every step (one all_reduce of one number; a second, before the hooks,
  when there is a time budget), so no process waits for a peer that left. A process that dies or
  is interrupted is not voted on: the elastic agent (or torchrun) ends its peers.
- **Output**: rank 0 alone evaluates (in eval mode: no collective, so validation cannot hang), logs,
  shows progress and writes the run directory and checkpoints. Resuming reads the run directory
  on every process, so on several machines it must be on a shared file system.
- **Faults**: ``--nproc`` runs the workers under torch.distributed's elastic agent: a worker that
  dies (even from SIGKILL) ends the job within seconds with a message naming its rank; the last
  checkpoint stays valid and ``--resume`` continues from it.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.data import Batches
from bnlab.errors import BnlabError
from bnlab.training.evaluate import loss_fn

STOP_REASONS = ("time", "diverged")  # agreed by code: the largest wins
RENDEZVOUS_TIMEOUT = timedelta(seconds=60)


@dataclass(frozen=True)
class World:
    """This process's place in the group: its rank, the group's size, and the group."""

    rank: int
    size: int
    group: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Tensor) -> Tensor:
        """This process's contiguous part of a global batch's indices."""
        return indices.tensor_split(self.size)[self.rank]

    def mean_loss(self, kind: str, logits: Tensor, labels: Tensor) -> tuple[Tensor, float]:
        """(the loss to backpropagate, the global batch's mean loss) for this shard."""
        local_sum = loss_fn(kind, logits, labels, reduction="sum")
        totals = torch.stack([local_sum.detach(), torch.tensor(float(len(labels)), device=local_sum.device)])
        dist.all_reduce(totals, group=self.group)
        global_sum, global_n = totals.tolist()
        return local_sum * (self.size / global_n), global_sum / global_n

    def agree(self, stop: str | None) -> str | None:
        """The most serious stop reason of any process, the same on all, so that all leave the loop together
        (a hook's own reason counts as "diverged"; the process that gave it keeps its wording in ``message``)."""
        vote = torch.tensor([0 if stop is None else STOP_REASONS.index(stop) + 1 if stop in STOP_REASONS else 2])
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        code = int(vote.item())
        return None if code == 0 else STOP_REASONS[code - 1]


def from_env(device: torch.device) -> World | None:
    """The World of a process started by ``--nproc`` or torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT); None alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:
            dist.init_process_group(backend, timeout=RENDEZVOUS_TIMEOUT)
        except (RuntimeError, ValueError) as err:
            raise BnlabError(
                f"cannot join the process group at {where} as rank {os.environ.get('RANK')} of {size} "
                f"({' '.join(str(err).split())[:200]}); check MASTER_ADDR, MASTER_PORT and --nnodes"
            ) from None
    return World(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


def synchronize(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model ready for data-parallel training: synchronized BN, DistributedDataParallel around it."""
    from bnlab.nn import convert

    model = convert(model, to="sync", process_group=world.group)
    device_ids = [device] if device.type == "cuda" else None
    # no buffer broadcast before each forward: synchronized BN keeps the running statistics equal everywhere
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


class ShardedBatches(Iterator[tuple[Tensor, Tensor]]):
    """This process's shard of every global batch of ``batches``."""

    def __init__(self, batches: Batches, world: World) -> None:
        self.batches, self.world = batches, world
        self.split = batches.split

    def __next__(self) -> tuple[Tensor, Tensor]:
        idx = self.world.shard(self.batches.next_indices())
        return self.split.images[idx], self.split.labels[idx]

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


def launch(nproc: int, argv: Sequence[str]) -> None:
    """Run ``bnlab`` with ``argv`` in ``nproc`` worker processes on this machine; raise naming a failed worker."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cores = os.cpu_count() or 1
    environment = dict(os.environ)
    loggers = {name: logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")}
    levels = {name: logger.level for name, logger in loggers.items()}
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # no oversubscription
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # One line says what failed (below); the agent's own tracebacks and a killed worker's leaked
    # semaphores (reported by Python's resource tracker at exit) would bury it.
    loggers["torch.distributed.elastic"].setLevel(logging.CRITICAL)
    loggers["torch.multiprocessing"].setLevel(logging.ERROR)
    os.environ["PYTHONWARNINGS"] = ",".join(
        filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore::UserWarning:multiprocessing.resource_tracker"])
    )
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2, start_method="spawn",
    )  # fmt: skip
    try:
        elastic_launch(config, worker)(list(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()  # the first to fail; its peers fail after it
        signal = (
            f"killed by signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        )
        raise BnlabError(f"worker rank {rank} failed ({signal}); the job stopped") from None
    finally:  # the caller's environment and logging as they were
        os.environ.clear()
        os.environ.update(environment)
        for name, logger in loggers.items():
            logger.setLevel(levels[name])


def worker(argv: list[str]) -> None:
    """A worker process: ``bnlab`` itself, its exit status the process's."""
    from bnlab.cli import main

    status = main(argv)
    if status:
        sys.exit(status)
