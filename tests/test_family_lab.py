"""``bnlab family``, the measured guide, and what it stands on: the family's norms in ``TrainConfig`` and the
networks, class batches, data-parallel runs in the run store, and the guide's rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import bnlab
from bnlab import kernels
from bnlab.config import NORMS, TrainConfig
from bnlab.data import ClassBatches, Split
from bnlab.errors import UsageError
from bnlab.lab import family
from bnlab.models import build_network
from bnlab.training import RunResult
from bnlab.training.runs import QUIET, load_run, obtain, run_dir

SEED_KEY = "528e6476c366"  # TrainConfig()'s key before the family's fields existed: stored runs keep their names


def test_later_fields_leave_stored_configs_and_keys_unchanged():
    config = TrainConfig()
    assert config.key() == SEED_KEY
    stored = config.to_dict()
    assert not set(stored) & {"width", "virtual_batch", "renorm_warmup", "group_channels", "classes_per_batch"}
    assert TrainConfig.from_dict(stored) == config  # a config.json written before them still loads
    ghost = TrainConfig(bn="ghost", virtual_batch=16)
    assert ghost.to_dict()["virtual_batch"] == 16 and TrainConfig.from_dict(ghost.to_dict()) == ghost
    assert ghost.key() != TrainConfig(bn="manual").key()


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"bn": "ghost"}, "virtual_batch goes with bn='ghost'"),
        ({"bn": "manual", "virtual_batch": 16}, "virtual_batch goes with bn='ghost'"),
        ({"bn": "ghost", "virtual_batch": 128}, "virtual_batch must be"),
        ({"bn": "manual", "renorm_warmup": 10}, "renorm_warmup goes with bn='renorm'"),
        ({"bn": "manual", "group_channels": 8}, "group_channels goes with bn='group'"),
        ({"classes_per_batch": 11}, "classes_per_batch must be an integer in \\[1, 10\\]"),
        ({"batch_size": 4, "classes_per_batch": 5}, "classes_per_batch must be an integer in \\[1, 4\\]"),
        ({"model": "mlp", "init": "he_normal", "width": 8}, "width is the convnet's"),
        ({"model": "lstm", "bn": "group"}, "the lstm model takes bn none, torch or manual"),
    ],
)
def test_family_options_are_refused_without_their_norm(settings, words):
    with pytest.raises(UsageError, match=words):
        TrainConfig(**settings)


def test_group_norm_trains_on_batches_of_one_and_batch_norms_refuse_them(small_mnist):
    config = TrainConfig(bn="group", depth=3, batch_size=1, batches=3, cadence="interval", eval_every=3, eval_size=32,
                         one_at_a_time=0, precise_samples=0)  # fmt: skip
    assert bnlab.train(config, small_mnist, device="cpu", log=lambda _: None, progress=False).status == "completed"
    for bn in ("torch", "manual", "renorm", "ghost"):
        extra = {"virtual_batch": 2} if bn == "ghost" else {}
        with pytest.raises(UsageError, match="at least 2 with batch norm"):
            TrainConfig(bn=bn, batch_size=1, **extra)


@pytest.mark.parametrize("model", ["convnet", "mlp"])
def test_every_norm_builds_in_the_same_places_with_the_same_weights(model):
    """Paired runs: a seed gives every norm the same kernels, and the norm layers sit where BN's do."""
    kinds = {  # the conv layers' norm and the dense layers'
        "torch": (nn.BatchNorm2d, nn.BatchNorm1d),
        "manual": (bnlab.BatchNorm2d, bnlab.BatchNorm1d),
        "renorm": (bnlab.BatchRenorm2d, bnlab.BatchRenorm1d),
        "ghost": (bnlab.GhostBatchNorm2d, bnlab.GhostBatchNorm1d),
        "group": (nn.GroupNorm,),
    }
    shape = {"depth": 6, "init": "glorot_uniform"} if model == "convnet" else {"hidden": (32, 32), "init": "he_normal"}
    nets = {}
    for bn in NORMS:
        extra = {"virtual_batch": 4} if bn == "ghost" else {}
        nets[bn] = build_network(TrainConfig(model=model, bn=bn, seed=3, batch_size=8, **shape, **extra))
    kernels = {bn: [p for p in net.parameters() if p.dim() > 1] for bn, net in nets.items()}
    for bn in NORMS:
        assert all(torch.equal(a, b) for a, b in zip(kernels[bn], kernels["none"], strict=True))
        if bn != "none":
            norms = [m for m in nets[bn].modules() if isinstance(m, kinds[bn])]
            assert len(norms) == (7 if model == "convnet" else 2)
    for bn, net in nets.items():  # the norm right after each linear map, then the activation (or fused in it)
        for block in [*net.blocks, *([net.hidden] if model == "convnet" else [])]:
            names = [name for name, _ in block.named_children()]
            fused = getattr(getattr(block, "norm", None), "fused_relu", False)
            assert names[1:] == [*(["norm"] if bn != "none" else []), *([] if fused else ["act"])], (bn, names)
            assert names[0] in ("conv", "linear")
            if bn != "none":
                assert block.norm.eps == 1e-3 and getattr(block.norm, "momentum", 0.01) == 0.01
    group = [m for m in nets["group"].modules() if isinstance(m, nn.GroupNorm)]
    convs = group[:-1] if model == "convnet" else []
    assert all(m.num_channels // m.num_groups == 4 for m in convs)  # 4 channels a group on convolutions
    assert all(m.num_groups == 1 for m in group[len(convs) :])  # one group (layer norm) on dense layers
    x = torch.randn(8, 1, 28, 28)
    for net in nets.values():
        assert net(x).shape == (8, 10)


def test_class_batches_pass_over_each_label_before_repeating_it_and_resume_across_the_boundary(small_mnist):
    """A tiny split (6 samples of each of 3 labels): batches of 4 from 2 labels cross every label's pass."""
    keep = torch.cat([torch.nonzero(small_mnist.train.labels == c).flatten()[:6] for c in (1, 4, 7)])
    split = Split(small_mnist.train.images[keep], small_mnist.train.labels[keep])
    batches = ClassBatches(split, 4, seed=2, classes=2)
    drawn = {c: [] for c in (1, 4, 7)}
    states, ahead = [], []
    for _ in range(30):
        states.append(batches.state_dict())
        indices = batches.next_indices()
        ahead.append(indices)
        labels = split.labels[indices]
        assert sorted(torch.bincount(labels, minlength=10)[[1, 4, 7]].tolist()) == [0, 2, 2]
        for c in (1, 4, 7):
            drawn[c] += indices[labels == c].tolist()
    for c, seen in drawn.items():  # each run of 6 consecutive draws of a label is one pass: all 6 samples
        passes = [seen[i : i + 6] for i in range(0, len(seen) - 5, 6)]
        assert passes and all(sorted(p) == sorted(torch.nonzero(split.labels == c).flatten().tolist()) for p in passes)
    again = ClassBatches(split, 4, seed=99, classes=2)
    again.load_state_dict(states[17])  # mid-way, after several labels' passes ended
    assert all(torch.equal(again.next_indices(), ahead[i]) for i in range(17, 30))


def test_class_batches_draw_each_batch_from_few_classes_evenly_and_resume(small_mnist):
    split = small_mnist.train
    batches = ClassBatches(split, 32, seed=5, classes=3)
    seen: list[torch.Tensor] = []
    for _ in range(20):
        indices = batches.next_indices()
        counts = torch.bincount(split.labels[indices], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [10, 11, 11]
        seen.append(indices)
    assert torch.equal(ClassBatches(split, 32, seed=5, classes=3).next_indices(), seen[0])
    state = batches.state_dict()
    ahead = [batches.next_indices() for _ in range(5)]
    batches.load_state_dict(state)
    assert all(torch.equal(a, batches.next_indices()) for a in ahead)
    # one pass over a label before any sample of it repeats
    label = int(split.labels[seen[0][0]])
    drawn = torch.cat([i[split.labels[i] == label] for i in seen])
    members = int((split.labels == label).sum())
    assert len(set(drawn[:members].tolist())) == min(members, len(drawn))


@pytest.mark.parametrize("bn", ["renorm", "ghost", "group"])
def test_family_runs_on_class_batches_train_through_the_run_store(small_mnist, tmp_path, bn):
    extra = {"renorm": {"renorm_warmup": 2}, "ghost": {"virtual_batch": 8}}.get(bn, {})
    config = TrainConfig(
        bn=bn, depth=3, batch_size=16, batches=6, classes_per_batch=2, cadence="interval", eval_every=3,
        eval_size=64, one_at_a_time=5, precise_samples=64, **extra,
    )  # fmt: skip
    result, how = obtain(config, tmp_path, data=small_mnist, **QUIET)
    assert how == "trained" and result.status == "completed" and [h["batch"] for h in result.history] == [0, 3, 6]
    assert (result.precise is None) == (bn == "group")  # GroupNorm keeps no statistics to recompute
    assert obtain(config, tmp_path, data=small_mnist, **QUIET)[1] == "reused"


def test_a_data_parallel_run_is_the_one_process_run_of_the_global_batch(small_mnist, tmp_path, mnist):
    """obtain(nproc=2): synchronized BN over 2 gloo processes, kept as its own run, equal to one process
    training the global batch (float rounding apart), and reused the second time."""
    config = TrainConfig(
        bn="manual", depth=3, batch_size=8, batches=4, optimizer="sgd", lr=0.05, momentum=0.9, loss="softmax",
        cadence="interval", eval_every=2, eval_size=500, one_at_a_time=10, precise_samples=64,
    )  # fmt: skip
    one, _ = obtain(config, tmp_path, data=mnist, **QUIET)
    two, how = obtain(config, tmp_path, nproc=2, **QUIET)
    assert how == "trained" and two.run_dir == run_dir(tmp_path, config, "cpu", nproc=2) != one.run_dir
    assert two.run_dir.name.endswith("-cpu-2proc")
    assert json.loads((two.run_dir / "config.json").read_text())["world_size"] == 2
    for a, b in zip(one.history, two.history, strict=True):
        assert a["batch"] == b["batch"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert two.validation_accuracy == pytest.approx(one.validation_accuracy, abs=2e-4)
    again, how = obtain(config, tmp_path, nproc=2, **QUIET)
    assert how == "reused" and again.history == load_run(two.run_dir, config).history


def _result(values: dict[tuple[str, str, int], list[float | None]]) -> family.FamilyResult:
    """A FamilyResult whose runs score ``values`` (arm, setting, batch) -> one test accuracy per seed."""
    budget = family.Budget("t", "", 2, (2, 32), 64, (2,), (32, 2), 1, 10, 0, 0)
    runs = {}
    for (arm, setting, batch), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            status = "completed" if value is not None else "diverged"
            runs[family.Cell(arm, setting, batch, seed)] = RunResult(TrainConfig(), status, test_accuracy=value)
    return family.FamilyResult(budget, (0, 1), runs, None, "cpu", 0, 0.0)


def test_the_rule_beats_only_in_every_seed_by_the_margin_and_diverged_runs_lose():
    iid = "i.i.d."
    result = _result({
        ("bn", iid, 2): [0.90, 0.91],
        ("group", iid, 2): [0.95, 0.96],  # beats BN in both seeds
        ("renorm", iid, 2): [0.951, 0.90],  # above BN in one seed only: not beaten by it, and beats no one
        ("none", iid, 2): [None, 0.99],  # diverged in seed 0, so it beats no one; best in seed 1, so none beats it
    })  # fmt: skip
    assert family.beats([0.95, 0.96], [0.90, 0.91])
    assert not family.beats([0.9015, 0.96], [0.90, 0.91])  # 0.15 points is within the margin
    assert family.beats([0.5, 0.5], [None, None]) and not family.beats([None, 0.99], [0.1, 0.1])
    winners = result.winners(iid, 2)
    assert "bn" not in winners and "group" in winners and "renorm" in winners
    assert "none" in winners
    nothing = _result({("bn", iid, 2): [None, None], ("group", iid, 2): [None, None]})
    assert nothing.winners(iid, 2) == []  # no arm completed a seed: no winner


def test_findings_state_the_shape_by_the_rule():
    iid = "i.i.d."
    result = _result({
        ("bn", iid, 2): [0.90, 0.91], ("bn", iid, 32): [0.97, 0.975],
        ("group", iid, 2): [0.96, 0.961], ("group", iid, 32): [0.962, 0.965],
        ("bn", "2 classes a batch", 32): [0.5, 0.6], ("group", "2 classes a batch", 32): [0.95, 0.96],
    })  # fmt: skip
    text = "\n".join(result.findings())
    assert "BN degrades as the batch shrinks: 0.9050 at 2 images against 0.9725 at 32" in text
    assert "GroupNorm stays flat: its median moves by 0.30 points" in text
    assert "the winners are GroupNorm" in text


def test_the_plan_pairs_every_arm_and_scales_the_learning_rate():
    budget = family.BUDGETS["full"]
    cells = family.plan(budget, (0, 1, 2))
    configs = {(c.arm, c.setting, c.batch, c.seed): cfg for c, cfg in cells.items()}
    bn2, sync2 = configs[("bn", "i.i.d.", 2, 0)], configs[("sync", "i.i.d.", 2, 0)]
    assert bn2.lr == pytest.approx(family.BASE_LR * 2 / 32) and bn2.batches == budget.samples // 2
    assert sync2.batch_size == 4 and sync2.lr == pytest.approx(family.BASE_LR * 4 / 32)
    assert sync2 == configs[("bn", "i.i.d.", 4, 0)]  # the same run, in 2 processes: its own directory
    assert not any(c.arm == "ghost" and c.batch <= family.VIRTUAL_BATCH for c in cells)
    assert {c.seed for c in cells} == {0, 1, 2}
    non_iid = configs[("renorm", "2 classes a batch", 32, 1)]
    assert non_iid.classes_per_batch == 2 and non_iid.renorm_warmup == non_iid.batches // 5
    assert len({cfg.init for cfg in cells.values()}) == 1  # every arm's kernels from one scheme: paired


@pytest.mark.parametrize("on", [True, False], ids=["kernels", "BNLAB_KERNELS=0"])
def test_smoke_guide_end_to_end_writes_its_report(small_mnist, tmp_path, monkeypatch, on):
    """The whole guide at the smoke budget, every arm on the same small data (the synchronized one too, in 2
    processes, which read BNLAB_KERNELS; this process's runs follow use_kernels)."""
    monkeypatch.setenv("BNLAB_KERNELS", "1" if on else "0")
    with kernels.use_kernels(on):
        outcome = family.run_family(
            "smoke", out_dir=tmp_path, data=small_mnist, device="cpu", log=lambda _: None, workers=1
        )
    assert len(outcome.runs) == len(family.plan(family.BUDGETS["smoke"], (0,))) and outcome.notes == []
    assert all(r.status in ("completed", "diverged") for r in outcome.runs.values())
    assert sum(r.status == "completed" for r in outcome.runs.values()) >= len(outcome.runs) - 2
    for run in outcome.runs.values():
        used = json.loads((run.run_dir / "config.json").read_text())["batch_norm"]
        assert used.startswith("compiled kernels" if on and kernels.available() else "tensor ops"), used
        if run.status == "completed":  # scored on the data it was given: 256 test images, not MNIST's 10,000
            assert run.test_accuracy * 256 == pytest.approx(round(run.test_accuracy * 256), abs=1e-6)
    synced = [r for c, r in outcome.runs.items() if c.arm == "sync"]
    assert synced and all(r.run_dir.name.endswith("-2proc") for r in synced)
    for name in ("report.md", "results.json", "results.csv", "family.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["setting"] for row in saved["table"]] == ["i.i.d.", "i.i.d.", "2 classes a batch"]
    assert saved["findings"] == outcome.findings() and saved["runs_trained"] == len(outcome.runs)
    again = family.run_family("smoke", out_dir=tmp_path, data=small_mnist, device="cpu", log=lambda _: None)
    assert again.trained == 0 and again.findings() == outcome.findings()


def test_cli_family_help_and_bad_usage():
    wide = os.environ | {"COLUMNS": "200"}  # argparse wraps the help text at the terminal's width
    run = subprocess.run(
        [sys.executable, "-m", "bnlab.cli", "family", "--help"], capture_output=True, text=True, env=wide
    )
    assert run.returncode == 0 and "--budget" in run.stdout and "Wu & He" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "bnlab.cli", "family", "--budget", "huge"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
