"""``TrainConfig``: everything that decides a training run, validated once, for every feature.

``bnlab train`` and ``reproduce``, the benefits lab, the benchmarks, the precise-statistics panel and
the recurrent experiment all describe their runs with this one class. The defaults are the
notebook's: its 20-layer ConvNet, Adam at 0.002, 800 batches of 64, mean sigmoid cross-entropy,
validation after batch 0 and every 100th, the training batch every 25th.

Two evaluation cadences:

- ``"notebook"``: after the step on batch *i*, validation when ``i % eval_every == 0``, else the
  batch just trained on when ``i % log_every == 0``. Every batch's loss is recorded.
- ``"interval"`` (the lab's): validation before the first step, after every ``eval_every`` steps and
  after the last, on the first ``eval_size`` validation images, optionally with the accuracy on the
  first ``train_eval_size`` training images and the fraction of dead ReLU units (``dead_units``).
  Only the evaluations are recorded.

Final scores, at the end of a completed run (always with the notebook cadence; with the interval
cadence when ``one_at_a_time`` or ``precise_samples`` asks for them): validation and test accuracy,
the first ``one_at_a_time`` test images classified alone, and the same with precise statistics from
``precise_samples`` training images (``bnlab.nn.precise``).

The normalization (``bn``): none; batch norm as ``torch.nn``'s or bnlab's (``BN_MODES``); or one of
its small-batch family, bnlab's layers (``bnlab.nn``; docs/family.md): "renorm" (Batch Renormalization,
warm-up over ``renorm_warmup`` steps), "ghost" (statistics over virtual batches of ``virtual_batch``)
or "group" (GroupNorm, ``group_channels`` channels per group). ``classes_per_batch`` draws each
training batch from that many classes (non-i.i.d. batches, ``data.ClassBatches``).

A config is frozen, hashable and serialises to JSON with ``to_dict``; ``from_dict`` validates a
stored one (unknown or missing keys, out-of-range values) before anything is built from it. Settings
added after run stores existed (``LATER_FIELDS``) are left out of ``to_dict`` at their defaults, and
filled in by ``from_dict`` where missing: a stored run keeps its key, and so its run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bnlab.errors import UsageError

MODELS = ("convnet", "mlp", "lstm")
BN_MODES = ("none", "torch", "manual")
NORMS = (*BN_MODES, "renorm", "ghost", "group")  # what ``bn`` may name (the module docstring)
BATCH_NORMS = ("torch", "manual", "renorm", "ghost")  # the norms with batch statistics (running and precise)
OPTIMIZERS = ("adam", "sgd", "rmsprop")
LOSSES = ("sigmoid", "softmax")
CADENCES = ("notebook", "interval")
TASKS = ("row", "pixel", "permuted")  # the LSTM's view of an image: 28 rows, 784 pixels, or permuted pixels
ACTIVATIONS = ("relu", "leaky_relu", "elu", "selu", "gelu", "swish", "tanh", "sigmoid", "identity")
CONV_INITS = ("auto", "glorot_uniform", "truncated_normal")
FC_INITS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal")

MAX_SEED = 2**63 - 1
MAX_BATCHES = 10**9  # a time budget (seconds) stops such runs; nothing else trains this long
MAX_PARAMETERS = 2 * 10**8  # 800 MB of float32 weights: larger networks fail fast, before building


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_int(name: str, value: Any, low: int, high: int | None = None, why: str = "") -> None:
    """A whole number in [low, high] (no upper bound when ``high`` is None); ``why`` says why the bound."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        because = f" ({why})" if why else ""
        if high is None:
            raise UsageError(f"{name} must be at least {low}{because}, a whole number; got {value!r}")
        raise UsageError(f"{name} must be an integer in [{low}, {high}]{because}; got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise UsageError(f"{name} must be a number in {bound}; got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run. Defaults are the notebook's settings."""

    # the network (bnlab.models.build_model)
    model: str = "convnet"
    bn: str = "none"
    bn_momentum: float | None = None  # None: the network's own (the notebook's decay 0.99, momentum 0.01)
    depth: int = 19  # convnet: conv layers
    hidden: tuple[int, ...] = (100,)  # convnet: its one dense layer; mlp: every hidden layer; lstm: (units,)
    activation: str = "relu"
    init: str | float = "auto"  # convnet: the notebook's per mode; mlp: a scheme or a standard deviation
    dropout: float = 0.0  # mlp only
    task: str = "row"  # lstm only: how an image becomes a sequence
    # the optimisation
    optimizer: str = "adam"
    lr: float = 0.002
    momentum: float = 0.0  # sgd and rmsprop
    clip: float | None = None  # clip the gradients' global norm to this
    loss: str = "sigmoid"
    batch_size: int = 64
    batches: int = 800
    seconds: float | None = None  # stop once the training steps (evaluation excluded) took this long
    seed: int = 0
    train_size: int | None = None  # train on the first N training images only
    # what is measured
    cadence: str = "notebook"
    eval_every: int = 100
    log_every: int = 25  # notebook cadence: the training batch between validations
    eval_size: int | None = None  # interval cadence: the first N validation images (None: all)
    train_eval_size: int = 0  # interval cadence: also the accuracy on the first N training images
    dead_units: bool = False  # interval cadence: also the fraction of ReLU units silent on every image
    one_at_a_time: int = 100  # final scores: test images classified alone
    precise_samples: int = 8192  # final scores: training images for precise statistics (0: none)
    checkpoint_every: int = 0  # a resumable checkpoint every N batches (0: only at the end)
    snapshots: tuple[int, ...] = ()  # keep the model after these batches as checkpoint-N.pt
    # added with the small-batch family (LATER_FIELDS): at their defaults they change no stored run's key
    width: int = 4  # convnet: conv layer d has width * d channels (the notebook's 4)
    virtual_batch: int | None = None  # bn="ghost": samples per virtual batch
    renorm_warmup: int | None = None  # bn="renorm": steps over which rmax, dmax grow to 3, 5 (None: the layer's)
    group_channels: int = 4  # bn="group": channels per group (GroupNorm's groups: channels // this)
    classes_per_batch: int | None = None  # each training batch from this many classes (None: i.i.d. batches)

    def __post_init__(self) -> None:
        # JSON gives lists; the config must stay hashable
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "snapshots", tuple(self.snapshots))
        check_choice("model", self.model, MODELS)
        check_choice("bn", self.bn, NORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("task", self.task, TASKS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("loss", self.loss, LOSSES)
        check_choice("cadence", self.cadence, CADENCES)
        if self.bn_momentum is not None:
            _check_number("bn_momentum", self.bn_momentum, 0.0, 1.0, open_low=True)
        check_int("depth", self.depth, 1, 200)
        if not self.hidden or (self.model != "mlp" and len(self.hidden) != 1):
            raise UsageError(f"hidden must list one layer size (several for the mlp); got {list(self.hidden)}")
        for size in self.hidden:
            check_int("hidden layer size", size, 1, 100_000)
        check_int("hidden layers", len(self.hidden), 1, 1000)
        if self.model == "convnet":
            check_choice("convnet init", self.init, CONV_INITS)
        elif self.model == "mlp":
            if isinstance(self.init, str):
                check_choice("init", self.init, FC_INITS)
            else:
                _check_number("init (a standard deviation)", self.init, 0.0, 1e3, open_low=True)
        if self.model != "mlp" and self.dropout:
            raise UsageError("dropout is only available in the mlp model")
        _check_number("dropout", self.dropout, 0.0, 0.999)
        _check_number("lr", self.lr, 0.0, 1e6, open_low=True)
        _check_number("momentum", self.momentum, 0.0, 0.999)
        if self.clip is not None:
            _check_number("clip", self.clip, 0.0, 1e9, open_low=True)
        check_int("batch_size", self.batch_size, 1, 1_000_000)
        if self.bn in BATCH_NORMS and self.batch_size < 2:
            raise UsageError("batch_size must be at least 2 with batch norm (statistics of one sample are undefined)")
        if self.model == "lstm" and self.bn not in BN_MODES:
            raise UsageError(f"the lstm model takes bn none, torch or manual; got {self.bn!r}")
        self._check_norm_options()
        check_int("batches", self.batches, 1, MAX_BATCHES)
        if self.seconds is not None:
            _check_number("seconds", self.seconds, 0.0, 1e7, open_low=True)
        check_int("seed", self.seed, 0, MAX_SEED)
        if self.train_size is not None:
            check_int("train_size", self.train_size, self.batch_size, 10**8)
        check_int("eval_every", self.eval_every, 1, MAX_BATCHES)
        check_int("log_every", self.log_every, 1, MAX_BATCHES)
        if self.eval_size is not None:
            check_int("eval_size", self.eval_size, 1, 10**8)
        check_int("train_eval_size", self.train_eval_size, 0, 10**8)
        check_int("one_at_a_time", self.one_at_a_time, 0, 10**8)
        check_int("precise_samples", self.precise_samples, 0, 10**8)
        check_int("checkpoint_every", self.checkpoint_every, 0, MAX_BATCHES)
        for batch in self.snapshots:
            check_int("snapshot batch", batch, 1, self.batches)

    def _check_norm_options(self) -> None:
        """Each family option only with its norm, so that one run has one config (and one key)."""
        check_int("width", self.width, 1, 1000)
        if self.width != 4 and self.model != "convnet":
            raise UsageError("width is the convnet's; the mlp's layer sizes are its hidden sizes")
        if (self.bn == "ghost") != (self.virtual_batch is not None):
            raise UsageError("virtual_batch goes with bn='ghost', which needs it (samples per virtual batch)")
        if self.virtual_batch is not None:
            check_int("virtual_batch", self.virtual_batch, 2, self.batch_size, why="at least 2, at most the batch")
        if self.renorm_warmup is not None:
            if self.bn != "renorm":
                raise UsageError("renorm_warmup goes with bn='renorm'")
            check_int("renorm_warmup", self.renorm_warmup, 0, MAX_BATCHES)
        check_int("group_channels", self.group_channels, 1, 100_000)
        if self.group_channels != 4 and self.bn != "group":
            raise UsageError("group_channels goes with bn='group'")
        if self.classes_per_batch is not None:
            high = min(10, self.batch_size)
            check_int("classes_per_batch", self.classes_per_batch, 1, high, why="10 in MNIST, 1 a sample at most")

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in LATER_FIELDS or getattr(self, f.name) != f.default
        }

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], where: str = "config") -> TrainConfig:
        """A stored config, validated: every key known and present, every value in range."""
        if not isinstance(stored, Mapping):
            raise UsageError(f"{where} must be a mapping of settings; got {type(stored).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(stored) - names), sorted(names - set(stored) - set(LATER_FIELDS))
        if unknown or missing:
            parts = [f"unknown keys {unknown}" if unknown else "", f"missing keys {missing}" if missing else ""]
            raise UsageError(f"{where} does not match this bnlab's TrainConfig: {'; '.join(p for p in parts if p)}")
        try:
            return cls(**stored)
        except TypeError as err:  # a value of the wrong type that a check compared
            raise UsageError(f"{where}: {err}") from None

    def key(self) -> str:
        """A short hash of the config: equal configs, equal keys (names run directories in stores)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


LATER_FIELDS = ("width", "virtual_batch", "renorm_warmup", "group_channels", "classes_per_batch")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
