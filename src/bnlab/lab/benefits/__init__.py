"""The benefits lab: each of the seven claims made for batch norm, put to a paired, measured test.

A *run* trains one network (a ``TrainConfig``) with or without batch norm from one seed, through the
training core. Runs with the same seed start from the same initial weights (every shared layer) and
see the same batches in the same order, so a difference between the two arms of a pair is the work
of batch norm alone. ``compare`` runs one such pair and returns its curves; ``run_benefits`` runs one
experiment per claim over several seeds, keeps every run in the run store (reused when the lab is
run again), and writes a report with a verdict per claim, computed by the rule in ``verdict``.

The package, from the bottom up:

- ``runs``: ``compare``: one pair trained by the training core (the lab keeps its runs in a run store).
- ``budgets``: how much of each experiment to run (smoke, quick, full).
- ``arms``: the two arms' names and ``Lab``, which trains every network in both.
- ``verdicts``: ``Comparison`` (one quantity, seed by seed), ``verdict`` and the margins.
- ``networks``, ``evidence``, ``sweeps``: the shared networks, what a claim's analysis returns, and
  the helpers for settings swept in both arms.
- ``claim1_speed`` .. ``claim7_results``: one experiment per claim, each with its ``CLAIM`` and
  ``experiment(lab)``.
- ``report``: the lab's result, rendered as report.md, report.html and results.json.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from bnlab.config import BN_MODES, TrainConfig, check_choice
from bnlab.data import MNIST, load_mnist
from bnlab.errors import UsageError
from bnlab.lab.benefits import (
    claim1_speed,
    claim2_learning_rates,
    claim3_initialisation,
    claim4_activations,
    claim5_depth,
    claim6_regularisation,
    claim7_results,
)
from bnlab.lab.benefits.arms import PLAIN, WITH_BN, Lab
from bnlab.lab.benefits.budgets import BUDGETS, Budget
from bnlab.lab.benefits.evidence import ClaimResult, Experiment
from bnlab.lab.benefits.report import BenefitsResult, report_blocks, write_report
from bnlab.lab.benefits.runs import Pair, compare
from bnlab.lab.benefits.verdicts import VERDICTS, Comparison, verdict
from bnlab.lab.step_cost import StepCost, interleaved_costs
from bnlab.training import RunResult, resolve_device
from bnlab.training.pool import usable_cores
from bnlab.training.runs import QUIET, obtain_many
from bnlab.training.work import matmul_peak

__all__ = [
    "BUDGETS",
    "CLAIMS",
    "VERDICTS",
    "BenefitsResult",
    "Budget",
    "ClaimResult",
    "Comparison",
    "Experiment",
    "Pair",
    "compare",
    "parse_claims",
    "report_blocks",
    "run_benefits",
    "verdict",
    "write_report",
]

_CLAIM_MODULES = (
    claim1_speed,
    claim2_learning_rates,
    claim3_initialisation,
    claim4_activations,
    claim5_depth,
    claim6_regularisation,
    claim7_results,
)
EXPERIMENTS: dict[int, Callable[[Lab], Experiment]] = {m.CLAIM.number: m.experiment for m in _CLAIM_MODULES}
CLAIMS: dict[int, tuple[str, str]] = {m.CLAIM.number: (m.CLAIM.title, m.CLAIM.text) for m in _CLAIM_MODULES}


def parse_claims(text: str) -> list[int]:
    """'1,3-5' -> [1, 3, 4, 5]; anything else is a UsageError naming the claims there are."""
    numbers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise UsageError(f"claims must be numbers or ranges like 1,3-5; got {text!r}")
        low, high = int(match[1]), int(match[2] or match[1])
        if low > high or low not in CLAIMS or high not in CLAIMS:
            raise UsageError(f"there are claims {min(CLAIMS)} to {max(CLAIMS)}; got {text!r}")
        numbers.update(range(low, high + 1))
    return sorted(numbers)


def describe_job(job: TrainConfig) -> str:
    """One line for the progress bar: the network, its recipe, its arm and its seed."""
    shape = f"{len(job.hidden)}x{job.hidden[0]}" if job.model == "mlp" else f"depth {job.depth}"
    arm = PLAIN if job.bn == "none" else WITH_BN
    return f"{job.model} {shape} {job.activation} {job.optimizer} lr={job.lr:g}, {arm}, seed {job.seed}"


def run_benefits(
    claims: Sequence[int] = tuple(CLAIMS),
    *,
    budget: str = "quick",
    seeds: int | None = None,
    out_dir: str | Path = "runs/benefits",
    bn: str = "manual",
    data: MNIST | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    policy: str = "reuse",
    runs_dir: str | Path | None = None,
    workers: int | None = None,
) -> BenefitsResult:
    """Run (or reuse) every run the chosen claims need, then write the report into ``out_dir``.

    Runs are kept in the run store ``runs_dir`` (default ``OUT/runs``) with ``policy`` ("reuse" finished runs,
    or "fresh"); the ones to train that share a structure train as stacks (``bnlab.training.stack``), and
    the stacks and other runs train side by side in ``workers`` processes (default: one per usable core).
    """
    start = time.perf_counter()
    check_choice("budget", budget, list(BUDGETS))
    check_choice("bn", bn, BN_MODES[1:])
    if not claims or set(claims) - set(CLAIMS):
        raise UsageError(f"claims must be among {sorted(CLAIMS)}; got {list(claims)}")
    if seeds is not None and seeds < 1:
        raise UsageError(f"seeds must be at least 1; got {seeds}")
    plan = BUDGETS[budget]
    lab = Lab(plan, tuple(range(seeds or plan.seeds)), bn)
    experiments = [EXPERIMENTS[n](lab) for n in sorted(set(claims))]
    torch_device = resolve_device(device)
    data = (data if data is not None else load_mnist(data_dir)).to(torch_device)
    out = Path(out_dir)
    store = out / "runs" if runs_dir is None else Path(runs_dir)

    jobs: dict[TrainConfig, int] = {}  # each job once, with the first claim that needs it
    for experiment in experiments:
        for job in experiment.jobs:
            jobs.setdefault(job, experiment.number)
    log(
        f"bnlab benefits: claims {', '.join(str(e.number) for e in experiments)}, budget {plan.name} "
        f"({plan.runtime}), {len(lab.seeds)} seed(s), {len(jobs)} runs in {store}"
    )
    enabled = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(jobs), unit="run", desc="benefits", disable=not enabled, file=sys.stderr) as bar:

        def finished(job: TrainConfig, result: RunResult, how: str) -> None:
            bar.set_postfix_str(f"claim {jobs[job]}: {describe_job(job)}", refresh=False)
            bar.update()

        obtained = obtain_many(
            list(jobs), store, policy=policy, data=data, device=torch_device, done=finished,
            workers=usable_cores() if workers is None else workers, **QUIET,
        )  # fmt: skip
    done = {job: result for job, (result, _) in obtained.items()}
    trained = sum(how != "reused" for _, how in obtained.values())
    log(f"trained {trained} runs, reused {len(jobs) - trained}")

    # the matmul peak, for the floor: at every thread count the runs trained with and the machine's, before the
    # costs and again after them
    thread_counts = sorted({torch.get_num_threads(), *(r.threads for r in done.values())})
    peaks = {n: [matmul_peak(threads=n)] for n in thread_counts}

    def lookup(spec: TrainConfig, norm: str) -> list[RunResult]:
        return [done[spec.replace(bn=norm, seed=seed)] for seed in lab.seeds]

    costs: dict[int, dict[str, dict[str, StepCost]]] = {}
    measured: dict[tuple, dict[str, StepCost]] = {}  # a setup two claims share is measured once
    rounds, steps = plan.cost_slices
    for e in experiments:
        if e.costs:
            log(f"claim {e.number}: measuring each arm's cost per step, interleaved ({', '.join(e.costs)})")
            for setup, arms in e.costs.items():
                key = tuple(arms.items())
                if key not in measured:
                    measured[key] = interleaved_costs(arms, data, torch_device, rounds=rounds, slice_steps=steps)
                costs.setdefault(e.number, {})[setup] = measured[key]
    for n in thread_counts:
        peaks[n].append(matmul_peak(threads=n))
    results = [
        e.analyse(lookup, out, costs=costs[e.number]) if e.costs else e.analyse(lookup, out) for e in experiments
    ]
    outcome = BenefitsResult(
        results, out, plan, lab.seeds, bn, str(torch_device), done, trained, time.perf_counter() - start,
        jobs={e.number: e.jobs for e in experiments}, costs=costs, peaks=peaks,
    )  # fmt: skip
    write_report(outcome)
    return outcome
