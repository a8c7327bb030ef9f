"""Each speed lever of the fast path, measured on its own: ms per training step of the seed network.

    python benchmarks/levers.py [--steps 210]

Starts from the plain eager setup (contiguous tensors, PyTorch's default Adam, bnlab's BN through
tensor ops) and turns on one lever at a time, then all of them, per BN mode. Also times evaluating
the 5,000 validation images in chunks of several sizes. Medians, measured round robin.
"""

import argparse
import statistics
import time

import torch

from bnlab import bench, reports
from bnlab.data import load_mnist
from bnlab.models import build_model
from bnlab.training import evaluate

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=210, help="training steps per measurement (default 210)")
args = parser.parse_args()

LEVERS = {
    "plain eager": dict(channels_last=False, fused_adam=False, compiled_kernels=False),
    "+ channels_last": dict(channels_last=True, fused_adam=False, compiled_kernels=False),
    "+ fused Adam": dict(channels_last=False, fused_adam=True, compiled_kernels=False),
    "+ compiled BN kernels": dict(channels_last=False, fused_adam=False, compiled_kernels=True),
    "all three (the fast path)": dict(channels_last=True, fused_adam=True, compiled_kernels=True),
}
print(bench.describe_machine())
data = load_mnist()
device = torch.device("cpu")
steppers = {}
for lever, options in LEVERS.items():
    for bn in ("none", "torch", "manual"):
        steppers[lever, bn] = bench.Stepper(bn, data, device, **options)
        steppers[lever, bn].run(10)  # warm-up
# Round robin, 10 steps at a time: drift in the machine's speed spreads evenly over every setup.
times: dict = {key: [] for key in steppers}
for _ in range(args.steps // 10):
    for key, stepper in steppers.items():
        times[key] += stepper.run(10)
ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}
rows = [[lever] + [f"{ms[lever, bn]:.2f}" for bn in ("none", "torch", "manual")] for lever in LEVERS]
print("\nms per training step (median)\n")
print(reports.markdown_table(["lever", "none", "torch", "manual"], rows))

CHUNKS = (64, 256, 1000, 5000)
models = {bn: build_model(bn).to(memory_format=torch.channels_last).eval() for bn in ("none", "torch", "manual")}
scoring: dict = {(chunk, bn): [] for chunk in CHUNKS for bn in models}
for _ in range(5):  # round robin again
    for chunk, bn in scoring:
        start = time.perf_counter()
        evaluate(models[bn], data.validation, chunk=chunk)
        scoring[chunk, bn].append(time.perf_counter() - start)
rows = [[str(chunk)] + [f"{statistics.median(scoring[chunk, bn]) * 1e3:.0f}" for bn in models] for chunk in CHUNKS]
print("\nms to score the 5,000 validation images, by chunk size (median of 5)\n")
print(reports.markdown_table(["chunk", "none", "torch", "manual"], rows))
