"""bnlab: batch normalization you can run, see, trust and build on.

from bnlab import BatchNorm2d, build_model, train, TrainConfig
"""

from bnlab.check import check_model
from bnlab.data import MNIST, Batches, Split, load_mnist
from bnlab.errors import BnlabError, CheckpointError, DataError, TrainingDiverged, UsageError
from bnlab.models import SeedConvNet, build_model, summary
from bnlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from bnlab.nn.convert import convert
from bnlab.nn.precise import Recalibration, recalibrate
from bnlab.nn.recurrent import BNLSTM, BNLSTMCell, SequenceBatchNorm
from bnlab.training import RunResult, TrainConfig, evaluate, load_model, one_at_a_time_accuracy, train
from bnlab.version import __version__

__all__ = [
    "BNLSTM",
    "MNIST",
    "BNLSTMCell",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Batches",
    "BnlabError",
    "CheckpointError",
    "DataError",
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
    "load_mnist",
    "load_model",
    "one_at_a_time_accuracy",
    "recalibrate",
    "summary",
    "train",
]
