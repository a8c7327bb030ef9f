"""Building, caching, verifying, installing and falling back from bnlab's compiled CPU kernels."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bnlab
from bnlab import kernels
from bnlab.errors import UsageError
from bnlab.kernels import build

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="needs the compiled kernels")


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A clean loader state with its own cache folder; the process's kernels come back afterwards."""
    with kernels.use_kernels(False):  # the process's own kernels leave the dispatcher meanwhile
        saved = kernels._library, kernels._failure
        kernels._library = kernels._failure = None
        kernels._enabled = True
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        try:
            yield tmp_path
        finally:
            kernels._register(False)  # a library loaded by the test leaves the dispatcher too
            kernels._library, kernels._failure = saved


@pytest.fixture(scope="module")
def pristine() -> bytes:
    """This machine's built library (from the real cache, built there first if needed)."""
    if not kernels.available():
        pytest.skip("needs the compiled kernels")
    return build.library(build.compiler()).read_bytes()


def _install_in_cache(data: bytes, directory: Path | None = None) -> Path:
    """Put a library into a cache folder (default: the current one) under the name a build of it would get."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    target = (directory or build.cache_dir()) / f"operators-{build.key(build.compiler())}-{digest}.so"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def _same_as_tensor_ops(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Outputs, gradients and running statistics agree between the kernels and the tensor ops."""
    results = []
    for on in (True, False):
        layer = copy.deepcopy(model)
        xi = x.detach().clone().requires_grad_()
        with kernels.use_kernels(on):
            y = layer(xi)
            y.float().square().sum().backward()
        results.append((y, xi.grad, layer.weight.grad, layer.running_mean, layer.running_var))
    for a, b in zip(*results, strict=True):
        tol = {"rtol": 1e-2, "atol": 1e-2} if a.dtype in (torch.float16, torch.bfloat16) else {}
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):  # the layouts the kernels keep
        assert results[0][0].stride() == results[1][0].stride() == x.stride()


def test_without_a_compiler_bnlab_falls_back_with_one_warning(fresh_kernels, monkeypatch):
    monkeypatch.setattr(build, "compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert not kernels.available()
    assert "tensor ops (kernels unavailable" in kernels.status()
    layer = bnlab.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer(x), torch.nn.functional.batch_norm(x, None, None, training=True))
    assert not kernels._installed


def test_a_failing_build_falls_back(fresh_kernels, monkeypatch):
    monkeypatch.setattr(build, "SOURCE", fresh_kernels / "broken.cpp")
    (fresh_kernels / "broken.cpp").write_text("this is not C++")
    with pytest.warns(RuntimeWarning, match="failed"):
        assert not kernels.available()
    assert not [p for p in (fresh_kernels / "bnlab" / "kernels").iterdir()]  # no half-written files


def test_a_cached_library_is_verified_and_reused(fresh_kernels, pristine, monkeypatch):
    cached = _install_in_cache(pristine)
    monkeypatch.setattr(build, "_run_compiler", lambda command: pytest.fail(f"recompiled: {command}"))
    assert build.library(build.compiler()) == cached


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(fresh_kernels, pristine, monkeypatch, damage):
    """A truncated library crashed every later run with SIGBUS; its checksum now catches it first."""
    cached = _install_in_cache(pristine)
    cached.write_bytes(pristine[: len(pristine) // 3] if damage == "truncate" else b"\0" * len(pristine))
    builds = []
    monkeypatch.setattr(
        build, "_compile", lambda cxx, directory, key: builds.append(key) or _install_in_cache(pristine)
    )
    with pytest.warns(UserWarning, match="damaged kernel library"):
        rebuilt = build.library(build.compiler())
    assert len(builds) == 1 and rebuilt.read_bytes() == pristine


@needs_kernels
def test_a_damaged_library_is_rebuilt_by_a_fresh_process(tmp_path, pristine):
    """Where loading it would kill the interpreter: the process rebuilds it (a real build) and runs."""
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path), "BNLAB_KERNELS": "1"}
    _install_in_cache(pristine, tmp_path / "bnlab" / "kernels").write_bytes(pristine[:100])
    code = (
        "from bnlab import kernels; import torch, bnlab; print(kernels.status()); "
        "bnlab.BatchNorm2d(3)(torch.randn(4, 3, 2, 2)); assert kernels._installed"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("compiled kernels") and "damaged kernel library" in result.stderr


def test_env_var_turns_the_kernels_off():
    code = (
        "from bnlab import kernels; import torch, bnlab; bnlab.BatchNorm1d(3)(torch.randn(4, 3)); "
        "print(kernels.status(), kernels._installed)"
    )
    env = os.environ | {"BNLAB_KERNELS": " Off "}  # any case, spaces ignored
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("tensor ops (kernels turned off") and out.strip().endswith("False")


@pytest.mark.parametrize(
    ("value", "on"),
    [
        *[("1", True), ("TRUE", True), (" yes", True), ("on", True), ("", True), (" ", True)],
        *[("0", False), ("false", False), ("No", False), ("OFF ", False)],
    ],
)
def test_env_values_that_switch_the_kernels(monkeypatch, value, on):
    monkeypatch.setenv("BNLAB_KERNELS", value)
    assert kernels._from_environment() is on


@pytest.mark.parametrize("value", ["garbage", "2", "0ff", "-", "enabled"])
def test_unknown_env_values_are_refused(monkeypatch, value):
    monkeypatch.setenv("BNLAB_KERNELS", value)
    with pytest.raises(UsageError, match=f"BNLAB_KERNELS={value!r} is not one of 1, true, yes, on, 0, false, no, off"):
        kernels._from_environment()


def test_an_unknown_env_value_is_a_one_line_cli_error_at_first_use():
    """BNLAB_KERNELS=garbage silently meant "on"; now the first batch-norm call refuses it: one line, exit 2."""
    env = os.environ | {"BNLAB_KERNELS": "garbage"}
    cli = subprocess.run([sys.executable, "-m", "bnlab.cli", "summary"], env=env, capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr.strip().splitlines() == [
        "bnlab summary: error: BNLAB_KERNELS='garbage' is not one of 1, true, yes, on, 0, false, no, off (any case); "
        "set BNLAB_KERNELS=0 for the tensor-op implementation, or unset it for the compiled kernels"
    ]


def _processes() -> dict[int, tuple[str, str, int, int]]:
    """pid -> (name, state, parent pid, process group) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            text = stat.read_text()
            state, parent, group = text[text.rindex(")") + 2 :].split()[:3]
            table[int(stat.parent.name)] = (
                text[text.index("(") + 1 : text.rindex(")")],
                state,
                int(parent),
                int(group),
            )
    return table


def _compiler_processes(cli: int) -> set[int]:
    """The processes ``cli`` started and theirs, once the compiler driver runs a child (cc1plus); else empty."""
    table = _processes()
    found, depth, frontier = set(), 0, {cli}
    while frontier:
        frontier = {pid for pid, (_, state, parent, _) in table.items() if parent in frontier and state != "Z"}
        found |= frontier
        depth += 1 if frontier else 0
    return found if depth >= 2 else set()


def _survivors(pids: set[int], group: int) -> list[str]:
    """Which of ``pids``, and of the processes in ``group`` (unless it is this test's own), still run."""
    own = os.getpgrp()
    return [
        f"{name} ({pid})"
        for pid, (name, state, _, pgrp) in _processes().items()
        if state not in "ZX" and (pid in pids or (pgrp == group and group != own))
    ]


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or build.compiler() is None, reason="needs /proc, a compiler")
def test_an_interrupted_build_ends_the_whole_compiler_process_group(tmp_path):
    """SIGTERM to bnlab during the first-use build: exit 130, no compiler process survives (cc1plus, started by the
    compiler driver, kept running as an orphan), and the temporary build folder is gone."""
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path), "BNLAB_KERNELS": "1"}  # an empty cache: a real build
    command = [sys.executable, "-m", "bnlab.cli", "summary"]
    bnlab_cli = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    compilers, group = set(), 0
    try:
        deadline = time.monotonic() + 120
        while not compilers and bnlab_cli.poll() is None and time.monotonic() < deadline:
            compilers = _compiler_processes(bnlab_cli.pid)
            time.sleep(0.05)
        assert compilers, f"no compiler seen running: {bnlab_cli.poll()}"
        group = _processes()[min(compilers)][3]  # the driver's (the first started, lowest pid unless pids wrapped)
        bnlab_cli.send_signal(signal.SIGTERM)
        _, stderr = bnlab_cli.communicate(timeout=60)
        assert bnlab_cli.returncode == 130, stderr
        assert stderr.strip().endswith("bnlab summary: interrupted; files already written are intact")
        # killed, they are gone at once; an orphan would go on compiling for far longer (the build takes 20-40 s)
        deadline = time.monotonic() + 5
        while _survivors(compilers, group) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _survivors(compilers, group) == []
        assert list((tmp_path / "bnlab" / "kernels").iterdir()) == []  # no build folder, no library
    finally:
        if bnlab_cli.poll() is None:
            bnlab_cli.kill()
        bnlab_cli.communicate()
        for pid in compilers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if group and group != os.getpgrp():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)


@needs_kernels
def test_use_kernels_adds_and_removes_the_cpu_kernels_from_the_dispatcher():
    def registered() -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key("bnlab::batch_norm_train", "AutogradCPU")

    x = torch.randn(4, 3, requires_grad=True)
    bnlab.BatchNorm1d(3)(x)  # the first CPU call installs them
    assert registered() and type(bnlab.BatchNorm1d(3)(x).grad_fn).__name__ == "CppFunction"
    with kernels.use_kernels(False):
        assert not registered()
        assert type(bnlab.BatchNorm1d(3)(x).grad_fn).__name__ == "_TrainBackward"  # ops.py's Python autograd
    assert registered()


@needs_kernels
@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x.transpose(2, 3),  # neither layout: made contiguous for the kernels
        lambda x: x[:, :, ::2],  # strided
        lambda x: x.double(),
        lambda x: x.half(),  # computed in float32, as the tensor ops do
        lambda x: x.bfloat16(),
    ],
    ids=["contiguous", "channels_last", "transposed", "strided", "float64", "float16", "bfloat16"],
)
def test_kernels_take_every_cpu_input_the_tensor_ops_take(make):
    torch.manual_seed(0)
    x = make(torch.randn(6, 3, 4, 5) * 3 + 2)
    layer = bnlab.BatchNorm2d(3, dtype=x.dtype if x.dtype == torch.float64 else None)
    _same_as_tensor_ops(layer, x)


@needs_kernels
def test_mixed_dtypes_and_buffers_follow_the_tensor_ops():
    layer = bnlab.BatchNorm1d(3)
    layer.running_mean = layer.running_mean.double()  # a buffer of another dtype: updated in its own
    _same_as_tensor_ops(layer, torch.randn(8, 3, 5))


@pytest.mark.parametrize("on", [True, False], ids=["kernels", "tensor-ops"])
@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((torch.ones(4, 3, dtype=torch.long), None), TypeError, "expects a floating-point input"),
        ((torch.randn(4, 3), torch.ones(4)), ValueError, "got 3 features .* its weight has shape \\[4\\]"),
        ((torch.randn(1, 3), None), ValueError, "more than one value per feature"),
        ((torch.randn(4), None), ValueError, "expects input of shape \\(N, C, \\*\\)"),
    ],
    ids=["integer", "weight-shape", "batch-of-one", "1d"],
)
def test_both_paths_refuse_bad_inputs_alike(on, args, error, message):
    x, weight = args
    with kernels.use_kernels(on), pytest.raises(error, match=message):
        torch.ops.bnlab.batch_norm_train(x, weight, None, None, None, 0.1, 1e-5, True, False)
