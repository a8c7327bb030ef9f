"""Which normalization at which batch size: batch norm's small-batch family side by side (``bnlab family``).

Wu & He (GroupNorm, 2018, Figure 1) trained ResNet-50 on ImageNet at 32 down to 2 images per GPU: BN's error
rose from 23.6% to 34.7% while GroupNorm's stayed at about 24%. This lab asks the same question of every
answer bnlab ships, on a network a CPU can train many times:

- **Arms** (``ARMS``): batch norm (bnlab's), Batch Renormalization, Ghost BN (virtual batches of 16 inside
  larger batches), GroupNorm, no normalization, and synchronized BN over 2 processes (each process holds
  the batch size on the x axis; the statistics and the gradient are those of the 2x larger global batch).
- **Batch sizes** (per process): the budget's, from 2 to 128, and one non-i.i.d. setting: batches of 32
  drawn from 2 classes each (``data.ClassBatches``), as Ioffe (2017) tested renorm.
- **The network**: the notebook's ConvNet cut to its first 6 conv layers (width 4: 4-24 channels, two
  stride-2 layers, 28 -> 14 -> 7 pixels), dense 100, logits. Not the 19-layer original: a batch of 2 costs
  a step per 2 images and the original's per-layer overhead made the guide's 150 runs hours long; and
  without normalization it does not train at all (the notebook's 10%), so the "no norm" arm would say
  nothing. At depth 6 every arm trains and the normalization is the only difference.
- **The recipe**: SGD with momentum 0.9 and Wu & He's linear scaling rule, learning rate ``BASE_LR`` x
  batch / 32 (global batch), softmax cross-entropy, the same number of training images at every batch size
  (so the same epochs), Glorot-uniform kernels in every arm, the running statistics' momentum 0.1
  (PyTorch's default and Wu & He's; the notebook's 0.01 lags: after the 250 steps of a batch of 128 in the
  full budget its average still holds 8% of the initial statistics). Renorm opens its bounds
  (rmax 1 -> 3, dmax 0 -> 5) in a straight line over the first fifth of the run, the shape of Ioffe's
  schedule. GroupNorm: 4 channels per group (``models.make_norm`` says why not 32 groups).
- **Paired**: a seed gives every arm the same initial weights and, at a batch size, the same batches (the
  synchronized arm at b per process trains BN's run at 2b: its batches, learning rate and steps, on 2
  processes; it is compared with BN at b, the per-device batch it rescues).

The measure is test accuracy (10,000 images) with the statistics each layer keeps (running EMA statistics:
what a deployed model uses), reported beside precise statistics (``bnlab.recalibrate``, 4,096 training
images in the training batch size) and the one-at-a-time check. The rule, fixed before the runs: arm A
**beats** arm B at a setting when A's accuracy exceeds B's in every seed by more than ``MARGIN`` (a run
that did not complete is beaten by any that did); the **winners** at a setting are the arms with a completed
seed that no other beats.

The synchronized arm needs ``SYNC_PROCESSES`` CPU cores: on a GPU (one device cannot hold two NCCL ranks) or
a machine with fewer cores it is left out, and the report says so.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bnlab import reports
from bnlab.config import TrainConfig
from bnlab.data import MNIST, load_mnist
from bnlab.errors import UsageError
from bnlab.fileio import atomic_write_bytes, write_json
from bnlab.training import RunResult, resolve_device
from bnlab.training.pool import usable_cores
from bnlab.training.runs import QUIET, obtain, obtain_many

BASE_LR = 0.02  # at 32 images a batch; linear scaling (Goyal et al. 2017; Wu & He's recipe)
REFERENCE_BATCH = 32
SYNC_PROCESSES = 2  # this machine's cores; the statistics of SYNC_PROCESSES x the per-process batch
VIRTUAL_BATCH = 16  # ghost BN's virtual batch, inside batches larger than it
BN_MOMENTUM = 0.1  # every norm's running statistics (the module docstring says why not the notebook's 0.01)
NETWORK = {"model": "convnet", "depth": 6, "width": 4, "hidden": (100,), "init": "glorot_uniform"}
# Rules fixed before the runs, on test accuracy (10,000 images: 0.002 is 20 of them):
MARGIN = 0.002  # A beats B when A's accuracy is higher in every seed by more than this
FLAT = 0.01  # an arm is flat over batch sizes when its median accuracy moves by at most this


@dataclass(frozen=True)
class Arm:
    """One normalization of the guide: its name, its ``TrainConfig`` settings and where it runs."""

    key: str
    label: str
    settings: dict[str, Any]
    processes: int = 1
    smallest_batch: int = 2  # ghost: only batches larger than its virtual batch

    def runs_at(self, batch: int, budget: Budget) -> bool:
        if self.processes > 1:
            return batch in budget.sync_batches
        return batch >= self.smallest_batch


ARMS = (
    Arm("bn", "BN", {"bn": "manual"}),
    Arm("renorm", "Batch Renorm", {"bn": "renorm"}),
    Arm("ghost", f"Ghost BN ({VIRTUAL_BATCH})", {"bn": "ghost", "virtual_batch": VIRTUAL_BATCH}, 1, 2 * VIRTUAL_BATCH),
    Arm("group", "GroupNorm", {"bn": "group"}),
    Arm("none", "no norm", {"bn": "none"}),
    Arm("sync", f"synced BN ({SYNC_PROCESSES} proc)", {"bn": "manual"}, SYNC_PROCESSES),
)
ARM_BY_KEY = {arm.key: arm for arm in ARMS}


@dataclass(frozen=True)
class Budget:
    """How much to run; the design is the same in every budget, only sizes change."""

    name: str
    runtime: str  # as measured on this project's 2-core CPU (docs/family.md)
    seeds: int
    batch_sizes: tuple[int, ...]  # per process
    samples: int  # training images per run, whatever the batch size
    sync_batches: tuple[int, ...]  # per-process batch sizes of the synchronized arm (2 processes: slow on a CPU)
    non_iid: tuple[int, int]  # (batch size, classes per batch)
    evals: int  # validation evaluations during a run (on eval_size images)
    eval_size: int
    precise_samples: int
    one_at_a_time: int


BUDGETS = {
    "smoke": Budget("smoke", "seconds, for CI", 1, (2, 32), 256, (2,), (32, 2), 1, 200, 128, 20),
    "quick": Budget("quick", "about 5 min on 2 CPU cores", 2, (2, 8, 32), 8_000, (2,), (32, 2), 4, 1000, 4096, 100),
    "full": Budget(
        "full", "about 30 min on 2 CPU cores", 3, (2, 4, 8, 16, 32, 64, 128), 32_000, (2, 4), (32, 2), 4, 1000, 4096,
        100,
    ),
}  # fmt: skip


def run_config(arm: Arm, batch: int, seed: int, budget: Budget, classes: int | None = None) -> TrainConfig:
    """The run of ``arm`` at ``batch`` images per process (a global batch of processes x that) and ``seed``."""
    global_batch = batch * arm.processes
    steps = max(1, budget.samples // global_batch)
    settings = dict(arm.settings)
    if settings["bn"] == "renorm":
        settings["renorm_warmup"] = steps // 5
    return TrainConfig(
        **NETWORK, **settings, optimizer="sgd", momentum=0.9, lr=BASE_LR * global_batch / REFERENCE_BATCH,
        loss="softmax", bn_momentum=BN_MOMENTUM, batch_size=global_batch, batches=steps, seed=seed,
        classes_per_batch=classes, cadence="interval", eval_every=max(1, steps // budget.evals),
        eval_size=budget.eval_size, one_at_a_time=budget.one_at_a_time, precise_samples=budget.precise_samples,
    )  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One run of the guide: an arm at a setting ("i.i.d." or the non-i.i.d. one) and batch size, one seed."""

    arm: str
    setting: str
    batch: int
    seed: int


def plan(budget: Budget, seeds: Sequence[int]) -> dict[Cell, TrainConfig]:
    """Every run the budget asks for."""
    cells: dict[Cell, TrainConfig] = {}
    non_iid_batch, classes = budget.non_iid
    for arm in ARMS:
        for seed in seeds:
            for batch in budget.batch_sizes:
                if arm.runs_at(batch, budget):
                    cells[Cell(arm.key, "i.i.d.", batch, seed)] = run_config(arm, batch, seed, budget)
            if arm.processes == 1 and arm.runs_at(non_iid_batch, budget):
                setting = non_iid_name(budget)
                cells[Cell(arm.key, setting, non_iid_batch, seed)] = run_config(
                    arm, non_iid_batch, seed, budget, classes
                )
    return cells


def non_iid_name(budget: Budget) -> str:
    return f"{budget.non_iid[1]} classes a batch"


MEASURES = {  # the scores of a run, by name: (RunResult attribute or precise key, precise?)
    "test": ("test_accuracy", False),
    "test precise": ("test_accuracy", True),
    "one at a time": ("one_at_a_time_accuracy", False),
    "one at a time precise": ("one_at_a_time_accuracy", True),
}


def score(run: RunResult, measure: str = "test") -> float | None:
    """A completed run's score (precise ones: for norms without batch statistics, the score itself); None if
    the run did not complete."""
    if run.status != "completed":
        return None
    key, precise = MEASURES[measure]
    if precise and run.precise:
        return run.precise.get(key)
    return getattr(run, key)


@dataclass
class FamilyResult:
    """Every run of the guide, by cell, and what the rule makes of them."""

    budget: Budget
    seeds: tuple[int, ...]
    runs: dict[Cell, RunResult]
    out_dir: Path
    device: str
    trained: int
    wall_seconds: float
    notes: list[str] = field(default_factory=list)

    def settings(self) -> list[tuple[str, int]]:
        """(setting, batch) in the table's order: the i.i.d. batch sizes, then the non-i.i.d. one."""
        iid = [("i.i.d.", b) for b in self.budget.batch_sizes]
        return [*iid, (non_iid_name(self.budget), self.budget.non_iid[0])]

    def values(self, arm: str, setting: str, batch: int, measure: str = "test") -> list[float | None] | None:
        """One score per seed, or None where the arm does not run at this setting."""
        cells = [Cell(arm, setting, batch, s) for s in self.seeds]
        if any(c not in self.runs for c in cells):
            return None
        return [score(self.runs[c], measure) for c in cells]

    def winners(self, setting: str, batch: int, measure: str = "test") -> list[str]:
        """The arms with a completed seed that no other arm beats at this setting (``beats``)."""
        present = {arm.key: v for arm in ARMS if (v := self.values(arm.key, setting, batch, measure)) is not None}
        return [
            a for a, v in present.items()
            if any(x is not None for x in v) and not any(beats(w, v) for b, w in present.items() if b != a)
        ]  # fmt: skip

    def medians(self, arm: str, measure: str = "test") -> dict[int, float]:
        """The arm's median accuracy at each i.i.d. batch size it ran at (completed seeds)."""
        out = {}
        for batch in self.budget.batch_sizes:
            values = self.values(arm, "i.i.d.", batch, measure)
            stats = reports.median_range(values or [])
            if stats is not None:
                out[batch] = stats["median"]
        return out

    def findings(self) -> list[str]:
        """The curve's shape in words, each by the rules above, from the runs as measured."""
        sizes, small = self.budget.batch_sizes, self.budget.batch_sizes[0]
        reference = REFERENCE_BATCH if REFERENCE_BATCH in sizes else sizes[-1]
        out = []
        bn_small, bn_ref = (self.values("bn", "i.i.d.", b) for b in (small, reference))
        if bn_small and bn_ref and small != reference:
            degrades = beats(bn_ref, bn_small)
            medians = self.medians("bn")
            out.append(
                f"BN {'degrades' if degrades else 'does not degrade by the rule'} as the batch shrinks: "
                f"{_median(bn_small)} at {small} images against {_median(bn_ref)} at {reference} (median of "
                f"{len(self.seeds)} seeds; {'every seed' if degrades else 'not every seed'} lower by more than "
                f"{MARGIN * 100:g} points)" + (f"; its curve: {_curve(medians)}" if medians else "") + "."
            )
        group = self.medians("group")
        if len(group) == len(sizes) > 1:  # a batch size without a completed run cannot be called flat
            spread = max(group.values()) - min(group.values())
            out.append(
                f"GroupNorm {'stays flat' if spread <= FLAT else 'does not stay flat'}: its median moves by "
                f"{spread * 100:.2f} points over batch sizes {sizes[0]}-{sizes[-1]} (flat: at most {FLAT * 100:g}); "
                f"{_curve(group)}."
            )
        for key in ("renorm", "sync", "ghost", "none"):
            arm = ARM_BY_KEY[key]
            for batch in sizes:
                mine, bn = self.values(key, "i.i.d.", batch), self.values("bn", "i.i.d.", batch)
                group_values = self.values("group", "i.i.d.", batch)
                if mine is None or bn is None:
                    continue
                verdict = "beats BN" if beats(mine, bn) else "loses to BN" if beats(bn, mine) else "ties BN"
                gn = ""
                if group_values is not None:
                    gn = (
                        ", beats GroupNorm" if beats(mine, group_values)
                        else ", loses to GroupNorm" if beats(group_values, mine) else ", ties GroupNorm"
                    )  # fmt: skip
                out.append(
                    f"{arm.label} at {batch} images a process: {_median(mine)}; {verdict} ({_median(bn)}){gn}"
                    + (f" ({_median(group_values)})" if group_values is not None else "") + "."
                )  # fmt: skip
                if key in ("ghost", "none"):
                    break  # one line each: at the smallest batch they run at
        setting, batch = self.settings()[-1]
        winners = self.winners(setting, batch)
        out.append(
            f"Non-i.i.d. batches ({batch} images from {self.budget.non_iid[1]} classes each): the winners are "
            f"{', '.join(ARM_BY_KEY[w].label for w in winners) or 'none'}; "
            + "; ".join(
                f"{arm.label} {_median(v)}" for arm in ARMS if (v := self.values(arm.key, setting, batch)) is not None
            )
            + "."
        )
        return out

    def rows(self) -> list[dict[str, Any]]:
        """results.csv: one row per run."""
        out = []
        for cell, run in self.runs.items():
            arm = ARM_BY_KEY[cell.arm]
            row: dict[str, Any] = {
                "arm": arm.label, "setting": cell.setting, "batch_per_process": cell.batch,
                "processes": arm.processes, "global_batch": run.config.batch_size, "steps": run.config.batches,
                "lr": run.config.lr, "seed": cell.seed, "status": run.status,
            }  # fmt: skip
            row |= {name.replace(" ", "_"): score(run, name) for name in MEASURES}
            row |= {"train_seconds": run.train_seconds, "run_dir": str(run.run_dir)}
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        table = []
        for setting, batch in self.settings():
            entry: dict[str, Any] = {"setting": setting, "batch": batch, "winners": self.winners(setting, batch)}
            for measure in MEASURES:
                entry[measure] = {a.key: self.values(a.key, setting, batch, measure) for a in ARMS}
            table.append(entry)
        return {
            "budget": self.budget.name,
            "seeds": list(self.seeds),
            "device": self.device,
            "runs_trained": self.trained,
            "runs_reused": len(self.runs) - self.trained,
            "wall_seconds": round(self.wall_seconds, 1),
            "rules": {"margin": MARGIN, "flat": FLAT, "measure": "test accuracy, running (EMA) statistics"},
            "recipe": {"base_lr": BASE_LR, "reference_batch": REFERENCE_BATCH, "network": dict(NETWORK)},
            "table": table,
            "findings": self.findings(),
            "notes": self.notes,
            "runs": self.rows(),
        }


def beats(a: Sequence[float | None], b: Sequence[float | None]) -> bool:
    """The rule: paired, seed by seed, a higher accuracy by more than ``MARGIN`` in every seed; a completed run
    beats one that did not complete."""
    return all(x is not None and (y is None or x - y > MARGIN) for x, y in zip(a, b, strict=True))


def _median(values: Sequence[float | None] | None, spread: bool = False) -> str:
    """The median over seeds (with ``spread``, and its range), and how many did not complete."""
    stats = reports.median_range(values or [])
    if stats is None:
        return "did not complete"
    text = reports.median_text(stats) if spread else f"{stats['median']:.4f}"
    missing = sum(v is None for v in values or [])
    return text + (f", {missing} did not complete" if missing else "")


def _curve(medians: dict[int, float]) -> str:
    return ", ".join(f"{b}: {v:.4f}" for b, v in medians.items())


def run_family(
    budget: str = "quick",
    seeds: int | None = None,
    *,
    out_dir: str | Path = "runs/family",
    data: MNIST | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    policy: str = "reuse",
    runs_dir: str | Path | None = None,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
) -> FamilyResult:
    """Train (or reuse) every run of ``budget``, then write report.md, results.json, results.csv and family.png.

    Runs are kept in the run store ``runs_dir`` (default ``OUT/runs``) with ``policy`` ("reuse" or "fresh").
    The one-process runs train side by side in ``workers`` processes (default: one per usable core); the
    synchronized arm's runs then train one after another, each in ``SYNC_PROCESSES`` processes of its own.
    """
    if budget not in BUDGETS:
        raise UsageError(f"budget must be one of {', '.join(BUDGETS)}; got {budget!r}")
    plan_, started = BUDGETS[budget], time.perf_counter()
    seed_list = tuple(range(plan_.seeds if seeds is None else seeds))
    if not seed_list:
        raise UsageError("the family guide needs at least one seed")
    out, torch_device = Path(out_dir), resolve_device(device)
    store_root = out / "runs" if runs_dir is None else Path(runs_dir)
    cells, notes = plan(plan_, seed_list), []
    why_not = sync_unavailable(torch_device)
    if why_not:
        cells = {c: config for c, config in cells.items() if ARM_BY_KEY[c.arm].processes == 1}
        notes.append(f"The synchronized arm was left out: {why_not}.")
        log(notes[-1])
    data = (data if data is not None else load_mnist(data_dir)).to(torch_device)
    alone = {c: config for c, config in cells.items() if ARM_BY_KEY[c.arm].processes == 1}
    synced = {c: config for c, config in cells.items() if ARM_BY_KEY[c.arm].processes > 1}
    log(
        f"bnlab family: budget {plan_.name} ({plan_.runtime}), {len(seed_list)} seed(s), {len(cells)} runs "
        f"({len(synced)} of them in {SYNC_PROCESSES} processes) in {store_root}"
    )
    enabled = sys.stderr.isatty() if progress is None else progress
    runs: dict[Cell, RunResult] = {}
    trained = 0
    with tqdm(total=len(cells), unit="run", desc="family", disable=not enabled, file=sys.stderr) as bar:
        obtained = obtain_many(
            list(alone.values()), store_root, policy=policy, data=data, device=torch_device,
            done=lambda config, result, how: bar.update(), workers=usable_cores() if workers is None else workers,
            **QUIET,
        )  # fmt: skip
        for cell, config in alone.items():
            runs[cell], how = obtained[config]
            trained += how != "reused"
        for cell, config in synced.items():  # on the data the others trained on (obtain hands it to the processes)
            runs[cell], how = obtain(
                config, store_root, policy=policy, data=data, device=torch_device, nproc=SYNC_PROCESSES, **QUIET
            )  # fmt: skip
            trained += how != "reused"
            bar.update()
    outcome = FamilyResult(
        plan_, seed_list, runs, out, str(torch_device), trained, time.perf_counter() - started, notes
    )  # fmt: skip
    write_report(outcome)
    return outcome


def sync_unavailable(device: torch.device) -> str:
    """Why the synchronized arm cannot run here ("" if it can): it needs ``SYNC_PROCESSES`` CPU cores."""
    if device.type != "cpu":
        return (
            f"it runs {SYNC_PROCESSES} processes on the CPU, and this lab runs on {device.type} (one GPU cannot "
            "hold two NCCL ranks)"
        )
    if usable_cores() < SYNC_PROCESSES:
        return f"it needs {SYNC_PROCESSES} usable CPU cores and this machine has {usable_cores()}"
    return ""


def report_blocks(outcome: FamilyResult) -> list[reports.Block]:
    plan_, seeds = outcome.budget, outcome.seeds
    arms = [a for a in ARMS if any(c.arm == a.key for c in outcome.runs)]

    def cell_text(arm: Arm, setting: str, batch: int, measure: str) -> str:
        values = outcome.values(arm.key, setting, batch, measure)
        if values is None:
            return ""
        text = _median(values, spread=True)
        return f"**{text}**" if arm.key in outcome.winners(setting, batch, measure) else text

    def table(measure: str) -> reports.Table:
        return reports.Table(
            ("setting", "batch", *(a.label for a in arms)),
            tuple(
                (setting, str(batch), *(cell_text(a, setting, batch, measure) for a in arms))
                for setting, batch in outcome.settings()
            ),
        )

    seconds = sum(r.train_seconds for r in outcome.runs.values())
    return [
        reports.Heading("Which normalization at which batch size", 1),
        reports.Text(
            f"The notebook's ConvNet cut to 6 conv layers (4-24 channels) + dense 100, SGD with momentum 0.9 at "
            f"lr {BASE_LR:g} x batch / {REFERENCE_BATCH}, {plan_.samples:,} training images per run at every batch "
            f"size, seeds {', '.join(map(str, seeds))} (a seed: the same initial weights in every arm, the same "
            f"batches at a batch size). Batch: images per process (the synchronized arm trains on "
            f"{SYNC_PROCESSES} processes, so its statistics and gradient are of twice as many). Budget "
            f"**{plan_.name}**: {len(outcome.runs)} runs ({outcome.trained} trained now) on {outcome.device}, "
            f"{outcome.wall_seconds / 60:.1f} min ({seconds / 60:.1f} min of training steps)."
        ),
        *(reports.Callout(note) for note in outcome.notes),
        reports.Heading("The rule"),
        reports.Text(
            f"Fixed before the runs. The measure: test accuracy (10,000 images) with the running (EMA) statistics "
            f"each layer keeps, what a deployed model uses. Arm A beats arm B at a setting when A's accuracy is "
            f"higher in every seed by more than {MARGIN * 100:g} points (a diverged run loses to any completed "
            f"one); the winners (in bold) are the arms no other beats. An arm is flat over batch sizes when its "
            f"median moves by at most {FLAT * 100:g} point."
        ),
        reports.Heading("Test accuracy, running statistics"),
        reports.Text(f"Median over {len(seeds)} seed(s) (range); winners in bold."),
        table("test"),
        reports.Image(
            "family.png",
            "Test error against images per process (as Wu & He's Figure 1), mean over seeds with the min-max band: "
            "with the running statistics, with precise ones, and at one batch size, i.i.d. against non-i.i.d. "
            "batches.",
        ),
        reports.Heading("Findings"),
        reports.Bullets(tuple(outcome.findings())),
        reports.Heading("Test accuracy, precise statistics"),
        reports.Text(
            f"The same weights with statistics recomputed from {plan_.precise_samples:,} training images "
            "(`bnlab.recalibrate`, in the training batch size); GroupNorm and no norm keep none, so theirs is the "
            "figure above."
        ),
        table("test precise"),
        reports.Heading("One at a time"),
        reports.Text(
            f"The first {plan_.one_at_a_time} test images classified alone (the notebook's check), running "
            "statistics. In eval mode no arm here normalizes over the batch, so a batch of one is classified as "
            "in a batch of many: this checks that, and what is left is how good the stored statistics are."
        ),
        table("one at a time"),
        reports.Text(
            f"Re-run: `bnlab family --budget {plan_.name} --seeds {len(seeds)}` (finished runs are reused; "
            "`--fresh` retrains)."
        ),
    ]


def _errors(
    outcome: FamilyResult, measure: str, place: Callable[[Cell], tuple[float, bool]]
) -> dict[str, list[list[tuple[float, float]]]]:
    """Per arm, per seed, the (x, test error in %) points of its completed runs; ``place(cell)``: (x, shown?)."""
    series: dict[str, list[list[tuple[float, float]]]] = {}
    for arm in ARMS:
        per_seed = []
        for seed in outcome.seeds:
            points = []
            for cell, run in outcome.runs.items():
                x, shown = place(cell)
                if cell.arm == arm.key and cell.seed == seed and shown and (value := score(run, measure)) is not None:
                    points.append((x, 100 * (1 - value)))
            if points:
                per_seed.append(sorted(points))
        if per_seed:
            series[arm.label] = per_seed
    return series


def write_report(outcome: FamilyResult) -> None:
    """report.md, results.json, results.csv and family.png in the output folder."""
    out = outcome.out_dir
    write_json(out / "results.json", outcome.to_dict())
    reports.write_csv(out / "results.csv", outcome.rows())
    panels = [
        reports.Panel(
            f"Test error, {title}", "images per process (batch size)", "test error (%)",
            _errors(outcome, measure, lambda c: (float(c.batch), c.setting == "i.i.d.")), logx=True,
            xticks=outcome.budget.batch_sizes,
        )
        for measure, title in (("test", "running (EMA) statistics"), ("test precise", "precise statistics"))
    ]  # fmt: skip
    non_iid, batch = non_iid_name(outcome.budget), outcome.budget.non_iid[0]
    categories = (f"i.i.d., {batch}", f"{non_iid}, {batch}")
    panels.append(
        reports.Panel(
            "Non-i.i.d. batches, running statistics", "batches", "test error (%)",
            _errors(outcome, "test", lambda c: (float(c.setting == non_iid), c.batch == batch)), categories=categories,
        )
    )  # fmt: skip
    reports.plot_panels(out / "family.png", panels, ncols=3)
    atomic_write_bytes(out / "report.md", reports.render_markdown(report_blocks(outcome)).encode())
