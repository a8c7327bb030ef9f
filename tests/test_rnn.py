"""The sequence classifier (bnlab.lstm) and the ``bnlab rnn`` experiment (bnlab.lab.rnn).

Every test is quick: a few batches of row-by-row MNIST on a slice of the data. Nothing asserts an
accuracy a seed happens to reach; what is checked holds on any machine: the views of an image, the
pairing of the two models, the files, reuse and resume, and that checkpoints load and can be checked.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from bnlab.check import check_model
from bnlab.cli import main
from bnlab.config import TrainConfig
from bnlab.errors import UsageError
from bnlab.lab import rnn
from bnlab.lstm import PERMUTATION_SEED, SequenceClassifier, parameter_count, pixel_permutation
from bnlab.models import build_network
from bnlab.training import load_model, obtain, run_dir


def lstm_config(**changes) -> TrainConfig:
    return TrainConfig(model="lstm", bn="manual", hidden=(8,), batch_size=16).replace(**changes)


def images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_sequence_views_of_an_image():
    x = images()
    row = build_network(lstm_config(task="row"))
    pixel = build_network(lstm_config(task="pixel"))
    permuted = build_network(lstm_config(task="permuted"))
    torch.testing.assert_close(row.sequences(x), x[:, 0], rtol=0, atol=0)  # (N, 28 steps, 28 pixels)
    torch.testing.assert_close(pixel.sequences(x), x.reshape(3, 784, 1), rtol=0, atol=0)
    order = permuted.permutation
    assert sorted(order.tolist()) == list(range(784)) and not torch.equal(order, torch.arange(784))
    torch.testing.assert_close(permuted.sequences(x), x.reshape(3, 784)[:, order].unsqueeze(2), rtol=0, atol=0)
    assert [m.lstm.max_steps for m in (row, pixel, permuted)] == [28, 784, 784]
    assert row.permutation is None and "permutation" not in row.state_dict()
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        row(torch.rand(2, 784))


def test_permutation_is_fixed_stored_and_reloaded():
    first = build_network(lstm_config(task="permuted", seed=0))
    other = build_network(lstm_config(task="permuted", seed=5, bn="none"))  # another seed and model: same order
    assert torch.equal(first.permutation, other.permutation)
    assert torch.equal(first.permutation, pixel_permutation())
    drawn = torch.randperm(784, generator=torch.Generator().manual_seed(PERMUTATION_SEED))
    assert torch.equal(pixel_permutation(), drawn)  # re-derivable from the fixed seed alone
    # the order is part of the state_dict: a checkpoint brings back the order it was trained with
    state = first.state_dict()
    assert torch.equal(state["permutation"], first.permutation)
    fresh = build_network(lstm_config(task="permuted", seed=0))
    fresh.load_state_dict(state)
    first.eval(), fresh.eval()
    torch.testing.assert_close(fresh(images()), first(images()), rtol=0, atol=0)


def test_lstm_and_bn_lstm_share_their_initial_weights():
    plain = build_network(lstm_config(bn="none", seed=3)).state_dict()
    with_bn = build_network(lstm_config(bn="manual", seed=3)).state_dict()
    assert set(plain) < set(with_bn)
    for key in plain:
        torch.testing.assert_close(with_bn[key], plain[key], rtol=0, atol=0)
    other_seed = build_network(lstm_config(seed=4)).state_dict()
    assert not torch.equal(other_seed["lstm.layers.0.weight_ih"], with_bn["lstm.layers.0.weight_ih"])
    # the paper's initialisation: identity W_h blocks, orthogonal W_x, forget bias 1, gammas 0.1
    cell = build_network(lstm_config(seed=3)).lstm.layers[0]
    torch.testing.assert_close(cell.weight_hh, torch.eye(8).repeat(4, 1))
    torch.testing.assert_close(cell.weight_ih.T @ cell.weight_ih, torch.eye(28), atol=1e-5, rtol=0)
    assert cell.bias[8:16].eq(1).all() and cell.bias[:8].eq(0).all() and cell.bn_hh.weight.eq(0.1).all()
    assert cell.h0_noise_std == 0.1


def test_building_leaves_the_global_generator_alone():
    """h_0's noise comes from the global generator: building a model must not move it, so both arms draw the same."""
    state = torch.get_rng_state()
    build_network(lstm_config())
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("task", ["row", "pixel", "permuted"])
@pytest.mark.parametrize("bn", ["none", "manual"])
def test_parameter_count_without_building(task, bn):
    config = lstm_config(task=task, bn=bn)
    model = build_network(config)
    allocated = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert parameter_count(config) == allocated


def test_refuses_what_the_lstm_cannot_honour():
    with pytest.raises(UsageError, match="bn='manual'"):
        build_network(lstm_config(bn="torch"))
    with pytest.raises(UsageError, match="dead_units"):
        build_network(lstm_config(dead_units=True))
    with pytest.raises(UsageError, match="lstm model"):
        SequenceClassifier(TrainConfig(model="convnet"))


def test_eval_mode_classifies_a_sequence_alone_as_in_a_batch():
    model = build_network(lstm_config()).eval()
    x = images(4)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    assert together.shape == (4, 10)
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)


TINY = ["--batches", "4", "--eval-every", "2", "--eval-size", "32", "--one-at-a-time", "4"]
TINY += ["--precise-samples", "64", "--checkpoint-every", "2"]


@pytest.fixture
def tiny_data(small_mnist, monkeypatch):
    """``bnlab rnn`` on a slice of MNIST: the command loads it through bnlab.lab.rnn.load_mnist."""
    monkeypatch.setattr(rnn, "load_mnist", lambda *args, **kwargs: small_mnist)
    return small_mnist


def test_rnn_command_writes_its_report_and_reuses_finished_runs(tiny_data, tmp_path, capsys):
    out = tmp_path / "rnn"
    assert main(["rnn", *TINY, "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [row["model"] for row in result["rows"]] == ["LSTM", "BN-LSTM"]
    assert all(row["batches"]["mean"] == 4 for row in result["rows"])
    assert result["rows"][0]["precise_test_accuracy"] is None  # the LSTM has no statistics to recompute
    assert result["rows"][1]["precise_test_accuracy"] is not None
    assert [p["seed"] for p in result["pairs"]] == [0]
    for name in ("report.md", "table.md", "results.csv", "results.json"):
        assert (out / name).is_file()
    assert (out / rnn.FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["model"] for r in csv.DictReader((out / "results.csv").open())] == ["LSTM", "BN-LSTM"]
    assert "BN-LSTM" in (out / "report.md").read_text() and "2 trained now" in (out / "report.md").read_text()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert [name.split("-")[:3] for name in runs] == [["lstm", "manual", "seed0"], ["lstm", "none", "seed0"]]
    for name in runs:
        assert {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"} <= {
            p.name for p in (out / "runs" / name).iterdir()
        }
        stored = json.loads((out / "runs" / name / "config.json").read_text())["config"]
        assert (stored["optimizer"], stored["lr"], stored["momentum"], stored["clip"]) == ("rmsprop", 0.001, 0.9, 1.0)
        assert (stored["batch_size"], stored["hidden"], stored["task"]) == (100, [100], "row")

    assert main(["rnn", *TINY, "--out", str(out), "--json"]) == 0
    again = capsys.readouterr()
    assert again.err.count("reused:") == 2 and "trained:" not in again.err
    assert json.loads(again.out)["rows"] == result["rows"]


def test_an_interrupted_run_resumes_from_its_checkpoint(small_mnist, tmp_path):
    config = rnn.paper_config("row", bn="none", batches=6, eval_every=2, eval_size=32, one_at_a_time=4)
    config = config.replace(checkpoint_every=2, precise_samples=0)
    whole, kind = obtain(config, tmp_path / "whole", data=small_mnist, log=lambda _: None)
    assert kind == "trained"

    def interrupt(_line: str) -> None:  # the first line comes after the last step, as final scores begin
        raise KeyboardInterrupt

    store_root = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        obtain(config, store_root, data=small_mnist, log=interrupt)
    path = run_dir(store_root, config, "cpu")
    assert json.loads((path / "summary.json").read_text())["status"] == "interrupted"
    resumed, kind = obtain(config, store_root, data=small_mnist, log=lambda _: None)
    assert kind == "resumed" and resumed.batches_done == 6
    # from batch 4's checkpoint (weights, optimizer, batch order, h_0 noise) to the same end
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in whole.history]
    assert resumed.test_accuracy == whole.test_accuracy
    assert obtain(config, store_root, data=small_mnist, log=lambda _: None)[1] == "reused"
    assert obtain(config, store_root, policy="fresh", data=small_mnist, log=lambda _: None)[1] == "trained"


def test_bnlab_check_runs_on_a_bn_lstm_checkpoint(small_mnist, tmp_path):
    config = rnn.paper_config("row", batches=2, eval_every=2, eval_size=32, one_at_a_time=0, precise_samples=0)
    result, _ = obtain(config, tmp_path / "runs", data=small_mnist, log=lambda _: None)
    checkpoint = load_model(result.run_dir)
    assert isinstance(checkpoint.model, SequenceClassifier) and not checkpoint.model.training
    assert checkpoint.config == config
    assert checkpoint.model.lstm.layers[0].bn_c.num_batches_tracked.tolist() == [2] * 28
    report = check_model(checkpoint.model, small_mnist.test, samples=8, stats_samples=64, batch_size=32)
    assert len(report.layers) == 3 and report.cost is not None and report.cost.metric == "accuracy"
    assert not {"training-mode", "batch-dependent", "identical-when-alone"} & set(report.codes())
