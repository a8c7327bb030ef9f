"""The notebook's training procedure, step for step.

Adam (lr 0.002, betas 0.9/0.999, eps 1e-8), batches of 64, 800 batches, loss = mean sigmoid
cross-entropy against one-hot labels (``loss="softmax"`` for the usual softmax cross-entropy).
After the step on batch 0 and every 100th batch: loss and accuracy on all 5,000 validation images;
after every other 25th: loss and accuracy on the batch just trained on. Both in eval mode, as the
notebook feeds ``is_training=False``. At the end: validation and test accuracy, then the first 100
test images classified one at a time (batch of one, eval mode), the notebook's check that
population statistics were tracked and are used.

The loop keeps the host out of the way: the per-batch losses stay on the device and are read
(and checked for NaN/inf) only at the logging points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from bnlab import kernels
from bnlab.data import MNIST, Batches, Split, load_mnist
from bnlab.errors import TrainingDiverged, UsageError
from bnlab.models import BN_MODES, SeedConvNet, build_model, check_choice
from bnlab.training import runs

LOSSES = ("sigmoid", "softmax")
STATUSES = ("running", "completed", "diverged", "interrupted", "failed")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run. Defaults are the notebook's settings."""

    bn: str = "none"
    batches: int = 800
    batch_size: int = 64
    lr: float = 0.002
    loss: str = "sigmoid"
    seed: int = 0
    validation_every: int = 100
    log_every: int = 25
    one_at_a_time: int = 100

    def __post_init__(self) -> None:
        check_choice("bn", self.bn, BN_MODES)
        check_choice("loss", self.loss, LOSSES)
        for name in ("batches", "batch_size", "validation_every", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if self.bn != "none" and self.batch_size < 2:
            raise UsageError("batch_size must be at least 2 with batch norm (statistics of one sample are undefined)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"lr must be a positive number; got {self.lr}")
        if self.one_at_a_time < 0:
            raise UsageError(f"one_at_a_time must be >= 0; got {self.one_at_a_time}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    config: TrainConfig
    status: str
    batches_done: int
    validation_accuracy: float | None = None
    test_accuracy: float | None = None
    one_at_a_time_accuracy: float | None = None
    wall_seconds: float = 0.0
    device: str = "cpu"
    fast: bool = True
    history: list[dict[str, Any]] = field(default_factory=list)  # the eval records of metrics.jsonl
    run_dir: Path | None = None
    model: nn.Module | None = None
    message: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "batches_done": self.batches_done,
            "validation_accuracy": self.validation_accuracy,
            "test_accuracy": self.test_accuracy,
            "one_at_a_time_accuracy": self.one_at_a_time_accuracy,
            "wall_seconds": round(self.wall_seconds, 3),
            "device": self.device,
            "fast": self.fast,
            "config": self.config.to_dict(),
        }


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the GPU when there is one; anything torch.device accepts otherwise."""
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


def loss_fn(kind: str, logits: Tensor, labels: Tensor) -> Tensor:
    """Mean loss of (N, classes) logits against (N,) integer labels."""
    if kind == "sigmoid":  # the notebook: mean over N x classes of sigmoid CE against one-hot
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, labels)


def evaluate(model: nn.Module, split: Split, loss: str = "sigmoid", chunk: int = 256) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split in eval mode (the model's mode is restored).

    Chunks of a few hundred images keep activations in cache: on a 2-core CPU, 256 scores the
    5,000 validation images about twice as fast as 2,500.
    """
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        total_loss = torch.zeros((), device=split.labels.device)
        correct = torch.zeros((), device=split.labels.device, dtype=torch.long)
        for start in range(0, len(split), chunk):
            images, labels = split.images[start : start + chunk], split.labels[start : start + chunk]
            logits = model(images)
            total_loss += loss_fn(loss, logits, labels) * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum()
    model.train(was_training)
    n = len(split)
    return total_loss.item() / n, correct.item() / n


def one_at_a_time_accuracy(model: nn.Module, split: Split, count: int = 100) -> float:
    """Accuracy on the first ``count`` samples, each classified alone (batch of one, eval mode)."""
    was_training = model.training
    model.eval()
    count = min(count, len(split))
    correct = 0
    with torch.inference_mode():
        for i in range(count):
            logits = model(split.images[i : i + 1])
            correct += int(logits.argmax(1).item() == split.labels[i].item())
    model.train(was_training)
    return correct / count if count else float("nan")


class _Reporter:
    """Notebook-format log lines, a progress bar on a terminal, and the metrics file."""

    def __init__(self, total: int, log: Callable[[str], None], progress: bool | None, metrics: runs.MetricsLog | None):
        self.log, self.metrics = log, metrics
        enabled = sys.stderr.isatty() if progress is None else progress
        self.bar = tqdm(total=total, unit="batch", disable=not enabled, file=sys.stderr, leave=False)

    def line(self, text: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            self.log(text)

    def record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def train(
    config: TrainConfig,
    data: MNIST | None = None,
    *,
    run_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    fast: bool = True,
) -> RunResult:
    """Train the seed network as the notebook does; write the run directory if ``run_dir`` is given.

    ``fast=False`` turns off the speed-ups (channels_last, fused Adam, bnlab's compiled BN kernels)
    for debugging; results mean the same either way and differ only by float rounding.
    Raises ``TrainingDiverged`` (after recording it) if the loss becomes NaN or infinite.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    torch.manual_seed(config.seed)  # for anything drawing from the global RNG; init and batches have their own
    data = (data if data is not None else load_mnist(data_dir)).to(device)
    model = build_model(config.bn, seed=config.seed).to(device)
    if fast:  # faster convolutions; bnlab's kernels take either layout (benchmarks/levers.py)
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_adam(model.parameters(), config.lr, fused=fast)
    batches = Batches(data.train, config.batch_size, seed=config.seed)

    run_path = Path(run_dir) if run_dir is not None else None
    result = RunResult(config, "running", 0, device=str(device), run_dir=run_path, model=model, fast=fast)
    with contextlib.nullcontext() if fast else kernels.use_kernels(False):
        _train_loop(config, data, model, optimizer, batches, result, run_path, log, progress)
    return result


def make_adam(params: Iterable[nn.Parameter], lr: float, fused: bool = True) -> torch.optim.Adam:
    """The notebook's Adam (betas 0.9/0.999, eps 1e-8); the fused implementation when it is available."""
    params = list(params)
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except RuntimeError:  # fused Adam needs a device/dtype this build supports
            pass
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _train_loop(
    config: TrainConfig,
    data: MNIST,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    result: RunResult,
    run_path: Path | None,
    log: Callable[[str], None],
    progress: bool | None,
) -> None:
    device = next(model.parameters()).device
    if run_path is not None:
        header = {"config": config.to_dict(), "hparams": model.hparams, "device": str(device), "fast": result.fast}
        runs.write_json(run_path / runs.CONFIG, header)
        runs.write_json(run_path / runs.SUMMARY, result.summary())
    reporter = _Reporter(config.batches, log, progress, runs.MetricsLog(run_path / runs.METRICS) if run_path else None)

    losses = torch.zeros(config.batches, device=device)  # every batch's loss, read at log points only
    checked = 0  # losses[:checked] are known finite and recorded

    def flush_losses(upto: int) -> None:
        nonlocal checked
        chunk = losses[checked:upto].tolist()
        for offset, value in enumerate(chunk):
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss became {value} at batch {checked + offset} (bn={config.bn}, lr={config.lr}); "
                    "the run stopped. Try a smaller --lr, or batch norm."
                )
            reporter.record({"event": "step", "batch": checked + offset, "loss": value})
        checked = upto

    def log_eval(batch: int, split_name: str, loss: float, accuracy: float, label: str) -> None:
        reporter.record(
            {
                "event": "eval",
                "batch": batch,
                "split": split_name,
                "loss": loss,
                "accuracy": accuracy,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        result.history.append({"batch": batch, "split": split_name, "loss": loss, "accuracy": accuracy})
        reporter.line(f"Batch: {batch:>2}: {label} loss: {loss:>3.5f}, {label} accuracy: {accuracy:>3.5f}")

    start = time.perf_counter()
    try:
        model.train()
        for batch in range(config.batches):
            images, labels = next(batches)
            loss = loss_fn(config.loss, model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[batch] = loss.detach()
            result.batches_done = batch + 1
            reporter.bar.update()
            if batch % config.validation_every == 0:
                flush_losses(batch + 1)
                log_eval(batch, "validation", *evaluate(model, data.validation, config.loss), "Validation")
            elif batch % config.log_every == 0:
                flush_losses(batch + 1)
                batch_split = Split(images, labels)
                log_eval(batch, "train_batch", *evaluate(model, batch_split, config.loss), "Training")
        flush_losses(config.batches)

        result.validation_accuracy = evaluate(model, data.validation, config.loss)[1]
        reporter.line(f"Final validation accuracy: {result.validation_accuracy:>3.5f}")
        result.test_accuracy = evaluate(model, data.test, config.loss)[1]
        reporter.line(f"Final test accuracy: {result.test_accuracy:>3.5f}")
        if config.one_at_a_time:
            result.one_at_a_time_accuracy = one_at_a_time_accuracy(model, data.test, config.one_at_a_time)
            reporter.line(f"Accuracy on {config.one_at_a_time} samples: {result.one_at_a_time_accuracy}")
        result.status = "completed"
    except TrainingDiverged as err:
        result.status, result.message = "diverged", str(err)
        raise
    except KeyboardInterrupt:
        result.status, result.message = "interrupted", f"interrupted after {result.batches_done} batches"
        raise
    except BaseException as err:
        result.status, result.message = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        result.wall_seconds = round(time.perf_counter() - start, 3)  # as stored, so reloads compare equal
        reporter.close()
        if run_path is not None:
            summary = result.summary()
            if result.status == "completed":
                runs.save_checkpoint(
                    run_path / runs.CHECKPOINT,
                    config=config.to_dict(),
                    hparams=model.hparams,
                    state_dict=model.state_dict(),
                    summary=summary,
                )
            runs.write_json(run_path / runs.SUMMARY, summary)


def load_run(run_dir: str | Path, expected: TrainConfig | None = None) -> RunResult | None:
    """A completed run's result from its directory, or None if it is not complete (or differs)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / runs.SUMMARY
    if not summary_path.is_file() or not (run_dir / runs.CHECKPOINT).is_file():
        return None
    summary = runs.read_json(summary_path)
    if summary.get("status") != "completed":
        return None
    config = TrainConfig(**summary["config"])
    if expected is not None and config != expected:
        return None
    history = [
        {k: r[k] for k in ("batch", "split", "loss", "accuracy")}
        for r in runs.read_metrics(run_dir / runs.METRICS)
        if r.get("event") == "eval"
    ]
    return RunResult(
        config=config,
        status="completed",
        batches_done=summary["batches_done"],
        validation_accuracy=summary["validation_accuracy"],
        test_accuracy=summary["test_accuracy"],
        one_at_a_time_accuracy=summary["one_at_a_time_accuracy"],
        wall_seconds=summary["wall_seconds"],
        device=summary["device"],
        fast=summary.get("fast", True),
        history=history,
        run_dir=run_dir,
    )


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[SeedConvNet, dict[str, Any]]:
    """Rebuild the network from a checkpoint (file or run directory); returns (model, payload)."""
    payload = runs.load_checkpoint(checkpoint)
    model = SeedConvNet(**payload["hparams"])
    model.load_state_dict(payload["state_dict"])
    device = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(device).eval(), payload
