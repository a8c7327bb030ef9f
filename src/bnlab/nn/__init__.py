"""bnlab's batch normalization.

statistics.py  the maths in tensor ops: moments, their exact combination, normalization, gradients
ops.py         the operators bnlab::batch_norm_{train,backward,eval} (compiled kernels or statistics.py)
sync.py        synchronized batch norm over a process group (its own autograd Function)
functional.py  batch_norm(): picks the operator, keeps the running statistics
batchnorm.py   the layers BatchNorm1d/2d/3d (state only) and is_batch_norm
renorm.py      batch renormalization: BatchRenorm1d/2d/3d
ghost.py       ghost batch norm (virtual batches): GhostBatchNorm1d/2d/3d
frozen.py      frozen batch norm (fixed statistics and affine): FrozenBatchNorm1d/2d/3d
convert.py     swap a model's BN layers: PyTorch's <-> bnlab's, and to any of the family or GroupNorm
fold.py        fold eval-mode BN into the conv or linear layer before it (deployment)
recurrent.py   recurrent batch norm: SequenceBatchNorm (statistics per time step), BNLSTMCell, BNLSTM
"""

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, is_batch_norm
from bnlab.nn.convert import convert
from bnlab.nn.fold import FoldResult, fold
from bnlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bnlab.nn.functional import batch_norm
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from bnlab.nn.recurrent import BNLSTM, BNLSTMCell, SequenceBatchNorm
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from bnlab.nn.statistics import naive_batch_norm

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FoldResult",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "SequenceBatchNorm",
    "batch_norm",
    "convert",
    "fold",
    "is_batch_norm",
    "naive_batch_norm",
]
