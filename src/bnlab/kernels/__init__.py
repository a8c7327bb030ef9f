"""bnlab's compiled CPU batch-norm kernels (``batch_norm.cpp``), built on first use.

The kernels compute what ``bnlab.nn.statistics`` writes with tensor ops, in fewer passes over
memory and with ReLU fused in. They take float32/float64 CPU tensors, contiguous or channels_last.
They are called only from the operators in ``bnlab.nn.ops``, never directly on a model's tensors,
so everything PyTorch does to an operator (tracing, export, compile) sees them.

The library is built once per machine with the system C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``; about a second) and cached, verified, by ``build.py``. Without a compiler,
or if the build fails, ``available()`` is False, a warning says why once, and bnlab's batch norm
uses its tensor-op implementation: the same maths, slower (outputs agree to float rounding, so a
long training run takes a slightly different path).

``BNLAB_KERNELS=0`` (or ``use_kernels(False)``) turns the kernels off, for debugging or comparison.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from bnlab.kernels import abi, build
from bnlab.kernels.abi import Layout

__all__ = ["Layout", "available", "backward", "forward_train", "layout", "normalize", "status", "use_kernels"]

_lock = threading.Lock()
_kernels: dict[str, abi.Kernel] | None = None
_failure: str | None = None
_enabled = os.environ.get("BNLAB_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def _load() -> dict[str, abi.Kernel] | None:
    global _kernels, _failure
    if _kernels is not None or _failure is not None:
        return _kernels
    with _lock:
        if _kernels is not None or _failure is not None:
            return _kernels
        try:
            cxx = build.compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
            library = ctypes.CDLL(str(build.library(cxx)))
            if library.bn_abi_version() != abi.VERSION:
                raise RuntimeError(f"kernel library of another ABI version; delete {build.cache_dir()}")
            _kernels = {name: abi.Kernel(library, name) for name in abi.SIGNATURES}
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _failure = str(err)
            warnings.warn(
                f"bnlab: compiled batch-norm kernels unavailable ({_failure}); using the tensor-op "
                "implementation (same maths, slower).",
                RuntimeWarning,
                stacklevel=3,
            )
    return _kernels


def available() -> bool:
    """True if the compiled kernels are enabled and built (building them now if needed)."""
    return _enabled and _load() is not None


def status() -> str:
    """One line saying which implementation bnlab's CPU batch norm uses, and why."""
    if not _enabled:
        return "tensor ops (kernels turned off: BNLAB_KERNELS=0 or use_kernels(False))"
    if _load() is None:
        return f"tensor ops (kernels unavailable: {_failure})"
    return f"compiled kernels ({build.SOURCE.name}, {torch.get_num_threads()} threads)"


@contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Turn the compiled kernels on or off inside a ``with`` block."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def layout(x: Tensor) -> Layout | None:
    """How x is stored, if the kernels can take it (float32/float64 on the CPU); None otherwise."""
    if x.device.type != "cpu" or x.dtype not in abi.DTYPES or x.dim() < 2:
        return None
    if x.is_contiguous():
        return Layout.NCS
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return Layout.NSC
    return None


def usable(x: Tensor, *per_feature: Tensor | None) -> bool:
    """Whether the kernels can take x and the per-feature tensors beside it (same dtype, contiguous)."""
    if not _enabled or type(x) is not Tensor or layout(x) is None or (_kernels is None and _load() is None):
        return False
    dtype = x.dtype
    for t in per_feature:  # a plain loop: this runs per layer per step
        if t is not None and (t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous()):
            return False
    return True


def _shape(x: Tensor) -> dict[str, int]:
    n, c = x.shape[0], x.shape[1]
    return {"n": n, "c": c, "s": x.numel() // (n * c), "layout": layout(x), "threads": torch.get_num_threads()}


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool
) -> tuple[Tensor, Tensor]:
    """(y, stats): batch-normalized x and the float64 (3, C) [mean, biased var, invstd] it used."""
    y = torch.empty_like(x)
    stats = torch.empty(3, x.shape[1], dtype=torch.float64)
    _kernels["bn_forward_train"](
        x.dtype, x=x, weight=weight, bias=bias, stats=stats, y=y, eps=eps, relu=relu, **_shape(x)
    )
    return y, stats


def normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, relu: bool
) -> Tensor:
    """(x - mean) * invstd * weight + bias, ReLU'd if asked; mean and invstd contiguous float64 (C,)."""
    y = torch.empty_like(x)
    _kernels["bn_normalize"](
        x.dtype, x=x, weight=weight, bias=bias, mean=mean, invstd=invstd, y=y, relu=relu, **_shape(x)
    )
    return y


def backward(
    x: Tensor, weight: Tensor | None, stats: Tensor, dy: Tensor, y: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) for ``forward_train``'s stats; dy must have x's layout; y masks dy (fused ReLU)."""
    dx = torch.empty_like(x)
    dweight = torch.empty(x.shape[1], dtype=x.dtype)
    dbias = torch.empty(x.shape[1], dtype=x.dtype)
    _kernels["bn_backward"](
        x.dtype, x=x, weight=weight, stats=stats, dy=dy, y=y, dx=dx, dweight=dweight, dbias=dbias, **_shape(x)
    )
    return dx, dweight, dbias
