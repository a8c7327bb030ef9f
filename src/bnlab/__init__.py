"""bnlab: batch normalization you can run, see, trust and build on.

from bnlab import BatchNorm2d, build_model, train, TrainConfig

The package face is light: ``import bnlab.nn`` (the layers and operators) loads neither the trainer nor the
checker; every name below is imported from its module on first use (PEP 562), as ``torch`` does for its
submodules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bnlab.version import __version__

# public name -> the module that owns it
_OWNERS = {
    "BNLSTM": "bnlab.nn.recurrent",
    "BNLSTMCell": "bnlab.nn.recurrent",
    "SequenceBatchNorm": "bnlab.nn.recurrent",
    "BatchNorm1d": "bnlab.nn.batchnorm",
    "BatchNorm2d": "bnlab.nn.batchnorm",
    "BatchNorm3d": "bnlab.nn.batchnorm",
    "BatchRenorm1d": "bnlab.nn.renorm",
    "BatchRenorm2d": "bnlab.nn.renorm",
    "BatchRenorm3d": "bnlab.nn.renorm",
    "GhostBatchNorm1d": "bnlab.nn.ghost",
    "GhostBatchNorm2d": "bnlab.nn.ghost",
    "GhostBatchNorm3d": "bnlab.nn.ghost",
    "FrozenBatchNorm1d": "bnlab.nn.frozen",
    "FrozenBatchNorm2d": "bnlab.nn.frozen",
    "FrozenBatchNorm3d": "bnlab.nn.frozen",
    "batch_norm": "bnlab.nn.functional",
    "convert": "bnlab.nn.convert",
    "FoldResult": "bnlab.nn.fold",
    "fold": "bnlab.nn.fold",
    "Recalibration": "bnlab.nn.precise",
    "recalibrate": "bnlab.nn.precise",
    "MNIST": "bnlab.data",
    "Batches": "bnlab.data",
    "Split": "bnlab.data",
    "load_mnist": "bnlab.data",
    "BnlabError": "bnlab.errors",
    "CheckpointError": "bnlab.errors",
    "DataError": "bnlab.errors",
    "TrainingDiverged": "bnlab.errors",
    "UsageError": "bnlab.errors",
    "SeedConvNet": "bnlab.models",
    "build_model": "bnlab.models",
    "summary": "bnlab.models",
    "TrainConfig": "bnlab.config",
    "RunResult": "bnlab.training.result",
    "train": "bnlab.training.runner",
    "evaluate": "bnlab.training.evaluate",
    "one_at_a_time_accuracy": "bnlab.training.evaluate",
    "load_model": "bnlab.training.store",
    "check_model": "bnlab.check",
}

__all__ = [
    "BNLSTM",
    "MNIST",
    "BNLSTMCell",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "Batches",
    "BnlabError",
    "CheckpointError",
    "DataError",
    "FoldResult",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "Recalibration",
    "RunResult",
    "SeedConvNet",
    "SequenceBatchNorm",
    "Split",
    "TrainConfig",
    "TrainingDiverged",
    "UsageError",
    "__version__",
    "batch_norm",
    "build_model",
    "check_model",
    "convert",
    "evaluate",
    "fold",
    "load_mnist",
    "load_model",
    "one_at_a_time_accuracy",
    "recalibrate",
    "summary",
    "train",
]


def __getattr__(name: str) -> Any:
    owner = _OWNERS.get(name)
    if owner is None:
        raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(owner), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_OWNERS})


if TYPE_CHECKING:  # what static checkers and IDEs see: the same names, imported eagerly
    from bnlab.check import check_model
    from bnlab.config import TrainConfig
    from bnlab.data import MNIST, Batches, Split, load_mnist
    from bnlab.errors import BnlabError, CheckpointError, DataError, TrainingDiverged, UsageError
    from bnlab.models import SeedConvNet, build_model, summary
    from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
    from bnlab.nn.convert import convert
    from bnlab.nn.fold import FoldResult, fold
    from bnlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
    from bnlab.nn.functional import batch_norm
    from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
    from bnlab.nn.precise import Recalibration, recalibrate
    from bnlab.nn.recurrent import BNLSTM, BNLSTMCell, SequenceBatchNorm
    from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
    from bnlab.training.evaluate import evaluate, one_at_a_time_accuracy
    from bnlab.training.result import RunResult
    from bnlab.training.runner import train
    from bnlab.training.store import load_model
