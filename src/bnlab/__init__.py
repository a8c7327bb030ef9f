"""bnlab: batch normalization you can run, see, trust and build on.

from bnlab import BatchNorm2d, build_model, train, TrainConfig
"""

from bnlab.check import check_model
from bnlab.data import MNIST, Batches, Split, load_mnist
from bnlab.errors import BnlabError, CheckpointError, DataError, TrainingDiverged, UsageError
from bnlab.models import SeedConvNet, build_model, summary
from bnlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from bnlab.nn.convert import convert
from bnlab.nn.recurrent import BNLSTM, BNLSTMCell, SequenceBatchNorm
from bnlab.training.loop import RunResult, TrainConfig, evaluate, load_model, one_at_a_time_accuracy, train

__version__ = "0.1.0"

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
    "RunResult",
    "SeedConvNet",
    "SequenceBatchNorm",
    "Split",
    "TrainConfig",
    "TrainingDiverged",
    "UsageError",
    "batch_norm",
    "build_model",
    "check_model",
    "convert",
    "evaluate",
    "load_mnist",
    "load_model",
    "one_at_a_time_accuracy",
    "summary",
    "train",
]
