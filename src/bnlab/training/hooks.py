"""The hooks of a run (``loop.Hook``): records, the two evaluation cadences, checkpoints and the progress bar.

``runner.train`` (and ``runner.train_stack``, once per member) assembles them for a config: a ``Recorder``
always, the notebook's or the lab's cadence, ``Checkpoints`` when the run keeps a directory, and a
``Progress`` bar on a terminal.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from bnlab.config import TrainConfig
from bnlab.data import Batches, Split
from bnlab.training import store
from bnlab.training.distributed import ShardedBatches
from bnlab.training.evaluate import UnitPeaks, evaluate
from bnlab.training.loop import Hook, LoopState
from bnlab.training.result import RunResult

__all__ = ["Checkpoints", "IntervalCadence", "NotebookCadence", "Progress", "Recorder"]


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


Scorer = Callable[[LoopState, Split], tuple[float, float]]  # (loss, accuracy) of the state's module on a split


class IntervalCadence(Hook):
    """The lab's evaluations: before the first step, every ``eval_every`` steps, and after the last.

    Validation on the first ``eval_size`` images; with ``train_eval_size`` also the first training
    images; with ``dead_units`` (ReLU networks) the fraction of hidden units silent on every
    validation image. A non-finite validation loss (weights overflowed between two loss checks)
    ends the run as diverged. ``scorer`` gives the scores (default: ``evaluate`` on the state's module;
    a stack's members share one pass, ``stack.StackScores``); the dead units are always the module's own.
    """

    def __init__(
        self, config: TrainConfig, validation: Split, train: Split, recorder: Recorder, scorer: Scorer | None = None
    ) -> None:
        self.config, self.recorder = config, recorder
        self.score = scorer or (lambda state, split: evaluate(state.module, split, config.loss))
        self.validation = validation.head(config.eval_size)
        self.train = train.head(config.train_eval_size) if config.train_eval_size else None
        self.dead_units = config.dead_units and config.activation == "relu"

    def start(self, state: LoopState) -> None:
        if state.step == 0:
            self.measure(state)

    def after_step(self, state: LoopState) -> None:
        if state.step % self.config.eval_every == 0 or state.step == self.config.batches or state.stop == "time":
            self.measure(state)

    def measure(self, state: LoopState) -> None:
        model, loss = state.module, self.config.loss
        if self.dead_units:
            peaks = UnitPeaks(model.hidden_blocks())
            with peaks:
                val_loss, val_accuracy = evaluate(model, self.validation, loss)
        else:
            val_loss, val_accuracy = self.score(state, self.validation)
        if not math.isfinite(val_loss):
            state.stop, state.message = "diverged", f"validation loss became {val_loss} at batch {state.step}"
            return
        extra = {"dead_relu": peaks.dead_fraction()} if self.dead_units else {}
        self.recorder.evaluation(state, state.step, "validation", val_loss, val_accuracy, **extra)
        if self.train is not None:
            self.recorder.evaluation(state, state.step, "train", *self.score(state, self.train))


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
