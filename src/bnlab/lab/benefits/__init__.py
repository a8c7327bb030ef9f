"""The benefits lab: each of the seven claims made for batch norm, put to a paired, measured test.

A *run* trains one network (``RunSpec``) with or without batch norm from one seed. Runs with the
same seed start from the same initial weights (every shared layer) and see the same batches in
the same order, so a difference between the two arms of a pair is the work of batch norm alone.
``compare`` runs one such pair and returns its curves; ``run_benefits`` runs one experiment per
claim over several seeds, stores every run as one small JSON file (reused when the lab is run
again), and writes a report with a verdict per claim, computed by the rule in ``verdict``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from bnlab import reports
from bnlab.data import MNIST, VALIDATION_SIZE, Batches, Split, load_mnist
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


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
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
        record = {"format": RUN_FORMAT, "version": RUN_VERSION, "run": _finite_or_none(run.to_dict())}
        runs.atomic_write_bytes(path, (json.dumps(record, allow_nan=False) + "\n").encode())
        return path


# --- Verdicts -------------------------------------------------------------------------------------

VERDICTS = ("supported", "not supported", "mixed")


@dataclass(frozen=True)
class Comparison:
    """One measured quantity, BN arm against a baseline arm, seed by seed (paired).

    The effect in a seed is ``bn - base`` (``kind="difference"``) or ``bn / base`` (``"ratio"``),
    turned round when lower values are better, so a positive difference or a ratio above 1 always
    favours BN. BN *wins* a seed when the effect exceeds ``margin``. The comparison **holds** when
    BN wins every seed, **fails** when it wins none, and is **inconsistent** otherwise. Comparisons
    with ``counts=False`` are reported but take no part in the verdict.
    """

    name: str
    bn: tuple[float, ...]
    base: tuple[float, ...]
    kind: str = "difference"
    higher_is_better: bool = True
    margin: float = 0.0
    baseline: str = "no BN"
    counts: bool = True

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, ("difference", "ratio"))
        if len(self.bn) != len(self.base) or not self.bn:
            raise ValueError(f"{self.name}: need one BN and one baseline value per seed")

    def effects(self) -> list[float]:
        out = []
        for bn, base in zip(self.bn, self.base, strict=True):
            better, worse = (bn, base) if self.higher_is_better else (base, bn)
            if self.kind == "difference":
                out.append(better - worse)  # inf - inf is NaN: no difference measurable
            elif worse == 0 or math.isinf(worse):
                out.append(math.inf if better > worse else 0.0 if better < worse else math.nan)
            else:
                out.append(better / worse)
        return out

    def wins(self) -> list[bool]:
        return [effect > self.margin for effect in self.effects()]  # NaN (no difference measurable) never wins

    @property
    def outcome(self) -> str:
        wins = self.wins()
        return "holds" if all(wins) else "fails" if not any(wins) else "inconsistent"

    def requirement(self) -> str:
        """The rule for one seed, in words."""
        if self.kind == "ratio":
            what = f"{self.baseline}'s / BN's" if not self.higher_is_better else f"BN's / {self.baseline}'s"
            return f"{what} > {self.margin:g}"
        sign = "BN - " + self.baseline if self.higher_is_better else self.baseline + " - BN"
        return f"{sign} > {self.margin:g}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "baseline": self.baseline,
            "bn": list(self.bn),
            "base": list(self.base),
            "effects": self.effects(),
            "wins": self.wins(),
            "requirement": self.requirement(),
            "outcome": self.outcome,
            "counts": self.counts,
        }


def verdict(comparisons: Sequence[Comparison]) -> str:
    """**supported** if every counted comparison holds; **not supported** if every one fails (or
    there is none: nothing showed a benefit); **mixed** otherwise."""
    outcomes = [c.outcome for c in comparisons if c.counts]
    if outcomes and all(o == "holds" for o in outcomes):
        return "supported"
    if all(o == "fails" for o in outcomes):
        return "not supported"
    return "mixed"


# --- Budgets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How much of each experiment to run: the designs are the same in every budget, only sizes change."""

    name: str
    seeds: int
    runtime: str  # measured (quick, smoke) or estimated (full) wall time on the 2-core CPU
    batches: int  # claims 2-5: training steps per run
    eval_every: int
    speed_batches: tuple[int, int]  # claim 1: MLP, ConvNet
    speed_eval_every: tuple[int, int]
    conv_eval_size: int  # validation images scored at each ConvNet evaluation
    sgd_lrs: tuple[float, ...]  # claim 2
    adam_lrs: tuple[float, ...]
    init_stds: tuple[float, ...]  # claim 3
    init_schemes: tuple[str, ...]
    activations: tuple[str, ...]  # claim 4
    depths: tuple[int, ...]  # claim 5
    overfit_size: int  # claim 6: training images
    overfit_batches: int
    best_lrs: tuple[float, ...]  # claim 7: Adam learning rates
    best_seconds: tuple[float, float]  # claim 7: training time per run, MLP and ConvNet
    best_eval_every: tuple[int, int]


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(
        "smoke",
        seeds=1,
        runtime="about 12 s",
        batches=20,
        eval_every=10,
        speed_batches=(40, 4),
        speed_eval_every=(10, 2),
        conv_eval_size=100,
        sgd_lrs=(0.1, 10.0),
        adam_lrs=(1e-3, 0.1),
        init_stds=(0.01, 5.0),
        init_schemes=("glorot_uniform",),
        activations=("sigmoid", "relu"),
        depths=(2, 5),
        overfit_size=300,
        overfit_batches=20,
        best_lrs=(1e-3,),
        best_seconds=(0.2, 0.3),
        best_eval_every=(10, 2),
    ),
    "quick": Budget(
        "quick",
        seeds=2,
        runtime="about 6.5 min",
        batches=1000,
        eval_every=100,
        speed_batches=(4000, 600),
        speed_eval_every=(50, 50),
        conv_eval_size=1000,
        sgd_lrs=(0.01, 0.1, 1.0, 10.0),
        adam_lrs=(1e-4, 1e-3, 1e-2, 1e-1),
        init_stds=(0.01, 0.1, 1.0, 5.0),
        init_schemes=("glorot_uniform", "he_normal"),
        activations=("sigmoid", "tanh", "relu", "leaky_relu", "elu", "swish"),
        depths=(2, 5, 10, 20, 50),
        overfit_size=2000,
        overfit_batches=1000,
        best_lrs=(1e-4, 1e-3, 1e-2),
        best_seconds=(3.0, 6.0),
        best_eval_every=(500, 50),
    ),
    "full": Budget(
        "full",
        seeds=5,
        runtime="about 2 h 40 min, measured",
        batches=5000,
        eval_every=250,
        speed_batches=(20000, 3000),
        speed_eval_every=(100, 100),
        conv_eval_size=5000,
        sgd_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
        adam_lrs=(3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
        init_stds=(0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 5.0),
        init_schemes=FC_INITS,
        activations=("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "swish"),
        depths=(2, 3, 5, 10, 20, 30, 50),
        overfit_size=2000,
        overfit_batches=5000,
        best_lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        best_seconds=(20.0, 40.0),
        best_eval_every=(1000, 200),
    ),
}


# --- The seven experiments ------------------------------------------------------------------------

CLAIMS: dict[int, tuple[str, str]] = {
    1: (
        "Networks train faster",
        "Networks train faster (each iteration is slower, but convergence comes much sooner).",
    ),
    2: ("Higher learning rates", "Higher learning rates become usable."),
    3: ("Easier initialisation", "Weights are easier to initialise."),
    4: (
        "More activation functions",
        "More activation functions become viable (sigmoids in deep nets; ReLUs die less).",
    ),
    5: ("Deeper networks", "Deeper networks become practical."),
    6: ("Regularisation", "It regularises a little (sometimes as well as dropout)."),
    7: ("Better results", "It may give better results overall."),
}

# The batch-norm paper's MNIST network (Ioffe & Szegedy, 2015, section 4.1): 784-100-100-100-10,
# batches of 60, softmax cross-entropy. Two recipes for it: plain SGD at 0.1 and Adam at 1e-3, common
# defaults fixed before any run and shared by both arms.
PAPER_MLP = RunSpec(family="mlp", hidden=(100, 100, 100), activation="relu", batch_size=60, loss="softmax")
RECIPES: dict[str, dict[str, Any]] = {"SGD": dict(optimizer="sgd", lr=0.1), "Adam": dict(optimizer="adam", lr=1e-3)}
# The notebook's network and procedure: 19 conv layers + dense 100, Adam 0.002, batches of 64,
# sigmoid cross-entropy. Glorot-uniform kernels in both arms (the notebook's tf.layers choice).
NOTEBOOK_CONVNET = RunSpec(
    family="convnet", depth=19, init="glorot_uniform", optimizer="adam", lr=0.002, loss="sigmoid", batch_size=64
)
DEEP_MLP = (100,) * 10  # claim 4: deep enough for sigmoids to stall without BN
WIDE_MLP = (512, 512)  # claim 6: wide enough to overfit, and for dropout to have units to spare
DROPOUT = 0.5  # on the hidden units, as Srivastava et al. (2014)

USABLE_ACCURACY = 0.90  # a run is usable when it does not diverge and ends at or above this
ACCURACY_MARGIN = 0.002  # 0.2 points: 10 of the 5,000 validation images
DEAD_MARGIN = 0.01  # one point of the hidden units
SPEEDUP_MARGIN = 1.1  # BN must get there in less than 1/1.1 of the time
THRESHOLDS = (0.90, 0.95, 0.97)

Lookup = Callable[[RunSpec, str], list[Run]]  # (spec, "none" or the BN mode) -> one run per seed


@dataclass
class ClaimResult:
    """One claim's evidence: what was run, the figures and tables, the comparisons and the verdict."""

    number: int
    setup: str
    rule: str
    comparisons: list[Comparison]
    headline: str
    tables: list[tuple[str, reports.Table]] = field(default_factory=list)  # (caption, table)
    figures: list[reports.Image] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return CLAIMS[self.number][0]

    @property
    def claim(self) -> str:
        return CLAIMS[self.number][1]

    @property
    def verdict(self) -> str:
        return verdict(self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "claim": self.number,
            "title": self.title,
            "text": self.claim,
            "verdict": self.verdict,
            "headline": self.headline,
            "setup": self.setup,
            "rule": self.rule,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "tables": [
                {"caption": caption, "headers": list(t.headers), "rows": [list(r) for r in t.rows]}
                for caption, t in self.tables
            ],
            "figures": [image.name for image in self.figures],
            "notes": self.notes,
        }


@dataclass
class Experiment:
    number: int
    jobs: list[Job]
    analyse: Callable[[Lookup, Path], ClaimResult]  # (runs, output folder for figures) -> result


@dataclass(frozen=True)
class _Lab:
    budget: Budget
    seeds: tuple[int, ...]
    bn: str

    def jobs(self, specs: Sequence[RunSpec]) -> list[Job]:
        return [Job(spec, arm, seed) for spec in specs for arm in ("none", self.bn) for seed in self.seeds]


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def _fmt(values: Sequence[float | None], digits: int = 4, missing: str = "diverged") -> str:
    """Mean (min-max) over seeds of the values there are; says in how many seeds there is none."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return missing
    text = reports.spread(_stats(present), digits)
    absent = len(values) - len(present)
    return f"{text}; {missing} in {absent}/{len(values)}" if absent else text


def _mean(values: Sequence[float | None], digits: int = 4) -> str:
    """The mean over seeds, for headlines (tables give the spread)."""
    present = [v for v in values if v is not None]
    return f"{statistics.fmean(present):.{digits}f}" if present else "diverged"


def _zoom(values: Sequence[float | None]) -> tuple[float, float]:
    """A y range framing these accuracies, so that differences of a point or two show."""
    present = [v for v in values if v is not None]
    return max(0.0, min(present) - 0.03), min(1.0, max(present) + 0.01)


def _span(values: Sequence[float], none: str = "none") -> str:
    """'0.1' when every seed agrees, '0.1-1' when they do not; 0 reads as ``none``."""

    def text(v: float) -> str:
        return none if v == 0 else f"{v:g}"

    low, high = min(values), max(values)
    return text(low) if low == high else f"{text(low)}-{text(high)}"


def _num(value: float | None) -> float:
    return math.nan if value is None else value


def _usable(run: Run) -> bool:
    final = run.final()
    return final is not None and final >= USABLE_ACCURACY


def _arms(lab: _Lab, get: Lookup, spec: RunSpec) -> dict[str, list[Run]]:
    return {"no BN": get(spec, "none"), "BN": get(spec, lab.bn)}


def _curve_panel(
    title: str, runs_by_label: Mapping[str, list[Run]], *, x: str = "batch", y: str = "val_accuracy", **kwargs: Any
) -> reports.Panel:
    xlabel = {"batch": "batch", "seconds": "training seconds"}[x]
    ylabel = {"val_accuracy": "validation accuracy", "dead_relu": "fraction of dead ReLU units"}[y]
    series = {label: [r.curve(y, x) for r in rs] for label, rs in runs_by_label.items()}
    return reports.Panel(title, xlabel, ylabel, series, per_run=x == "seconds", **kwargs)


def _sweep_panel(
    title: str, xlabel: str, xs: Sequence[float], runs_at: Mapping[str, list[list[Run]]], **kwargs: Any
) -> reports.Panel:
    """Final validation accuracy against a swept value (one curve per seed); diverged runs are crosses at 0."""
    series, marks = {}, {}
    for label, per_x in runs_at.items():
        seeds = range(len(per_x[0]))
        series[label] = [
            [(x, rs[i].final()) for x, rs in zip(xs, per_x, strict=True) if not rs[i].diverged] for i in seeds
        ]
        marks[label] = [(x, 0.0) for x, rs in zip(xs, per_x, strict=True) for r in rs if r.diverged]
    return reports.Panel(
        title,
        xlabel,
        "final validation accuracy",
        series,
        marks=marks,
        hlines=(USABLE_ACCURACY,),
        ylim=(0, 1.02),
        xticks=() if kwargs.get("categories") else xs,
        **kwargs,
    )


def _figure(out: Path, name: str, caption: str, panels: Sequence[reports.Panel], ncols: int = 2) -> reports.Image:
    reports.plot_panels(out / name, panels, ncols=ncols)
    return reports.Image(name, caption)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> reports.Table:
    return reports.Table(tuple(headers), tuple(tuple(r) for r in rows))


SWEEP_KEY = (
    f"Mean over seeds with min-max band (or bars); crosses at 0 mark diverged runs; the dotted line is the "
    f"{USABLE_ACCURACY:.0%} usable threshold."
)
USABLE_RULE = (
    f"A run is *usable* when it did not diverge and ends with at least {USABLE_ACCURACY:.0%} validation accuracy."
)


def _reach(run: Run, threshold: float, key: str) -> float:
    point = run.first_reaching(threshold)
    return point[key] if point is not None else math.inf


def _conv_images(b: Budget) -> str:
    """Which validation images a ConvNet evaluation scores under budget b."""
    if b.conv_eval_size >= VALIDATION_SIZE:
        return f"all {VALIDATION_SIZE:,} validation images"
    return f"the first {b.conv_eval_size:,} validation images"


def _seconds_text(values: Sequence[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "never"
    text = f"{statistics.fmean(finite):.1f} s"
    return text if len(finite) == len(values) else f"{text} (never in {len(values) - len(finite)}/{len(values)} seeds)"


def _claim1(lab: _Lab) -> Experiment:
    b = lab.budget
    setups = {
        "MLP": replace(
            PAPER_MLP,
            activation="sigmoid",
            **RECIPES["SGD"],
            batches=b.speed_batches[0],
            eval_every=b.speed_eval_every[0],
        ),
        "ConvNet": replace(
            NOTEBOOK_CONVNET, batches=b.speed_batches[1], eval_every=b.speed_eval_every[1], eval_size=b.conv_eval_size
        ),
    }

    def analyse(get: Lookup, out: Path) -> ClaimResult:
        comparisons, rows, cost_rows, panels, heads = [], [], [], [], []
        for name, spec in setups.items():
            arms = _arms(lab, get, spec)
            plain, bn = arms["no BN"], arms["BN"]
            for threshold in THRESHOLDS:
                steps = [[_reach(r, threshold, "batch") for r in rs] for rs in (plain, bn)]
                secs = [[_reach(r, threshold, "seconds") for r in rs] for rs in (plain, bn)]
                rows.append(
                    (
                        name,
                        f"{threshold:.0%}",
                        *(_fmt(v, 0, "never") for v in steps),
                        *(_fmt(v, 2, "never") for v in secs),
                    )
                )
                reached = [math.isfinite(a) or math.isfinite(b) for a, b in zip(*secs, strict=True)]
                if any(reached):
                    comparisons.append(
                        Comparison(
                            f"{name}: training seconds to {threshold:.0%} validation accuracy",
                            bn=tuple(secs[1]),
                            base=tuple(secs[0]),
                            kind="ratio",
                            higher_is_better=False,
                            margin=SPEEDUP_MARGIN,
                            counts=all(reached),  # a seed where neither arm got there says nothing about speed
                        )
                    )
            cost = [[r.seconds_per_batch * 1000 for r in rs] for rs in (plain, bn)]
            ratios = [with_bn / without for without, with_bn in zip(*cost, strict=True)]
            cost_rows.append((name, _fmt(cost[0], 2), _fmt(cost[1], 2), _fmt(ratios, 2)))
            hlines = {"hlines": THRESHOLDS, "ylim": (0, 1.02)}
            panels += [
                _curve_panel(f"{name}: validation accuracy by batch", arms, **hlines),
                _curve_panel(f"{name}: validation accuracy by training time", arms, x="seconds", **hlines),
            ]
            heads.append(_speed_headline(name, plain, bn, statistics.median(ratios)))
        return ClaimResult(
            1,
            setup=(
                f"Two setups, each trained without and with BN from the same initial weights on the same batches. "
                f"**MLP**: the paper's MLP with its sigmoid units, plain SGD at 0.1, "
                f"{b.speed_batches[0]} batches of 60, scored on the 5,000 validation images every "
                f"{b.speed_eval_every[0]} batches. **ConvNet**: the notebook's network and procedure (19 conv "
                f"layers, Adam 0.002, batches of 64, sigmoid cross-entropy), {b.speed_batches[1]} batches, scored "
                f"on {_conv_images(b)} every {b.speed_eval_every[1]} batches. Time is "
                "training time only (evaluation excluded)."
            ),
            rule=(
                "For each setup and each accuracy threshold: BN wins a seed when the time without BN divided by "
                f"the time with BN exceeds {SPEEDUP_MARGIN:g}, i.e. BN gets there at least 10% sooner in wall-clock "
                "training time (never reaching counts as infinitely late). A threshold is judged only when, in "
                "every seed, at least one arm reached it within the budget; one that neither arm reached in some "
                "seed is reported, not judged, since that seed says nothing about speed. The slower iteration is "
                "part of the claim, so it is reported, not judged."
            ),
            comparisons=comparisons,
            headline="; ".join(heads),
            tables=[
                (
                    "Batches and training seconds to reach each validation accuracy (mean, min-max over seeds)",
                    _table(
                        ["setup", "accuracy", "batches, no BN", "batches, BN", "seconds, no BN", "seconds, BN"], rows
                    ),
                ),
                (
                    "Cost of one training iteration",
                    _table(["setup", "ms/batch, no BN", "ms/batch, BN", "BN / no BN"], cost_rows),
                ),
            ],
            figures=[
                _figure(
                    out,
                    "claim1_speed.png",
                    "Validation accuracy by batch (mean and min-max band over seeds) and by training time (one line "
                    "per seed); dotted lines at 90, 95 and 97%.",
                    panels,
                )
            ],
        )

    return Experiment(1, lab.jobs(list(setups.values())), analyse)


def _speed_headline(name: str, plain: list[Run], bn: list[Run], cost_ratio: float) -> str:
    cost = f"a BN iteration costs {cost_ratio:.2f}x, median over seeds"
    for threshold in reversed(THRESHOLDS):
        bn_seconds = [_reach(r, threshold, "seconds") for r in bn]
        if all(math.isfinite(s) for s in bn_seconds):
            plain_text = _seconds_text([_reach(r, threshold, "seconds") for r in plain])
            return f"{name}: {threshold:.0%} after {_seconds_text(bn_seconds)} with BN vs {plain_text} without ({cost})"
    return f"{name}: BN did not reach {THRESHOLDS[0]:.0%} in every seed ({cost})"


def _claim2(lab: _Lab) -> Experiment:
    b = lab.budget
    grids = {"SGD": ("sgd", b.sgd_lrs), "Adam": ("adam", b.adam_lrs)}
    specs = {
        (opt, lr): replace(PAPER_MLP, optimizer=name, lr=lr, batches=b.batches, eval_every=b.eval_every)
        for opt, (name, lrs) in grids.items()
        for lr in lrs
    }

    def analyse(get: Lookup, out: Path) -> ClaimResult:
        comparisons, rows, panels, heads = [], [], [], []
        for opt, (_, lrs) in grids.items():
            at = {label: [_arms(lab, get, specs[opt, lr])[label] for lr in lrs] for label in ("no BN", "BN")}
            largest = {label: _largest_usable(lrs, per_lr, len(lab.seeds)) for label, per_lr in at.items()}
            comparisons.append(
                Comparison(
                    f"largest usable learning rate, {opt}",
                    bn=tuple(largest["BN"]),
                    base=tuple(largest["no BN"]),
                    kind="ratio",
                    margin=1.0,
                )
            )
            heads.append(f"{opt} {_span(largest['BN'])} with BN vs {_span(largest['no BN'])} without")
            rows += [
                (opt, f"{lr:g}", _fmt([r.final() for r in plain]), _fmt([r.final() for r in bn]))
                for lr, plain, bn in zip(lrs, at["no BN"], at["BN"], strict=True)
            ]
            panels.append(_sweep_panel(f"{opt}: final accuracy by learning rate", "learning rate", lrs, at, logx=True))
        return ClaimResult(
            2,
            setup=(
                f"The batch-norm paper's MNIST MLP (784-100-100-100-10, ReLU, Glorot-uniform weights, batches of "
                f"60, softmax cross-entropy), {b.batches} batches per run, over a learning-rate sweep: SGD at "
                f"{', '.join(f'{lr:g}' for lr in b.sgd_lrs)}; Adam at {', '.join(f'{lr:g}' for lr in b.adam_lrs)}. "
                f"{USABLE_RULE} A run whose loss becomes NaN or infinite is marked diverged."
            ),
            rule=(
                "For each optimizer: BN wins a seed when its largest usable learning rate is larger than the largest "
                "usable one without BN (ratio > 1; no usable rate counts as 0)."
            ),
            comparisons=comparisons,
            headline="largest usable learning rate: " + "; ".join(heads),
            tables=[
                (
                    "Final validation accuracy by learning rate",
                    _table(["optimizer", "learning rate", "no BN", "BN"], rows),
                )
            ],
            figures=[
                _figure(
                    out, "claim2_learning_rates.png", f"Final validation accuracy by learning rate. {SWEEP_KEY}", panels
                )
            ],
        )

    return Experiment(2, lab.jobs(list(specs.values())), analyse)


def _init_label(init: str | float) -> str:
    return init if isinstance(init, str) else f"std {init:g}"


def _grid_experiment(
    lab: _Lab, specs: Mapping[tuple[str, Any], RunSpec], values: Sequence[Any]
) -> Callable[[Lookup], dict[str, dict[str, list[list[Run]]]]]:
    """runs[optimizer][arm label][i][seed] for the i-th of ``values``, each under both recipes."""

    def collect(get: Lookup) -> dict[str, dict[str, list[list[Run]]]]:
        return {
            opt: {label: [_arms(lab, get, specs[opt, v])[label] for v in values] for label in ("no BN", "BN")}
            for opt in RECIPES
        }

    return collect


def _count_usable(per_value: list[list[Run]], seeds: int) -> list[float]:
    return [float(sum(_usable(rs[i]) for rs in per_value)) for i in range(seeds)]


def _largest_usable(values: Sequence[float], per_value: list[list[Run]], seeds: int) -> list[float]:
    """Per seed, the largest of ``values`` whose run is usable (0 when none is)."""
    return [
        float(max((v for v, rs in zip(values, per_value, strict=True) if _usable(rs[i])), default=0))
        for i in range(seeds)
    ]


def _recipe_rows(labels: Sequence[str], runs: dict[str, dict[str, list[list[Run]]]]) -> list[tuple[str, ...]]:
    return [
        (label, *(_fmt([r.final() for r in runs[opt][arm][i]]) for opt in RECIPES for arm in ("no BN", "BN")))
        for i, label in enumerate(labels)
    ]


RECIPE_HEADERS = tuple(f"{opt}, {arm}" for opt in RECIPES for arm in ("no BN", "BN"))
RECIPES_TEXT = "plain SGD at 0.1 and Adam at 1e-3"


def _claim3(lab: _Lab) -> Experiment:
    b = lab.budget
    inits: list[str | float] = [*b.init_stds, *b.init_schemes]
    specs = {
        (opt, init): replace(PAPER_MLP, init=init, **recipe, batches=b.batches, eval_every=b.eval_every)
        for opt, recipe in RECIPES.items()
        for init in inits
    }
    collect = _grid_experiment(lab, specs, inits)

    def analyse(get: Lookup, out: Path) -> ClaimResult:
        runs_, n = collect(get), len(lab.seeds)
        comparisons, heads, panels = [], [], []
        labels = [_init_label(i) for i in inits]
        for opt, at in runs_.items():
            counts = {label: _count_usable(per_init, n) for label, per_init in at.items()}
            comparisons.append(
                Comparison(
                    f"usable initialisations (of {len(inits)}), {opt}",
                    bn=tuple(counts["BN"]),
                    base=tuple(counts["no BN"]),
                )
            )
            heads.append(
                f"{opt} {_span(counts['BN'], '0')} of {len(inits)} with BN vs {_span(counts['no BN'], '0')} without"
            )
            panels.append(
                _sweep_panel(
                    f"{opt}: final accuracy by initialisation",
                    "initial weights",
                    range(len(inits)),
                    at,
                    categories=labels,
                )
            )
        return ClaimResult(
            3,
            setup=(
                f"The paper's MLP (ReLU) with every Linear layer drawn from a normal of standard deviation "
                f"{', '.join(f'{s:g}' for s in b.init_stds)}, or by the schemes {', '.join(b.init_schemes)}; "
                f"{RECIPES_TEXT}, {b.batches} batches per run. {USABLE_RULE}"
            ),
            rule=(
                "For each optimizer: BN wins a seed when more initialisations are usable with BN than without "
                "(difference > 0)."
            ),
            comparisons=comparisons,
            headline="usable initialisations: " + "; ".join(heads),
            tables=[
                (
                    "Final validation accuracy by initialisation",
                    _table(["init", *RECIPE_HEADERS], _recipe_rows(labels, runs_)),
                )
            ],
            figures=[
                _figure(
                    out,
                    "claim3_initialisation.png",
                    f"Final validation accuracy by initial weights. {SWEEP_KEY}",
                    panels,
                )
            ],
        )

    return Experiment(3, lab.jobs(list(specs.values())), analyse)


def _claim4(lab: _Lab) -> Experiment:
    b = lab.budget
    acts = b.activations
    specs = {
        (opt, act): replace(
            PAPER_MLP, hidden=DEEP_MLP, activation=act, **recipe, batches=b.batches, eval_every=b.eval_every
        )
        for opt, recipe in RECIPES.items()
        for act in acts
    }
    collect = _grid_experiment(lab, specs, acts)

    def analyse(get: Lookup, out: Path) -> ClaimResult:
        runs_, n = collect(get), len(lab.seeds)
        comparisons, viable_heads, dead_heads, acc_panels, dead_panels, dead_rows = [], [], [], [], [], []
        for opt, at in runs_.items():
            counts = {label: _count_usable(per_act, n) for label, per_act in at.items()}
            comparisons.append(
                Comparison(
                    f"viable activation functions (of {len(acts)}), {opt}",
                    bn=tuple(counts["BN"]),
                    base=tuple(counts["no BN"]),
                )
            )
            viable_heads.append(
                f"{opt} {_span(counts['BN'], '0')} of {len(acts)} with BN vs {_span(counts['no BN'], '0')} without"
            )
            acc_panels.append(
                _sweep_panel(
                    f"{opt}: final accuracy by activation", "activation", range(len(acts)), at, categories=acts
                )
            )
            relu = {label: per_act[acts.index("relu")] for label, per_act in at.items()}
            dead = {label: [r.points[-1]["dead_relu"] for r in rs] for label, rs in relu.items()}
            comparisons.append(
                Comparison(
                    f"dead ReLU units at the end, {opt}",
                    bn=tuple(dead["BN"]),
                    base=tuple(dead["no BN"]),
                    higher_is_better=False,
                    margin=DEAD_MARGIN,
                )
            )
            dead_rows.append((opt, _fmt(dead["no BN"], 3), _fmt(dead["BN"], 3)))
            dead_heads.append(f"{opt} {_mean(dead['BN'], 3)} with BN vs {_mean(dead['no BN'], 3)}")
            dead_panels.append(_curve_panel(f"{opt}: dead ReLU units", relu, y="dead_relu"))
        tables = [
            (
                "Final validation accuracy by activation",
                _table(["activation", *RECIPE_HEADERS], _recipe_rows(acts, runs_)),
            ),
            ("Fraction of dead ReLU units at the end (ReLU network)", _table(["optimizer", "no BN", "BN"], dead_rows)),
        ]
        figures = [
            _figure(out, "claim4_activations.png", f"Final validation accuracy by activation. {SWEEP_KEY}", acc_panels),
            _figure(
                out,
                "claim4_dead_relus.png",
                "Fraction of the ReLU network's hidden units that are dead (zero on every scored validation image, "
                "eval mode) during training; mean and min-max band over seeds.",
                dead_panels,
            ),
        ]
        headline = f"viable activations: {'; '.join(viable_heads)}; dead ReLUs at the end: {'; '.join(dead_heads)}"
        return ClaimResult(
            4,
            setup=(
                f"A deep MLP ({len(DEEP_MLP)} hidden layers of {DEEP_MLP[0]}, Glorot-uniform weights, batches of 60) "
                f"with each of {', '.join(acts)}; {RECIPES_TEXT}, {b.batches} batches per run. {USABLE_RULE} "
                "A ReLU unit is *dead* when it outputs zero for every scored validation image (eval mode)."
            ),
            rule=(
                "For each optimizer: BN wins a seed when more activations are viable (usable) with BN than without "
                f"(difference > 0), and, for the ReLU network, when the fraction of dead units at the end is lower "
                f"with BN by more than {DEAD_MARGIN:g}."
            ),
            comparisons=comparisons,
            headline=headline,
            tables=tables,
            figures=figures,
        )

    return Experiment(4, lab.jobs(list(specs.values())), analyse)


def _claim5(lab: _Lab) -> Experiment:
    b = lab.budget
    depths = b.depths
    specs = {
        (opt, d): replace(PAPER_MLP, hidden=(100,) * d, **recipe, batches=b.batches, eval_every=b.eval_every)
        for opt, recipe in RECIPES.items()
        for d in depths
    }
    collect = _grid_experiment(lab, specs, depths)

    def analyse(get: Lookup, out: Path) -> ClaimResult:
        runs_, n = collect(get), len(lab.seeds)
        comparisons, heads, panels = [], [], []
        for opt, at in runs_.items():
            deepest = {label: _largest_usable(depths, per_d, n) for label, per_d in at.items()}
            comparisons.append(
                Comparison(
                    f"deepest usable network (hidden layers), {opt}",
                    bn=tuple(deepest["BN"]),
                    base=tuple(deepest["no BN"]),
                    kind="ratio",
                    margin=1.0,
                )
            )
            heads.append(f"{opt} {_span(deepest['BN'])} with BN vs {_span(deepest['no BN'])} without")
            panels.append(_sweep_panel(f"{opt}: final accuracy by depth", "hidden layers", depths, at, logx=True))
        labels = [str(d) for d in depths]
        return ClaimResult(
            5,
            setup=(
                f"MLPs of {', '.join(labels)} hidden layers of 100 ReLU units (Glorot-uniform weights, batches of "
                f"60); {RECIPES_TEXT}, {b.batches} batches per run. {USABLE_RULE}"
            ),
            rule=(
                "For each optimizer: BN wins a seed when the deepest usable network with BN is deeper than the "
                "deepest usable one without (ratio > 1; none usable counts as 0)."
            ),
            comparisons=comparisons,
            headline="deepest usable MLP (hidden layers): " + "; ".join(heads),
            tables=[
                (
                    "Final validation accuracy by depth (hidden layers)",
                    _table(["depth", *RECIPE_HEADERS], _recipe_rows(labels, runs_)),
                )
            ],
            figures=[_figure(out, "claim5_depth.png", f"Final validation accuracy by depth. {SWEEP_KEY}", panels)],
        )

    return Experiment(5, lab.jobs(list(specs.values())), analyse)


def _gap(run: Run) -> float | None:
    return None if run.diverged else run.points[-1]["train_accuracy"] - run.points[-1]["val_accuracy"]


def _claim6(lab: _Lab) -> Experiment:
    b = lab.budget
    base = replace(
        PAPER_MLP,
        hidden=WIDE_MLP,
        batches=b.overfit_batches,
        eval_every=max(1, b.overfit_batches // 10),
        train_size=b.overfit_size,
        train_eval_size=b.overfit_size,
    )
    specs = {(opt, p): replace(base, **recipe, dropout=p) for opt, recipe in RECIPES.items() for p in (0.0, DROPOUT)}

    def analyse(get: Lookup, out: Path) -> ClaimResult:
        comparisons, rows, panels, heads = [], [], [], []
        for opt in RECIPES:
            nets = {
                "neither": get(specs[opt, 0.0], "none"),
                "BN": get(specs[opt, 0.0], lab.bn),
                "dropout": get(specs[opt, DROPOUT], "none"),
                "BN + dropout": get(specs[opt, DROPOUT], lab.bn),
            }
            gaps = {name: [_gap(r) for r in rs] for name, rs in nets.items()}
            val = {name: [r.final() for r in rs] for name, rs in nets.items()}
            rows += [
                (opt, name, _fmt([r.final("train_accuracy") for r in rs]), _fmt(val[name]), _fmt(gaps[name]))
                for name, rs in nets.items()
            ]
            comparisons += [
                Comparison(
                    f"train-validation accuracy gap, {opt}",
                    bn=tuple(map(_num, gaps["BN"])),
                    base=tuple(map(_num, gaps["neither"])),
                    higher_is_better=False,
                    margin=ACCURACY_MARGIN,
                ),
                Comparison(
                    f"final validation accuracy, {opt}",
                    bn=tuple(map(_num, val["BN"])),
                    base=tuple(map(_num, val["neither"])),
                    margin=ACCURACY_MARGIN,
                ),
                Comparison(
                    f"final validation accuracy against dropout, {opt}",
                    bn=tuple(map(_num, val["BN"])),
                    base=tuple(map(_num, val["dropout"])),
                    margin=-ACCURACY_MARGIN,
                    baseline="dropout",
                    counts=False,
                ),
            ]
            heads.append(
                f"{opt} gap {_mean(gaps['BN'], 3)} with BN vs {_mean(gaps['neither'], 3)} without "
                f"({_mean(gaps['dropout'], 3)} with dropout)"
            )
            gap_curves = {
                name: [[(p["batch"], p["train_accuracy"] - p["val_accuracy"]) for p in r.points] for r in rs]
                for name, rs in nets.items()
            }
            panels += [
                reports.Panel(f"{opt}: train - validation accuracy", "batch", "accuracy gap", gap_curves),
                _curve_panel(f"{opt}: validation accuracy", nets, ylim=_zoom([v for vs in val.values() for v in vs])),
            ]
        return ClaimResult(
            6,
            setup=(
                f"A wide MLP ({len(WIDE_MLP)} hidden layers of {WIDE_MLP[0]} ReLU units, batches of 60) trained on "
                f"only the first {b.overfit_size} training images for {b.overfit_batches} batches, so that it "
                f"overfits: without BN or dropout, with BN, with dropout ({DROPOUT:g} on the hidden units), with "
                f"both; {RECIPES_TEXT}. The gap is training accuracy (on those {b.overfit_size} images) minus "
                "validation accuracy, both in eval mode, at the end."
            ),
            rule=(
                "For each optimizer, BN against the network with neither: BN wins a seed when its gap is smaller by "
                f"more than {ACCURACY_MARGIN:g} and, separately, when its validation accuracy is higher by more than "
                f"{ACCURACY_MARGIN:g}. 'As well as dropout' (BN's validation accuracy no more than {ACCURACY_MARGIN:g} "
                "below dropout's) is reported but not judged: one setup cannot refute 'sometimes'."
            ),
            comparisons=comparisons,
            headline="; ".join(heads),
            tables=[
                (
                    "Final accuracies and their gap",
                    _table(["optimizer", "network", "train accuracy", "validation accuracy", "gap"], rows),
                )
            ],
            figures=[
                _figure(
                    out,
                    "claim6_regularisation.png",
                    "Left: training minus validation accuracy; right: validation accuracy (mean and min-max band "
                    "over seeds).",
                    panels,
                )
            ],
        )

    return Experiment(6, lab.jobs(list(specs.values())), analyse)


def _claim7(lab: _Lab) -> Experiment:
    b = lab.budget
    models = {
        "MLP": replace(PAPER_MLP, eval_every=b.best_eval_every[0], seconds=b.best_seconds[0]),
        "ConvNet": replace(
            NOTEBOOK_CONVNET, eval_every=b.best_eval_every[1], seconds=b.best_seconds[1], eval_size=b.conv_eval_size
        ),
    }
    specs = {
        (name, lr): replace(spec, optimizer="adam", lr=lr, batches=10**9)  # the clock stops these runs
        for name, spec in models.items()
        for lr in b.best_lrs
    }

    def analyse(get: Lookup, out: Path) -> ClaimResult:
        comparisons, rows, choice_rows, panels, heads = [], [], [], [], []
        for name, spec in models.items():
            at = {label: [_arms(lab, get, specs[name, lr])[label] for lr in b.best_lrs] for label in ("no BN", "BN")}
            chosen = {  # per seed, the run at the learning rate that did best
                label: [max((rs[i] for rs in per_lr), key=Run.best) for i in range(len(lab.seeds))]
                for label, per_lr in at.items()
            }
            best = {label: [r.best() for r in rs] for label, rs in chosen.items()}
            comparisons.append(
                Comparison(
                    f"{name}: best validation accuracy in {spec.seconds:g} s of training",
                    bn=tuple(best["BN"]),
                    base=tuple(best["no BN"]),
                    margin=ACCURACY_MARGIN,
                )
            )
            heads.append(f"{name} {_mean(best['BN'])} with BN vs {_mean(best['no BN'])} without")
            rows += [
                (name, f"{lr:g}", _fmt([r.best() for r in plain]), _fmt([r.best() for r in bn]))
                for lr, plain, bn in zip(b.best_lrs, at["no BN"], at["BN"], strict=True)
            ]
            choice_rows += [
                (
                    name,
                    label,
                    _span([r.spec.lr for r in rs]),
                    _fmt(best[label]),
                    _fmt([float(r.batches) for r in rs], 0),
                    _fmt([r.seconds_per_batch * 1000 for r in rs], 2),
                )
                for label, rs in chosen.items()
            ]
            panels.append(
                _curve_panel(
                    f"{name}: at each arm's best learning rate",
                    chosen,
                    x="seconds",
                    ylim=_zoom(best["BN"] + best["no BN"]),
                )
            )
        return ClaimResult(
            7,
            setup=(
                f"Two networks under the same training-time budget per run: the paper's MLP (ReLU, batches of 60, "
                f"softmax cross-entropy) for {b.best_seconds[0]:g} s and the notebook's ConvNet (batches of 64, "
                f"sigmoid cross-entropy; scored on {_conv_images(b)}) for {b.best_seconds[1]:g} s, "
                f"both with Adam at each of {', '.join(f'{lr:g}' for lr in b.best_lrs)}. Each arm keeps, per seed, "
                "its own best learning rate; its score is the best validation accuracy it reached within the budget."
            ),
            rule=(
                "For each network: BN wins a seed when its best validation accuracy beats the best without BN by "
                f"more than {ACCURACY_MARGIN:g}."
            ),
            comparisons=comparisons,
            headline="best validation accuracy: " + "; ".join(heads),
            tables=[
                (
                    "Best validation accuracy within the budget, by learning rate",
                    _table(["network", "learning rate", "no BN", "BN"], rows),
                ),
                (
                    "Each arm at its own best learning rate",
                    _table(
                        ["network", "arm", "best lr", "best validation accuracy", "batches in budget", "ms/batch"],
                        choice_rows,
                    ),
                ),
            ],
            figures=[
                _figure(
                    out,
                    "claim7_best.png",
                    "Validation accuracy by training time, each arm at its own best learning rate (one line per seed).",
                    panels,
                )
            ],
            notes=[
                "The learning rate is chosen on the same validation images the accuracy is reported on, which "
                "flatters both arms alike. A time budget makes the number of batches depend on the machine and its "
                "load, so these runs are not repeatable bit for bit."
            ],
        )

    return Experiment(7, lab.jobs(list(specs.values())), analyse)


EXPERIMENTS: dict[int, Callable[[_Lab], Experiment]] = {
    1: _claim1,
    2: _claim2,
    3: _claim3,
    4: _claim4,
    5: _claim5,
    6: _claim6,
    7: _claim7,
}


# --- Running the lab ------------------------------------------------------------------------------


@dataclass
class BenefitsResult:
    claims: list[ClaimResult]
    out_dir: Path
    budget: Budget
    seeds: tuple[int, ...]
    bn: str
    device: str
    runs: dict[Job, Run]
    trained: int
    wall_seconds: float

    def threads(self) -> list[int]:
        """The thread counts the runs were trained with (reused runs keep theirs)."""
        return sorted({run.threads for run in self.runs.values()})

    def to_dict(self) -> dict[str, Any]:
        store = RunStore(self.out_dir / "runs", torch.device(self.device).type)
        return {
            "budget": self.budget.name,
            "seeds": list(self.seeds),
            "bn": self.bn,
            "device": self.device,
            "threads": self.threads(),
            "runs_trained": self.trained,
            "runs_reused": len(self.runs) - self.trained,
            "wall_seconds": round(self.wall_seconds, 1),
            "claims": [c.to_dict() for c in self.claims],
            "runs": [
                {
                    "file": store.path(job).name,
                    "spec": job.spec.to_dict(),
                    "bn": job.bn,
                    "seed": job.seed,
                    "status": run.status,
                    "batches": run.batches,
                    "train_seconds": round(run.train_seconds, 3),
                    "final_val_accuracy": run.final(),
                }
                for job, run in self.runs.items()
            ],
        }


def parse_claims(text: str) -> list[int]:
    """'1,3-5' -> [1, 3, 4, 5]; anything else is a UsageError naming the claims there are."""
    numbers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise UsageError(f"claims must be numbers or ranges like 1,3-5; got {text!r}")
        low, high = int(match[1]), int(match[2] or match[1])
        if low > high or low not in CLAIMS or high not in CLAIMS:
            raise UsageError(f"there are claims {min(CLAIMS)} to {max(CLAIMS)}; got {text!r}")
        numbers.update(range(low, high + 1))
    return sorted(numbers)


def _describe(job: Job) -> str:
    spec = job.spec
    shape = f"{len(spec.hidden)}x{spec.hidden[0]}" if spec.family == "mlp" else f"depth {spec.depth}"
    arm = "no BN" if job.bn == "none" else "BN"
    return f"{spec.family} {shape} {spec.activation} {spec.optimizer} lr={spec.lr:g}, {arm}, seed {job.seed}"


def run_benefits(
    claims: Sequence[int] = tuple(CLAIMS),
    *,
    budget: str = "quick",
    seeds: int | None = None,
    out_dir: str | Path = "runs/benefits",
    bn: str = "torch",
    data: MNIST | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
    progress: bool | None = None,
) -> BenefitsResult:
    """Run (or reuse) every run the chosen claims need, then write the report into ``out_dir``."""
    start = time.perf_counter()
    check_choice("budget", budget, list(BUDGETS))
    check_choice("bn", bn, BN_MODES[1:])
    if not claims or set(claims) - set(CLAIMS):
        raise UsageError(f"claims must be among {sorted(CLAIMS)}; got {list(claims)}")
    if seeds is not None and seeds < 1:
        raise UsageError(f"seeds must be at least 1; got {seeds}")
    plan = BUDGETS[budget]
    lab = _Lab(plan, tuple(range(seeds or plan.seeds)), bn)
    experiments = [EXPERIMENTS[n](lab) for n in sorted(set(claims))]
    torch_device = resolve_device(device)
    data = (data if data is not None else load_mnist(data_dir)).to(torch_device)
    out = Path(out_dir)
    store = RunStore(out / "runs", torch_device.type)

    jobs: dict[Job, int] = {}  # each job once, with the first claim that needs it
    for experiment in experiments:
        for job in experiment.jobs:
            jobs.setdefault(job, experiment.number)
    log(
        f"bnlab benefits: claims {', '.join(str(e.number) for e in experiments)}, budget {plan.name} "
        f"({plan.runtime}), {len(lab.seeds)} seed(s), {len(jobs)} runs in {store.directory}"
    )
    done: dict[Job, Run] = {}
    trained = 0
    enabled = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(jobs), unit="run", desc="benefits", disable=not enabled, file=sys.stderr) as bar:
        for job, number in jobs.items():
            run = store.load(job)
            if run is None:
                bar.set_postfix_str(f"claim {number}: {_describe(job)}", refresh=True)
                run = train_run(job.spec, job.bn, job.seed, data, torch_device)
                store.save(run)
                trained += 1
            done[job] = run
            bar.update()
    log(f"trained {trained} runs, reused {len(jobs) - trained}")

    def lookup(spec: RunSpec, arm: str) -> list[Run]:
        return [done[Job(spec, arm, seed)] for seed in lab.seeds]

    results = [e.analyse(lookup, out) for e in experiments]
    outcome = BenefitsResult(
        results, out, plan, lab.seeds, bn, str(torch_device), done, trained, time.perf_counter() - start
    )
    write_report(outcome)
    return outcome


# --- The report -----------------------------------------------------------------------------------

TONES = {"supported": "good", "not supported": "bad", "mixed": "mixed"}
BN_NAMES = {"torch": "PyTorch's `nn.BatchNorm1d/2d`", "manual": "bnlab's own `BatchNorm1d/2d`"}


def _g(value: float) -> str:
    return "∞" if value == math.inf else "n/a" if math.isnan(value) else f"{value:.4g}"


def _effect(comparison: Comparison, value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{_g(value)}x" if comparison.kind == "ratio" else f"{value:+.4g}"


def report_blocks(result: BenefitsResult) -> list[reports.Block]:
    R = reports
    b = result.budget
    verdict_rows = [(f"{c.number}. {c.claim}", f"**{c.verdict}**", c.headline) for c in result.claims]
    blocks: list[reports.Block] = [
        R.Heading("Batch norm: the seven claims, measured", 1),
        R.Text(
            f"Each claim is tested by paired runs: every network is trained without and with batch norm "
            f"({BN_NAMES[result.bn]} before each hidden activation, never on the logits; running-statistics "
            f"momentum {PAPER_MLP.bn_momentum:g}) from the same initial weights, on the same batches in the same "
            f"order. Budget "
            f"**{b.name}**, {len(result.seeds)} seed(s) ({', '.join(map(str, result.seeds))}), on {result.device} "
            f"with {'/'.join(map(str, result.threads()))} thread(s): {len(result.runs)} runs "
            f"({result.trained} trained now, "
            f"{len(result.runs) - result.trained} reused) in {result.wall_seconds:.0f} s; their training steps "
            f"took {sum(r.train_seconds for r in result.runs.values()) / 60:.1f} min in all. Accuracy is validation "
            "accuracy in eval mode on MNIST's 5,000 validation images"
            + (
                "."
                if b.conv_eval_size >= VALIDATION_SIZE
                else f" (ConvNets: the first {b.conv_eval_size}, to keep evaluation from dominating the cost)."
            )
        ),
        R.Table(("claim", "verdict", "headline"), tuple(verdict_rows)),
        R.Heading("How a verdict is reached"),
        R.Text(
            "Each experiment measures one or more quantities per seed in both arms (a *comparison*). BN **wins** a "
            "seed when its effect (BN minus baseline, or their ratio, turned round where lower is better) exceeds "
            "the comparison's margin. A comparison **holds** when BN wins every seed, **fails** when it wins none, "
            "and is **inconsistent** otherwise. The claim is **supported** when every judged comparison holds, "
            "**not supported** when every one fails, and **mixed** otherwise."
        ),
        R.Bullets(
            (
                f"Usable run: not diverged, final validation accuracy at least {USABLE_ACCURACY:.0%}.",
                f"Accuracy margin: {ACCURACY_MARGIN:g} (10 of 5,000 validation images).",
                f"Speed margin: {SPEEDUP_MARGIN:g}x (at least 10% sooner). Dead-unit margin: {DEAD_MARGIN:g}.",
                "Diverged: the training loss became NaN or infinite; the run stopped there.",
            )
        ),
    ]
    for claim in result.claims:
        blocks += [
            R.Heading(f"{claim.number}. {claim.title}"),
            R.Text(f"**Claim:** {claim.claim}"),
            R.Text(f"**What was run.** {claim.setup}"),
            *claim.figures,
        ]
        for caption, table in claim.tables:
            blocks += [R.Text(f"*{caption}.*"), table]
        rows = [
            (
                c.name + ("" if c.counts else " (reported, not judged)"),
                ", ".join(map(_g, c.base)) + f" ({c.baseline})",
                ", ".join(map(_g, c.bn)),
                ", ".join(_effect(c, e) for e in c.effects()),
                c.requirement(),
                f"{sum(c.wins())}/{len(c.wins())}",
                c.outcome,
            )
            for c in claim.comparisons
        ]
        if rows:
            headers = ("comparison", "baseline", "BN", "effect", "BN wins a seed when", "wins", "outcome")
            blocks += [R.Text("*Comparisons, seed by seed.*"), R.Table(headers, tuple(rows))]
        else:
            blocks.append(R.Text("*Nothing to compare: no run produced a value this claim is judged on.*"))
        blocks += [
            R.Text(f"**Rule.** {claim.rule}"),
            R.Callout(f"**Verdict: {claim.verdict}.** {claim.headline}.", TONES[claim.verdict]),
            *(R.Text(note) for note in claim.notes),
        ]
    claims = ",".join(str(c.number) for c in result.claims)
    blocks += [
        R.Heading("Reproduce"),
        R.Text(
            f"`bnlab benefits --budget {b.name} --seeds {len(result.seeds)} --claims {claims} --bn {result.bn}` "
            "(finished runs in `runs/` are reused; delete them to start afresh)."
        ),
    ]
    return blocks


def write_report(result: BenefitsResult) -> None:
    """report.md, report.html (self-contained), results.json; the PNGs are already beside them."""
    out = result.out_dir
    blocks = report_blocks(result)
    runs.atomic_write_bytes(out / "report.md", reports.render_markdown(blocks).encode())
    html = reports.render_html(blocks, title="bnlab: the benefits of batch norm, measured", image_dir=out)
    runs.atomic_write_bytes(out / "report.html", html.encode())
    runs.atomic_write_bytes(
        out / "results.json", (json.dumps(_finite_or_none(result.to_dict()), indent=1) + "\n").encode()
    )
