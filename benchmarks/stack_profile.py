"""Where a lab stack's time goes: the largest stack of one claim's runs, trained once under cProfile.

    python benchmarks/stack_profile.py                  # claim 2 of the quick budget
    python benchmarks/stack_profile.py --claim 4 --budget full --top 30

Trains the members of the claim's largest stackable group (``stack.structure``; the lab trains the same
group as one stack) into a temporary store at one thread, as a lab worker does, and prints the wall time
and the functions with the largest cumulative time: the step (vmap forward, backward), the evaluations
(``hooks.measure``), batch drawing (``next``) and the optimizer (``StackOptimizer.step``). Times are this
machine's now: compare the shares, not the seconds, with another day's.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import tempfile
import time

import torch

from bnlab.data import load_mnist
from bnlab.lab.benefits import BUDGETS, EXPERIMENTS
from bnlab.lab.benefits.arms import Lab
from bnlab.training.runner import train_stack
from bnlab.training.stack import stack_pays, structure

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--claim", type=int, default=2, choices=sorted(EXPERIMENTS))
parser.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
parser.add_argument("--top", type=int, default=20, help="functions to list (default: 20)")
args = parser.parse_args()

torch.set_num_threads(1)  # as a lab worker
budget = BUDGETS[args.budget]
lab = Lab(budget, tuple(range(budget.seeds)), "manual")
groups: dict[object, list] = collections.defaultdict(list)
for job in EXPERIMENTS[args.claim](lab).jobs:
    if stack_pays(job):
        groups[structure(job)].append(job)
if not groups:
    parser.exit(1, f"claim {args.claim} has no runs that the lab stacks\n")
group = max(groups.values(), key=len)
first = group[0]
print(
    f"claim {args.claim}, budget {args.budget}: a stack of {len(group)} ({first.model}, bn={first.bn}, "
    f"{first.optimizer}, {first.batches} steps, evaluation every {first.eval_every})"
)
data = load_mnist()
with tempfile.TemporaryDirectory() as store:
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    train_stack(group, data, run_dirs=[f"{store}/{i}" for i in range(len(group))], device="cpu", log=lambda _: None)
    profile.disable()
    print(f"wall {time.perf_counter() - start:.2f} s")
pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
