"""Compile ``operators.cpp`` (with ``batch_norm.h``) once per machine, cache the library, verify it before loading.

The library is C++ against PyTorch's headers and libraries (``torch/include``, ``torch/lib``); it
takes about 40 seconds to build, once. It lands in ``$XDG_CACHE_HOME/bnlab/kernels/`` (default
``~/.cache/bnlab/kernels``) as ``operators-KEY-SHA.so``. KEY hashes what decides the build
(sources, flags, compiler, PyTorch version, CPU), so a changed source, another PyTorch or another
machine builds anew. SHA is the first 16 hex digits of the
file's own SHA-256, checked before every load: a truncated or overwritten library (which would crash
the process with SIGBUS when loaded) is deleted and rebuilt, with a warning, instead of loaded.
Files are written under a temporary name and renamed into place, so concurrent builders each
install a complete library. The compiler runs in a process group of its own: if the build is
interrupted (Ctrl-C, or the ``bnlab`` command's SIGTERM handler raising ``Interrupted``), the whole
group is ended, the compiler driver's children (cc1plus, as, ld) with it, and the temporary build
folder is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("operators.cpp")
HEADER = Path(__file__).with_name("batch_norm.h")
# -fno-trapping-math lets masked (ReLU) loops vectorize as blends; bnlab never reads FP exception flags.
# -w: PyTorch's headers warn by the hundred under some compilers (C++20 features under older defaults).
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-w"]


def torch_flags() -> list[str]:
    """Compile and link flags for PyTorch's C++ API, from the installed torch package."""
    root = Path(torch.__file__).parent
    return [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{root / 'include'}",
        f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-L{root / 'lib'}",
        f"-Wl,-rpath,{root / 'lib'}",
    ]


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


def key(cxx: str) -> str:
    """What decides the build, hashed: sources, flags, compiler, PyTorch, platform and CPU."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    ingredients = [SOURCE.read_text(), HEADER.read_text(), " ".join(FLAGS + torch_flags()), version, torch.__version__]
    return hashlib.sha256("\n".join([*ingredients, platform.platform(), _cpu_signature()]).encode()).hexdigest()[:16]


def library(cxx: str) -> Path:
    """A verified library for this source, compiler and CPU, compiling it first if needed."""
    build_key = key(cxx)
    directory = cache_dir()
    for candidate in sorted(directory.glob(f"operators-{build_key}-*.so")):
        if _digest(candidate) == candidate.stem.rsplit("-", 1)[-1]:
            return candidate
        warnings.warn(f"bnlab: damaged kernel library {candidate} (checksum mismatch); rebuilding it", stacklevel=2)
        candidate.unlink(missing_ok=True)
    return _compile(cxx, directory, build_key)


def _end_group(process: subprocess.Popen) -> None:
    """End the process group led by ``process``: SIGTERM (gcc's driver then deletes its temporary files), SIGKILL
    for whatever is left, also if a second interrupt arrives meanwhile; ``process`` reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _run_compiler(command: list[str]) -> subprocess.CompletedProcess:
    """``subprocess.run(command)`` with the output captured, in a new session: if this process is interrupted
    (or anything else raises meanwhile), the compiler and every process it started are ended before the
    exception goes on. (A SIGTERM to bnlab otherwise left cc1plus running as an orphan.)"""
    pipe = subprocess.PIPE
    with subprocess.Popen(command, stdout=pipe, stderr=pipe, text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate()
        except BaseException:
            _end_group(process)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _compile(cxx: str, directory: Path, key: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # a first CPU batch norm otherwise stalls for a minute without a word
    print("bnlab: compiling the CPU batch-norm kernels for this machine (once, about a minute)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        output = Path(tmp) / "operators.so"
        errors = []
        # Without OpenMP (e.g. Apple clang) the pragmas are ignored: one thread, still one pass fewer.
        for flags in (FLAGS, [f for f in FLAGS if f != "-fopenmp"]):
            command = [cxx, *flags, *torch_flags(), str(SOURCE), "-o", str(output), "-lc10", "-ltorch_cpu"]
            result = _run_compiler(command)
            if result.returncode == 0:
                target = directory / f"operators-{key}-{_digest(output)}.so"
                os.replace(output, target)  # atomic: a reader sees no library or a whole one
                return target
            errors.append(result.stderr.strip()[-300:])
        raise RuntimeError(f"{cxx} failed: {errors[-1]}")
