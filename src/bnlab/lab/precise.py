"""When do you need precise BN statistics, and from how many samples? The seed network, both BN modes.

Eval-mode accuracy uses each BN layer's running statistics, an EMA of batch statistics that lags
the weights; precise statistics (``bnlab.recalibrate``) are recomputed with the weights frozen. This
panel measures the gap between the two on the notebook's network (``SeedConvNet``, Adam 0.002,
batches of 64) across the EMA's decay (momentum 0.1, 0.01, 0.001) and training length, and how
precise accuracy depends on the number of images the statistics are pooled from.

One run per (BN mode, decay, seed) trains to the longest length and keeps model snapshots at the
shorter ones: Adam has no schedule, so batch 200 of a 3,000-batch run is a 200-batch run. Runs with
the same seed share initial weights and batches, so the decays are compared pairwise. Each snapshot
is scored on validation and test with its stored (EMA) statistics and with precise ones; at one
(decay, length) cell precise statistics are also drawn from each sample count (nested draws, the
first N of one permutation per seed). Runs live in the run store (``OUT/runs/`` unless given
another) and are reused when finished; the scores of a run are cached in ``OUT/analysis/`` and
recomputed when the run is retrained or the budget's analysis settings change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab import reports
from bnlab.config import BN_MODES, TrainConfig
from bnlab.data import MNIST, load_mnist
from bnlab.errors import UsageError
from bnlab.fileio import atomic_write_bytes, read_json, write_json
from bnlab.reports import median_range, median_text
from bnlab.training import RunResult, load_model, obtain, resolve_device, run_dir, store
from bnlab.training.scores import precise_copy, scores, training_split

LABELS = {"torch": "PyTorch BN", "manual": "bnlab BN"}
SPLITS = ("validation", "test")
MOMENTA = (0.1, 0.01, 0.001)  # decay 0.9, 0.99 (the notebook's), 0.999
# Rules fixed before measuring, on validation accuracy (5,000 images; 0.002 is 10 of them):
FALLS_SHORT = 0.01  # EMA falls short in a cell when the median seed loses more than 1 point to precise
UNRELIABLE = 0.05  # ... and is unreliable there when some seed loses more than 5 points
ENOUGH = (0.002, 0.005)  # N samples are enough: median seed within 0.2 points of the largest count, worst within 0.5


@dataclass(frozen=True)
class Budget:
    """How much to run; the design is the same in every budget, only sizes change."""

    name: str
    seeds: int
    lengths: tuple[int, ...]  # training lengths (batches), the last one the runs' length
    momenta: tuple[float, ...]  # BN momentum, PyTorch's convention: decay = 1 - momentum
    samples: tuple[int, ...]  # the sweep's sample counts, ascending; the largest gives every snapshot's precise scores
    sweep: tuple[float, int]  # the (momentum, length) cell of the sample sweep
    score_size: int | None  # validation and test images scored (None: all)
    eval_size: int  # validation images of the EMA accuracy recorded during training


BUDGETS = {
    "smoke": Budget("smoke", 1, (1, 2), (0.1, 0.01), (32, 64), (0.01, 2), 200, 100),
    "quick": Budget("quick", 1, (200, 800), MOMENTA, (256, 1024, 4096), (0.01, 800), None, 1000),
    "full": Budget("full", 3, (200, 800, 3000), MOMENTA, (256, 512, 1024, 2048, 4096, 8192), (0.01, 800), None, 1000),
}


def decay(momentum: float) -> float:
    return round(1 - momentum, 6)


def run_config(budget: Budget, bn: str, momentum: float, seed: int) -> TrainConfig:
    """One run: the notebook's network and optimiser, snapshots at the shorter lengths, no final scores of its own."""
    return TrainConfig(
        bn=bn, bn_momentum=momentum, batches=budget.lengths[-1], seed=seed, cadence="interval",
        eval_every=math.gcd(*budget.lengths), eval_size=budget.eval_size, one_at_a_time=0, precise_samples=0,
        snapshots=budget.lengths[:-1],
    )  # fmt: skip


def _select(rows: Sequence[dict[str, Any]], **where: Any) -> dict[int, dict[str, Any]]:
    """The measurements matching ``where``, by seed."""
    return {r["seed"]: r for r in rows if all(r[k] == v for k, v in where.items())}


@dataclass
class PreciseResult:
    """Every run of the panel and its measurements, one dict per snapshot, statistics and sample count."""

    budget: Budget
    seeds: tuple[int, ...]
    modes: tuple[str, ...]
    runs: list[RunResult]
    rows: list[dict[str, Any]]  # results.csv
    out_dir: Path
    device: str
    trained: int
    wall_seconds: float
    scored: tuple[int, int] = (5000, 10000)  # validation and test images each snapshot is scored on

    def threads(self) -> list[int]:
        """The thread counts the runs were trained with (reused runs keep theirs; floats depend on it)."""
        return sorted({r.threads for r in self.runs})

    def decay_rows(self) -> list[dict[str, Any]]:
        """Per (mode, decay, length): EMA and precise accuracy and their per-seed gap, median and range over seeds."""
        out, largest = [], self.budget.samples[-1]
        for bn in self.modes:
            for momentum in self.budget.momenta:
                for length in self.budget.lengths:
                    where = {"bn": bn, "decay": decay(momentum), "batches": length}
                    ema = _select(self.rows, statistics="ema", **where)
                    precise = _select(self.rows, statistics="precise", samples=largest, **where)
                    row: dict[str, Any] = where | {"seeds": len(precise)}
                    for key in (f"{split}_accuracy" for split in SPLITS):
                        row[f"{key}_ema"] = median_range([r[key] for r in ema.values()])
                        row[f"{key}_precise"] = median_range([r[key] for r in precise.values()])
                        row[f"{key}_gap"] = median_range([r[key] - ema[s][key] for s, r in precise.items()])
                    out.append(row)
        return out

    def sample_rows(self) -> list[dict[str, Any]]:
        """Per (mode, samples): precise accuracy, its shortfall from the largest count, the recalibration's cost."""
        out, (momentum, length) = [], self.budget.sweep
        for bn in self.modes:
            where = {"bn": bn, "decay": decay(momentum), "batches": length, "statistics": "precise"}
            best = _select(self.rows, samples=self.budget.samples[-1], **where)
            for n in self.budget.samples:
                at = _select(self.rows, samples=n, **where)
                row: dict[str, Any] = {"bn": bn, "samples": n, "seeds": len(at)}
                for key in (f"{split}_accuracy" for split in SPLITS):
                    row[f"{key}"] = median_range([r[key] for r in at.values()])
                    row[f"{key}_short"] = median_range([best[s][key] - r[key] for s, r in at.items()])
                row["seconds"] = median_range([r["recalibration_seconds"] for r in at.values()])
                row["share_of_training"] = median_range(
                    [r["recalibration_seconds"] / r["train_seconds"] for r in at.values()]
                )
                out.append(row)
        return out

    def findings(self) -> list[str]:
        """The answers in words, by the rules above, from the rows as measured."""
        out, (momentum, length), largest = [], self.budget.sweep, self.budget.samples[-1]
        for bn in self.modes:
            rows = [r for r in self.decay_rows() if r["bn"] == bn and r["seeds"]]
            short = [r for r in rows if r["validation_accuracy_gap"]["median"] > FALLS_SHORT]
            shaky = [r for r in rows if r not in short and r["validation_accuracy_gap"]["max"] > UNRELIABLE]
            fine = [r for r in rows if r not in short + shaky]
            out.append(
                f"{LABELS[bn]}: EMA falls short of precise statistics at {_cells(short) or 'no decay and length'}"
                + (f"; some seeds only, at {_cells(shaky)}" if shaky else "")
                + (f"; EMA is within both margins at {_cells(fine)}" if fine else "")
                + "."
            )
        for bn in self.modes:
            rows = [r for r in self.sample_rows() if r["bn"] == bn and r["seeds"]]
            enough = next((r for r in rows[:-1] if _enough(r["validation_accuracy_short"])), None)
            out.append(
                f"{LABELS[bn]}, decay {decay(momentum):g}, {length} batches: "
                + (f"{enough['samples']:,} samples are enough ({_points(enough['validation_accuracy_short'])} points "
                   f"below {largest:,})" if enough else f"no count below {largest:,} meets the rule")
                + (f"; recalibrating from {largest:,} took {median_text(rows[-1]['seconds'], '.1f')} s, "
                   f"{median_text(rows[-1]['share_of_training'], '.1%')} of the training time." if rows else ".")
            )  # fmt: skip
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.name,
            "seeds": list(self.seeds),
            "modes": list(self.modes),
            "device": self.device,
            "threads": self.threads(),
            "runs_trained": self.trained,
            "runs_reused": len(self.runs) - self.trained,
            "wall_seconds": round(self.wall_seconds, 1),
            "rules": {"falls_short": FALLS_SHORT, "unreliable": UNRELIABLE, "enough": list(ENOUGH)},
            "decay_rows": self.decay_rows(),
            "sample_rows": self.sample_rows(),
            "findings": self.findings(),
            "runs": [
                {"run_dir": str(r.run_dir), "status": r.status, "train_seconds": r.train_seconds} for r in self.runs
            ],
        }


def _points(stats: dict[str, float] | None) -> str:
    """A difference in percentage points: '+24.1 (+0.3 to +61.0)'."""
    if stats is None:
        return "-"
    median, low, high = (f"{stats[k] * 100:+.1f}" for k in ("median", "min", "max"))
    return median if low == high else f"{median} ({low} to {high})"


def _cells(rows: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"decay {r['decay']:g}/{r['batches']} batches ({_points(r['validation_accuracy_gap'])})" for r in rows
    )


def _enough(short: dict[str, float]) -> bool:
    return short["median"] <= ENOUGH[0] and short["max"] <= ENOUGH[1]


def run_precise(
    budget: str = "quick",
    seeds: int | None = None,
    *,
    modes: Sequence[str] = ("torch", "manual"),
    out_dir: str | Path = "runs/precise",
    data: MNIST | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    policy: str = "reuse",
    runs_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
) -> PreciseResult:
    """Train (or reuse) every run of ``budget``, measure its snapshots, and write the report into ``out_dir``.

    Runs are kept in the run store ``runs_dir`` (default ``OUT/runs``) with ``policy`` ("reuse" or "fresh";
    fresh runs are scored anew)."""
    if budget not in BUDGETS:
        raise UsageError(f"budget must be one of {', '.join(BUDGETS)}; got {budget!r}")
    if not modes or any(bn not in BN_MODES[1:] for bn in modes):
        raise UsageError(f"modes must be a non-empty subset of {', '.join(BN_MODES[1:])}; got {list(modes)}")
    plan, started = BUDGETS[budget], time.perf_counter()
    seed_list = tuple(range(plan.seeds if seeds is None else seeds))
    if not seed_list:
        raise UsageError("the precise panel needs at least one seed")
    out, torch_device = Path(out_dir), resolve_device(device)
    store_root = out / "runs" if runs_dir is None else Path(runs_dir)
    data = (data if data is not None else load_mnist(data_dir)).to(torch_device)
    jobs = [(bn, m, s) for bn in modes for m in plan.momenta for s in seed_list]
    runs, rows, trained = [], [], 0
    for index, (bn, momentum, seed) in enumerate(jobs, 1):
        config = run_config(plan, bn, momentum, seed)
        result, how = obtain(
            config, store_root, policy=policy, data=data, device=torch_device, log=lambda _: None, progress=progress
        )  # fmt: skip
        fresh = how != "reused"
        where = run_dir(store_root, config, torch_device)
        clock = time.perf_counter()
        measured, now = measure(plan, result, data, out / "analysis" / f"{where.name}.json", reuse=not fresh)
        log(
            f"[{index}/{len(jobs)}] {LABELS[bn]}, decay {decay(momentum):g}, seed {seed}: "
            + (f"trained ({result.wall_seconds:.0f} s)" if fresh else "run reused")
            + (f", measured ({time.perf_counter() - clock:.0f} s)" if now else ", scores reused" if measured else "")
            + ("" if measured else f", {result.status}: not measured")
        )
        runs.append(result)
        rows += measured
        trained += fresh
    outcome = PreciseResult(
        plan,
        seed_list,
        tuple(modes),
        runs,
        rows,
        out,
        str(torch_device),
        trained,
        time.perf_counter() - started,
        scored=tuple(min(len(split), plan.score_size or len(split)) for split in (data.validation, data.test)),
    )
    write_report(outcome)
    return outcome


def measure(
    budget: Budget, result: RunResult, data: MNIST, cache: Path, reuse: bool = True
) -> tuple[list[dict[str, Any]], bool]:
    """(a completed run's snapshots scored with EMA and precise statistics, and the sample sweep; whether measured
    now rather than read from ``cache``)."""
    if result.status != "completed" or result.run_dir is None:
        return [], False  # a diverged run has no weights worth scoring; the report counts the seeds measured
    config = result.config
    settings = {"lengths": budget.lengths, "samples": budget.samples, "sweep": budget.sweep, "size": budget.score_size}
    # which run and which data the scores are of: a retrained run or other data is scored anew
    settings |= {"run_seconds": result.wall_seconds, "data": [len(data.train), len(data.validation), len(data.test)]}
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}  # as JSON reads it back
    if reuse and cache.is_file():
        try:
            stored = read_json(cache)
            if stored.get("settings") == settings:
                return stored["rows"], False
        except (OSError, ValueError, AttributeError):  # a damaged cache is measured anew
            pass
    scored = MNIST(data.train, data.validation.head(budget.score_size), data.test.head(budget.score_size))
    train_split = training_split(config, data)
    clock = {h["batch"]: h["seconds"] for h in result.history}  # training seconds at each length
    base = {"bn": config.bn, "decay": decay(config.bn_momentum), "bn_momentum": config.bn_momentum, "seed": config.seed}
    rows = []
    for length in budget.lengths:
        name = store.CHECKPOINT if length == config.batches else store.snapshot_name(length)
        model = load_model(result.run_dir / name, data.train.images.device).model
        at = base | {"batches": length, "train_seconds": clock[length]}
        rows.append(at | {"statistics": "ema", "samples": None, "recalibration_seconds": None})
        rows[-1] |= scores(model, scored, config.loss, 0)
        sweep = (config.bn_momentum, length) == budget.sweep
        for n in budget.samples if sweep else budget.samples[-1:]:
            precise, done = precise_copy(model, train_split, n, config.batch_size, config.seed)
            rows.append(at | {"statistics": "precise", "samples": n, "recalibration_seconds": done.seconds})
            rows[-1] |= scores(precise, scored, config.loss, 0)
    write_json(cache, {"settings": settings, "rows": rows})
    return rows, True


def report_blocks(outcome: PreciseResult) -> list[reports.Block]:
    plan, (momentum, length), largest = outcome.budget, outcome.budget.sweep, outcome.budget.samples[-1]
    validation, test = outcome.scored
    images = f"{'all' if plan.score_size is None else 'the first'} {validation:,} validation and {test:,} test images"
    decay_table = reports.Table(
        ("BN", "decay", "batches", "seeds", *(f"{s} {k}" for s in ("val", "test") for k in ("EMA", "precise", "gap"))),
        tuple(
            (LABELS[r["bn"]], f"{r['decay']:g}", str(r["batches"]), str(r["seeds"]),
             *(f(r[f"{s}_accuracy_{k}"]) for s in SPLITS for k, f in (("ema", median_text), ("precise", median_text),
                                                                       ("gap", _points))))
            for r in outcome.decay_rows()
        ),
    )  # fmt: skip
    sample_table = reports.Table(
        ("BN", "samples", "val precise", "val short", "test precise", "test short", "recalibration s", "of training"),
        tuple(
            (LABELS[r["bn"]], f"{r['samples']:,}", median_text(r["validation_accuracy"]),
             _points(r["validation_accuracy_short"]), median_text(r["test_accuracy"]),
             _points(r["test_accuracy_short"]),
             median_text(r["seconds"], ".2f"), median_text(r["share_of_training"], ".1%"))
            for r in outcome.sample_rows()
        ),
    )  # fmt: skip
    return [
        reports.Heading("When do you need precise statistics, and how much data?", 1),
        reports.Text(
            f"The notebook's ConvNet (19 conv layers + dense, Adam 0.002, batches of 64) with "
            f"{' and '.join(LABELS[b] for b in outcome.modes)}, EMA decay "
            f"{', '.join(f'{decay(m):g}' for m in plan.momenta)} (PyTorch momentum "
            f"{', '.join(f'{m:g}' for m in plan.momenta)}), seeds {', '.join(map(str, outcome.seeds))}. "
            f"One {plan.lengths[-1]}-batch run per (mode, decay, seed) with model snapshots after "
            f"{', '.join(map(str, plan.lengths[:-1]))} batches; a seed gives every decay the same initial weights "
            f"and batches. Each snapshot is scored on {images} with its stored EMA statistics and with precise "
            f"statistics from {largest:,} training images (`bnlab.recalibrate`, batches of 64, weights frozen). "
            f"Budget **{plan.name}**: {len(outcome.runs)} runs ({outcome.trained} trained now) on {outcome.device} "
            f"with {'/'.join(map(str, outcome.threads()))} thread(s), {outcome.wall_seconds / 60:.1f} min."
        ),
        reports.Heading("EMA against precise statistics"),
        reports.Text(
            f"Accuracy: median over {len(outcome.seeds)} seed(s) (range). Gap: precise minus EMA accuracy of the "
            "same weights, per seed, in percentage points: median (range)."
        ),
        decay_table,
        reports.Heading("How many samples precise statistics need"),
        reports.Text(
            f"Decay {decay(momentum):g}, {length} batches. N samples: the first N of one random permutation of the "
            f"training set per seed. Short: accuracy with {largest:,} samples minus accuracy with N, per seed, in "
            f"points. Of training: recalibration seconds over the {length} batches' training seconds (one process "
            "on a shared machine: timings are noisy)."
        ),
        sample_table,
        reports.Image(
            "precise.png",
            f"Top rows: validation accuracy with EMA and precise statistics against batches. Bottom row: precise "
            f"accuracy against samples at decay {decay(momentum):g}, {length} batches. Mean over seeds, min-max band.",
        ),
        reports.Heading("Findings"),
        reports.Text(
            f"Rules fixed before measuring, on validation accuracy: EMA falls short where the median seed loses "
            f"more than {FALLS_SHORT * 100:g} point to precise statistics, and is unreliable where some seed loses "
            f"more than {UNRELIABLE * 100:g}; N samples are enough where the median seed is within "
            f"{ENOUGH[0] * 100:g} points of {largest:,} samples and every seed within {ENOUGH[1] * 100:g}."
        ),
        reports.Bullets(tuple(outcome.findings())),
    ]


def _curves(rows: list[dict[str, Any]], x: str, y: str, **where: Any) -> list[list[tuple[float, float]]]:
    """Per seed, the (x, y) points of the measurements matching ``where``."""
    by_seed: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        if all(r[k] == v for k, v in where.items()):
            by_seed.setdefault(r["seed"], []).append((r[x], r[y]))
    return [sorted(points) for points in by_seed.values()]


def write_report(outcome: PreciseResult) -> None:
    """report.md, results.json, results.csv and precise.png in the output folder."""
    out, plan, rows = outcome.out_dir, outcome.budget, outcome.rows
    write_json(out / "results.json", outcome.to_dict())
    reports.write_csv(out / "results.csv", rows)
    kinds = {"EMA": {"statistics": "ema"}, "precise": {"statistics": "precise", "samples": plan.samples[-1]}}
    panels = [
        reports.Panel(
            f"{LABELS[bn]}, decay {decay(m):g}", "batches", "validation accuracy",
            {k: _curves(rows, "batches", "validation_accuracy", bn=bn, decay=decay(m), **w) for k, w in kinds.items()},
            logx=True, xticks=plan.lengths, ylim=(0.0, 1.0),
        )
        for m in plan.momenta for bn in outcome.modes
    ]  # fmt: skip
    sweep = {"decay": decay(plan.sweep[0]), "batches": plan.sweep[1], "statistics": "precise"}
    panels += [
        reports.Panel(
            f"{LABELS[bn]}, decay {sweep['decay']:g}, {plan.sweep[1]} batches", "samples", "precise accuracy",
            {s: _curves(rows, "samples", f"{s}_accuracy", bn=bn, **sweep) for s in SPLITS},
            logx=True, xticks=plan.samples,
        )
        for bn in outcome.modes
    ]  # fmt: skip
    reports.plot_panels(out / "precise.png", panels, ncols=len(outcome.modes))
    atomic_write_bytes(out / "report.md", reports.render_markdown(report_blocks(outcome)).encode())
