"""Forward + backward of the BN-LSTM against the plain LSTM made of the same ops, and nn.LSTM, on CPU.

    python benchmarks/lstm_speed.py [--steps 784] [--batch 100] [--hidden 100] [--repeats 5] [--threads N]

Pixel-by-pixel MNIST's shape by default: 784 steps, batch 100, hidden 100, input 1. One training
step each (forward, a cross-entropy-like loss on the last output, backward), all models in one
process, measured round robin so that drift in the machine's speed hits all alike; figures are
medians. Rows:

    nn.LSTM                   PyTorch's (a C++ loop; on CPU, so no cuDNN)
    BNLSTM(bn=False)          bnlab's plain LSTM: the BN-LSTM's step loop without its batch norms
    BNLSTM(bn=True)           the BN-LSTM
    ..., input path <how>     the same with the input path (W_x x_t, and its BN) computed for the
                              whole sequence at once or step by step, instead of ~1 MiB chunks
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bnlab import bench, kernels
from bnlab.nn import recurrent
from bnlab.nn.recurrent import BNLSTM

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=784, help="sequence length (default 784)")
parser.add_argument("--batch", type=int, default=100, help="sequences per batch (default 100)")
parser.add_argument("--hidden", type=int, default=100, help="hidden units (default 100)")
parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per model (default 5)")
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

WHOLE, STEP = 1 << 62, 1  # input-path chunk budgets in bytes: every step in one chunk, one step per chunk


def training_step(model: nn.Module, x: torch.Tensor, readout: torch.Tensor, chunk_bytes: int) -> Callable[[], None]:
    def run() -> None:
        recurrent._CHUNK_BYTES, saved = chunk_bytes, recurrent._CHUNK_BYTES
        try:
            model.zero_grad(set_to_none=True)
            output, _ = model(x)
            (output[-1] @ readout).logsumexp(1).mean().backward()
        finally:
            recurrent._CHUNK_BYTES = saved

    return run


torch.manual_seed(0)
x = torch.rand(args.steps, args.batch, 1)  # pixel intensities, time-major
readout = torch.randn(args.hidden, 10) / args.hidden**0.5
default = recurrent._CHUNK_BYTES
chunk = recurrent._chunk_steps(args.batch, 4 * args.hidden, x.element_size())


def bnlstm(bn: bool = True) -> BNLSTM:
    return BNLSTM(1, args.hidden, max_steps=args.steps, bn=bn, h0_noise_std=0.1)


setups = {
    "nn.LSTM": (nn.LSTM(1, args.hidden), default),
    "BNLSTM(bn=False)": (bnlstm(bn=False), default),
    "BNLSTM(bn=True)": (bnlstm(), default),
    "BNLSTM(bn=False), input path at once": (bnlstm(bn=False), WHOLE),
    "BNLSTM(bn=True), input path at once": (bnlstm(), WHOLE),
    "BNLSTM(bn=True), input path per step": (bnlstm(), STEP),
}
runs = {name: training_step(model, x, readout, chunk_bytes) for name, (model, chunk_bytes) in setups.items()}
for run in runs.values():  # warm-up: allocator, kernels, first-call costs
    run()
times: dict[str, list[float]] = {name: [] for name in runs}
for _ in range(args.repeats):
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)

print(bench.describe_machine())
print(f"bnlab kernels: {kernels.status()}")
print(
    f"{args.steps} steps, batch {args.batch}, hidden {args.hidden}, input 1; forward + backward, median of "
    f"{args.repeats}; input path in chunks of {chunk} steps unless said\n"
)
median = {name: statistics.median(t) for name, t in times.items()}
plain, torch_lstm = median["BNLSTM(bn=False)"], median["nn.LSTM"]
print(f"| {'model':38s} | {'ms':>8s} | {'vs BNLSTM(bn=False)':>19s} | {'vs nn.LSTM':>10s} |")
print(f"|{'-' * 40}|{'-' * 9}:|{'-' * 20}:|{'-' * 11}:|")
for name, seconds in median.items():
    print(f"| {name:38s} | {seconds * 1e3:8.1f} | {seconds / plain:18.2f}x | {seconds / torch_lstm:9.2f}x |")
with_bn = median["BNLSTM(bn=True)"]
# the same ratio per round (the two ran back to back), so a slow stretch of the machine cancels out
paired = sorted(b / p for b, p in zip(times["BNLSTM(bn=True)"], times["BNLSTM(bn=False)"], strict=True))
print(f"\nBN-LSTM / plain LSTM of the same ops: {with_bn / plain:.2f}x (ratio of medians)")
print(f"per round: median {statistics.median(paired):.2f}x, from {paired[0]:.2f}x to {paired[-1]:.2f}x")
print(
    f"per step: plain {plain / args.steps * 1e6:.0f} us; batch norm adds {(with_bn - plain) / args.steps * 1e6:.0f} us "
    "(two batch_norm calls, forward and backward, and a share of the input path's)"
)
