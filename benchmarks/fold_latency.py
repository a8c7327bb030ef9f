"""Eval latency of the seed ConvNet before and after ``bnlab.fold``, at batch 1 and 256.

    python benchmarks/fold_latency.py                 # both BN modes, 1 thread and torch's default
    python benchmarks/fold_latency.py --repeats 200

The two models are timed alternately (``bench.median_pair``), so that drift in the machine's speed hits
both alike; figures are medians, and the ratio (folded / unfolded) is the number to compare between days.
The models are the notebook's network with bnlab's BN (fused ReLU, channels_last as bnlab trains it) and
with PyTorch's, weights from a seed, statistics set away from their defaults.
"""

from __future__ import annotations

import argparse

import torch

from bnlab.bench import median_pair
from bnlab.models import build_model
from bnlab.nn.fold import fold

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--repeats", type=int, default=100, help="timed repeats per model and batch (default: 100)")
args = parser.parse_args()

rows = []
for threads in sorted({1, torch.get_num_threads()}):
    torch.set_num_threads(threads)
    for bn in ("manual", "torch"):
        model = build_model(bn, seed=0).eval().to(memory_format=torch.channels_last)
        with torch.no_grad():
            for m in model.modules():
                if getattr(m, "running_var", None) is not None:
                    m.running_var.uniform_(0.5, 2.0)
                    m.running_mean.uniform_(-0.5, 0.5)
        folded = fold(model, torch.randn(8, 1, 28, 28)).model
        for batch in (1, 256):
            x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-5)
                before, after = median_pair(lambda m=model, x=x: m(x), lambda f=folded, x=x: f(x), args.repeats)
            rows.append((threads, bn, batch, before * 1e3, after * 1e3, after / before))

print(f"{'threads':>7}  {'bn':<6}  {'batch':>5}  {'before ms':>9}  {'after ms':>8}  {'after/before':>12}")
for threads, bn, batch, before, after, ratio in rows:
    print(f"{threads:>7}  {bn:<6}  {batch:>5}  {before:>9.3f}  {after:>8.3f}  {ratio:>12.2f}")
