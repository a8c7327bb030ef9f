"""How fast a stack of runs trains (bnlab.training.stack), per member-step, against the same runs one at a time.

    python benchmarks/stack_speed.py [--steps 40] [--rounds 3] [--sizes 1,8,32,64] [--threads 2]

For the lab's two networks (the paper's 784-100-100-100-10 MLP, batches of 60, SGD; the notebook's
ConvNet, batches of 64, Adam) in each arm, it times training steps only (no evaluation): one run alone
through ``fit`` as the lab trained it before (channels_last, fused Adam, bnlab's kernels), then stacks of M
runs through ``fit_stack``. Rounds alternate the two, so load on the machine hits both alike; medians
over rounds. For the plain MLP it also times a hand-written stack of batched matmuls (``torch.bmm`` on
(M, B, F) activations, weights (M, in, out)), the other way the issue names, to show what vmap costs.

Throughput is FLOP/s of training work (``bnlab.training.work.step_flops``) against the float32 matmul peak
measured in the same rounds. Absolute times move with the machine and its load: compare within a row.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from bnlab.data import Batches, load_mnist
from bnlab.lab.benefits.networks import NOTEBOOK_CONVNET, PAPER_MLP
from bnlab.models import build_network
from bnlab.training import LoopState, fit
from bnlab.training.loop import fit_stack
from bnlab.training.runner import prepare
from bnlab.training.scores import training_split
from bnlab.training.stack import NetworkStack, StackOptimizer
from bnlab.training.work import matmul_peak, step_flops

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--steps", type=int, default=40, help="training steps per timing (default: 40)")
parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
parser.add_argument("--sizes", default="1,8,32,64", help="stack sizes M (default: 1,8,32,64)")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
parser.add_argument("--only", choices=("mlp", "convnet"), help="one network only")
args = parser.parse_args()
torch.set_num_threads(args.threads)
sizes = [int(s) for s in args.sizes.split(",")]
data = load_mnist()


def time_alone(config, steps: int) -> float:
    """Seconds per step of one run, as the lab trained its runs one at a time."""
    state, batches = prepare(config, data, torch.device("cpu"))
    fit(state, batches, steps=3, loss=config.loss)
    warm = state.clock
    fit(state, batches, steps=3 + steps, loss=config.loss)
    return (state.clock - warm) / steps


def time_stack(config, members: int, steps: int) -> float:
    configs = [config.replace(seed=s) for s in range(members)]
    stack = NetworkStack([build_network(c) for c in configs])
    optimizer = StackOptimizer(stack, config.optimizer, [c.lr for c in configs], config.momentum)
    states = [LoopState(m, None) for m in stack.members]
    streams = [Batches(training_split(c, data), c.batch_size, seed=c.seed) for c in configs]
    fit_stack(stack, optimizer, states, streams, steps=3, loss=config.loss, hooks=[[] for _ in configs])
    warm = states[0].clock
    fit_stack(stack, optimizer, states, streams, steps=3 + steps, loss=config.loss, hooks=[[] for _ in configs])
    return (states[0].clock - warm) / steps  # a member's share: the stack's step time over M


def time_bmm_mlp(members: int, steps: int) -> float:
    """The plain MLP as hand-written batched matmuls, SGD: seconds per member-step."""
    sizes_ = [784, 100, 100, 100, 10]
    weights = [torch.randn(members, a, b).mul_(a**-0.5).requires_grad_() for a, b in itertools.pairwise(sizes_)]
    biases = [torch.zeros(members, 1, b, requires_grad=True) for b in sizes_[1:]]
    streams = [Batches(data.train, 60, seed=s) for s in range(members)]

    def step() -> None:
        drawn = [next(s) for s in streams]
        h = torch.stack([x for x, _ in drawn]).flatten(2)
        labels = torch.stack([y for _, y in drawn])
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < len(weights) - 1:
                h = h.relu()
        loss = F.cross_entropy(h.flatten(0, 1), labels.flatten(), reduction="none").view(members, -1).mean(1).sum()
        for t in (*weights, *biases):
            t.grad = None
        loss.backward()
        with torch.no_grad():
            for t in (*weights, *biases):
                t.sub_(t.grad, alpha=0.1)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps / members


setups = {
    "MLP": {"no BN": PAPER_MLP, "bnlab BN": PAPER_MLP.replace(bn="manual"), "torch BN": PAPER_MLP.replace(bn="torch")},
    "ConvNet": {"no BN": NOTEBOOK_CONVNET, "bnlab BN": NOTEBOOK_CONVNET.replace(bn="manual")},
}
if args.only:
    setups = {k: v for k, v in setups.items() if k.lower() == args.only}
print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps per timing, {args.rounds} rounds"
)
peaks: list[float] = []
rows = []
for network, arms in setups.items():
    for arm, config in arms.items():
        flops = step_flops(config)
        alone_times, stack_times, bmm_times = [], {m: [] for m in sizes}, {m: [] for m in sizes}
        steps = args.steps if network == "MLP" else max(4, args.steps // 8)
        for _ in range(args.rounds):
            peaks.append(matmul_peak())
            alone_times.append(time_alone(config, steps))
            for m in sizes:
                stack_times[m].append(time_stack(config, m, steps))
                if network == "MLP" and arm == "no BN":
                    bmm_times[m].append(time_bmm_mlp(m, steps))
        base = statistics.median(alone_times)
        rows.append((network, arm, "alone (fit)", 1, base, 1.0, flops / base))
        for m in sizes:
            t = statistics.median(stack_times[m])
            rows.append((network, arm, "stack (vmap)", m, t, base / t, flops / t))
            if bmm_times[m]:
                t = statistics.median(bmm_times[m])
                rows.append((network, arm, "batched matmuls", m, t, base / t, flops / t))
peak = statistics.median(peaks)
print(f"float32 matmul peak (1024^2, median of the rounds): {peak / 1e9:.0f} GFLOP/s (min {min(peaks) / 1e9:.0f}, "
      f"max {max(peaks) / 1e9:.0f})\n")  # fmt: skip
print("| network | arm | how | runs M | ms per run-step | speed-up vs alone | GFLOP/s | of peak |")
print("|---|---|---|---:|---:|---:|---:|---:|")
for network, arm, how, m, t, speedup, rate in rows:
    print(f"| {network} | {arm} | {how} | {m} | {t * 1e3:.3f} | {speedup:.2f} | {rate / 1e9:.0f} | {rate / peak:.0%} |")
