"""Runs: one network trained with or without batch norm from one seed, and the store that keeps them.

A *run* trains one network (``RunSpec``) with or without batch norm from one seed. Runs with the
same seed start from the same initial weights (every shared layer) and see the same batches in
the same order, so a difference between the two arms of a pair is the work of batch norm alone.
``compare`` runs one such pair and returns its curves; ``RunStore`` keeps every finished run as one
small JSON file, so that running the lab again reuses it.

Moved here unchanged from the single-module lab; this training loop and store are due to be replaced
by the project's single training core.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.data import MNIST, Batches, Split, load_mnist
from bnlab.errors import UsageError
from bnlab.models import ACTIVATIONS, BN_MODES, FAMILIES, FC_INITS, SeedConvNet, build_net, check_choice
from bnlab.training import runs
from bnlab.training.loop import LOSSES, evaluate, loss_fn, make_adam, resolve_device

OPTIMIZERS = ("sgd", "adam")
CONV_INITS = ("glorot_uniform", "truncated_normal")


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run but its normalization and seed.

    ``family`` "mlp" is an ``FCNet`` (``hidden``, ``dropout``; ``init`` a scheme or a standard
    deviation); "convnet" is the notebook's ``SeedConvNet`` (``depth``). Training stops after
    ``batches`` steps or, with ``seconds``, once the training steps (evaluation not counted) have
    taken that long. Every ``eval_every`` steps, and at the start and the end, the first
    ``eval_size`` validation images are scored in eval mode (and the first ``train_eval_size``
    training images, when set); ``train_size`` trains on the first N training images only.

    ``bn_momentum`` is the BN layers' running-statistics momentum (PyTorch's convention). The lab uses
    PyTorch's default, 0.1, not the notebook's 0.01 (TensorFlow's decay 0.99): with 0.01 the running
    statistics still remember their initial values for a few hundred batches, so eval-mode accuracy
    lags the network itself and every early-convergence figure would be charged to batch norm.
    """

    family: str = "mlp"
    hidden: tuple[int, ...] = (100, 100, 100)
    depth: int = 19
    activation: str = "relu"
    init: str | float = "glorot_uniform"
    dropout: float = 0.0
    bn_momentum: float = 0.1
    optimizer: str = "sgd"
    lr: float = 0.1
    loss: str = "softmax"
    batch_size: int = 60
    batches: int = 1000
    seconds: float | None = None
    eval_every: int = 100
    eval_size: int = 5000
    train_size: int | None = None
    train_eval_size: int = 0

    def __post_init__(self) -> None:
        check_choice("family", self.family, FAMILIES)
        check_choice("activation", self.activation, list(ACTIVATIONS))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("loss", self.loss, LOSSES)
        if self.family == "convnet":
            check_choice("convnet init", str(self.init), CONV_INITS)
            if self.dropout:
                raise UsageError("dropout is only available in the mlp family")
        elif isinstance(self.init, str):
            check_choice("init", self.init, FC_INITS)
        if not 0.0 < self.bn_momentum <= 1.0:
            raise UsageError(f"bn_momentum must be in (0, 1]; got {self.bn_momentum}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a positive number; got {self.lr}")
        if self.batch_size < 2:
            raise UsageError("batch_size must be at least 2: batch norm needs two samples per feature")
        for name in ("batches", "eval_every", "eval_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if self.seconds is not None and not self.seconds > 0:
            raise UsageError(f"seconds must be positive; got {self.seconds}")
        if self.train_size is not None and self.train_size < self.batch_size:
            raise UsageError(f"train_size ({self.train_size}) must hold at least one batch ({self.batch_size})")
        if self.train_eval_size < 0:
            raise UsageError(f"train_eval_size must be >= 0; got {self.train_eval_size}")

    def model_hparams(self) -> dict[str, Any]:
        if self.family == "convnet":
            return dict(depth=self.depth, activation=self.activation, init=self.init)
        return dict(hidden=self.hidden, activation=self.activation, init=self.init, dropout=self.dropout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSpec:
        return cls(**{**d, "hidden": tuple(d["hidden"])})


@dataclass
class Run:
    """What one run leaves: its evaluation points and how long its training steps took.

    Each point holds ``batch`` (steps done), ``seconds`` (training time so far), ``val_loss`` and
    ``val_accuracy``; with ``train_eval_size`` also ``train_loss``/``train_accuracy``; for ReLU
    networks ``dead_relu``, the fraction of hidden units that output zero for every scored
    validation image. A run whose loss became NaN or infinite stops with status "diverged".
    """

    spec: RunSpec
    bn: str
    seed: int
    status: str
    batches: int
    train_seconds: float
    points: list[dict[str, float]]
    device: str = "cpu"
    threads: int = 1

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    @property
    def seconds_per_batch(self) -> float:
        return self.train_seconds / self.batches if self.batches else math.nan

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

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Run:
        return cls(**{**d, "spec": RunSpec.from_dict(d["spec"])})


def _head(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


def _hidden_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the hidden activations (in eval mode dropout passes them through)."""
    blocks = list(model.blocks)  # type: ignore[arg-type]
    return [*blocks, model.hidden] if isinstance(model, SeedConvNet) else blocks


class _UnitPeaks:
    """Each hidden unit's largest output over an evaluation pass (a unit: a dense feature or a conv
    channel); a ReLU unit whose largest output is zero is dead for that data."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = blocks
        self.peaks: list[Tensor | None] = [None] * len(blocks)

    def __enter__(self) -> _UnitPeaks:
        self.handles = [b.register_forward_hook(partial(self._record, i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _record(self, index: int, _module: nn.Module, _inputs: Any, output: Tensor) -> None:
        peak = output.amax(dim=[d for d in range(output.dim()) if d != 1])
        previous = self.peaks[index]
        self.peaks[index] = peak if previous is None else torch.maximum(previous, peak)

    def dead_fraction(self) -> float:
        peaks = [p for p in self.peaks if p is not None]
        return sum(int((p <= 0).sum()) for p in peaks) / sum(p.numel() for p in peaks)


def _measure(
    model: nn.Module, spec: RunSpec, step: int, clock: float, val: Split, train_probe: Split | None
) -> dict[str, float]:
    relu = spec.activation == "relu"
    peaks = _UnitPeaks(_hidden_blocks(model) if relu else [])
    with peaks:
        val_loss, val_accuracy = evaluate(model, val, spec.loss)
    point = {"batch": step, "seconds": round(clock, 4), "val_loss": val_loss, "val_accuracy": val_accuracy}
    if train_probe is not None:
        point["train_loss"], point["train_accuracy"] = evaluate(model, train_probe, spec.loss)
    if relu:
        point["dead_relu"] = peaks.dead_fraction()
    return point


def _optimizer(spec: RunSpec, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":  # PyTorch's default betas and eps; fused, faster on the CPU too
        return make_adam(model.parameters(), spec.lr)
    return torch.optim.SGD(model.parameters(), lr=spec.lr)


def train_run(spec: RunSpec, bn: str, seed: int, data: MNIST, device: str | torch.device = "cpu") -> Run:
    """Train one network of ``spec`` (normalization ``bn``) from ``seed``; ``data`` on ``device``.

    The seed draws the initial weights (in layer order: with and without BN they agree), the batch
    order and dropout. A NaN or infinite loss ends the run as "diverged"; it never raises.
    """
    check_choice("bn", bn, BN_MODES)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    torch.manual_seed(seed)  # dropout draws from the global generator; weights and batches have their own
    model = build_net(spec.family, bn, seed=seed, **spec.model_hparams())
    for module in model.modules():
        if hasattr(module, "reset_running_stats"):  # torch's and bnlab's BN alike
            module.momentum = spec.bn_momentum
    conv = spec.family == "convnet"
    if conv:
        model = model.to(memory_format=torch.channels_last)  # faster convolutions on the CPU
    model.to(device)
    optimizer = _optimizer(spec, model, device)
    train = data.train if spec.train_size is None else _head(data.train, spec.train_size)
    batches = Batches(train, spec.batch_size, seed)
    val = _head(data.validation, spec.eval_size)
    train_probe = _head(train, spec.train_eval_size) if spec.train_eval_size else None

    points = [_measure(model, spec, 0, 0.0, val, train_probe)]
    clock, step, status = 0.0, 0, "completed"
    model.train()
    while step < spec.batches:
        start = time.perf_counter()
        images, labels = next(batches)
        if conv:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(spec.loss, model(images), labels)
        if not torch.isfinite(loss):
            status = "diverged"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock += time.perf_counter() - start
        step += 1
        out_of_time = spec.seconds is not None and clock >= spec.seconds
        if step % spec.eval_every == 0 or step == spec.batches or out_of_time:
            point = _measure(model, spec, step, clock, val, train_probe)
            if not math.isfinite(point["val_loss"]):  # weights overflowed between two loss checks
                status = "diverged"
                break
            points.append(point)
        if out_of_time:
            break
    return Run(spec, bn, seed, status, step, clock, points, device=str(device), threads=torch.get_num_threads())


@dataclass
class Pair:
    """The two arms of one paired comparison: same initial weights, same batches, BN or not."""

    plain: Run
    bn: Run

    def curves(self, y: str = "val_accuracy", x: str = "batch") -> dict[str, list[tuple[float, float]]]:
        """{"no BN": [(x, y), ...], "BN": [...]}: e.g. validation accuracy against batch or seconds."""
        return {"no BN": self.plain.curve(y, x), "BN": self.bn.curve(y, x)}


def compare(
    spec: RunSpec | None = None,
    *,
    seed: int = 0,
    bn: str = "torch",
    data: MNIST | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
) -> Pair:
    """Train ``spec`` without and with batch norm from the same initial weights on the same batches.

    For example ``compare(RunSpec(activation="sigmoid", batches=500), seed=1).curves()["BN"]`` is the
    BN arm's [(batch, validation accuracy), ...]; ``curves(x="seconds")`` puts training time on x.
    """
    check_choice("bn", bn, BN_MODES[1:])
    torch_device = resolve_device(device)
    data = (data if data is not None else load_mnist(data_dir)).to(torch_device)
    spec = spec if spec is not None else RunSpec()
    return Pair(train_run(spec, "none", seed, data, torch_device), train_run(spec, bn, seed, data, torch_device))


# --- Storage: one small JSON file per finished run, so a re-run reuses it ------------------------

RUN_FORMAT, RUN_VERSION = "bnlab.benefits.run", 1


@dataclass(frozen=True)
class Job:
    """One run to do: a spec, a normalization ("none" or a BN mode) and a seed."""

    spec: RunSpec
    bn: str
    seed: int


def finite_or_none(obj: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


class RunStore:
    """Finished runs as ``DIR/{family}-{bn}-seed{S}-{key}.json``; the key hashes the job and the device
    type (timings from a GPU are not reused on a CPU). Each file is written atomically when its run
    ends, so an interrupted lab loses at most the run in progress; a file that cannot be read back,
    or that records another job, counts as missing and the run is done again."""

    def __init__(self, directory: str | Path, device_type: str = "cpu") -> None:
        self.directory = Path(directory)
        self.device_type = device_type

    def path(self, job: Job) -> Path:
        ident = {"spec": job.spec.to_dict(), "bn": job.bn, "seed": job.seed, "device": self.device_type}
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        return self.directory / f"{job.spec.family}-{job.bn}-seed{job.seed}-{key}.json"

    def load(self, job: Job) -> Run | None:
        try:
            record = json.loads(self.path(job).read_text())
            if record.get("format") != RUN_FORMAT or record.get("version") != RUN_VERSION:
                return None
            run = Run.from_dict(record["run"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return run if (run.spec, run.bn, run.seed) == (job.spec, job.bn, job.seed) else None

    def save(self, run: Run) -> Path:
        path = self.path(Job(run.spec, run.bn, run.seed))
        record = {"format": RUN_FORMAT, "version": RUN_VERSION, "run": finite_or_none(run.to_dict())}
        runs.atomic_write_bytes(path, (json.dumps(record, allow_nan=False) + "\n").encode())
        return path
