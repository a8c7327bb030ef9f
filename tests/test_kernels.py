"""Building, caching, verifying and falling back from bnlab's compiled batch-norm kernels."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from bnlab import kernels
from bnlab import nn as norm
from bnlab.kernels import abi, build

needs_compiler = pytest.mark.skipif(build.compiler() is None, reason="needs a C++ compiler")


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A clean loader state with its own cache folder; the real state comes back afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_kernels", None)
    monkeypatch.setattr(kernels, "_failure", None)
    return tmp_path


def test_without_a_compiler_bnlab_falls_back_with_one_warning(fresh_kernels, monkeypatch):
    monkeypatch.setattr(build, "compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert not kernels.available()
    assert "tensor ops (kernels unavailable" in kernels.status()
    layer = norm.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer(x), torch.nn.functional.batch_norm(x, None, None, training=True))


def test_a_failing_build_falls_back(fresh_kernels, monkeypatch):
    monkeypatch.setattr(build, "SOURCE", fresh_kernels / "broken.cpp")
    (fresh_kernels / "broken.cpp").write_text("this is not C++")
    with pytest.warns(RuntimeWarning, match="failed"):
        assert not kernels.available()
    assert not [p for p in (fresh_kernels / "bnlab" / "kernels").iterdir()]  # no half-written files


@needs_compiler
def test_the_build_is_cached_per_source(fresh_kernels, monkeypatch):
    first = build.library(build.compiler())
    assert first.is_file() and first.parent == fresh_kernels / "bnlab" / "kernels"
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    assert build.library(build.compiler()) == first
    assert all("--version" in cmd for cmd in calls)  # nothing recompiled


@needs_compiler
@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(fresh_kernels, damage):
    """A truncated library crashed every later run with SIGBUS; its checksum now catches it first."""
    library = build.library(build.compiler())
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\0" * len(data))
    with pytest.warns(UserWarning, match="damaged kernel library"):
        rebuilt = build.library(build.compiler())
    assert rebuilt.read_bytes() == data
    # and in a fresh process (where a bad load would kill the interpreter) the kernels load and run
    rebuilt.write_bytes(data[:100])
    code = (
        "from bnlab import kernels; import torch, bnlab; print(kernels.status()); "
        "bnlab.BatchNorm2d(3)(torch.randn(4, 3, 2, 2))"
    )
    env = os.environ | {"XDG_CACHE_HOME": str(fresh_kernels)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("compiled kernels") and "damaged kernel library" in result.stderr


def test_env_var_turns_the_kernels_off():
    code = "from bnlab import kernels; print(kernels.status())"
    env = os.environ | {"BNLAB_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("tensor ops (kernels turned off")


def test_kernels_are_not_used_where_they_do_not_apply():
    x = torch.randn(4, 3, 5, 5)
    assert kernels.layout(x) is kernels.Layout.NCS
    assert kernels.layout(x.contiguous(memory_format=torch.channels_last)) is kernels.Layout.NSC
    assert kernels.layout(x.half()) is None  # float16: tensor ops with float32 statistics
    assert kernels.layout(x.transpose(2, 3)) is None  # neither layout
    assert not kernels.usable(x, torch.ones(3, dtype=torch.float64))  # mixed dtypes


def test_the_abi_is_declared_once_and_called_by_name():
    header = abi.header()
    for name, params in abi.SIGNATURES.items():
        assert f"void {name}_f32(" in header and f"void {name}_f64(" in header
        assert header.count(params[0][0]) >= 2  # parameter names appear in the declarations
    assert f"#define BNLAB_ABI_VERSION {abi.VERSION}" in header
    if not kernels.available():
        pytest.skip("kernels unavailable")
    kernel = kernels._kernels["bn_normalize"]
    with pytest.raises(TypeError, match="bn_normalize takes x, weight, bias"):
        kernel(torch.float32, x=None)
    assert isinstance(kernel._functions[torch.float32], ctypes._CFuncPtr)
