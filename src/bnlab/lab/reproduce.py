"""The notebook's experiment: the same network trained without BN, with PyTorch's BN and with bnlab's.

``reproduce`` trains the three networks at the notebook's settings for each seed (the same seed
gives the three the same batches, and the same kernels where their initialisation agrees), then
writes a table next to the notebook's published figures and a plot of validation accuracy.

Every accuracy is given twice. **EMA**: with the running statistics the network trained with, the
notebook's measure, comparable with its published figures. **Precise**: with population statistics
recomputed from 8,192 training images after training (``bnlab.nn.precise``), what the weights can do.
The two differ when the running averages lag the weights, which at the notebook's decay of 0.99 and
Adam's 0.002 happens often enough to move a single run's EMA accuracy by tens of points.

Runs live in the run store (``OUT/runs/`` unless given another), one directory per config
(``bnlab.training.runs``); a finished run with the same configuration is reused instead of retrained, so
an interrupted ``reproduce`` picks up where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab import reports
from bnlab.config import BN_MODES, TrainConfig
from bnlab.data import MNIST, load_mnist
from bnlab.errors import UsageError
from bnlab.fileio import atomic_write_bytes, write_json
from bnlab.training import RunResult, obtain, resolve_device


@dataclass(frozen=True)
class Published:
    network: str
    test_accuracy: float
    one_at_a_time_accuracy: float


# The notebook's printed results (TensorFlow 1, one run each).
NOTEBOOK = {
    "none": Published("without batch norm", 0.1219, 0.13),
    "torch": Published("tf.layers.batch_normalization", 0.9745, 0.98),
    "manual": Published("tf.nn.moments + tf.nn.batch_normalization", 0.9605, 0.98),
}

LABELS = {
    "none": "no BN",
    "torch": "PyTorch BN (nn.BatchNorm2d, TF settings)",
    "manual": "bnlab BN (bnlab.BatchNorm2d, TF settings)",
}


ACCURACIES = ("validation_accuracy", "test_accuracy", "one_at_a_time_accuracy")
DIGITS = {"validation_accuracy": 4, "test_accuracy": 4, "one_at_a_time_accuracy": 2}  # 100 images: 2 digits


@dataclass
class ReproduceResult:
    runs: dict[str, list[RunResult]]  # bn mode -> one result per seed
    out_dir: Path

    def rows(self) -> list[dict[str, Any]]:
        """One row per network: figures over seeds (mean, min, max), EMA and precise, beside the notebook's."""
        rows = []
        for bn, results in self.runs.items():
            row: dict[str, Any] = {"bn": bn, "network": LABELS[bn], "seeds": len(results)}
            for key in ACCURACIES:
                row[key] = reports.summarize([getattr(r, key) for r in results])
                row[f"precise_{key}"] = reports.summarize([r.precise[key] for r in results if r.precise])
            row["wall_seconds"] = reports.summarize([r.wall_seconds for r in results])
            row["precise_seconds"] = reports.summarize([r.precise["seconds"] for r in results if r.precise])
            row["notebook_test_accuracy"] = NOTEBOOK[bn].test_accuracy
            row["notebook_one_at_a_time_accuracy"] = NOTEBOOK[bn].one_at_a_time_accuracy
            rows.append(row)
        return rows


def reproduce(
    seeds: int | Sequence[int] = 1,
    *,
    out_dir: str | Path = "runs/reproduce",
    data: MNIST | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    modes: Sequence[str] = BN_MODES,
    policy: str = "reuse",
    runs_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    fast: bool = True,
) -> ReproduceResult:
    """Train every mode for every seed at the notebook's settings; write the table and plot.

    Runs are kept in the run store ``runs_dir`` (default ``OUT/runs``) by ``bnlab.training.obtain`` with
    ``policy`` ("reuse" finished runs, or "fresh").
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise UsageError("reproduce needs at least one seed")
    for bn in modes:
        if bn not in BN_MODES:
            raise UsageError(f"unknown bn mode {bn!r}; choose from {', '.join(BN_MODES)}")
    out = Path(out_dir)
    store = out / "runs" if runs_dir is None else Path(runs_dir)
    torch_device = resolve_device(device)
    data = data if data is not None else load_mnist(data_dir)
    results: dict[str, list[RunResult]] = {bn: [] for bn in modes}
    total, done = len(seed_list) * len(modes), 0
    for seed in seed_list:
        for bn in modes:
            done += 1
            config = TrainConfig(bn=bn, seed=seed)
            log(f"[{done}/{total}] {LABELS[bn]}, seed {seed}")
            result, how = obtain(
                config, store, policy=policy, data=data, device=torch_device, log=log, progress=progress, fast=fast
            )
            log(f"    {how}: {result.run_dir} (wall time {result.wall_seconds:.1f} s)")
            results[bn].append(result)
    outcome = ReproduceResult(results, out)
    write_reproduce_report(outcome)
    return outcome


def write_reproduce_report(outcome: ReproduceResult) -> None:
    """results.json, results.csv, table.md and validation_accuracy.png in the output folder."""
    out, rows = outcome.out_dir, outcome.rows()
    write_json(
        out / "results.json",
        {
            "rows": rows,
            "runs": [r.summary() | {"run_dir": str(r.run_dir)} for rs in outcome.runs.values() for r in rs],
        },
    )
    reports.write_csv(out / "results.csv", reports.flatten_rows(rows))
    atomic_write_bytes(out / "table.md", (reproduce_table(outcome) + "\n").encode())
    curves = {
        LABELS[bn]: [reports.validation_curve(r.history, r.config.batches, r.validation_accuracy) for r in rs]
        for bn, rs in outcome.runs.items()
    }
    reports.plot_curves(
        out / "validation_accuracy.png",
        curves,
        title="Validation accuracy of the 20-layer ConvNet on MNIST",
        xlabel="batch",
        ylabel="validation accuracy",
    )


def reproduce_table(outcome: ReproduceResult) -> str:
    rows = outcome.rows()
    seeds = max(r["seeds"] for r in rows)
    spread = " (mean, min-max over seeds)" if seeds > 1 else ""

    headers = ["network", "seeds"]
    headers += [f"{name} {kind}" for name in ("validation", "test", "100 alone") for kind in ("EMA", "precise")]
    headers += ["wall s", "precise s", "notebook test", "notebook 100"]
    body = [
        [
            r["network"],
            str(r["seeds"]),
            *(reports.spread_cell(r[prefix + key], DIGITS[key]) for key in ACCURACIES for prefix in ("", "precise_")),
            reports.spread_cell(r["wall_seconds"], 1),
            reports.spread_cell(r["precise_seconds"], 2),
            f"{r['notebook_test_accuracy']:.4f}",
            f"{r['notebook_one_at_a_time_accuracy']:.2f}",
        ]
        for r in rows
    ]
    note = (
        "EMA: the running statistics the network trained with (the notebook's measure). Precise: statistics "
        "recomputed from 8,192 training images after training, same weights. 100 alone: the first 100 test images "
        "classified one at a time. precise s: the recomputation's cost."
    )
    return f"Final accuracies{spread}, 800 batches of 64\n\n" + reports.markdown_table(headers, body) + f"\n\n{note}"
