"""The lab's engine against one run at a time: the same runs, side by side on one machine.

    python benchmarks/lab_engine.py [--budget quick] [--claims 2-6] [--seeds N]

Takes the runs the chosen claims need at the chosen budget and trains them twice, each time into a
fresh run store: as the first engine did (one run at a time, in this process, with torch's threads)
and as the lab does now (stacks of runs of one structure, in worker processes of one thread each).
It prints both wall times, their ratio, the work (FLOPs) and each engine's fraction of the matmul peak
measured in the same process, and how many runs ended otherwise in the two (status or steps: float
rounding can move a divergence). Which engine goes first alternates with ``--rounds``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bnlab.data import load_mnist
from bnlab.lab.benefits import EXPERIMENTS, parse_claims
from bnlab.lab.benefits.arms import Lab
from bnlab.lab.benefits.budgets import BUDGETS
from bnlab.lab.benefits.runs import QUIET
from bnlab.training.pool import usable_cores
from bnlab.training.runs import obtain_many
from bnlab.training.work import matmul_peak, step_flops

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--budget", default="quick", choices=list(BUDGETS))
parser.add_argument("--claims", default="2-6", help="claims whose runs to train (default: 2-6)")
parser.add_argument("--seeds", type=int, help="seeds (default: the budget's)")
parser.add_argument("--rounds", type=int, default=1, help="times each engine trains everything (default: 1)")
args = parser.parse_args()

plan = BUDGETS[args.budget]
lab = Lab(plan, tuple(range(args.seeds or plan.seeds)), "manual")
jobs = list(dict.fromkeys(job for n in parse_claims(args.claims) for job in EXPERIMENTS[n](lab).jobs))
data = load_mnist()
flops = sum(step_flops(job) * job.batches for job in jobs)
engines = {
    "one run at a time": {"workers": 1, "max_stack": 1},
    "stacks in workers": {"workers": usable_cores()},
}
print(f"claims {args.claims}, budget {args.budget}, {len(lab.seeds)} seed(s): {len(jobs)} runs, "
      f"{flops / 1e12:.1f} TFLOP of training (at most: diverged runs stop early)")  # fmt: skip
seconds: dict[str, list[float]] = {name: [] for name in engines}
outcomes = {}
peaks = [matmul_peak()]
for round_ in range(args.rounds):
    order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
    for name in order:
        with tempfile.TemporaryDirectory(prefix="bnlab-engine-") as root:
            start = time.perf_counter()
            obtained = obtain_many(jobs, Path(root), data=data, **engines[name], **QUIET)
            seconds[name].append(time.perf_counter() - start)
        outcomes[name] = {job: (r.status, r.batches_done) for job, (r, _) in obtained.items()}
        print(f"  round {round_ + 1}: {name}: {seconds[name][-1]:.0f} s")
    peaks.append(matmul_peak())
first, second = outcomes["one run at a time"], outcomes["stacks in workers"]
differ = [job for job in jobs if first[job] != second[job]]  # rounding can move a divergence by a step or two
peak = statistics.median(peaks)
print(f"\nmatmul peak {peak / 1e9:.0f} GFLOP/s (median of {len(peaks)}); runs that ended otherwise (status or "
      f"steps) in the two engines: {len(differ)} of {len(jobs)}\n")  # fmt: skip
print("| engine | wall s | speed-up | fraction of peak (training FLOPs / wall) |")
print("|---|---:|---:|---:|")
base = statistics.median(seconds["one run at a time"])
for name, values in seconds.items():
    wall = statistics.median(values)
    print(f"| {name} | {wall:.0f} | {base / wall:.2f}x | {flops / wall / peak:.0%} |")
