"""The bnlab command: exit statuses, one-line errors, and the train -> evaluate round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bnlab.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnlab.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--batches", "0"], "argument --batches: must be >= 1, got 0"),
        (["train", "--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["train", "--lr", "nan"], "argument --lr: must be > 0.0, got nan"),
        (["train", "--bn", "batch"], "argument --bn: invalid choice"),
        (["reproduce", "--seeds", "-1"], "argument --seeds: must be >= 1"),
        (["evaluate"], "the following arguments are required: RUN_DIR_OR_CHECKPOINT"),
        (["frobnicate"], "invalid choice"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_unavailable_device_is_a_usage_error(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--batches", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is available; use --device cpu" in err and err.count("\n") == 1


def test_missing_data_exits_1_naming_the_fix(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "MNIST files missing" in err and "train-images-idx3-ubyte" in err and err.count("\n") == 1


def test_help_everywhere():
    for command in ([], ["train"], ["reproduce"], ["evaluate"], ["summary"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and "usage: bnlab" in result.stdout


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--bn", "manual", "--batches", "3", "--out", str(out), "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert "Batch:  0: Validation loss:" in stdout and "Accuracy on 100 samples:" in stdout
    assert (out / "checkpoint.pt").is_file()
    assert main(["train", "--batches", "3", "--out", str(out)]) == 2  # will not overwrite a run
    assert "holds files that are not a bnlab run's" in capsys.readouterr().err

    assert main(["evaluate", str(out), "--json", "--samples", "10", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    summary = json.loads((out / "summary.json").read_text())
    assert result["test_accuracy"] == summary["test_accuracy"]
    assert result["one_at_a_time_samples"] == 10
    assert "Test accuracy:" in captured.err  # human lines move to stderr under --json


def test_evaluate_missing_checkpoint_exits_1(tmp_path):
    result = run_cli("evaluate", str(tmp_path))
    assert result.returncode == 1
    assert "no checkpoint at" in result.stderr and "Traceback" not in result.stderr


def test_summary_command(capsys):
    assert main(["summary", "--bn", "torch"]) == 0
    assert "blocks.0.norm   BatchNorm2d" in capsys.readouterr().out
