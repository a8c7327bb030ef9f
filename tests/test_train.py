"""The training loop: logs, run directory, checkpoints, determinism, divergence and interruption."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bnlab.data import MNIST, Split
from bnlab.errors import CheckpointError, TrainingDiverged, UsageError
from bnlab.fileio import write_json
from bnlab.training import TrainConfig, evaluate, load_model, load_run, loss_fn, one_at_a_time_accuracy, store, train

SHORT = dict(batches=30, eval_every=10, log_every=5, one_at_a_time=20, precise_samples=256)


def test_log_lines_follow_the_notebook(small_mnist, tmp_path):
    lines: list[str] = []
    train(TrainConfig(bn="manual", **SHORT), small_mnist, device="cpu", log=lines.append, progress=False)
    assert lines[0].startswith("Batch:  0: Validation loss: ") and ", Validation accuracy: " in lines[0]
    assert lines[1].startswith("Batch:  5: Training loss: ")
    assert [line.split(":")[1].strip() for line in lines[:6]] == ["0", "5", "10", "15", "20", "25"]
    assert lines[-3].startswith("Final validation accuracy: ")
    assert lines[-2].startswith("Final test accuracy: ")
    assert lines[-1].startswith("Accuracy on 20 samples: ")


def test_run_directory_holds_config_metrics_summary_and_checkpoint(small_mnist, tmp_path):
    result = train(
        TrainConfig(bn="torch", **SHORT),
        small_mnist,
        run_dir=tmp_path,
        device="cpu",
        log=lambda _: None,
        progress=False,
    )
    config = json.loads((tmp_path / store.CONFIG).read_text())
    assert config["config"]["bn"] == "torch" and config["config"]["depth"] == 19
    records = list(store.read_metrics(tmp_path / store.METRICS))
    steps = [r for r in records if r["event"] == "step"]
    assert [r["batch"] for r in steps] == list(range(30))
    evals = [r for r in records if r["event"] == "eval"]
    assert [(r["batch"], r["split"]) for r in evals][:3] == [(0, "validation"), (5, "train_batch"), (10, "validation")]
    summary = json.loads((tmp_path / store.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["test_accuracy"] == result.test_accuracy
    reloaded = load_run(tmp_path, TrainConfig(bn="torch", **SHORT))
    assert reloaded is not None and reloaded.test_accuracy == result.test_accuracy
    assert load_run(tmp_path, TrainConfig(bn="torch", **(SHORT | {"seed": 1}))) is None  # other config


def test_checkpoint_reloads_to_the_same_scores(small_mnist, tmp_path):
    result = train(
        TrainConfig(bn="manual", **SHORT),
        small_mnist,
        run_dir=tmp_path,
        device="cpu",
        log=lambda _: None,
        progress=False,
    )
    checkpoint = load_model(tmp_path)
    model = checkpoint.model
    assert checkpoint.config.bn == "manual"
    assert not model.training
    assert evaluate(model, small_mnist.test)[1] == result.test_accuracy
    assert one_at_a_time_accuracy(model, small_mnist.test, 20) == result.one_at_a_time_accuracy
    trained = result.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_same_seed_same_run(small_mnist):
    def losses(seed):
        result = train(
            TrainConfig(bn="manual", seed=seed, **SHORT), small_mnist, device="cpu", log=lambda _: None, progress=False
        )
        return [h["loss"] for h in result.history], result.model.state_dict()

    (a, state_a), (b, state_b), (c, _) = losses(0), losses(0), losses(1)
    assert a == b and a != c
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_nan_loss_stops_the_run_and_keeps_valid_files(small_mnist, tmp_path):
    images = small_mnist.train.images.clone()
    images[:, :, 5, 5] = float("nan")
    poisoned = MNIST(Split(images, small_mnist.train.labels), small_mnist.validation, small_mnist.test)
    with pytest.raises(TrainingDiverged, match="loss became nan at batch 0"):
        train(
            TrainConfig(bn="none", **SHORT),
            poisoned,
            run_dir=tmp_path,
            device="cpu",
            log=lambda _: None,
            progress=False,
        )
    summary = json.loads((tmp_path / store.SUMMARY).read_text())
    assert summary["status"] == "diverged" and "batch 0" in summary["message"]
    assert list(store.read_metrics(tmp_path / store.METRICS)) == []
    assert not (tmp_path / store.CHECKPOINT).exists()


def test_interrupted_run_keeps_what_it_wrote(small_mnist, tmp_path):
    def interrupt_at_batch_10(line: str) -> None:
        if line.startswith("Batch: 10"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            TrainConfig(bn="none", **SHORT),
            small_mnist,
            run_dir=tmp_path,
            device="cpu",
            log=interrupt_at_batch_10,
            progress=False,
        )
    summary = json.loads((tmp_path / store.SUMMARY).read_text())
    assert summary["status"] == "interrupted" and summary["batches_done"] == 11
    steps = [r for r in store.read_metrics(tmp_path / store.METRICS) if r["event"] == "step"]
    assert len(steps) == 11
    assert load_run(tmp_path) is None  # not reusable: it did not finish


def test_torn_last_metrics_line_is_skipped(tmp_path):
    path = tmp_path / store.METRICS
    path.write_text('{"event": "step", "batch": 0, "loss": 0.5}\n{"event": "st')
    assert list(store.read_metrics(path)) == [{"event": "step", "batch": 0, "loss": 0.5}]


def test_loss_functions():
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    labels = torch.tensor([0])
    expected_sigmoid = -(torch.log(torch.sigmoid(logits[0, 0])) + torch.log(1 - torch.sigmoid(logits[0, 1:])).sum()) / 3
    torch.testing.assert_close(loss_fn("sigmoid", logits, labels), expected_sigmoid)
    torch.testing.assert_close(loss_fn("softmax", logits, labels), -torch.log_softmax(logits, 1)[0, 0])


@pytest.mark.parametrize(
    "bad",
    [
        dict(bn="batch"),
        dict(batches=0),
        dict(lr=-1.0),
        dict(lr=float("nan")),
        dict(loss="mse"),
        dict(bn="manual", batch_size=1),
    ],
)
def test_bad_config_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        TrainConfig(**bad)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a bnlab checkpoint"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a bnlab checkpoint"):
        load_model(tmp_path / "other.pt")


def test_files_are_written_with_the_usual_permissions(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
