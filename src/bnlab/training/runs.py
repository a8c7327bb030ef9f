"""The run keeper: the one way a config's run is found, reused, resumed or trained in a run store.

    result, how = obtain(config, root, data=data, device=device)            # how: reused | resumed | trained

A *store* is a folder of run directories, one per config, device type and process count, named by
``run_dir``: ``{model}-{bn}-seed{S}-{config key}-{device}``, e.g. ``mlp-manual-seed0-1f667e248789-cpu``, and
``...-cpu-2proc`` for a data-parallel run of 2 processes (``obtain(nproc=2)``). The key hashes the whole
config, so another budget, learning rate or cadence is another run; the device type and the processes are
in the name because a run's numbers are those of the device and the reduction order it trained with.
Every lab command (reproduce, precise, rnn, benefits, family) keeps its runs here, so the same config,
given the same store, is the same run whichever command asks for it.

Policies (``POLICIES``):
- ``"reuse"`` (the default): a finished run of the config (completed or diverged: both are results) is
  read back; an unfinished one with a resumable checkpoint continues from it; anything else (nothing
  there, an unfinished run without a checkpoint, a damaged or foreign directory) is replaced by a new run.
- ``"fresh"``: a new run replaces whatever the directory holds (every lab command's ``--fresh``).

A directory is only ever replaced if it holds nothing but a bnlab run's files (``store.RunDir.create``),
under its lock, so a user's own files and a concurrent writer are never touched.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnlab.config import TrainConfig, check_int
from bnlab.data import MNIST, fetch_mnist, load_mnist
from bnlab.errors import BnlabError, CheckpointError, Interrupted, UsageError
from bnlab.training import store
from bnlab.training.distributed import INTERRUPTED, PEER_FAILED, WorkerFailed, from_env, launch, peer_failure
from bnlab.training.pool import run_in_workers
from bnlab.training.result import RunResult
from bnlab.training.runner import train, train_stack
from bnlab.training.stack import stack_pays, structure
from bnlab.training.work import step_flops

__all__ = ["POLICIES", "QUIET", "load_run", "obtain", "obtain_many", "run_dir"]

POLICIES = ("reuse", "fresh")
# How many runs a stack holds (benchmarks/stack_speed.py): vmap's fixed cost per step makes a stack of a few
# runs slower than the runs one by one (at one thread, the paper's MLP: 0.33-0.75x for 1-4 runs), and from
# about 8 runs a member-step costs less than a run's step alone (1.1-1.6x faster at 16-32 runs).
MIN_STACK, MAX_STACK = 8, 32


def silent(_line: str) -> None:
    """A lab's runs log nothing (a module-level function: worker processes are handed it)."""


# what a lab passes for its runs: no log, no bar, no checkpoints (its evaluations are the record), a diverged
# run a result
QUIET = {"log": silent, "progress": False, "checkpoints": False, "raise_on_divergence": False}


def run_dir(root: str | Path, config: TrainConfig, device: torch.device | str, nproc: int = 1) -> Path:
    """The directory of ``config``'s run on ``device`` (in ``nproc`` data-parallel processes) in the store ``root``."""
    processes = f"-{nproc}proc" if nproc > 1 else ""
    name = f"{config.model}-{config.bn}-seed{config.seed}-{config.key()}-{torch.device(device).type}{processes}"
    return Path(root) / name


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise UsageError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")


def obtain(
    config: TrainConfig,
    root: str | Path,
    *,
    policy: str = "reuse",
    data: MNIST | None = None,
    device: torch.device | str = "cpu",
    nproc: int = 1,
    data_dir: str | Path | None = None,
    **options: Any,
) -> tuple[RunResult, str]:
    """(``config``'s run in the store ``root``, how it was obtained: "reused", "resumed" or "trained").

    ``options`` go to ``training.train`` (log, progress, fast, checkpoints, ...). A diverged run is a result
    (its status says so), never an exception: the same whether it was trained now or is reused.

    ``nproc`` > 1: data-parallel training in that many processes of this machine (``distributed.launch``;
    synchronized BN, the global batch ``config.batch_size`` split between them), on ``data`` (handed to them
    in a temporary file) or MNIST from ``data_dir``; its own run directory (``run_dir``), rank 0 writing it.
    A worker that fails ends the job (its peers stopped) with a ``BnlabError`` naming it, the run recorded as
    failed; an interrupt is recorded by rank 0 as a lone process records it, then raised.
    """
    check_policy(policy)
    device = torch.device(device)
    check_int("nproc", nproc, 1, 256)
    path = run_dir(root, config, device, nproc)
    resume = False
    if policy == "reuse":
        previous = load_run(path, config)
        if previous is not None:
            return previous, "reused"
        resume = resumable(path, config)
    how = "resumed" if resume else "trained"
    if nproc == 1:
        [result] = train_item(Item((config,), resume), data, root, device, options)
        return result, how
    options = {**options, "raise_on_divergence": False}
    with tempfile.TemporaryDirectory(prefix="bnlab-data-") as folder:
        data_file = None
        if data is None:
            fetch_mnist(data_dir)  # once here: workers downloading it side by side would race
        else:
            data_file = str(Path(folder) / "data.pt")
            torch.save(data.to("cpu"), data_file)
        try:
            status = launch(
                nproc, train_in_world, config.to_dict(), str(path), resume, str(device), data_file,
                None if data_dir is None else str(data_dir), options,
            )  # fmt: skip
        except WorkerFailed as err:
            store.record_end(path, "failed", f"{err}; the job stopped")
            raise
    if status != 0:  # rank 0 failed, after saying why on stderr and in the run's summary
        said = store.read_summary(path).get("message", "") if (path / store.SUMMARY).is_file() else ""
        raise BnlabError(f"{path}: the run in {nproc} processes failed (rank 0{': ' + said if said else ''})")
    return _finished_run(path, config), how


def train_in_world(
    config: dict[str, Any],
    path: str,
    resume: bool,
    device: str,
    data_file: str | None,
    data_dir: str | None,
    options: dict[str, Any],
) -> int:
    """One process of ``obtain(nproc=N)``'s data-parallel run (``launch``'s entry): join the group and train.

    Its exit status tells ``launch`` how it ended: 0; ``INTERRUPTED`` (Ctrl-C or SIGTERM, which rank 0 records
    in the run as a lone process does); ``PEER_FAILED`` when another process's failure broke a collective
    (that process names the cause); 1 for its own error, said in one line on stderr.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)
    where = torch.device(device)
    try:
        world = from_env(where)
        data = None if data_file is None else torch.load(data_file, weights_only=False)
        train(
            TrainConfig.from_dict(config), data, run_dir=path, resume=resume, replace=not resume,
            data_dir=data_dir, device=where, world=world, **options,
        )  # fmt: skip
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as err:
        if peer_failure(err) is not None:
            return PEER_FAILED
        print(f"bnlab: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


def obtain_many(
    configs: Sequence[TrainConfig],
    root: str | Path,
    *,
    policy: str = "reuse",
    data: MNIST | None = None,
    device: torch.device | str = "cpu",
    min_stack: int = MIN_STACK,
    max_stack: int = MAX_STACK,
    workers: int = 1,
    done: Callable[[TrainConfig, RunResult, str], None] = lambda config, result, how: None,
    **options: Any,
) -> dict[TrainConfig, tuple[RunResult, str]]:
    """Every config's run in the store ``root``, as ``obtain`` would give it, the runs to train grouped into
    *items*: those that share a structure and train faster stacked (``stack_pays``) as stacks of ``min_stack``
    to ``max_stack`` (``training.train_stack``), the others one by one.

    Runs to resume are stacked only with runs resuming from the same step. With ``workers`` > 1 (on the
    CPU) the items train side by side in that many processes of one thread each (``pool.py``), the
    largest first; each run's numbers are its own whatever trains beside it. ``done(config, result,
    how)`` is called as each run is obtained (a stack's members when the stack ends). ``options`` go
    to ``train`` (and what applies of them to ``train_stack``: log, fast, checkpoints); a diverged run
    is a result, never an exception.
    """
    check_policy(policy)
    device = torch.device(device)
    out: dict[TrainConfig, tuple[RunResult, str]] = {}
    groups: dict[Any, list[TrainConfig]] = {}
    for config in dict.fromkeys(configs):  # each config once, in order
        path = run_dir(root, config, device)
        previous = load_run(path, config) if policy == "reuse" else None
        if previous is not None:
            out[config] = (previous, "reused")
            done(config, previous, "reused")
            continue
        step = store.load_checkpoint(path)["step"] if policy == "reuse" and resumable(path, config) else None
        key = (structure(config), step) if stack_pays(config) else (config, step)
        groups.setdefault(key, []).append(config)
    items = []
    for (_, step), group in groups.items():
        chunks = [group[start : start + max_stack] for start in range(0, len(group), max_stack)]
        for chunk in chunks:  # too few for a stack to pay: one by one
            stacks = [chunk] if len(chunk) >= min(min_stack, max_stack) else [[config] for config in chunk]
            items += [Item(tuple(members), step is not None) for members in stacks]

    def finished(item: Item, results: Sequence[RunResult]) -> None:
        for config, result in zip(item.configs, results, strict=True):
            out[config] = (result, "resumed" if item.resume else "trained")
            done(config, result, out[config][1])

    if workers > 1 and device.type == "cpu" and len(items) > 1:
        if data is None:
            data = load_mnist()
        items.sort(key=Item.work, reverse=True)  # the longest first: the last to finish is a short one
        shared = (data, str(root), device, options)

        def read_back(index: int) -> None:  # a worker's runs, from the directories it wrote
            finished(items[index], [_finished_run(run_dir(root, c, device), c) for c in items[index].configs])

        def lost(index: int, why: str) -> None:  # a worker killed mid-item could not record how its runs ended
            for config in items[index].configs:
                store.record_end(run_dir(root, config, device), "failed", f"{why}; the run stopped")

        run_in_workers(f"{__name__}.train_item", items, workers=workers, shared=shared, done=read_back, lost=lost)
    else:
        for item in items:
            finished(item, train_item(item, data, root, device, options))
    return {config: out[config] for config in dict.fromkeys(configs)}


@dataclass(frozen=True)
class Item:
    """What one call trains: a run, or a stack of runs of one structure; resumed from their checkpoints or new."""

    configs: tuple[TrainConfig, ...]
    resume: bool

    def work(self) -> float:
        """FLOPs of its training (from the start, even when resumed), near enough to order items by."""
        return sum(step_flops(c) * c.batches for c in self.configs)


def train_item(item: Item, data: MNIST | None, root: str | Path, device: torch.device, options: dict[str, Any]):
    """Train ``item`` (in this process, or in a worker of ``pool.py``): its runs' results, in order."""
    paths = [run_dir(root, c, device) for c in item.configs]
    if len(item.configs) == 1:
        result = train(
            item.configs[0], data, run_dir=paths[0], resume=item.resume, replace=not item.resume, device=device,
            **{**options, "raise_on_divergence": False},
        )  # fmt: skip
        return [result]
    stack_options = {k: v for k, v in options.items() if k in ("log", "fast", "checkpoints")}
    return train_stack(
        list(item.configs), data, run_dirs=paths, resume=item.resume, replace=not item.resume, device=device,
        **stack_options,
    )  # fmt: skip


def _finished_run(path: Path, config: TrainConfig) -> RunResult:
    """The run a worker just finished, read back from its directory."""
    result = load_run(path, config)
    if result is None:
        raise CheckpointError(f"{path}: a worker finished this run but its directory does not say so")
    return result


def resumable(path: Path, config: TrainConfig) -> bool:
    """Whether ``path`` holds an unfinished run of ``config`` with a checkpoint to continue from."""
    if not (path / store.CHECKPOINT).is_file():
        return False
    try:
        unfinished = store.read_summary(path).get("status") not in store.FINISHED
        return unfinished and store.read_config(path) == config and "resume" in store.load_checkpoint(path)
    except CheckpointError:
        return False


def load_run(run_dir: str | Path, expected: TrainConfig | None = None) -> RunResult | None:
    """A finished run (completed or diverged) from its directory, or None if it is not finished (or differs)."""
    run_dir = Path(run_dir)
    if not (run_dir / store.SUMMARY).is_file() or not (run_dir / store.CONFIG).is_file():
        return None
    try:
        summary = store.read_summary(run_dir)
        config = store.read_config(run_dir)
        records = [r for r in store.read_metrics(run_dir / store.METRICS) if r.get("event") == "eval"]
    except (OSError, ValueError, KeyError, UsageError, store.CheckpointError):
        return None
    if summary.get("status") not in store.FINISHED or (expected is not None and config != expected):
        return None
    keys = ("batch", "split", "loss", "accuracy", "seconds", "dead_relu")
    history = [{k: r[k] for k in keys if k in r} for r in records]
    fields = ("batches_done", "validation_accuracy", "test_accuracy", "one_at_a_time_accuracy", "precise", "message")
    return RunResult(
        config=config,
        status=summary["status"],
        train_seconds=summary.get("train_seconds", 0.0),
        wall_seconds=summary.get("wall_seconds", 0.0),
        history=history,
        device=summary.get("device", "cpu"),
        fast=summary.get("fast", True),
        threads=summary.get("threads", 1),
        run_dir=run_dir,
        **{key: summary.get(key) for key in fields},
    )
