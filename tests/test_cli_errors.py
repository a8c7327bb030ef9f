"""No traceback anywhere: every bad input, hostile file and OS error gets one line, the right exit status,
and leaves the files already written valid.

Exit status: 2 bad usage, 1 a problem explained on stderr, 130 interrupted. Each case asserts the
status, a fragment of the message naming the problem (and, where there is one, the fix), a single
line on stderr, and no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnlab.cli import main
from bnlab.config import TrainConfig
from bnlab.training import store, train

UNWRITABLE = "/proc/bnlab-cannot-write-here"  # not even root can create files under /proc


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bnlab.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def expect(capsys, args: list[str], status: int, fragment: str) -> None:
    """In-process: ``bnlab ARGS`` exits with ``status`` and one line holding ``fragment``."""
    try:
        code = main(args)
    except SystemExit as exit_info:  # argparse's own usage errors
        code = exit_info.code
    assert code == status, capsys.readouterr()
    line = one_line(capsys.readouterr().err)
    assert fragment in line, line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig(bn="manual", batches=2, eval_every=100, one_at_a_time=5, precise_samples=128)
    train(config, run_dir=out, device="cpu", log=lambda _: None, progress=False)
    return out


def finish(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``process.communicate``, reaping the process even when it does not end in time."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


# --- Arguments out of range, checked before any work ----------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--seed", "18446744073709551616"], "argument --seed: must be <="),
        (["train", "--seed", "-1"], "argument --seed: must be >= 0"),
        (["train", "--batches", "1000000000000"], "argument --batches: must be <="),
        (["train", "--nproc", "0"], "argument --nproc: must be >= 1"),
        (["summary", "--depth", "100000"], "argument --depth: must be <= 200"),
        (["evaluate", "x", "--samples", "-3"], "argument --samples: must be >= 0"),
        (["recalibrate", "x", "--samples", "1"], "argument --samples: must be >= 2"),
        (["reproduce", "--seeds", "1000"], "argument --seeds: must be <= 100"),
        (["benefits", "--seeds", "1e3"], "argument --seeds: expected a whole number"),
        (["rnn", "--eval-size", "6000"], "argument --eval-size: must be <= 5000"),
        (["rnn", "--threads", "100000"], "argument --threads: must be <= 1024"),
        (["train", "--batch-size", "100000"], "argument --batch-size: must be <= 55000"),
        (["bench", "--runs", "100000"], "argument --runs: must be <= 10000"),
    ],
)
def test_arguments_out_of_range_exit_2(capsys, args, fragment):
    expect(capsys, args, 2, fragment)


# --- Run directories ------------------------------------------------------------------------------


def test_out_pointing_at_a_file_or_an_unwritable_place_is_refused_up_front(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    for command in (["train", "--batches", "1"], ["reproduce"], ["benefits", "--budget", "smoke"]):
        expect(capsys, [*command, "--out", str(a_file)], 2, "not a folder")
        expect(capsys, [*command, "--out", UNWRITABLE], 2, UNWRITABLE)
    assert a_file.read_text() == "mine"


def test_bench_output_is_checked_before_the_benchmark_runs(tmp_path, capsys):
    start = time.monotonic()
    expect(capsys, ["bench", "layer", "--out", f"{UNWRITABLE}/timings.json"], 2, "cannot write")
    expect(capsys, ["bench", "layer", "--out", str(tmp_path)], 2, "is a folder")
    assert time.monotonic() - start < 30  # refused, not benchmarked first


def test_bench_with_missing_data_is_one_line(tmp_path, capsys):
    expect(capsys, ["bench", "train", "--data-dir", str(tmp_path / "missing")], 1, "does not exist")


def test_two_runs_into_one_directory_the_second_is_refused(tmp_path):
    out = tmp_path / "shared"
    first = subprocess.Popen(
        [sys.executable, "-m", "bnlab.cli", "train", "--batches", "300", "--seed", "0", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / store.CONFIG).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = run_cli("train", "--batches", "2", "--seed", "1", "--out", str(out))
        assert second.returncode == 2
        assert "another bnlab process is writing" in one_line(second.stderr)
    finally:
        first.send_signal(signal.SIGTERM)  # SIGTERM as Ctrl-C: the run records that it was interrupted
        _, err = finish(first, timeout=60)
    assert first.returncode == 130, err
    summary = store.read_summary(out)
    assert summary["status"] == "interrupted" and summary["config"]["seed"] == 0
    assert all(r["batch"] < summary["batches_done"] for r in store.read_metrics(out / store.METRICS))


def test_default_run_directories_differ_for_runs_started_in_the_same_second(tmp_path):
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "bnlab.cli", "train", "--batches", "1", "--precise-samples", "0"], cwd=tmp_path,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]  # fmt: skip
    try:
        for process in processes:
            _, err = finish(process, timeout=300)
            assert process.returncode == 0, err
    finally:
        for process in processes:
            process.kill()
            process.wait()
    runs = sorted((tmp_path / "runs" / "train").iterdir())
    assert len(runs) == 2 and all(store.read_summary(r)["status"] == "completed" for r in runs)


def test_a_failure_before_the_loop_leaves_no_running_status(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    expect(capsys, ["train", "--data-dir", str(tmp_path / "empty"), "--out", str(out)], 1, "MNIST files missing")
    summary = store.read_summary(out)
    assert summary["status"] == "failed" and "MNIST files missing" in summary["message"]


def test_an_os_error_reading_data_names_the_path(tmp_path, capsys, monkeypatch):
    from bnlab import data

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "_md5", unreadable)
    expect(capsys, ["train", "--batches", "1", "--out", str(tmp_path / "run")], 1, "Permission denied")


# --- Hostile or mismatched checkpoints: refused by name, before anything is built -------------------


def _tampered(finished_run: Path, tmp_path: Path, change) -> Path:
    payload = torch.load(finished_run / store.CHECKPOINT, weights_only=True)
    change(payload)
    path = tmp_path / "tampered.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda p: p["config"].update(depth=100000), "depth must be an integer in [1, 200]"),
        (lambda p: p["config"].update(hidden=[100000000]), "hidden layer size must be an integer"),
        (lambda p: p["config"].update(surprise=1), "unknown keys ['surprise']"),
        (lambda p: p["config"].pop("loss"), "missing keys ['loss']"),
        (lambda p: p.update(config="depth=19"), "config must be a mapping"),
        (lambda p: p["state_dict"].update({"logits.weight": torch.zeros(3, 3)}), "logits.weight has shape [3, 3]"),
        (lambda p: p["state_dict"].pop("logits.bias"), "missing ['logits.bias']"),
        (lambda p: p["state_dict"]["logits.weight"].fill_(float("nan")), "logits.weight holds NaN"),
        (lambda p: p.update(version=99), "version 99"),
    ],
)
def test_hostile_or_mismatched_checkpoints_are_one_line_errors(finished_run, tmp_path, capsys, change, fragment):
    path = _tampered(finished_run, tmp_path, change)
    for command in (["evaluate", str(path), "--precise-samples", "0"], ["recalibrate", str(path)]):
        expect(capsys, command, 1, fragment)


def test_evaluate_reports_the_samples_it_really_classified(finished_run, capsys):
    assert main(["evaluate", str(finished_run), "--samples", "20000", "--precise-samples", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["one_at_a_time_samples"] == 10000


def test_recalibrate_never_overwrites_silently(finished_run, capsys):
    expect(capsys, ["recalibrate", str(finished_run), "--samples", "64", "--out", str(finished_run / "summary.json")],
           2, "exists")  # fmt: skip
    assert json.loads((finished_run / "summary.json").read_text())["status"] == "completed"


# --- Smaller cases ---------------------------------------------------------------------------------


def test_summary_takes_json_and_device(capsys):
    assert main(["summary", "--json", "--device", "cpu", "--depth", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["depth"] == 3 and printed["layers"][0]["layer"] == "blocks.0.conv"


def test_sigterm_interrupts_like_ctrl_c_and_keeps_the_files(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "bnlab.cli", "train", "--batches", "5000", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / store.METRICS).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGTERM)
    _, err = finish(process, timeout=60)
    assert process.returncode == 130 and "interrupted" in one_line(err)
    summary = store.read_summary(out)
    assert summary["status"] == "interrupted" and 0 < summary["batches_done"] < 5000
    steps = [r["batch"] for r in store.read_metrics(out / store.METRICS) if r["event"] == "step"]
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] < 5000  # every line written so far is whole
