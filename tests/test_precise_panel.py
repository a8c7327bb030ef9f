"""The precise-statistics panel end to end at the smoke budget: files, tables, and reuse of finished work.

Only properties that hold on any machine are asserted (shapes, consistency between the files, reuse),
never a seed's accuracy: a few batches of training say nothing about when EMA statistics suffice.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from bnlab.cli import main
from bnlab.lab.precise import BUDGETS, run_precise

SMOKE = BUDGETS["smoke"]
MODES = ("torch", "manual")
RUNS = len(MODES) * len(SMOKE.momenta) * SMOKE.seeds


@pytest.fixture(scope="module")
def panel(small_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("precise")
    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy CPU two threads per process can be several times slower than one
    try:
        outcome = run_precise("smoke", out_dir=out, data=small_mnist, device="cpu", log=lines.append, progress=False)
    finally:
        torch.set_num_threads(threads)
    return outcome, out, lines


def test_every_run_is_trained_measured_and_written(panel):
    outcome, out, lines = panel
    assert outcome.trained == len(outcome.runs) == RUNS and all(r.status == "completed" for r in outcome.runs)
    assert len(lines) == RUNS and all("trained" in line and "measured" in line for line in lines)
    for run in outcome.runs:  # model snapshots at the shorter lengths, the final model at the last
        names = {p.name for p in run.run_dir.iterdir()}
        assert {f"checkpoint-{n}.pt" for n in SMOKE.lengths[:-1]} | {"checkpoint.pt"} <= names
    markdown = (out / "report.md").read_text()
    for heading in ("# When do you need precise", "## EMA against precise", "## How many samples", "## Findings"):
        assert heading in markdown
    assert "](precise.png)" in markdown and (out / "precise.png").read_bytes().startswith(b"\x89PNG")
    assert markdown.count("\n- ") == len(outcome.findings()) == 2 * len(MODES)


def test_tables_are_well_formed(panel):
    _, out, _ = panel
    results = json.loads((out / "results.json").read_text())
    assert results["budget"] == "smoke" and results["runs_trained"] == RUNS and results["runs_reused"] == 0
    rows = results["decay_rows"]
    assert [(r["bn"], r["decay"], r["batches"]) for r in rows] == [
        (bn, round(1 - m, 6), n) for bn in MODES for m in SMOKE.momenta for n in SMOKE.lengths
    ]
    for row in rows:
        assert row["seeds"] == SMOKE.seeds
        for split in ("validation", "test"):
            ema, precise, gap = (row[f"{split}_accuracy_{k}"] for k in ("ema", "precise", "gap"))
            assert 0 <= ema["min"] <= ema["median"] <= ema["max"] <= 1 and 0 <= precise["median"] <= 1
            assert gap["median"] == pytest.approx(precise["median"] - ema["median"])  # one seed: the gap of medians
    samples = results["sample_rows"]
    assert [(r["bn"], r["samples"]) for r in samples] == [(bn, n) for bn in MODES for n in SMOKE.samples]
    for row in samples:
        assert row["seconds"]["min"] > 0 and row["share_of_training"]["min"] > 0
        if row["samples"] == SMOKE.samples[-1]:  # the largest count is the reference: nothing short of itself
            assert row["validation_accuracy_short"]["max"] == row["test_accuracy_short"]["max"] == 0

    measurements = list(csv.DictReader((out / "results.csv").open()))
    per_run = 2 * len(SMOKE.lengths)  # EMA and precise at every length
    sweep_runs = len(MODES) * SMOKE.seeds  # runs at the sweep's decay: the other sample counts too
    assert len(measurements) == RUNS * per_run + sweep_runs * (len(SMOKE.samples) - 1)
    assert {m["statistics"] for m in measurements} == {"ema", "precise"}
    assert all(0 <= float(m["validation_accuracy"]) <= 1 for m in measurements)
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| PyTorch BN")]
    assert len(table) == len(rows) // len(MODES) + len(SMOKE.samples)


def test_batch_norm_statistics_do_not_feed_back_into_training(panel):
    """Training normalizes with batch statistics, so a seed gives every decay the same weights: precise
    accuracy is the same whatever the decay, and the decays differ only in their EMA statistics."""
    outcome, _, _ = panel
    for bn in MODES:
        for length in SMOKE.lengths:
            scores = {
                (r["validation_accuracy"], r["test_accuracy"])
                for r in outcome.rows
                if (r["bn"], r["batches"], r["statistics"], r["samples"]) == (bn, length, "precise", SMOKE.samples[-1])
            }
            assert len(scores) == 1


def test_finished_runs_and_their_scores_are_reused(panel, small_mnist):
    outcome, out, _ = panel
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*.pt")}
    caches = sorted((out / "analysis").iterdir())
    assert len(caches) == RUNS
    caches[0].unlink()  # one run's scores lost: measured again, its run not retrained
    torch.set_num_threads(1)  # restored after the test (conftest)
    lines: list[str] = []
    again = run_precise("smoke", out_dir=out, data=small_mnist, device="cpu", log=lines.append, progress=False)
    assert again.trained == 0 and {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*.pt")} == stamps
    assert sum("run reused, measured" in line for line in lines) == 1
    assert sum("run reused, scores reused" in line for line in lines) == RUNS - 1
    assert again.decay_rows() == outcome.decay_rows()  # the same weights, scored again: the same accuracies
    accuracies = [{k: v for k, v in r.items() if "accuracy" in k} for r in again.sample_rows()]
    assert accuracies == [{k: v for k, v in r.items() if "accuracy" in k} for r in outcome.sample_rows()]


def test_cli_prints_json_and_reuses_the_panel(panel, capsys):
    _, out, _ = panel
    code = main(["precise", "--budget", "smoke", "--out", str(out), "--device", "cpu", "--threads", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    results = json.loads(captured.out)
    assert results["runs_reused"] == RUNS and results["out_dir"] == str(out) and results["findings"]
    # the command reads MNIST itself, not the fixture's subset: the same runs, scored anew on other data
    assert "run reused, measured" in captured.err and "Written to" in captured.err
    largest = f"{max(r['samples'] for r in results['sample_rows']):,} samples are enough"
    assert not any(largest in finding for finding in results["findings"])  # never judged against itself


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--budget", "huge"], "argument --budget: invalid choice"),
        (["--modes", "torch,none"], "argument --modes: expected a comma-separated subset of torch,manual"),
        (["--seeds", "0"], "argument --seeds: must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["precise", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["precise", "--budget", "smoke", "--out", str(blocked), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and err.count("\n") == 1
