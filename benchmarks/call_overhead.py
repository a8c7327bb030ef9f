"""Per-call cost of bnlab's batch norm at the seed network's smallest shapes, where the overhead dominates.

For each shape, median microseconds of one training-mode forward + backward of
- ``torch.nn.BatchNorm`` (the yardstick);
- ``bnlab.BatchNorm`` (the layer: module, operator, autograd);
- bnlab's operators alone (``bnlab::batch_norm_train`` then ``bnlab::batch_norm_backward``, no
  autograd, no module): what the arithmetic and the dispatcher cost;
and overhead = layer - operators alone. Implementations alternate within each repetition, so drift
in the machine's speed hits all alike.

``--against REV`` also times the layer of another git revision (e.g. 345ee49, the ctypes +
autograd.Function code before the operators): each round runs one process per source tree, in
turn, and a process reports its own torch.nn time too, so the revisions compare as ratios to the
same yardstick and to each other.

    python benchmarks/call_overhead.py [--repeats 15] [--calls 300] [--against 345ee49 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

SHAPES = [(64, 76, 1, 1), (64, 100), (64, 64, 2, 2), (64, 4, 28, 28)]
ROOT = Path(__file__).resolve().parents[1]


def _timer(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(shape: tuple[int, ...], repeats: int, calls: int) -> dict[str, float]:
    import bnlab  # the source tree on sys.path: this one, or another revision's under --against

    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    native = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(c)
    ours = (bnlab.BatchNorm1d if len(shape) == 2 else bnlab.BatchNorm2d)(c)
    runs = {"torch.nn": lambda: native(x).backward(dy), "bnlab": lambda: ours(x).backward(dy)}
    if hasattr(torch.ops.bnlab, "batch_norm_backward"):
        weight, bias, xd, rm, rv = (
            ours.weight.detach(),
            ours.bias.detach(),
            x.detach(),
            ours.running_mean,
            ours.running_var,
        )

        def operators() -> None:
            _, stats = torch.ops.bnlab.batch_norm_train(xd, weight, bias, rm, rv, 0.1, 1e-5, True, False)
            torch.ops.bnlab.batch_norm_backward(xd, weight, stats, dy, None)

        runs["operators"] = operators
    for fn in runs.values():  # warm-up (and the kernels' first-call installation)
        _timer(fn, calls // 3)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(_timer(fn, calls))
    return {name: statistics.median(values) for name, values in times.items()}


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    print(json.dumps({"x".join(map(str, s)): measure(s, args.repeats, args.calls) for s in SHAPES}))


def _run_tree(src: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    env = os.environ | {"PYTHONPATH": str(src)}
    command = [sys.executable, __file__, "--worker", "--repeats", str(args.repeats), "--calls", str(args.calls)]
    return json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)


def _against(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.against, "src"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        trees = {"now": ROOT / "src", args.against: Path(tmp) / "src"}
        rounds: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, src in trees.items():
                rounds[name].append(_run_tree(src, args))
    print(f"layer forward + backward, microseconds, median of {args.rounds} alternating processes (1 thread)")
    print(f"| shape | torch.nn | bnlab {args.against} | bnlab now | now / {args.against} | now / torch.nn |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in ("x".join(map(str, s)) for s in SHAPES):

        def med(name: str, key: str, shape: str = shape) -> float:
            return statistics.median(r[shape][key] for r in rounds[name])

        torch_nn = statistics.median(r[shape]["torch.nn"] for name in trees for r in rounds[name])
        old, now = med(args.against, "bnlab"), med("now", "bnlab")
        print(f"| {shape} | {torch_nn:.1f} | {old:.1f} | {now:.1f} | {now / old:.2f} | {now / torch_nn:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--against", metavar="REV", help="also time the layer of this git revision")
    parser.add_argument("--rounds", type=int, default=5, help="with --against: processes per source tree")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    if args.against:
        return _against(args)
    from bnlab import kernels
    from bnlab.bench import describe_machine

    if not kernels.available():
        raise SystemExit(f"the kernels are not available: {kernels.status()}")
    torch.set_num_threads(1)
    print(describe_machine())
    print("| shape | torch.nn us | bnlab us | operators alone us | overhead us (bnlab - operators) | bnlab/torch |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        t = measure(shape, args.repeats, args.calls)
        overhead = t["bnlab"] - t["operators"]
        print(
            f"| {'x'.join(map(str, shape))} | {t['torch.nn']:.1f} | {t['bnlab']:.1f} | {t['operators']:.1f} | "
            f"{overhead:.1f} | {t['bnlab'] / t['torch.nn']:.2f} |"
        )


if __name__ == "__main__":
    main()
