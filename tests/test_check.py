"""bnlab check: every finding on a model built to have it, nothing on healthy ones, and the command."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab import recalibrate
from bnlab.check import RULES, check_model, load_model_spec
from bnlab.cli import main
from bnlab.data import Batches, Split
from bnlab.errors import BnlabError, UsageError
from bnlab.training import TrainConfig, load_model, train

ROOT = Path(__file__).resolve().parents[1]


def small_net(momentum: float = 0.1, bias: bool = False, track_first: bool = True) -> nn.Sequential:
    """conv-BN-ReLU, strided conv-BN-ReLU, pool, linear-BN-ReLU, linear: BN layers "1", "4" and "9"."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=bias),
        nn.BatchNorm2d(8, momentum=momentum, track_running_stats=track_first),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=bias),
        nn.BatchNorm2d(16, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32, bias=bias),
        nn.BatchNorm1d(32, momentum=momentum),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def fit(model: nn.Module, data: Split, batches: int = 150, one_at_a_time: bool = False) -> nn.Module:
    """Adam with a learning rate decaying to 0, so the statistics keep up with the weights; returns it in eval mode.

    ``one_at_a_time``: batches of one sample, fed as two copies: PyTorch refuses a literal batch of one
    at the (N, C) layer, and two copies give that layer the statistics of the sample alone (variance 0),
    exactly what a framework that accepts batches of one (TensorFlow) computes.
    """
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / batches)
    stream = Batches(data, 1 if one_at_a_time else 32, seed=0)
    model.train()
    for _ in range(batches):
        images, labels = next(stream)
        if one_at_a_time:
            images, labels = images[[0, 0]], labels[[0, 0]]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def found(report) -> set[tuple[str, str | None]]:
    return {(f.code, f.layer) for f in report.findings}


def evidence(report, code: str) -> str:
    (finding,) = [f for f in report.findings if f.code == code]
    return finding.evidence


def snapshot(model: nn.Module) -> tuple[dict, list[bool], list]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()], [getattr(m, "momentum", None) for m in model.modules()]


def assert_unchanged(model: nn.Module, before: tuple[dict, list[bool], list]) -> None:
    state, modes, momenta = snapshot(model)
    assert modes == before[1] and momenta == before[2]
    assert all(torch.equal(value, before[0][key]) for key, value in state.items())


@pytest.fixture(scope="module")
def healthy(small_mnist) -> nn.Module:
    torch.manual_seed(0)
    return fit(small_net(), small_mnist.train)


@pytest.fixture
def model(healthy) -> nn.Module:
    return copy.deepcopy(healthy)


@pytest.fixture(scope="module")
def seed_run(small_mnist, tmp_path_factory) -> Path:
    """The notebook's ConvNet with bnlab's BN after 100 batches: decay 0.99 has not forgotten the initial values."""
    run_dir = tmp_path_factory.mktemp("seed")
    config = TrainConfig(bn="manual", batches=100, eval_every=1000, log_every=1000, one_at_a_time=0, precise_samples=0)
    train(config, small_mnist, run_dir=run_dir, device="cpu", log=lambda _: None, progress=False)
    return run_dir


def test_healthy_model_passes_and_is_left_unchanged(model, mnist):
    before = snapshot(model)
    report = check_model(model, mnist.test)
    assert report.findings == [] and report.passed
    assert report.layers == ["1", "4", "9"] and (report.samples, report.stats_samples) == (100, 1024)
    assert "PASS: batch norm is used correctly" in report.format()
    assert_unchanged(model, before)


def test_seed_convnet_passes_with_tracked_statistics_and_fails_one_at_a_time_with_batch_statistics(
    seed_run, small_mnist, mnist
):
    model = load_model(seed_run).model
    assert {f.code for f in check_model(model, mnist.test).findings} == {"momentum-too-small", "stale-stats"}

    batches = (images for images, _ in itertools.islice(Batches(small_mnist.train, 64, seed=1), 30))
    recalibrate(model, batches, samples=30 * 64)
    report = check_model(model, mnist.test)
    assert report.findings == [], report.format()

    model.train()  # the notebook's lesson: scored one at a time with batch statistics
    report = check_model(model, mnist.test)
    layers = [f"blocks.{i}.norm" for i in range(19)] + ["hidden.norm"]
    assert found(report) == {("training-mode", name) for name in layers} | {("identical-when-alone", None)}
    lesson = evidence(report, "identical-when-alone")
    assert lesson.startswith("all 100 samples scored alone get the same output (class ")
    assert not report.passed and "FAIL: errors: training-mode, identical-when-alone" in report.format()


def test_training_mode(model, mnist):
    model.train()
    before = snapshot(model)
    report = check_model(model, mnist.test)
    assert found(report) == {("training-mode", "1"), ("training-mode", "4"), ("training-mode", "9")} | {
        ("identical-when-alone", None)
    }
    assert_unchanged(model, before)  # its training-mode passes changed no statistic, counter or mode


def test_no_running_stats_makes_predictions_batch_dependent(small_mnist, mnist):
    report = check_model(fit(small_net(track_first=False), small_mnist.train), mnist.test)
    assert found(report) == {("no-running-stats", "1"), ("batch-dependent", None)}
    moved = evidence(report, "batch-dependent")
    assert moved.startswith("outputs move by up to") and "predictions change; accuracy" in moved


def test_statistics_never_updated(mnist):
    report = check_model(small_net().eval(), mnist.test)
    assert found(report) == {("stats-at-init", name) for name in ("1", "4", "9")}
    assert report.findings[0].evidence == "num_batches_tracked = 0"


def test_nonfinite_statistics(model, mnist):
    model[1].running_var[0] = float("nan")
    assert found(check_model(model, mnist.test)) == {("nonfinite-stats", "1")}


def test_momentum_too_small_for_the_batches_trained(small_mnist, mnist):
    report = check_model(fit(small_net(momentum=0.01), small_mnist.train, batches=60), mnist.test)
    assert {f.code for f in report.findings} == {"momentum-too-small"} and not report.passed
    first = next(f for f in report.findings if f.layer == "1")  # its inputs' variance is far below the initial 1
    assert first.evidence.startswith("momentum 0.01 after 60 batches: 55% is still the initial value")


def test_momentum_too_large_is_a_warning(small_mnist, mnist):
    report = check_model(fit(small_net(momentum=0.9), small_mnist.train), mnist.test)
    assert found(report) == {("momentum-too-large", name) for name in ("1", "4", "9")}
    assert report.passed and report.findings[0].evidence == "momentum 0.9 (decay 0.1)"


def test_stale_statistics_from_data_preprocessed_differently(model, mnist):
    standardized = Split((mnist.test.images - 0.1307) / 0.3081, mnist.test.labels)  # trained on [0, 1] pixels
    report = check_model(model, standardized)
    assert found(report) == {("stale-stats", "1")}  # later layers normalize in training mode: they see no change


def test_batch_of_one_training(small_mnist, mnist):
    report = check_model(fit(small_net(), small_mnist.train, batches=200, one_at_a_time=True), mnist.test)
    # Layer "9" has one value per sample and feature: its variance collapsed. In the conv layers a
    # digit's own pixels vary about as much as MNIST does, so batches of one left them sound.
    assert found(report) == {("batch-of-one", "9")}


def test_redundant_bias(small_mnist, mnist):
    report = check_model(fit(small_net(bias=True), small_mnist.train), mnist.test)
    assert found(report) == {("redundant-bias", name) for name in ("1", "4", "9")}
    assert [f.evidence for f in report.findings] == [
        "fed by 0 (Conv2d, bias=True)",
        "fed by 3 (Conv2d, bias=True)",
        "fed by 8 (Linear, bias=True)",
    ]


def test_a_bias_with_an_activation_between_it_and_batch_norm_is_not_redundant(mnist):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(2704, 10)
    )
    assert found(check_model(model.eval(), mnist.test)) == {("stats-at-init", "2")}


def test_batch_norm_on_the_logits(mnist):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10, bias=False), nn.BatchNorm1d(10), nn.Softmax(1))
    assert found(check_model(model.eval(), mnist.test)) == {("stats-at-init", "2"), ("bn-on-logits", "2")}


def test_docs_explain_every_finding():
    docs = (ROOT / "docs" / "check.md").read_text()
    assert all(f"`{code}`" in docs for code in RULES)


def test_bad_arguments():
    with pytest.raises(UsageError, match="samples must be at least 2"):
        check_model(nn.Identity(), torch.zeros(10, 3), samples=1)
    with pytest.raises(UsageError, match=r"cannot score inputs of shape \(100, 1, 28, 28\)"):
        check_model(nn.Linear(10, 2), torch.zeros(200, 1, 28, 28))


FACTORIES = """
from pathlib import Path

import torch
from torch import nn

from bnlab.training import load_model

HERE = Path(__file__).parent
NOT_CALLABLE = 3


def healthy():
    return torch.load(HERE / "healthy.pt", weights_only=False)


def fast_momentum():
    model = healthy()
    for layer in (model[1], model[4], model[9]):
        layer.momentum = 0.9
    return model


def seed_in_training_mode():
    return load_model({seed_run!r}).model.train()


def returns_number():
    return 3


def raises():
    raise RuntimeError("no weights here")
"""


@pytest.fixture
def factories(tmp_path, monkeypatch, healthy, seed_run) -> Path:
    """Modules in a folder of their own, which is the current folder (the command imports from there)."""
    torch.save(healthy, tmp_path / "healthy.pt")
    (tmp_path / "bnlab_test_factories.py").write_text(FACTORIES.format(seed_run=str(seed_run)))
    (tmp_path / "bnlab_test_broken.py").write_text("import bnlab_test_not_installed\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command adds the current folder: undone afterwards
    for name in ("bnlab_test_factories", "bnlab_test_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def test_command_passes_a_healthy_model_with_exit_0(factories, capsys):
    assert main(["check", "bnlab_test_factories:healthy", "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) | {"layers": None} == {
        "passed": True,
        "errors": 0,
        "warnings": 0,
        "layers": None,
        "samples": 100,
        "stats_samples": 1024,
        "findings": [],
    }
    assert "PASS: batch norm is used correctly" in captured.err  # human lines on stderr under --json


def test_command_fails_the_notebook_mistake_with_exit_1(factories, capsys):
    assert main(["check", "bnlab_test_factories:seed_in_training_mode", "--json", "--samples", "20"]) == 1
    report = json.loads(capsys.readouterr().out)
    codes = {f["code"] for f in report["findings"]}
    # 100 batches at decay 0.99 also left its statistics unconverged (see the test above)
    assert codes == {"training-mode", "identical-when-alone", "momentum-too-small", "stale-stats"}
    assert not report["passed"] and report["errors"] == len(report["findings"]) and report["samples"] == 20
    (lesson,) = [f for f in report["findings"] if f["code"] == "identical-when-alone"]
    assert lesson["layer"] is None and lesson["evidence"].startswith("all 20 samples scored alone get the same")
    assert lesson["fix"].startswith("Call model.eval()") and lesson["severity"] == "error"


def test_command_reads_bnlab_checkpoints(seed_run, capsys):
    assert main(["check", str(seed_run), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"bnlab check {seed_run} (SeedConvNet)\n20 batch-norm layers")
    assert "ERROR momentum-too-small" in out and "Fix: Train for more batches" in out


def test_warnings_fail_only_with_strict(factories, capsys):
    assert main(["check", "bnlab_test_factories:fast_momentum"]) == 0
    assert "PASS: warnings: momentum-too-large" in capsys.readouterr().out
    assert main(["check", "bnlab_test_factories:fast_momentum", "--strict"]) == 1


@pytest.mark.parametrize(
    "model, status, fragment",
    [
        ("nowhere", 2, "'nowhere' is neither a checkpoint nor a run directory that exists, nor module:factory"),
        ("no such:thing", 2, "'no such:thing' is not module:factory; write it like mypackage.models:build_model"),
        ("bnlab_test_missing:build", 2, "cannot import bnlab_test_missing (no module named 'bnlab_test_missing')"),
        ("bnlab_test_factories:nothing", 2, "bnlab_test_factories has no 'nothing'"),
        ("bnlab_test_factories:NOT_CALLABLE", 2, "not a function that returns a model but a value of type int"),
        ("bnlab_test_factories:returns_number", 2, "returned a value of type int, not a torch.nn.Module"),
        ("bnlab_test_factories:raises", 1, "bnlab_test_factories:raises() failed: RuntimeError: no weights here"),
        ("bnlab_test_broken:build", 1, "importing bnlab_test_broken failed: ModuleNotFoundError"),
    ],
)
def test_bad_models_are_one_line_errors(factories, capsys, model, status, fragment):
    assert main(["check", model]) == status
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_bad_samples_is_a_usage_error(factories, capsys):
    assert main(["check", "bnlab_test_factories:healthy", "--samples", "1"]) == 2
    assert "samples must be at least 2" in capsys.readouterr().err


def test_load_model_spec_finds_factories_on_the_path(factories, monkeypatch):
    monkeypatch.syspath_prepend(str(factories))
    assert isinstance(load_model_spec("bnlab_test_factories:healthy"), nn.Sequential)
    with pytest.raises(BnlabError, match="raises\\(\\) failed"):
        load_model_spec("bnlab_test_factories:raises")


def test_installed_command_imports_from_the_current_folder(factories):
    """The console script's sys.path starts at its own folder, not the current one: check that it adds it."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("bnlab")), "check", "bnlab_test_factories:healthy", "--samples", "5"],
        cwd=factories,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("PASS: batch norm is used correctly")
