"""``bnlab rnn``: the LSTM against the BN-LSTM on sequential MNIST (Cooijmans et al., ICLR 2017).

For each seed the two models are trained from the same initial weights on the same batches with the
same h_0 noise: their configs differ only in ``bn`` ("none" or "manual"), so any difference between
the two is the work of recurrent batch norm. Settings are the paper's (and the authors' scripts'):
RMSProp at 1e-3 with momentum 0.9, gradients clipped at a global norm of 1.0, batches of 100,
100 hidden units, softmax cross-entropy, gamma 0.1, h_0 noise 0.1 (``bnlab.lstm``).

The budget is a number of batches, a training time (``minutes``: training steps only, evaluation
excluded; the slower BN-LSTM then sees fewer batches), or both, whichever ends first. Validation
accuracy on the first ``eval_size`` validation images is measured every ``eval_every`` batches; at
the end the whole validation and test sets are scored, and the first ``one_at_a_time`` test images
classified one at a time in eval mode (a sequence alone: population statistics per time step), with
the running statistics (EMA) and, for the BN-LSTM, with precise ones recomputed from
``precise_samples`` training images.

Runs live in the run store (``OUT/runs/`` unless given another), one directory per config
(``bnlab.training.runs``), each with config, metrics, checkpoints and summary. A finished run is reused; an
interrupted one resumes from its latest checkpoint (written every ``checkpoint_every`` batches).
The report: table.md, report.md, results.csv, results.json and validation_accuracy.png in OUT.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab import reports
from bnlab.config import MAX_BATCHES, TASKS, TrainConfig, check_choice
from bnlab.data import MNIST, load_mnist
from bnlab.errors import UsageError
from bnlab.fileio import atomic_write_bytes, write_json
from bnlab.lab.curves import best, curve, first_reaching
from bnlab.reports import spread_cell, summarize
from bnlab.training import RunResult, obtain, resolve_device, run_dir, store

ARMS = {"none": "LSTM", "manual": "BN-LSTM"}  # bn -> the model's name
TASK_NAMES = {
    "row": "row-by-row MNIST (28 steps of 28 pixels)",
    "pixel": "pixel-by-pixel MNIST (784 steps of 1 pixel)",
    "permuted": "permuted pixel-by-pixel MNIST (pMNIST, 784 steps)",
}
# The paper's Table 1, test accuracy. Its "MNIST" is pixel by pixel; row by row is not in the paper.
PAPER_TEST_ACCURACY = {"pixel": {"none": 0.989, "manual": 0.990}, "permuted": {"none": 0.902, "manual": 0.954}}
DEFAULT_BATCHES = 3000  # without --minutes: about 5.5 epochs of the 55,000 training images
THRESHOLDS = (0.90, 0.95, 0.98)  # convergence speed: the first evaluation at or above each


def paper_config(
    task: str = "row",
    *,
    bn: str = "manual",
    seed: int = 0,
    batches: int = DEFAULT_BATCHES,
    seconds: float | None = None,
    eval_every: int = 100,
    eval_size: int | None = 1000,
    one_at_a_time: int = 100,
    precise_samples: int = 8192,
    checkpoint_every: int = 200,
) -> TrainConfig:
    """The paper's sequential-MNIST settings for one model and seed, with the given budget and measurements."""
    return TrainConfig(
        model="lstm",
        bn=bn,
        hidden=(100,),
        task=task,
        optimizer="rmsprop",
        lr=1e-3,
        momentum=0.9,
        clip=1.0,
        loss="softmax",
        batch_size=100,
        batches=batches,
        seconds=seconds,
        seed=seed,
        cadence="interval",
        eval_every=eval_every,
        eval_size=eval_size,
        one_at_a_time=one_at_a_time,
        precise_samples=precise_samples,
        checkpoint_every=checkpoint_every,
    )


def _precise(result: RunResult, key: str) -> float | None:
    return result.precise.get(key) if result.precise else None


def _train_seconds(result: RunResult) -> float:
    """Training time as summary.json stores it, so a run reports the same figures trained now or reused."""
    return round(result.train_seconds, 4)


def _reaching(result: RunResult, accuracy: float) -> int | None:
    """The first evaluated batch at which validation accuracy reached ``accuracy``; None if it never did."""
    point = first_reaching(result, accuracy) if result.history else None
    return None if point is None else int(point["batch"])


@dataclass
class RnnResult:
    """The runs of one ``rnn`` experiment: per model ("none", "manual"), one result per seed, in seed order."""

    task: str
    runs: dict[str, list[RunResult]]
    out_dir: Path
    how: dict[str, int]  # runs reused, resumed and trained now
    runs_dir: Path  # the run store they are kept in

    def rows(self) -> list[dict[str, Any]]:
        """One row per model: budget used, speed, final accuracies (spread over seeds), convergence, the paper's."""
        rows = []
        for bn, results in self.runs.items():
            row: dict[str, Any] = {"bn": bn, "model": ARMS[bn], "seeds": len(results)}
            row["diverged"] = sum(r.diverged for r in results)
            row["batches"] = summarize([r.batches_done for r in results])
            row["train_seconds"] = summarize([_train_seconds(r) for r in results])
            row["seconds_per_batch"] = summarize(
                [_train_seconds(r) / r.batches_done for r in results if r.batches_done]
            )
            for key in ("validation_accuracy", "test_accuracy", "one_at_a_time_accuracy"):
                row[key] = summarize([getattr(r, key) for r in results])
                row[f"precise_{key}"] = summarize([_precise(r, key) for r in results])
            row["best_eval_accuracy"] = summarize([best(r) for r in results if r.history])
            for threshold in THRESHOLDS:
                reached = [_reaching(r, threshold) for r in results]
                row[f"batches_to_{threshold:g}"] = summarize(reached)
                row[f"reached_{threshold:g}"] = sum(b is not None for b in reached)
            row["paper_test_accuracy"] = PAPER_TEST_ACCURACY.get(self.task, {}).get(bn)
            rows.append(row)
        return rows

    def pairs(self) -> list[dict[str, Any]]:
        """Per seed, the two models side by side: test accuracy and its difference (BN-LSTM minus LSTM)."""
        out = []
        for plain, with_bn in zip(self.runs["none"], self.runs["manual"], strict=True):
            pair: dict[str, Any] = {"seed": plain.config.seed}
            for label, result in (("lstm", plain), ("bnlstm", with_bn)):
                pair[f"{label}_test_accuracy"] = result.test_accuracy
                pair[f"{label}_batches"] = result.batches_done
                pair[f"{label}_batches_to_0.95"] = _reaching(result, 0.95)
            both = plain.test_accuracy is not None and with_bn.test_accuracy is not None
            pair["difference"] = with_bn.test_accuracy - plain.test_accuracy if both else None
            out.append(pair)
        return out


def run_rnn(
    task: str = "row",
    seeds: int | Sequence[int] = 1,
    *,
    batches: int | None = None,
    minutes: float | None = None,
    out_dir: str | Path = "runs/rnn",
    data: MNIST | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    eval_every: int = 100,
    eval_size: int | None = 1000,
    one_at_a_time: int = 100,
    precise_samples: int = 8192,
    checkpoint_every: int = 200,
    policy: str = "reuse",
    runs_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
) -> RnnResult:
    """Train the LSTM and the BN-LSTM for every seed on ``task``; write the report in ``out_dir``.

    Budget: ``batches`` (default ``DEFAULT_BATCHES`` when ``minutes`` is not given), ``minutes`` of
    training time per run, or both (whichever ends first).
    """
    check_choice("task", task, TASKS)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise UsageError("rnn needs at least one seed")
    if batches is None:
        batches = DEFAULT_BATCHES if minutes is None else MAX_BATCHES
    settings = dict(
        batches=batches,
        seconds=None if minutes is None else minutes * 60.0,
        eval_every=eval_every,
        eval_size=eval_size,
        one_at_a_time=one_at_a_time,
        precise_samples=precise_samples,
        checkpoint_every=checkpoint_every,
    )
    configs = {(bn, seed): paper_config(task, bn=bn, seed=seed, **settings) for seed in seed_list for bn in ARMS}
    out, torch_device = Path(out_dir), resolve_device(device)
    store_root = out / "runs" if runs_dir is None else Path(runs_dir)
    data = data if data is not None else load_mnist(data_dir)
    runs: dict[str, list[RunResult]] = {bn: [] for bn in ARMS}
    how = {"reused": 0, "resumed": 0, "trained": 0}
    for done, ((bn, seed), config) in enumerate(configs.items(), 1):
        log(f"[{done}/{len(configs)}] {ARMS[bn]}, {task}, seed {seed}: {run_dir(store_root, config, torch_device)}")
        started = time.perf_counter()
        result, kind = obtain(  # a diverged run is a result (recorded, reused), never an exception
            config, store_root, policy=policy, data=data, device=torch_device, log=log, progress=progress
        )  # fmt: skip
        how[kind] += 1
        took = "" if kind == "reused" else f", {time.perf_counter() - started:.0f} s"
        log(f"    {kind}: {_run_line(result)}{took}")
        runs[bn].append(result)
    outcome = RnnResult(task, runs, out, how, store_root)
    write_rnn_report(outcome)
    return outcome


def _run_line(result: RunResult) -> str:
    if result.diverged:
        return f"diverged after {result.batches_done} batches ({result.message})"
    test = "-" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    return f"{result.batches_done} batches, {result.seconds_per_batch:.3f} s/batch, test accuracy {test}"


# --- the report -------------------------------------------------------------------------------------


def _budget(outcome: RnnResult) -> str:
    config = outcome.runs["none"][0].config
    parts = [] if config.batches == MAX_BATCHES else [f"{config.batches:,} batches"]
    if config.seconds is not None:
        parts.append(f"{config.seconds / 60:g} minutes of training steps")
    return " or ".join(parts) + (", whichever ends first," if len(parts) > 1 else "") + " per run"


def _table(outcome: RnnResult) -> tuple[list[str], list[list[str]], str]:
    """(headers, rows, note) of the results table: per model, budget used, speed, accuracies, convergence."""
    rows = outcome.rows()
    headers = ["model", "seeds", "batches", "s/batch", "validation", "test EMA", "test precise"]
    headers += ["alone EMA", "alone precise", "best eval"]
    headers += [f"batches to {t:.0%}" for t in THRESHOLDS] + ["paper test"]
    body = []
    for r in rows:
        cells = [r["model"], str(r["seeds"]) + (f" ({r['diverged']} diverged)" if r["diverged"] else "")]
        cells += [
            spread_cell(r["batches"], 0),
            spread_cell(r["seconds_per_batch"], 3),
            spread_cell(r["validation_accuracy"], 4),
        ]
        cells += [spread_cell(r["test_accuracy"], 4), spread_cell(r["precise_test_accuracy"], 4)]
        cells += [spread_cell(r["one_at_a_time_accuracy"], 2), spread_cell(r["precise_one_at_a_time_accuracy"], 2)]
        cells.append(spread_cell(r["best_eval_accuracy"], 4))
        for t in THRESHOLDS:
            reached, stats = r[f"reached_{t:g}"], r[f"batches_to_{t:g}"]
            cells.append(spread_cell(stats, 0) + (f" ({reached}/{r['seeds']})" if 0 < reached < r["seeds"] else ""))
        paper = r["paper_test_accuracy"]
        cells.append("-" if paper is None else f"{paper:.3f}")
        body.append(cells)
    config = outcome.runs["none"][0].config
    eval_size = "all" if config.eval_size is None else f"the first {config.eval_size:,}"
    spread = " Figures over several seeds: mean (min-max)." if max(r["seeds"] for r in rows) > 1 else ""
    used = sorted({r.precise["samples"] for r in outcome.runs["manual"] if r.precise})  # whole batches of 100
    samples = "/".join(f"{n:,}" for n in used) or f"{config.precise_samples:,}"
    note = (
        f"{TASK_NAMES[outcome.task]}, {_budget(outcome)}.{spread} validation, test: the whole sets after training. "
        "EMA: the running statistics the BN-LSTM trained with; precise: recomputed from "
        f"{samples} training images, same weights (the LSTM has no statistics). alone: the first "
        f"{config.one_at_a_time} test images, each classified alone in eval mode. best eval and batches to X: "
        f"validation accuracy on {eval_size} validation images every {config.eval_every} batches. s/batch: training "
        "steps only. paper: Cooijmans et al., Table 1 (pixel and permuted tasks only)."
    )
    return headers, body, note


def rnn_table(outcome: RnnResult) -> str:
    """The results table in Markdown, with its note."""
    headers, body, note = _table(outcome)
    return "LSTM vs BN-LSTM\n\n" + reports.markdown_table(headers, body) + f"\n\n{note}"


def _pairs_table(outcome: RnnResult) -> reports.Table:
    def acc(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = tuple(
        (
            str(p["seed"]),
            acc(p["lstm_test_accuracy"]),
            acc(p["bnlstm_test_accuracy"]),
            "-" if p["difference"] is None else f"{p['difference']:+.4f}",
            str(p["lstm_batches_to_0.95"] or "-"),
            str(p["bnlstm_batches_to_0.95"] or "-"),
        )
        for p in outcome.pairs()
    )
    headers = ("seed", "LSTM test", "BN-LSTM test", "BN-LSTM - LSTM", "LSTM batches to 95%", "BN-LSTM batches to 95%")
    return reports.Table(headers, rows)


FIGURE = "validation_accuracy.png"


def plot_rnn(outcome: RnnResult, path: Path) -> None:
    """Validation accuracy against batches (mean and min-max band over seeds) and against training time (per run)."""
    by_batch = {ARMS[bn]: [curve(r, "val_accuracy") for r in rs] for bn, rs in outcome.runs.items()}
    by_time = {ARMS[bn]: [curve(r, "val_accuracy", "seconds") for r in rs] for bn, rs in outcome.runs.items()}
    ylabel, seconds = "validation accuracy", "training seconds (evaluation excluded)"
    panels = [
        reports.Panel("against batches", "batch", ylabel, by_batch),
        reports.Panel("against training time", seconds, ylabel, by_time, per_run=True),
    ]
    reports.plot_panels(path, panels, title=f"LSTM vs BN-LSTM, {TASK_NAMES[outcome.task]}")


def write_rnn_report(outcome: RnnResult) -> None:
    """table.md, report.md, results.csv, results.json and validation_accuracy.png in the output folder."""
    out, rows = outcome.out_dir, outcome.rows()
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "results.json",
        store.finite_or_none(
            {
                "task": outcome.task,
                "rows": rows,
                "pairs": outcome.pairs(),
                "runs": [r.summary() | {"run_dir": str(r.run_dir)} for rs in outcome.runs.values() for r in rs],
            }
        ),
    )
    reports.write_csv(out / "results.csv", reports.flatten_rows(rows))
    atomic_write_bytes(out / "table.md", (rnn_table(outcome) + "\n").encode())
    plot_rnn(outcome, out / FIGURE)
    config = outcome.runs["none"][0].config
    headers, body, note = _table(outcome)
    threads = sorted({r.threads for rs in outcome.runs.values() for r in rs})
    blocks: list[reports.Block] = [
        reports.Heading(f"LSTM vs BN-LSTM: {TASK_NAMES[outcome.task]}", 1),
        reports.Text(
            f"Cooijmans et al.'s sequential-MNIST setup: one layer of {config.hidden[0]} units, RMSProp at "
            f"{config.lr:g} with momentum {config.momentum:g}, gradients clipped at a norm of {config.clip:g}, "
            f"batches of {config.batch_size}, softmax cross-entropy; BN-LSTM gammas start at 0.1, h_0 noise 0.1 for "
            f"both. Budget: {_budget(outcome)}. Each seed trains both models from the same initial weights on the "
            f"same batches. Device {outcome.runs['none'][0].device}, {'/'.join(map(str, threads))} thread(s)."
        ),
        reports.Table(tuple(headers), tuple(map(tuple, body))),
        reports.Text(note),
        reports.Heading("Per seed"),
        _pairs_table(outcome),
        reports.Image(FIGURE, f"Validation accuracy ({TASK_NAMES[outcome.task]})"),
        reports.Text(
            f"Runs: {outcome.how['trained']} trained now, {outcome.how['resumed']} resumed, "
            f"{outcome.how['reused']} reused, in `{outcome.runs_dir}`."
        ),
    ]
    atomic_write_bytes(out / "report.md", reports.render_markdown(blocks).encode())
