"""The kernels' C ABI, declared once.

``SIGNATURES`` names every function's parameters in one order. From it come both sides of the call:

- the C header ``bnlab_abi.h`` that ``batch_norm.cpp`` includes, so the compiler rejects a definition
  whose parameters differ from the declaration (two ``extern "C"`` functions cannot overload);
- the ctypes argument types, and ``Kernel.__call__``, which takes the parameters *by name*.

Every function exists for float32 (``_f32``) and float64 (``_f64``); ``T`` is that type.
Statistics are float64 arrays ``stats = [mean (C), biased var (C), invstd (C)]``.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from typing import Any

import torch

VERSION = 2  # bumped whenever a signature changes; the loader refuses a library of another version


class Layout(IntEnum):
    """How an (N, C, S) tensor is stored (S = positions per sample: L, H*W or D*H*W)."""

    NCS = 0  # contiguous: x[(n * C + c) * S + s]
    NSC = 1  # channels_last: x[(n * S + s) * C + c]


_SHAPE = (("n", "int64_t"), ("c", "int64_t"), ("s", "int64_t"), ("layout", "int"), ("threads", "int"))

SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    # y = (x - mean) * invstd * weight + bias, ReLU'd if relu; mean and invstd are C doubles each.
    "bn_normalize": (
        ("x", "const T*"),
        ("weight", "const T*"),
        ("bias", "const T*"),
        ("mean", "const double*"),
        ("invstd", "const double*"),
        ("y", "T*"),
        *_SHAPE,
        ("relu", "int"),
    ),
    # Batch statistics into stats, then y as bn_normalize with them.
    "bn_forward_train": (
        ("x", "const T*"),
        ("weight", "const T*"),
        ("bias", "const T*"),
        ("stats", "double*"),
        ("y", "T*"),
        *_SHAPE,
        ("eps", "double"),
        ("relu", "int"),
    ),
    # dz = dy (masked by y > 0 when y is given); dweight = sum(dz * xhat), dbias = sum(dz),
    # dx = invstd * weight * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M); a null output is skipped.
    "bn_backward": (
        ("x", "const T*"),
        ("weight", "const T*"),
        ("stats", "const double*"),
        ("dy", "const T*"),
        ("y", "const T*"),
        ("dx", "T*"),
        ("dweight", "T*"),
        ("dbias", "T*"),
        *_SHAPE,
    ),
}

DTYPES = {torch.float32: ("f32", "float"), torch.float64: ("f64", "double")}
_CTYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "double": ctypes.c_double}


def header() -> str:
    """The C declarations of SIGNATURES (``bnlab_abi.h``)."""
    lines = [
        "// Generated from bnlab/kernels/abi.py at build time; the ABI is declared there, once.",
        "#pragma once",
        "#include <cstdint>",
        f"#define BNLAB_ABI_VERSION {VERSION}",
        "enum Layout : int { " + ", ".join(f"k{m.name} = {m.value}" for m in Layout) + " };",
        'extern "C" {',
        "int bn_abi_version();",
    ]
    for name, params in SIGNATURES.items():
        for suffix, ctype in DTYPES.values():
            args = ", ".join(f"{kind.replace('T*', ctype + '*')} {param}" for param, kind in params)
            lines.append(f"void {name}_{suffix}({args});")
    lines.append("}")
    return "\n".join(lines) + "\n"


class Kernel:
    """One ABI function, both dtypes, called with named arguments: tensors (or None) for pointers."""

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        params = SIGNATURES[name]
        self.name = name
        self._pointers = tuple(kind.endswith("*") for _, kind in params)
        self._names = tuple(param for param, _ in params)
        argtypes = [ctypes.c_void_p if kind.endswith("*") else _CTYPES[kind] for _, kind in params]
        self._functions = {}
        for dtype, (suffix, _) in DTYPES.items():
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes, function.restype = argtypes, None
            self._functions[dtype] = function

    def __call__(self, dtype: torch.dtype, **args: Any) -> None:
        if len(args) != len(self._names):
            raise TypeError(f"{self.name} takes {', '.join(self._names)}; got {', '.join(args)}")
        values = [args[name] for name in self._names]  # KeyError names a missing argument
        for i, pointer in enumerate(self._pointers):
            if pointer and values[i] is not None:
                values[i] = values[i].data_ptr()
        self._functions[dtype](*values)
