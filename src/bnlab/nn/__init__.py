"""bnlab's batch normalization: the maths, the layers, conversion and precise statistics."""

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm, naive_batch_norm
from bnlab.nn.convert import convert

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "convert", "naive_batch_norm"]
