"""Compile ``batch_norm.cpp`` once per machine, cache the library, and verify it before loading it.

The library lands in ``$XDG_CACHE_HOME/bnlab/kernels/`` (default ``~/.cache/bnlab/kernels``) as
``batch_norm-KEY-SHA.so``. KEY hashes what decides the build (source, ABI header, flags, compiler,
CPU), so a changed source or another machine builds anew. SHA is the first 16 hex digits of the
file's own SHA-256, checked before every load: a truncated or overwritten library (which would crash
the process with SIGBUS when loaded) is deleted and rebuilt, with a warning, instead of loaded.
Files are written under a temporary name and renamed into place, so concurrent builders each
install a complete library.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from bnlab.kernels import abi

SOURCE = Path(__file__).with_name("batch_norm.cpp")
# -fno-trapping-math lets masked (ReLU) loops vectorize as blends; bnlab never reads FP exception flags.
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]


def compiler() -> str | None:
    """``$CXX``, else the first of c++, g++, clang++ on the PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlab" / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def library(cxx: str) -> Path:
    """A verified library for this source, compiler and CPU, compiling it first if needed."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    ingredients = [SOURCE.read_text(), abi.header(), " ".join(FLAGS), version, platform.platform(), _cpu_signature()]
    key = hashlib.sha256("\n".join(ingredients).encode()).hexdigest()[:16]
    directory = cache_dir()
    for candidate in sorted(directory.glob(f"batch_norm-{key}-*.so")):
        if _digest(candidate) == candidate.stem.rsplit("-", 1)[-1]:
            return candidate
        warnings.warn(f"bnlab: damaged kernel library {candidate} (checksum mismatch); rebuilding it", stacklevel=2)
        candidate.unlink(missing_ok=True)
    return _compile(cxx, directory, key)


def _compile(cxx: str, directory: Path, key: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        (Path(tmp) / "bnlab_abi.h").write_text(abi.header())
        output = Path(tmp) / "batch_norm.so"
        errors = []
        # Without OpenMP (e.g. Apple clang) the pragmas are ignored: one thread, still one pass fewer.
        for flags in (FLAGS, [f for f in FLAGS if f != "-fopenmp"]):
            command = [cxx, *flags, f"-I{tmp}", str(SOURCE), "-o", str(output)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                target = directory / f"batch_norm-{key}-{_digest(output)}.so"
                os.replace(output, target)  # atomic: a reader sees no library or a whole one
                return target
            errors.append(result.stderr.strip()[-300:])
        raise RuntimeError(f"{cxx} failed: {errors[-1]}")
