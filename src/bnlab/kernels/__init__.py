"""bnlab's compiled CPU batch-norm kernels (``batch_norm.cpp``), built on first use.

The kernels compute exactly what ``norm.py`` writes with tensor ops, in fewer passes over memory
and with ReLU fused in. They take float32/float64 CPU tensors, contiguous or channels_last.

The library is built once per machine with the system C++ compiler (``$CXX``, else ``c++``, ``g++``
or ``clang++``; about a second) into ``$XDG_CACHE_HOME/bnlab/kernels/`` under a name that hashes the
source, the flags, the compiler and the CPU, so a changed source or another machine rebuilds it.
Without a compiler, or if the build fails, ``available()`` is False, a warning says why once, and
bnlab's batch norm uses its tensor-op implementation: the same maths, slower (outputs agree to
float rounding, so a long training run takes a slightly different path).

``BNLAB_KERNELS=0`` (or ``use_kernels(False)``) turns the kernels off, for debugging or comparison.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

ABI_VERSION = 1
SOURCE = Path(__file__).with_name("batch_norm.cpp")
# -fno-trapping-math lets masked (ReLU) loops vectorize as blends; bnlab never reads FP exception flags.
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_functions: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}  # (name, dtype) -> the typed C function
_failure: str | None = None
_enabled = os.environ.get("BNLAB_KERNELS", "1").lower() not in ("0", "false", "no", "off")

_P, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    "bn_normalize": [_P, _P, _I64, _I64, _I64, _INT, _INT, _P, _P, _P, _P, _INT],
    "bn_forward_train": [_P, _P, _I64, _I64, _I64, _INT, _INT, _P, _P, _DBL, _INT, _P, _P, _DBL, _INT, _P, _P],
    "bn_backward": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _INT, _INT, _P, _P, _P],
}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlab" / "kernels"


def _build(compiler: str) -> Path:
    """The cached library for this source, compiler and CPU, compiling it first if needed."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), " ".join(FLAGS), version, platform.platform(), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"batch_norm-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        errors = []
        # Without OpenMP (e.g. Apple clang) the pragmas are ignored: one thread, still one pass fewer.
        for flags in (FLAGS, [f for f in FLAGS if f != "-fopenmp"]):
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders each install a complete library
                return target
            errors.append(result.stderr.strip()[-300:])
        raise RuntimeError(f"{compiler} failed: {errors[-1]}")
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load() -> ctypes.CDLL | None:
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is not None or _failure is not None:
            return _library
        try:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
            library = ctypes.CDLL(str(_build(compiler)))
            if library.bn_abi_version() != ABI_VERSION:
                raise RuntimeError("stale kernel library in the cache; delete ~/.cache/bnlab/kernels")
            for name, argtypes in _SIGNATURES.items():
                for suffix, dtype in (("f32", torch.float32), ("f64", torch.float64)):
                    fn = getattr(library, f"{name}_{suffix}")
                    fn.argtypes, fn.restype = argtypes, None
                    _functions[name, dtype] = fn
            _library = library
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _failure = str(err)
            warnings.warn(
                f"bnlab: compiled batch-norm kernels unavailable ({_failure}); using the tensor-op "
                "implementation (same maths, slower).",
                RuntimeWarning,
                stacklevel=3,
            )
    return _library


def available() -> bool:
    """True if the compiled kernels are enabled and built (building them now if needed)."""
    return _enabled and _load() is not None


def status() -> str:
    """One line saying which implementation bnlab's CPU batch norm uses, and why."""
    if not _enabled:
        return "tensor ops (kernels turned off: BNLAB_KERNELS=0 or use_kernels(False))"
    if _load() is None:
        return f"tensor ops (kernels unavailable: {_failure})"
    return f"compiled kernels ({SOURCE.name}, {torch.get_num_threads()} threads)"


@contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Turn the compiled kernels on or off inside a ``with`` block."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def layout(x: Tensor) -> int | None:
    """0 for NCS (contiguous), 1 for NSC (channels_last); None when the kernels cannot take x."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() < 2:
        return None
    if x.is_contiguous():
        return 0
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return 1
    return None


def usable(x: Tensor, *others: Tensor | None) -> bool:
    """Whether the kernels can take x and the per-feature tensors beside it (same dtype, contiguous)."""
    if not _enabled or layout(x) is None or (_library is None and _load() is None):
        return False
    dtype, device = x.dtype, x.device
    for t in others:  # a plain loop: this runs per layer per step
        if t is not None and (t.dtype != dtype or t.device != device or not t.is_contiguous()):
            return False
    return True


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _dims(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // (n * c)


def _fn(name: str, x: Tensor):
    return _functions[name, x.dtype]


def forward_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    unbiased: bool,
) -> tuple[Tensor, Tensor]:
    """Batch statistics, running-statistics update and normalization in one call.

    Returns (y, stats), stats = float64 [mean (C values), invstd (C values)], as ``backward`` takes it.
    (One tensor and pointer arithmetic rather than two views: this path runs per layer per step, and
    on the seed network's 1x1 layers Python overhead is most of its cost.)
    """
    n, c, s = _dims(x)
    y = torch.empty_like(x)
    stats = torch.empty(2 * c, dtype=torch.float64)
    p = stats.data_ptr()
    _fn("bn_forward_train", x)(
        x.data_ptr(), y.data_ptr(), n, c, s, layout(x), torch.get_num_threads(), _ptr(weight), _ptr(bias),
        eps, int(relu), _ptr(running_mean), _ptr(running_var), momentum, int(unbiased), p, p + 8 * c,
    )  # fmt: skip
    return y, stats


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None, relu: bool
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias (ReLU'd if asked); mean and invstd float64 (C,)."""
    n, c, s = _dims(x)
    y = torch.empty_like(x)
    _fn("bn_normalize", x)(
        x.data_ptr(), y.data_ptr(), n, c, s, layout(x), torch.get_num_threads(),
        mean.data_ptr(), invstd.data_ptr(), _ptr(weight), _ptr(bias), int(relu),
    )  # fmt: skip
    return y


def backward(
    x: Tensor,
    dy: Tensor,
    y: Tensor | None,
    stats: Tensor,
    weight: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias), each computed only where ``needs`` says; dy must have x's layout.

    stats is what ``forward_train`` returned. dz = dy (masked by y > 0 when y is given),
    dbias = sum(dz), dweight = sum(dz * xhat), dx = invstd * weight * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M).
    """
    n, c, s = _dims(x)
    dx = torch.empty_like(x) if needs[0] else None
    dweight = torch.empty(c, dtype=x.dtype) if needs[1] else None
    dbias = torch.empty(c, dtype=x.dtype) if needs[2] else None
    p = stats.data_ptr()
    _fn("bn_backward", x)(
        x.data_ptr(), dy.data_ptr(), _ptr(y), _ptr(dx), _ptr(dweight), _ptr(dbias), n, c, s, layout(x),
        torch.get_num_threads(), p, p + 8 * c, _ptr(weight),
    )  # fmt: skip
    return dx, dweight, dbias
