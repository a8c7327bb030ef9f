"""``train``: one run of a ``TrainConfig``, from building the network to the last line of its summary.

It builds the network, optimizer and batch order the config describes, runs the one loop (``loop.py``)
with the hooks of the config's cadence, and keeps the run directory (``store.py``) if given one. At
the end of a notebook-cadence run it scores validation, test and the one-at-a-time check twice: with
the running (EMA) statistics the network trained with, the notebook's measure, and with precise
statistics recomputed from ``precise_samples`` training images (``bnlab.nn.precise``), which says
what the weights can do whatever state the EMA is in.

The run's status ends up in summary.json whatever happens: completed, diverged (the loss became NaN
or infinite), interrupted (Ctrl-C, SIGTERM) or failed (any other error, before or during the loop).

Why this file is over 500 lines: it is everything between a config and a finished run directory,
and its parts (the hooks of both cadences, checkpoints, resume, the final scores) share one
``RunResult`` and one run's state; split apart they would pass that state around instead.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from bnlab import kernels
from bnlab.config import TrainConfig
from bnlab.data import MNIST, Batches, Split, load_mnist
from bnlab.errors import TrainingDiverged, UsageError
from bnlab.models import build_network
from bnlab.nn.precise import Recalibration, recalibrate
from bnlab.training import store
from bnlab.training.distributed import ShardedBatches, World, synchronize
from bnlab.training.evaluate import UnitPeaks, evaluate, one_at_a_time_accuracy
from bnlab.training.loop import Hook, LoopState, fit, make_optimizer


@dataclass
class RunResult:
    """What a run leaves: its status, its evaluations, and (notebook cadence) the final scores."""

    config: TrainConfig
    status: str
    batches_done: int = 0
    train_seconds: float = 0.0  # training steps only
    wall_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # the eval records of metrics.jsonl
    validation_accuracy: float | None = None
    test_accuracy: float | None = None
    one_at_a_time_accuracy: float | None = None
    precise: dict[str, Any] | None = None  # the same three with precise statistics, and what they cost
    device: str = "cpu"
    fast: bool = True
    threads: int = 1
    message: str = ""
    run_dir: Path | None = None
    model: nn.Module | None = None

    def summary(self) -> dict[str, Any]:
        keys = ("status", "message", "batches_done", "validation_accuracy", "test_accuracy", "one_at_a_time_accuracy")
        out = {key: getattr(self, key) for key in keys}
        return out | {
            "precise": self.precise,
            "train_seconds": round(self.train_seconds, 4),
            "wall_seconds": round(self.wall_seconds, 3),
            "device": self.device,
            "fast": self.fast,
            "threads": self.threads,
            "config": self.config.to_dict(),
        }

    # --- the interval cadence's view: one point per evaluation --------------------------------------

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    @property
    def seconds_per_batch(self) -> float:
        return self.train_seconds / self.batches_done if self.batches_done else math.nan

    @property
    def points(self) -> list[dict[str, float]]:
        """Per evaluation: batch, seconds, val_loss/val_accuracy, train_loss/train_accuracy, dead_relu (if measured)."""
        by_batch: dict[int, dict[str, float]] = {}
        for record in self.history:
            point = by_batch.setdefault(record["batch"], {"batch": record["batch"], "seconds": record["seconds"]})
            prefix = "val" if record["split"] == "validation" else "train"
            point[f"{prefix}_loss"], point[f"{prefix}_accuracy"] = record["loss"], record["accuracy"]
            if "dead_relu" in record:
                point["dead_relu"] = record["dead_relu"]
        return list(by_batch.values())

    def final(self, key: str = "val_accuracy") -> float | None:
        """The last point's value; None for a diverged run, whose last values mean nothing."""
        return None if self.diverged else self.points[-1][key]

    def best(self, key: str = "val_accuracy") -> float:
        return max(p[key] for p in self.points)

    def first_reaching(self, accuracy: float) -> dict[str, float] | None:
        """The first point with validation accuracy >= ``accuracy``, if any."""
        return next((p for p in self.points if p["val_accuracy"] >= accuracy), None)

    def curve(self, y: str = "val_accuracy", x: str = "batch") -> list[tuple[float, float]]:
        return [(p[x], p[y]) for p in self.points if y in p]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is the GPU when there is one; anything torch.device accepts otherwise."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def head(split: Split, n: int | None) -> Split:
    return split if n is None else Split(split.images[:n], split.labels[:n])


class Recorder(Hook):
    """Keeps the run's records: in ``history``, and appended to metrics.jsonl when there is a run directory."""

    def __init__(self, run: store.RunDir | None, result: RunResult, steps: bool) -> None:
        self.run, self.result, self.steps = run, result, steps

    def after_step(self, state: LoopState) -> None:
        self.result.batches_done, self.result.train_seconds = state.step, state.clock
        if self.steps and self.run is not None:
            self.run.record({"event": "step", "step": state.step, "batch": state.step - 1, "loss": state.loss})

    def evaluation(self, state: LoopState, batch: int, split: str, loss: float, accuracy: float, **extra: Any) -> None:
        record = {"batch": batch, "split": split, "loss": loss, "accuracy": accuracy}
        record |= {"seconds": round(state.clock, 4), **extra}
        self.result.history.append(record)
        if self.run is not None:
            self.run.record({"event": "eval", "step": state.step, **record})


class NotebookCadence(Hook):
    """The notebook's evaluations and log lines: validation after batch 0 and every ``eval_every``-th,
    else the batch just trained on every ``log_every``-th; both in eval mode."""

    def __init__(self, config: TrainConfig, validation: Split, recorder: Recorder, line: Callable[[str], None]):
        self.config, self.validation, self.recorder, self.line = config, validation, recorder, line

    def after_step(self, state: LoopState) -> None:
        batch = state.step - 1  # the notebook numbers the batch just trained on
        if batch % self.config.eval_every == 0:
            split, label, data = "validation", "Validation", self.validation
        elif batch % self.config.log_every == 0:
            split, label, data = "train_batch", "Training", Split(state.images, state.labels)
        else:
            return
        loss, accuracy = evaluate(state.module, data, self.config.loss)
        self.recorder.evaluation(state, batch, split, loss, accuracy)
        self.line(f"Batch: {batch:>2}: {label} loss: {loss:>3.5f}, {label} accuracy: {accuracy:>3.5f}")


class IntervalCadence(Hook):
    """The lab's evaluations: before the first step, every ``eval_every`` steps, and after the last.

    Validation on the first ``eval_size`` images; with ``train_eval_size`` also the first training
    images; with ``dead_units`` (ReLU networks) the fraction of hidden units silent on every
    validation image. A non-finite validation loss (weights overflowed between two loss checks)
    ends the run as diverged.
    """

    def __init__(self, config: TrainConfig, validation: Split, train: Split, recorder: Recorder) -> None:
        self.config, self.recorder = config, recorder
        self.validation = head(validation, config.eval_size)
        self.train = head(train, config.train_eval_size) if config.train_eval_size else None
        self.dead_units = config.dead_units and config.activation == "relu"

    def start(self, state: LoopState) -> None:
        if state.step == 0:
            self.measure(state)

    def after_step(self, state: LoopState) -> None:
        if state.step % self.config.eval_every == 0 or state.step == self.config.batches or state.stop == "time":
            self.measure(state)

    def measure(self, state: LoopState) -> None:
        model, loss = state.module, self.config.loss
        peaks = UnitPeaks(model.hidden_blocks() if self.dead_units else [])
        with peaks:
            val_loss, val_accuracy = evaluate(model, self.validation, loss)
        if not math.isfinite(val_loss):
            state.stop, state.message = "diverged", f"validation loss became {val_loss} at batch {state.step}"
            return
        extra = {"dead_relu": peaks.dead_fraction()} if self.dead_units else {}
        self.recorder.evaluation(state, state.step, "validation", val_loss, val_accuracy, **extra)
        if self.train is not None:
            self.recorder.evaluation(state, state.step, "train", *evaluate(model, self.train, loss))


class Checkpoints(Hook):
    """A resumable checkpoint every ``checkpoint_every`` steps; model snapshots after the ``snapshots`` batches."""

    def __init__(
        self, config: TrainConfig, run: store.RunDir, batches: Batches | ShardedBatches, result: RunResult
    ) -> None:
        self.config, self.run, self.batches, self.result = config, run, batches, result

    def after_step(self, state: LoopState) -> None:
        every = self.config.checkpoint_every
        if state.step in self.config.snapshots:
            self.run.save_checkpoint(store.snapshot_name(state.step), self.payload(state, resumable=False))
        if every and state.step % every == 0 and state.step < self.config.batches:
            self.run.save_checkpoint(store.CHECKPOINT, self.payload(state, resumable=True))

    def payload(self, state: LoopState, resumable: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "config": self.config.to_dict(),
            "state_dict": state.module.state_dict(),
            "step": state.step,
            "summary": self.result.summary(),
        }
        if resumable:
            payload["resume"] = {
                "optimizer": state.optimizer.state_dict(),
                "batches": self.batches.state_dict(),
                "rng": torch.get_rng_state(),
                "clock": state.clock,
                "history": self.result.history,
            }
        return payload


class Progress(Hook):
    """A progress bar on stderr when it is a terminal (or when asked), advanced every step."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, unit="batch", disable=not enabled, file=sys.stderr, leave=False)

    def start(self, state: LoopState) -> None:
        self.bar.update(state.step)

    def after_step(self, state: LoopState) -> None:
        self.bar.update()

    def line(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` made to print around the bar."""

        def write(text: str) -> None:
            with tqdm.external_write_mode(file=sys.stderr):
                log(text)

        return write


def training_split(config: TrainConfig, data: MNIST) -> Split:
    return head(data.train, config.train_size)


def train(
    config: TrainConfig,
    data: MNIST | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    fast: bool = True,
    checkpoints: bool = True,
    raise_on_divergence: bool = True,
    replace: bool = False,
    world: World | None = None,
) -> RunResult:
    """Train ``config``'s network; keep the run directory ``run_dir`` if given (``resume``: continue the run in it).

    ``run_dir`` must be new or empty; with ``replace`` it may hold another run (unfinished, or of another
    config), which is removed first.
    ``fast=False`` turns off the speed-ups (channels_last, fused Adam, bnlab's compiled BN kernels)
    for debugging; results mean the same either way and differ only by float rounding.
    ``checkpoints=False`` writes no checkpoint (the lab keeps only the evaluations of its runs).
    A diverged run raises ``TrainingDiverged`` after recording it, unless ``raise_on_divergence`` is False.
    ``world``: this process's place in a data-parallel group (``distributed.py``); rank 0 alone keeps
    the run directory, logs and evaluates.
    """
    device = resolve_device(device)
    started = time.perf_counter()
    run, checkpoint = None, None
    main = world is None or world.is_main
    if run_dir is not None and resume and not main:  # every process resumes from the one checkpoint
        checkpoint = store.load_checkpoint(store.checkpoint_path(run_dir))
    elif run_dir is not None and resume:
        run, checkpoint = store.RunDir.resume(run_dir)
    elif run_dir is not None and main:
        run = store.RunDir.create(run_dir, replace=replace)
    result = RunResult(config, "running", device=str(device), fast=fast, threads=torch.get_num_threads())
    result.run_dir = run.path if run else None
    try:
        if run is not None:
            run.write_summary(result.summary())
        with contextlib.nullcontext() if fast else kernels.use_kernels(False):
            _train(config, data, data_dir, device, run, checkpoint, result, log, progress, fast, checkpoints, world)
        if result.status == "diverged" and raise_on_divergence:
            raise TrainingDiverged(result.message)
    except TrainingDiverged:
        raise
    except KeyboardInterrupt:
        result.status, result.message = "interrupted", f"interrupted after {result.batches_done} batches"
        raise
    except BaseException as err:
        result.status, result.message = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        result.wall_seconds = round(time.perf_counter() - started, 3)  # as stored, so reloads compare equal
        if run is not None:
            try:
                run.write_summary(result.summary())
            except OSError:
                if result.status in store.FINISHED:  # nothing else reports the problem: this error does
                    raise
                # else the error on its way out (named by its file) is the one to report; the summary could
                # not be written even in place, so it says the run's last recorded status
            finally:
                run.close()
    return result


def _train(
    config: TrainConfig,
    data: MNIST | None,
    data_dir: str | Path | None,
    device: torch.device,
    run: store.RunDir | None,
    checkpoint: dict[str, Any] | None,
    result: RunResult,
    log: Callable[[str], None],
    progress: bool | None,
    fast: bool,
    checkpoints: bool,
    world: World | None,
) -> None:
    data = (data if data is not None else load_mnist(data_dir)).to(device)
    state, batches = prepare(config, data, device, channels_last=fast, fused=fast, world=world)
    train_split = batches.split
    result.model = state.module
    if checkpoint is not None:
        _restore(state, checkpoint, batches, result)
    if run is not None:
        details = {"world_size": world.size} if world else {}
        details["batch_norm"] = kernels.status()  # which implementation bnlab's BN used: kernels or tensor ops
        run.write_config(config, device=str(device), fast=fast, threads=torch.get_num_threads(), **details)
    notebook = config.cadence == "notebook"
    main = world is None or world.is_main
    recorder = Recorder(run, result, steps=notebook)
    bar = Progress(config.batches, progress if main else False)
    line = bar.line(log)
    cadence = (
        NotebookCadence(config, data.validation, recorder, line)
        if notebook
        else IntervalCadence(config, data.validation, train_split, recorder)
    )
    hooks: list[Hook] = [recorder, cadence, bar] if main else []  # only rank 0 evaluates, records and shows
    if run is not None and checkpoints:
        hooks.append(Checkpoints(config, run, batches, result))
    try:
        fit(
            state,
            batches,
            steps=config.batches,
            loss=config.loss,
            hooks=hooks,
            seconds=config.seconds,
            clip=config.clip,
            world=world,
        )
    finally:
        bar.bar.close()
    result.batches_done, result.train_seconds = state.step, state.clock
    if state.stop == "diverged":
        result.status, result.message = (
            "diverged",
            f"{state.message} (bn={config.bn}, lr={config.lr:g}); the run stopped. Try a smaller --lr, or batch norm.",
        )
        return
    if main and (notebook or config.one_at_a_time or config.precise_samples):
        _final_scores(config, data, train_split, result, line)
    result.status = "completed"
    if run is not None and checkpoints:  # before summary.json says "completed": a failed write makes it "failed"
        payload = {"config": config.to_dict(), "state_dict": state.module.state_dict(), "step": state.step}
        run.save_checkpoint(store.CHECKPOINT, payload | {"summary": result.summary()})


def prepare(
    config: TrainConfig,
    data: MNIST,
    device: torch.device,
    *,
    channels_last: bool = True,
    fused: bool = True,
    world: World | None = None,
) -> tuple[LoopState, Batches | ShardedBatches]:
    """The network, optimizer and batch stream of ``config``, ready for ``fit``.

    ``channels_last``: the ConvNet in channels_last (faster convolutions; bnlab's kernels take either
    layout). ``fused``: the fused Adam where the device has one. ``world``: synchronized BN and
    DistributedDataParallel around the network, and this process's shard of every batch.
    """
    torch.manual_seed(config.seed)  # dropout draws from the global generator; weights and batches have their own
    model = build_network(config).to(device)
    if channels_last and config.model == "convnet":
        model = model.to(memory_format=torch.channels_last)
    if world is not None:
        model = synchronize(model, world, device)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.momentum, fused)
    batches = Batches(training_split(config, data), config.batch_size, seed=config.seed)
    return LoopState(model, optimizer), batches if world is None else ShardedBatches(batches, world)


def _restore(
    state: LoopState, checkpoint: dict[str, Any], batches: Batches | ShardedBatches, result: RunResult
) -> None:
    """The loop's state at the checkpoint: weights, optimizer, batch order, RNG, clock and evaluations so far."""
    resume = checkpoint["resume"]
    state.module.load_state_dict(checkpoint["state_dict"])
    state.optimizer.load_state_dict(resume["optimizer"])
    batches.load_state_dict(resume["batches"])
    torch.set_rng_state(resume["rng"])
    state.step, state.clock = checkpoint["step"], resume["clock"]
    result.history = list(resume["history"])
    result.batches_done, result.train_seconds = state.step, state.clock


def _final_scores(
    config: TrainConfig, data: MNIST, train_split: Split, result: RunResult, line: Callable[[str], None]
) -> None:
    """Validation, test and one-at-a-time accuracy with the EMA statistics, then with precise ones."""
    model = result.model
    ema = scores(model, data, config.loss, config.one_at_a_time)
    result.validation_accuracy, result.test_accuracy = ema["validation_accuracy"], ema["test_accuracy"]
    result.one_at_a_time_accuracy = ema.get("one_at_a_time_accuracy")
    precise: dict[str, Any] = {}
    if config.bn != "none" and config.precise_samples:
        recalibrated, done = precise_copy(model, train_split, config.precise_samples, config.batch_size, config.seed)
        precise = {"samples": done.samples, "seconds": round(done.seconds, 3)}
        precise |= scores(recalibrated, data, config.loss, config.one_at_a_time)
        line(f"Precise statistics: recomputed from {done.samples:,} training images in {done.seconds:.2f} s")
    result.precise = precise or None

    for text in score_lines(ema, precise, config.one_at_a_time):
        line(text)


def score_lines(
    scores: dict[str, float], precise: dict[str, Any] | None, one_at_a_time: int, kind: str = "EMA", final: bool = True
) -> list[str]:
    """The notebook's final lines, each score followed by its precise counterpart when there is one."""
    labels = {
        "validation_accuracy": ("Final validation accuracy" if final else "Validation accuracy", 5),
        "test_accuracy": ("Final test accuracy" if final else "Test accuracy", 5),
        "one_at_a_time_accuracy": (f"Accuracy on {one_at_a_time} samples", 2),
    }
    lines = []
    for key, (label, digits) in labels.items():
        if key in scores:
            text = f"{label}: {scores[key]:>3.{digits}f}"
            if precise and key in precise:
                text += f" ({kind} statistics), {precise[key]:.{digits}f} (precise)"
            lines.append(text)
    return lines


def scores(model: nn.Module, data: MNIST, loss: str, one_at_a_time: int) -> dict[str, float]:
    """Validation and test accuracy, and the first ``one_at_a_time`` test images classified alone."""
    out = {
        "validation_accuracy": evaluate(model, data.validation, loss)[1],
        "test_accuracy": evaluate(model, data.test, loss)[1],
    }
    if one_at_a_time:
        out["one_at_a_time_accuracy"] = one_at_a_time_accuracy(model, data.test, one_at_a_time)
    return out


def precise_copy(
    model: nn.Module, train_split: Split, samples: int, batch_size: int, seed: int
) -> tuple[nn.Module, Recalibration]:
    """A copy of ``model`` with precise statistics from ``samples`` training images (a fixed draw for ``seed``)."""
    precise = copy.deepcopy(model)
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))
    images = train_split.images[order[:samples].to(train_split.images.device)]
    return precise, recalibrate(precise, images, samples=samples, batch_size=batch_size)


def train_or_reuse(
    config: TrainConfig, data: MNIST | None, run_dir: str | Path, *, reuse: bool = True, **options: Any
) -> tuple[RunResult, bool]:
    """(the run of ``config`` in ``run_dir``, whether it was trained now): a finished run of ``config`` there
    is reused; anything else there (an interrupted run, another config's) is replaced by a new run.
    ``options`` go to ``train``."""
    previous = load_run(run_dir, config) if reuse else None
    if previous is not None:
        return previous, False
    return train(config, data, run_dir=run_dir, replace=True, **options), True


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
