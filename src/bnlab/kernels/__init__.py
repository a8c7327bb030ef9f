"""bnlab's compiled CPU batch norm: C++ kernels registered as the CPU implementation of bnlab's operators.

``batch_norm.h`` computes what ``bnlab.nn.statistics`` writes with tensor ops, in fewer passes over
memory and with ReLU fused in; ``operators.cpp`` wraps it as the CPU and AutogradCPU kernels of the
operators ``bnlab::batch_norm_{train,backward,eval}`` (defined in ``bnlab.nn.ops``). Once installed,
a CPU call goes from Python into the dispatcher and stays in C++, forward and backward; everything
PyTorch does to an operator (tracing, export, compile, script) sees the same operator either way.

The library is built once per machine with the system C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) against the installed PyTorch, about 40 seconds, and cached, verified, by
``build.py``. It is built and installed on the first CPU call of a bnlab operator. Without a
compiler, or if the build fails, ``available()`` is False, a warning says why once, and the
operators keep their tensor-op implementation: the same maths, slower (outputs agree to float
rounding, so a long training run takes a slightly different path).

``BNLAB_KERNELS`` turns them on or off, for debugging or comparison: ``1``, ``true``, ``yes`` or
``on`` (the default, also when unset or empty) or ``0``, ``false``, ``no`` or ``off``, in any case,
surrounding spaces ignored. Off (or ``use_kernels(False)``), they are removed from the dispatcher,
and the tensor-op implementation serves CPU tensors. Any other value is a ``UsageError`` naming the
accepted ones, raised by the first use (a batch-norm call, ``available()``, ``status()``), never a
silent "on".
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

from bnlab.errors import UsageError
from bnlab.kernels import build

__all__ = ["available", "install", "status", "use_kernels"]

_lock = threading.RLock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
_installed = False  # the library's kernels are registered with the dispatcher
_enabled: bool | None = None  # None: BNLAB_KERNELS not read yet
_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _from_environment() -> bool:
    value = os.environ.get("BNLAB_KERNELS", "")
    switch = value.strip().lower() or "1"
    if switch not in _SWITCH:
        raise UsageError(
            f"BNLAB_KERNELS={value!r} is not one of {', '.join(_SWITCH)} (any case); set BNLAB_KERNELS=0 for the "
            "tensor-op implementation, or unset it for the compiled kernels"
        )
    return _SWITCH[switch]


def _is_enabled() -> bool:
    """Whether the kernels are on: use_kernels' setting, else BNLAB_KERNELS (read once)."""
    global _enabled
    if _enabled is None:
        _enabled = _from_environment()
    return _enabled


def _load() -> ctypes.CDLL | None:
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is not None or _failure is not None:
            return _library
        try:
            cxx = build.compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
            library = ctypes.CDLL(str(build.library(cxx)))
            library.bnlab_register.restype = ctypes.c_int
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


_OPERATORS = ("batch_norm_train", "batch_norm_backward", "batch_norm_eval")  # those operators.cpp has kernels for


def _register(on: bool) -> None:
    """Add the library's kernels to the dispatcher, or remove them."""
    global _installed
    if on == _installed:
        return
    if on:
        if _library.bnlab_register() != 0:
            raise RuntimeError("bnlab: the compiled kernels could not be registered with PyTorch's dispatcher")
    else:
        _library.bnlab_deregister()
    _installed = on
    # The Python dispatcher (tracing, fake tensors, torch.compile) caches per operator which kernel serves each
    # dispatch key, and C++ registrations do not reset it: after use_kernels(False), a compiled model went on
    # looking for the removed AutogradCPU kernel and its backward silently left x.grad None. PyTorch clears the
    # same private cache where it changes registrations itself (torch/export/exported_program.py).
    for name in _OPERATORS:
        getattr(torch.ops.bnlab, name).default._dispatch_cache.clear()


def install() -> bool:
    """Register the kernels if they are enabled and not registered yet (building them first if needed).

    True if this call registered them: the caller (``bnlab.nn.ops``'s tensor-op implementation, on a
    CPU call) then calls the operator again, and the kernels serve it.
    """
    if _installed or not _is_enabled():
        return False
    with _lock:
        if _installed or not _enabled or _load() is None:
            return False
        _register(True)
        return True


def available() -> bool:
    """True if the compiled kernels are enabled and built (building them now if needed)."""
    return _is_enabled() and _load() is not None


def status() -> str:
    """One line saying which implementation bnlab's CPU batch norm uses, and why."""
    if not _is_enabled():
        return "tensor ops (kernels turned off: BNLAB_KERNELS=0 or use_kernels(False))"
    if _load() is None:
        return f"tensor ops (kernels unavailable: {_failure})"
    return f"compiled kernels ({build.SOURCE.name}, {torch.get_num_threads()} threads)"


@contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Turn the compiled kernels on or off inside a ``with`` block."""
    global _enabled
    with _lock:
        previous, _enabled = _is_enabled(), enabled
        if not enabled:
            _register(False)
    try:
        yield
    finally:
        with _lock:
            _enabled = previous
            if not previous:
                _register(False)
            elif _library is not None:
                _register(True)
