"""Building, caching and falling back from bnlab's compiled batch-norm kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bnlab import kernels
from bnlab.nn import batchnorm as norm


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A clean loader state with its own cache folder; the real state comes back afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_failure", None)
    return tmp_path


def test_without_a_compiler_bnlab_falls_back_with_one_warning(fresh_kernels, monkeypatch):
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert not kernels.available()
    assert "tensor ops (kernels unavailable" in kernels.status()
    layer = norm.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer(x), torch.nn.functional.batch_norm(x, None, None, training=True))


def test_a_failing_build_falls_back(fresh_kernels, monkeypatch):
    monkeypatch.setattr(kernels, "SOURCE", fresh_kernels / "broken.cpp")
    (fresh_kernels / "broken.cpp").write_text("this is not C++")
    with pytest.warns(RuntimeWarning, match="failed"):
        assert not kernels.available()
    assert not list((fresh_kernels / "bnlab" / "kernels").glob("*.tmp"))  # no half-written files


@pytest.mark.skipif(kernels._compiler() is None, reason="needs a C++ compiler")
def test_the_build_is_cached_per_source(fresh_kernels, monkeypatch):
    first = kernels._build(kernels._compiler())
    assert first.is_file() and first.parent == fresh_kernels / "bnlab" / "kernels"
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    assert kernels._build(kernels._compiler()) == first
    assert all("--version" in cmd for cmd in calls)  # nothing recompiled


def test_env_var_turns_the_kernels_off():
    code = "from bnlab import kernels; print(kernels.status())"
    env = os.environ | {"BNLAB_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("tensor ops (kernels turned off")


def test_kernels_are_not_used_where_they_do_not_apply():
    x = torch.randn(4, 3, 5, 5)
    assert kernels.layout(x) == 0
    assert kernels.layout(x.contiguous(memory_format=torch.channels_last)) == 1
    assert kernels.layout(x.half()) is None  # float16: tensor ops with float32 statistics
    assert kernels.layout(x.transpose(2, 3)) is None  # neither layout
    assert not kernels.usable(x, torch.ones(3, dtype=torch.float64))  # mixed dtypes
