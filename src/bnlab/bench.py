"""Speed benchmarks: bnlab's BN layer against PyTorch's, and the seed experiment's training speed.

``layer_benchmark`` times forward + backward of one BN layer, bnlab's against ``torch.nn``'s, at the
seed network's shapes (batch 64) and at an ImageNet-like shape (N=32, C=64, 56x56), contiguous and
channels_last. Repetitions alternate between the two implementations so that drift in the
machine's speed hits both alike; figures are medians.

``training_benchmark`` measures, per BN mode at the seed settings: milliseconds per training step,
the whole 800-batch run with the notebook's evaluation cadence, training seconds to reach 95% and
97% validation accuracy, inference images per second, and peak memory. Each (mode, path) runs in
its own process, so peak memory and warm caches belong to that run alone.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnlab import kernels, reports
from bnlab.config import BN_MODES, TrainConfig
from bnlab.data import fetch_mnist, load_mnist
from bnlab.errors import BnlabError
from bnlab.models import build_model
from bnlab.nn import batchnorm as norm
from bnlab.training import Hook, LoopState, evaluate, fit, resolve_device, train
from bnlab.training.runner import prepare

_SIZES = [28] * 2 + [14] * 3 + [7] * 3 + [4] * 3 + [2] * 3 + [1] * 5  # spatial size after conv d = 1..19
SEED_SHAPES = [(64, 4 * d, s, s) for d, s in zip(range(1, 20), _SIZES, strict=True)] + [(64, 100)]
LARGE_SHAPE = (32, 64, 56, 56)


def median_pair(run_a: Callable[[], None], run_b: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median seconds of a and b, measured alternately after a warm-up."""
    for _ in range(3):
        run_a()
        run_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for run, times in ((run_a, times_a), (run_b, times_b)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


@dataclass
class LayerTiming:
    shape: tuple[int, ...]
    layout: str
    relu: bool
    native_us: float
    bnlab_us: float

    @property
    def ratio(self) -> float:
        return self.bnlab_us / self.native_us


def time_layer(shape: Sequence[int], layout: str = "contiguous", relu: bool = False, repeats: int = 30) -> LayerTiming:
    """Forward + backward of bnlab's BatchNorm vs torch.nn's (followed by ReLU when ``relu``)."""
    c = shape[1]
    native = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(c)
    ours = (norm.BatchNorm1d if len(shape) == 2 else norm.BatchNorm2d)(c, fused_relu=relu)
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)

    def run_native() -> None:
        y = native(x)
        (torch.relu(y) if relu else y).backward(dy)

    def run_ours() -> None:
        ours(x).backward(dy)

    native_s, ours_s = median_pair(run_native, run_ours, repeats)
    return LayerTiming(tuple(shape), layout, relu, native_s * 1e6, ours_s * 1e6)


def layer_benchmark(repeats: int = 30, relu: bool = False) -> list[LayerTiming]:
    timings = []
    for layout in ("contiguous", "channels_last"):
        for shape in SEED_SHAPES:
            if layout == "channels_last" and len(shape) == 2:
                continue
            timings.append(time_layer(shape, layout, relu, repeats))
        timings.append(time_layer(LARGE_SHAPE, layout, relu, max(5, repeats // 3)))
    return timings


def layer_table(timings: Sequence[LayerTiming]) -> str:
    rows = []
    for layout in ("contiguous", "channels_last"):
        seed = [t for t in timings if t.layout == layout and t.shape != LARGE_SHAPE]
        for t in timings:
            if t.layout == layout:
                shape = "x".join(map(str, t.shape))
                rows.append([shape, layout, f"{t.native_us:.1f}", f"{t.bnlab_us:.1f}", f"{t.ratio:.2f}"])
        if seed:
            native, ours = sum(t.native_us for t in seed), sum(t.bnlab_us for t in seed)
            rows.append(
                [f"all {len(seed)} seed-network shapes", layout, f"{native:.1f}", f"{ours:.1f}", f"{ours / native:.2f}"]
            )
    relu = " + ReLU" if timings and timings[0].relu else ""
    headers = ["shape", "layout", f"torch.nn{relu} us", f"bnlab{relu} us", "bnlab/torch"]
    return reports.markdown_table(headers, rows)


# ---- training speed -------------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StepTimes(Hook):
    """Seconds of each training step, read off the loop's clock (evaluation and hooks excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = 0.0

    def start(self, state: LoopState) -> None:
        self.last = state.clock

    def after_step(self, state: LoopState) -> None:
        self.times.append(state.clock - self.last)
        self.last = state.clock


class Stepper:
    """The seed network trained a few steps at a time by the training loop, each step timed; levers on or off."""

    def __init__(
        self,
        bn: str,
        data: Any,
        device: torch.device,
        channels_last: bool = True,
        fused_adam: bool = True,
        compiled_kernels: bool = True,
    ) -> None:
        self.config = TrainConfig(bn=bn)
        self.state, self.batches = prepare(self.config, data, device, channels_last=channels_last, fused=fused_adam)
        self.model = self.state.model
        self.compiled_kernels = compiled_kernels and kernels.available()

    def run(self, steps: int) -> list[float]:
        """Seconds per step for the next ``steps`` steps."""
        timer = StepTimes()
        with kernels.use_kernels(self.compiled_kernels):
            fit(self.state, self.batches, steps=self.state.step + steps, loss=self.config.loss, hooks=[timer])
        return timer.times


def step_times(bn: str, data: Any, device: torch.device, steps: int = 110, **levers: bool) -> list[float]:
    """Seconds per training step of the seed network (the first 10 steps, warm-up, dropped)."""
    return Stepper(bn, data, device, **levers).run(steps)[10:]


def _time_to_accuracy(
    bn: str, fast: bool, data: Any, device: torch.device, targets: Sequence[float], max_batches: int
) -> dict[str, Any]:
    """Training seconds (evaluation excluded) until validation accuracy first reaches each target.

    Same procedure as the notebook's run, with the validation set scored every 25 batches.
    """
    stepper = Stepper(bn, data, device, channels_last=fast, fused_adam=fast, compiled_kernels=fast)
    reached: dict[str, Any] = {f"{t:.2f}": None for t in targets}
    trained = 0.0
    for batches in range(25, max_batches + 1, 25):
        trained += sum(stepper.run(25))
        accuracy = evaluate(stepper.model, data.validation)[1]
        for t in targets:
            if reached[f"{t:.2f}"] is None and accuracy >= t:
                reached[f"{t:.2f}"] = {"seconds": round(trained, 3), "batches": batches}
        if all(v is not None for v in reached.values()):
            break
    return reached


def _throughput(bn: str, fast: bool, data: Any, device: torch.device) -> float:
    """Test images per second in eval mode (median of 5 passes over the 10,000)."""
    model = build_model(bn, seed=0).to(device).eval()
    if fast:
        model = model.to(memory_format=torch.channels_last)
    with kernels.use_kernels(fast):
        evaluate(model, data.validation)  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            evaluate(model, data.test)
            times.append(time.perf_counter() - start)
        return len(data.test) / statistics.median(times)


def measure_mode(
    bn: str, fast: bool, runs: int, steps: int, device_name: str = "auto", data_dir: str | None = None
) -> dict[str, Any]:
    """Everything ``training_benchmark`` reports for one mode and path (run in a fresh process)."""
    device = resolve_device(device_name)
    data = load_mnist(data_dir).to(device)
    out: dict[str, Any] = {"bn": bn, "fast": fast, "device": str(device), "threads": torch.get_num_threads()}
    with kernels.use_kernels(fast):
        out["kernels"] = kernels.status() if bn == "manual" else None
        step = step_times(bn, data, device, steps, channels_last=fast, fused_adam=fast, compiled_kernels=fast)
        out["step_ms"] = _stats([t * 1e3 for t in step])
        walls, accuracies = [], []
        for _ in range(runs):
            result = train(TrainConfig(bn=bn), data, device=device, log=lambda _: None, progress=False, fast=fast)
            walls.append(result.wall_seconds)
            accuracies.append(result.test_accuracy)
        out["run_s"] = _stats(walls)
        out["test_accuracy"] = accuracies
        out["time_to_accuracy"] = (
            _time_to_accuracy(bn, fast, data, device, (0.95, 0.97), max_batches=2000) if bn != "none" else None
        )
        out["inference_images_per_s"] = round(_throughput(bn, fast, data, device))
    out["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def training_benchmark(
    modes: Sequence[str] = BN_MODES,
    paths: Sequence[bool] = (True,),
    runs: int = 3,
    steps: int = 110,
    device: str = "auto",
    data_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run ``measure_mode`` for each (mode, path) in its own Python process; return their reports."""
    resolve_device(device)  # bad usage and missing data fail here, in one line, not inside a worker
    fetch_mnist(data_dir)
    results = []
    for fast in paths:
        for bn in modes:
            log(f"bench: bn={bn}, {'fast' if fast else 'slow'} path ...")
            params = {"bn": bn, "fast": fast, "runs": runs, "steps": steps, "device_name": device, "data_dir": data_dir}
            args = json.dumps(params)
            proc = subprocess.run(
                [sys.executable, "-m", "bnlab.bench", args], capture_output=True, text=True, env=os.environ.copy()
            )
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                raise BnlabError(f"the benchmark worker for bn={bn} failed: {last}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def training_table(results: Sequence[dict[str, Any]]) -> str:
    def spread(s: dict[str, float], digits: int) -> str:
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    def reach(r: dict[str, Any], key: str) -> str:
        hit = (r["time_to_accuracy"] or {}).get(key)
        return "not reached" if hit is None else f"{hit['seconds']:.1f} s ({hit['batches']} b)"

    baseline = {r["fast"]: r["step_ms"]["median"] for r in results if r["bn"] == "none"}
    rows = []
    for r in results:
        base = baseline.get(r["fast"])
        overhead = "" if base is None or r["bn"] == "none" else f"{(r['step_ms']['median'] / base - 1) * 100:+.0f}%"
        rows.append([
            r["bn"], "fast" if r["fast"] else "slow", spread(r["step_ms"], 2), overhead, spread(r["run_s"], 1),
            reach(r, "0.95"), reach(r, "0.97"), f"{r['inference_images_per_s']:,}", f"{r['peak_rss_mib']:.0f}",
            f"{statistics.fmean(r['test_accuracy']):.4f}",
        ])  # fmt: skip
    headers = ["bn", "path", "ms/step", "vs none", "800-batch run s", "to 95%", "to 97%", "inference img/s",
               "peak RSS MiB", "test acc"]  # fmt: skip
    return reports.markdown_table(headers, rows)


def describe_machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def _worker(argv: Sequence[str]) -> None:
    params = json.loads(argv[0])
    print(json.dumps(measure_mode(**params)))


if __name__ == "__main__":
    _worker(sys.argv[1:])
