"""Time that load cannot flip: the quick lab's claim 1, quiet and with a CPU hog spinning on one core.

    python benchmarks/noise.py [--budget quick] [--rounds 2] [--out runs/noise]

Claim 1's verdict rests on steps to a threshold (from the runs, trained once and then reused) times each
arm's cost per step, measured with the arms interleaved (``bnlab.lab.step_cost``). This trains the runs
once, then alternates conditions (quiet, then a busy-loop process on one core), re-measuring the costs
and re-deriving the verdict each time, and prints each setup's BN/no-BN cost ratio and verdict under
both. The claim: the hog moves the ratio by under 15% and changes no verdict. (The old lab timed its runs
one after the other; on a busy machine its quick budget reported a 3.20x BN step cost for the MLP, min-max
1.49-4.91 over seeds, where its quiet full study measured 1.26x.)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bnlab.lab.benefits import run_benefits

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--budget", default="quick", choices=("smoke", "quick", "full"))
parser.add_argument("--rounds", type=int, default=2, help="quiet/hog pairs (default: 2)")
parser.add_argument("--out", help="lab folder (default: a temporary one); its runs are reused")
args = parser.parse_args()
out = Path(args.out or tempfile.mkdtemp(prefix="bnlab-noise-"))

HOG = "while True: pass"


def measure(hog: bool) -> tuple[dict[str, float], str]:
    spinner = subprocess.Popen([sys.executable, "-c", HOG]) if hog else None
    try:
        result = run_benefits([1], budget=args.budget, out_dir=out, log=lambda _: None, progress=False)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    costs = result.costs[1]
    ratios = {setup: arms["BN"].ratio(arms["no BN"])[0] for setup, arms in costs.items()}
    return ratios, result.claims[0].verdict


print(f"claim 1, budget {args.budget}, runs in {out} (trained on the first pass, reused after)")
measured: dict[str, list[tuple[dict[str, float], str]]] = {"quiet": [], "hog": []}
for _ in range(args.rounds):
    for condition in ("quiet", "hog"):
        ratios, verdict = measure(condition == "hog")
        measured[condition].append((ratios, verdict))
        cells = ", ".join(f"{setup} {ratio:.3f}x" for setup, ratio in ratios.items())
        print(f"  {condition:5s}: BN step cost {cells}; verdict {verdict}")
print()
print("| setup | BN/no-BN quiet (median) | with a CPU hog (median) | change | verdicts quiet | verdicts hog |")
print("|---|---:|---:|---:|---|---|")
for setup in measured["quiet"][0][0]:
    quiet = statistics.median(r[setup] for r, _ in measured["quiet"])
    hog = statistics.median(r[setup] for r, _ in measured["hog"])
    verdicts = {c: ", ".join(v for _, v in measured[c]) for c in measured}
    print(f"| {setup} | {quiet:.3f} | {hog:.3f} | {hog / quiet - 1:+.1%} | {verdicts['quiet']} | {verdicts['hog']} |")
