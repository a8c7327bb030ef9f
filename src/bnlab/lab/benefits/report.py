"""The lab's result and its report: report.md, a self-contained report.html and results.json."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab import reports
from bnlab.config import TrainConfig
from bnlab.data import VALIDATION_SIZE
from bnlab.fileio import atomic_write_bytes
from bnlab.lab.benefits.arms import WITH_BN
from bnlab.lab.benefits.budgets import Budget
from bnlab.lab.benefits.evidence import ClaimResult
from bnlab.lab.benefits.networks import PAPER_MLP
from bnlab.lab.benefits.sweeps import USABLE_ACCURACY
from bnlab.lab.benefits.verdicts import ACCURACY_MARGIN, DEAD_MARGIN, SPEEDUP_MARGIN, Comparison
from bnlab.lab.curves import final
from bnlab.lab.step_cost import StepCost
from bnlab.training import RunResult
from bnlab.training.store import finite_or_none
from bnlab.training.work import step_flops

TONES = {"supported": "good", "not supported": "bad", "mixed": "mixed"}
BN_NAMES = {"torch": "PyTorch's `nn.BatchNorm1d/2d`", "manual": "bnlab's own `BatchNorm1d/2d`"}


@dataclass
class BenefitsResult:
    """Everything one lab run leaves: each claim's evidence and every run it was drawn from."""

    claims: list[ClaimResult]
    out_dir: Path
    budget: Budget
    seeds: tuple[int, ...]
    bn: str
    device: str
    runs: dict[TrainConfig, RunResult]
    trained: int
    wall_seconds: float
    jobs: dict[int, list[TrainConfig]] = field(default_factory=dict)  # claim -> the runs it needs
    costs: dict[int, dict[str, dict[str, StepCost]]] = field(default_factory=dict)  # claim -> setup -> arm -> cost
    peaks: dict[int, list[float]] = field(default_factory=dict)  # threads -> float32 matmul FLOP/s during the lab

    def threads(self) -> list[int]:
        """The thread counts the runs were trained with (reused runs keep theirs)."""
        return sorted({run.threads for run in self.runs.values()})

    def peak(self, threads: int | None = None) -> float:
        """The median float32 matmul FLOP/s measured during the lab at ``threads`` (default: the machine's)."""
        measured = self.peaks.get(threads or max(self.peaks, default=1), [])
        return statistics.median(measured) if measured else math.nan

    def work(self) -> list[dict[str, Any]]:
        """Per claim, then for the whole lab (each run once): runs, training steps, FLOPs, the floor (the FLOPs at
        the machine's matmul peak, all cores), the training time the runs took (worker seconds: runs trained
        side by side each count their own; a stacked run its share of its stack), and the fraction of peak
        reached: the FLOPs over each run's seconds times the peak at its own thread count."""
        groups = {f"{n}. {self.claim_title(n)}": jobs for n, jobs in self.jobs.items()}
        groups["whole lab (each run once)"] = list(dict.fromkeys(j for jobs in self.jobs.values() for j in jobs))
        rows = []
        for name, jobs in groups.items():
            runs = [self.runs[j] for j in jobs]
            flops = sum(step_flops(j) * r.batches_done for j, r in zip(jobs, runs, strict=True))
            seconds = sum(r.train_seconds for r in runs)
            possible = sum(r.train_seconds * self.peak(r.threads) for r in runs)
            row = {"claim": name, "runs": len(runs), "steps": sum(r.batches_done for r in runs), "flops": flops}
            row |= {"floor_seconds": flops / self.peak(), "train_seconds": seconds}
            rows.append(row | {"fraction_of_peak": flops / possible if possible else math.nan})
        return rows

    def claim_title(self, number: int) -> str:
        return next(c.title for c in self.claims if c.number == number)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.name,
            "seeds": list(self.seeds),
            "bn": self.bn,
            "device": self.device,
            "threads": self.threads(),
            "runs_trained": self.trained,
            "runs_reused": len(self.runs) - self.trained,
            "wall_seconds": round(self.wall_seconds, 1),
            "matmul_peak_flops": {str(threads): values for threads, values in self.peaks.items()},
            "work": self.work(),
            "costs": {
                str(n): {setup: {arm: c.to_dict() for arm, c in arms.items()} for setup, arms in by_setup.items()}
                for n, by_setup in self.costs.items()
            },
            "claims": [c.to_dict() for c in self.claims],
            "runs": [
                {
                    "run_dir": run.run_dir.name if run.run_dir else None,
                    "config": job.to_dict(),
                    "bn": job.bn,
                    "seed": job.seed,
                    "status": run.status,
                    "batches": run.batches_done,
                    "train_seconds": round(run.train_seconds, 3),
                    "flops": step_flops(job) * run.batches_done,
                    "final_val_accuracy": final(run),
                }
                for job, run in self.runs.items()
            ],
        }


def number_text(value: float) -> str:
    """A compared value, to four significant figures; infinity (never reached) and NaN (not measurable) in words."""
    return "∞" if value == math.inf else "n/a" if math.isnan(value) else f"{value:.4g}"


def effect_text(comparison: Comparison, value: float) -> str:
    """One seed's effect: a ratio as '1.3x', a difference with its sign."""
    if math.isnan(value):
        return "n/a"
    return f"{number_text(value)}x" if comparison.kind == "ratio" else f"{value:+.4g}"


def report_blocks(result: BenefitsResult) -> list[reports.Block]:
    budget = result.budget
    verdict_rows = [(f"{c.number}. {c.claim}", f"**{c.verdict}**", c.headline) for c in result.claims]
    blocks: list[reports.Block] = [
        reports.Heading("Batch norm: the seven claims, measured", 1),
        reports.Text(
            f"Each claim is tested by paired runs: every network is trained without and with batch norm "
            f"({BN_NAMES[result.bn]} before each hidden activation, never on the logits; running-statistics "
            f"momentum {PAPER_MLP.bn_momentum:g}) from the same initial weights, on the same batches in the same "
            f"order. Budget "
            f"**{budget.name}**, {len(result.seeds)} seed(s) ({', '.join(map(str, result.seeds))}), on {result.device} "
            f"with {'/'.join(map(str, result.threads()))} thread(s): {len(result.runs)} runs "
            f"({result.trained} trained now, "
            f"{len(result.runs) - result.trained} reused) in {result.wall_seconds:.0f} s; their training steps "
            f"took {sum(r.train_seconds for r in result.runs.values()) / 60:.1f} min in all. Accuracy is validation "
            "accuracy in eval mode on MNIST's 5,000 validation images"
            + (
                "."
                if budget.conv_eval_size >= VALIDATION_SIZE
                else f" (ConvNets: the first {budget.conv_eval_size}, to keep evaluation from dominating the cost)."
            )
        ),
        reports.Table(("claim", "verdict", "headline"), tuple(verdict_rows)),
        reports.Heading("How a verdict is reached"),
        reports.Text(
            "Each experiment measures one or more quantities per seed in both arms (a *comparison*). BN **wins** a "
            "seed when its effect (BN minus baseline, or their ratio, turned round where lower is better) exceeds "
            "the comparison's margin. A comparison **holds** when BN wins every seed, **fails** when it wins none, "
            "and is **inconsistent** otherwise. The claim is **supported** when every judged comparison holds, "
            "**not supported** when every one fails, and **mixed** otherwise."
        ),
        reports.Bullets(
            (
                f"Usable run: not diverged, final validation accuracy at least {USABLE_ACCURACY:.0%}.",
                f"Accuracy margin: {ACCURACY_MARGIN:g} (10 of 5,000 validation images).",
                f"Speed margin: {SPEEDUP_MARGIN:g}x (at least 10% sooner). Dead-unit margin: {DEAD_MARGIN:g}.",
                "Diverged: the training loss became NaN or infinite; the run stopped there.",
            )
        ),
    ]
    for claim in result.claims:
        blocks += [
            reports.Heading(f"{claim.number}. {claim.title}"),
            reports.Text(f"**Claim:** {claim.claim}"),
            reports.Text(f"**What was run.** {claim.setup}"),
            *claim.figures,
        ]
        for caption, table in claim.tables:
            blocks += [reports.Text(f"*{caption}.*"), table]
        rows = [
            (
                c.name + ("" if c.counts else " (reported, not judged)"),
                ", ".join(map(number_text, c.base)) + f" ({c.baseline})",
                ", ".join(map(number_text, c.bn)),
                ", ".join(effect_text(c, e) for e in c.effects()),
                c.requirement(),
                f"{sum(c.wins())}/{len(c.wins())}",
                c.outcome,
            )
            for c in claim.comparisons
        ]
        if rows:
            headers = ("comparison", "baseline", WITH_BN, "effect", "BN wins a seed when", "wins", "outcome")
            blocks += [reports.Text("*Comparisons, seed by seed.*"), reports.Table(headers, tuple(rows))]
        else:
            blocks.append(reports.Text("*Nothing to compare: no run produced a value this claim is judged on.*"))
        blocks += [
            reports.Text(f"**Rule.** {claim.rule}"),
            reports.Callout(f"**Verdict: {claim.verdict}.** {claim.headline}.", TONES[claim.verdict]),
            *(reports.Text(note) for note in claim.notes),
        ]
    blocks += work_blocks(result)
    claims = ",".join(str(c.number) for c in result.claims)
    blocks += [
        reports.Heading("Reproduce"),
        reports.Text(
            f"`bnlab benefits --budget {budget.name} --seeds {len(result.seeds)} --claims {claims} --bn {result.bn}` "
            "(finished runs in `runs/` are reused; delete them to start afresh)."
        ),
    ]
    return blocks


def work_blocks(result: BenefitsResult) -> list[reports.Block]:
    """The arithmetic the lab was: FLOPs per claim, the floor at this machine's matmul peak, the time it took."""
    rows = [
        (
            row["claim"],
            str(row["runs"]),
            f"{row['steps']:,}",
            f"{row['flops'] / 1e12:.3g}",
            f"{row['floor_seconds'] / 60:.3g}",
            f"{row['train_seconds'] / 60:.3g}",
            f"{row['fraction_of_peak']:.0%}" if math.isfinite(row["fraction_of_peak"]) else "-",
        )
        for row in result.work()
    ]
    peaks = "; ".join(
        f"{threads} thread{'s' if threads > 1 else ''}: {', '.join(f'{p / 1e9:.0f}' for p in values)} GFLOP/s"
        for threads, values in sorted(result.peaks.items())
    )
    stacked = sum(1 for r in result.runs.values() if r.run_dir and _stack_size(r.run_dir) > 1)
    return [
        reports.Heading("The work, and the floor"),
        reports.Text(
            "Training work is the FLOPs of every run's training steps (matmuls and convolutions, forward and "
            "backward, counted by PyTorch's FlopCounterMode; evaluation excluded). The floor is that work at "
            "this machine's float32 matmul peak on all its cores: no engine could train faster. The peak was "
            f"measured during the lab ({peaks}). Training time is worker time: runs trained side by side each "
            f"count their own seconds ({stacked} of the {len(result.runs)} runs trained in stacks, each member "
            "with its share of its stack's time; reused runs keep the time of the lab that trained them). The "
            "fraction of peak is the work over each run's seconds at the peak of its own thread count."
        ),
        reports.Text("*Work, floor and training time per claim (a run two claims share counts in both).*"),
        reports.Table(
            ("claim", "runs", "training steps", "TFLOP", "floor, min", "training, worker-min", "of peak"), tuple(rows)
        ),
    ]


def _stack_size(run_dir: Path) -> int:
    """How many runs the run in ``run_dir`` was trained with as one stack (1: alone)."""
    try:
        return int(json.loads((run_dir / "config.json").read_text()).get("stack", 1))
    except (OSError, ValueError):
        return 1


def write_report(result: BenefitsResult) -> None:
    """report.md, report.html (self-contained), results.json; the PNGs are already beside them."""
    out = result.out_dir
    blocks = report_blocks(result)
    atomic_write_bytes(out / "report.md", reports.render_markdown(blocks).encode())
    html = reports.render_html(blocks, title="bnlab: the benefits of batch norm, measured", image_dir=out)
    atomic_write_bytes(out / "report.html", html.encode())
    atomic_write_bytes(out / "results.json", (json.dumps(finite_or_none(result.to_dict()), indent=1) + "\n").encode())
