"""Per-call cost of bnlab's batch norm at the seed network's smallest shapes, where Python overhead dominates.

For each shape, median microseconds of one training-mode forward + backward of
- ``torch.nn.BatchNorm``;
- ``bnlab.BatchNorm`` (the layer, through the ``bnlab::`` operators and autograd);
- the compiled kernels called directly (forward then backward, no autograd, no dispatcher),
and the overhead = bnlab - kernels: what the layer, the dispatcher and autograd add per call.
Implementations alternate within each repetition, so drift in the machine's speed hits all alike.

    python benchmarks/call_overhead.py [--repeats 15] [--calls 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import bnlab
from bnlab import kernels
from bnlab.bench import describe_machine

SHAPES = [(64, 76, 1, 1), (64, 100), (64, 64, 2, 2)]


def _timer(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(shape: tuple[int, ...], repeats: int, calls: int) -> dict[str, float]:
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    native = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(c)
    ours = (bnlab.BatchNorm1d if len(shape) == 2 else bnlab.BatchNorm2d)(c)
    weight, bias, xd = ours.weight.detach(), ours.bias.detach(), x.detach()

    def raw_kernels() -> None:
        _, stats = kernels.forward_train(xd, weight, bias, 1e-5, False)
        kernels.backward(xd, weight, stats, dy, None)

    runs = {
        "torch.nn": lambda: native(x).backward(dy),
        "bnlab": lambda: ours(x).backward(dy),
        "kernels": raw_kernels,
    }
    for fn in runs.values():  # warm-up
        _timer(fn, calls // 3)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(_timer(fn, calls))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"the kernels are not available: {kernels.status()}")
    print(describe_machine())
    print("| shape | torch.nn us | bnlab us | kernels alone us | overhead us (bnlab - kernels) | bnlab/torch |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        t = measure(shape, args.repeats, args.calls)
        overhead = t["bnlab"] - t["kernels"]
        print(
            f"| {'x'.join(map(str, shape))} | {t['torch.nn']:.1f} | {t['bnlab']:.1f} | {t['kernels']:.1f} | "
            f"{overhead:.1f} | {t['bnlab'] / t['torch.nn']:.2f} |"
        )


if __name__ == "__main__":
    main()
