"""The benefits lab: paired runs, the verdict rule, resuming, the report and the command."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnlab import reports
from bnlab.cli import main
from bnlab.config import TrainConfig
from bnlab.data import Batches
from bnlab.errors import UsageError
from bnlab.lab.benefits import (
    BUDGETS,
    CLAIMS,
    VERDICTS,
    Comparison,
    claim1_speed,
    claim7_results,
    compare,
    parse_claims,
    run_benefits,
    runs,
    verdict,
)
from bnlab.lab.benefits.arms import Lab
from bnlab.lab.benefits.networks import LAB, PAPER_MLP
from bnlab.lab.curves import final, points
from bnlab.lab.step_cost import StepCost
from bnlab.models import ACTIVATIONS, FCNet, build_network
from bnlab.training import RunResult, obtain, run_dir, store, train
from bnlab.training import runner as train_module
from bnlab.training import runs as keeper
from bnlab.training.evaluate import UnitPeaks
from bnlab.training.runner import train_stack

FC_INITS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal")


def build_pair(config: TrainConfig, bn: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The two arms' networks: the same config without and with BN."""
    return build_network(config.replace(bn="none")), build_network(config.replace(bn=bn))


def lab_train(config: TrainConfig, bn: str, seed: int, data) -> RunResult:
    return train(config.replace(bn=bn, seed=seed), data, device="cpu", **runs.QUIET)


# --- Models -----------------------------------------------------------------------------------------


def shared_weights(plain: nn.Module, with_bn: nn.Module) -> list[str]:
    """Names of the parameters both networks have (every conv and Linear weight; biases where both have one)."""
    return sorted(set(dict(plain.named_parameters())) & set(dict(with_bn.named_parameters())))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    hidden=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    init=st.one_of(st.sampled_from(FC_INITS), st.floats(1e-3, 10.0)),
    bn=st.sampled_from(["torch", "manual"]),
)
def test_mlp_pair_starts_from_identical_shared_weights(seed, hidden, activation, init, bn):
    config = PAPER_MLP.replace(seed=seed, hidden=tuple(hidden), activation=activation, init=init)
    plain, with_bn = build_pair(config, bn)
    names = shared_weights(plain, with_bn)
    assert len([n for n in names if n.endswith("linear.weight")]) == len(hidden)
    params_plain, params_bn = dict(plain.named_parameters()), dict(with_bn.named_parameters())
    assert all(torch.equal(params_plain[n], params_bn[n]) for n in names)


@pytest.mark.parametrize("bn", ["torch", "manual"])
def test_convnet_pair_shares_every_kernel(bn):
    config = TrainConfig(model="convnet", seed=5, depth=4, init="glorot_uniform")
    plain, with_bn = build_pair(config, bn)
    names = shared_weights(plain, with_bn)
    assert sum(n.endswith("conv.weight") for n in names) == 4 and "hidden.linear.weight" in names
    params_plain, params_bn = dict(plain.named_parameters()), dict(with_bn.named_parameters())
    assert all(torch.equal(params_plain[n], params_bn[n]) for n in names)
    other = build_pair(config.replace(seed=6), bn)[0]
    assert not torch.equal(other.blocks[0].conv.weight, plain.blocks[0].conv.weight)


def test_fcnet_structure_bn_before_activation_never_on_logits():
    model = FCNet("torch", hidden=(8, 6), activation="tanh", dropout=0.25)
    assert [name for name, _ in model.blocks[0].named_children()] == ["linear", "norm", "act", "dropout"]
    assert model.blocks[0].linear.bias is None and model.logits.bias is not None
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.logits.modules())
    plain = FCNet("none", hidden=(8, 6))
    assert [name for name, _ in plain.blocks[1].named_children()] == ["linear", "act"]
    assert torch.all(plain.blocks[0].linear.bias == 0)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_fcnet_init_by_standard_deviation_and_bad_options():
    model = FCNet("none", hidden=(400,), init=0.5, generator=torch.Generator().manual_seed(0))
    assert model.blocks[0].linear.weight.std().item() == pytest.approx(0.5, rel=0.01)
    assert model.logits.weight.std().item() == pytest.approx(0.5, rel=0.1)
    with pytest.raises(UsageError, match="init must be one of"):
        FCNet(init="orthogonal")
    with pytest.raises(UsageError, match="standard deviation"):
        FCNet(init=-1.0)
    with pytest.raises(UsageError, match="dropout"):
        FCNet(dropout=1.0)


def test_dead_units_are_those_silent_on_every_image():
    model = FCNet("none", hidden=(4,))
    with torch.no_grad():
        model.blocks[0].linear.weight.zero_()
        model.blocks[0].linear.bias.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    with UnitPeaks(model.hidden_blocks()) as peaks:
        model(torch.rand(5, 1, 28, 28))
    assert peaks.dead_fraction() == 0.5  # the units with bias -1 and 0 never output more than zero


# --- Runs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        PAPER_MLP.replace(hidden=(32, 32), dropout=0.3, batches=12, eval_every=4, eval_size=64),
        LAB.replace(
            model="convnet", depth=3, init="glorot_uniform", optimizer="adam", lr=1e-3, batches=3, eval_size=32
        ),
    ],
    ids=["mlp+dropout", "convnet"],
)
def test_paired_runs_share_initial_weights_and_batch_order(spec, small_mnist, monkeypatch):
    streams: list[list[torch.Tensor]] = []
    initial: list[dict[str, torch.Tensor]] = []

    class RecordingBatches(Batches):
        def next_indices(self):
            indices = super().next_indices()
            if not streams or self is not streams[-1][0]:
                streams.append([self])
            streams[-1].append(indices.clone())
            return indices

    def recording_build_network(config):
        model = build_network(config)
        initial.append({k: v.clone() for k, v in model.named_parameters()})
        return model

    monkeypatch.setattr(train_module, "Batches", RecordingBatches)
    monkeypatch.setattr(train_module, "build_network", recording_build_network)
    pair = compare(spec, seed=3, bn="torch", data=small_mnist, device="cpu")

    (_, *plain_order), (_, *bn_order) = streams  # each stream: its Batches, then the indices it drew
    assert len(plain_order) == len(bn_order) == spec.batches
    assert spec.model == "mlp" or spec.eval_every == 100  # the convnet: evaluated at the start and the end only
    assert all(torch.equal(a, b) for a, b in zip(plain_order, bn_order, strict=True))
    shared = set(initial[0]) & set(initial[1])
    assert any(name.endswith("weight") for name in shared)
    assert all(torch.equal(initial[0][name], initial[1][name]) for name in shared)
    assert (pair.plain.config.bn, pair.bn.config.bn) == ("none", "torch")
    curves = pair.curves()
    assert [x for x, _ in curves["no BN"]] == [x for x, _ in curves["BN"]] == [p["batch"] for p in points(pair.bn)]


def test_same_seed_same_run_and_divergence_is_recorded_not_raised(small_mnist):
    spec = PAPER_MLP.replace(hidden=(16,), dropout=0.2, batches=10, eval_every=5, eval_size=64, train_eval_size=64)
    first, second = (lab_train(spec, "torch", 1, small_mnist) for _ in range(2))

    def untimed(run: RunResult) -> list[dict]:
        return [{k: v for k, v in p.items() if k != "seconds"} for p in points(run)]

    assert untimed(first) == untimed(second) and first.status == "completed"
    assert set(points(first)[-1]) >= {"train_accuracy", "dead_relu"}
    blown = lab_train(PAPER_MLP.replace(lr=1e6, batches=20, eval_every=5, eval_size=64), "none", 0, small_mnist)
    assert blown.status == "diverged" and blown.diverged and blown.batches_done < 20 and final(blown) is None


def test_time_budget_stops_the_run(small_mnist):
    spec = PAPER_MLP.replace(hidden=(16,), batches=10**9, seconds=0.05, eval_every=10**6, eval_size=32)
    run = lab_train(spec, "none", 0, small_mnist)
    assert 0.05 <= run.train_seconds < 1.0 and points(run)[-1]["batch"] == run.batches_done


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="resnet"), "model must be one of"),
        (dict(optimizer="lbfgs"), "optimizer must be one of"),
        (dict(lr=0.0), "lr must be a number in"),
        (dict(bn="torch", batch_size=1), "batch_size must be at least 2"),
        (dict(model="convnet", init=0.1), "convnet init must be one of"),
        (dict(model="convnet", dropout=0.5), "only available in the mlp model"),
        (dict(train_size=10), "train_size must be an integer in"),
        (dict(bn_momentum=0.0), "bn_momentum"),
    ],
)
def test_bad_run_specs_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        LAB.replace(**kwargs)


# --- Verdicts ---------------------------------------------------------------------------------------

finite = st.floats(-10, 10, allow_nan=False)


@given(
    pairs=st.lists(st.tuples(finite, finite), min_size=1, max_size=6),
    margin=st.floats(-1, 1),
    higher=st.booleans(),
)
def test_a_seed_is_won_when_the_signed_difference_beats_the_margin(pairs, margin, higher):
    bn, base = zip(*pairs, strict=True)
    c = Comparison("x", bn=bn, base=base, higher_is_better=higher, margin=margin)
    sign = 1 if higher else -1
    assert c.wins() == [sign * (b - a) > margin for b, a in pairs]
    flipped = Comparison("x", bn=tuple(-v for v in bn), base=tuple(-v for v in base), higher_is_better=not higher)
    assert flipped.wins() == Comparison("x", bn=bn, base=base, higher_is_better=higher).wins()
    expected = "holds" if all(c.wins()) else "fails" if not any(c.wins()) else "inconsistent"
    assert c.outcome == expected


@given(
    pairs=st.lists(st.tuples(st.floats(0.01, 100), st.floats(0.01, 100)), min_size=1, max_size=6),
    scale=st.floats(0.1, 10),
)
def test_ratio_comparisons_do_not_depend_on_units(pairs, scale):
    bn, base = zip(*pairs, strict=True)
    c = Comparison("t", bn=bn, base=base, kind="ratio", higher_is_better=False, margin=1.1)
    scaled = Comparison("t", bn=tuple(v * scale for v in bn), base=tuple(v * scale for v in base), kind="ratio",
                        higher_is_better=False, margin=1.1)  # fmt: skip
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(c.effects(), scaled.effects(), strict=True))


def test_never_reaching_counts_as_infinitely_late():
    inf = math.inf
    c = Comparison(
        "t", bn=(2.0, inf, 5.0, inf), base=(inf, 3.0, 5.0, inf), kind="ratio", higher_is_better=False, margin=1.0
    )
    assert c.wins() == [True, False, False, False]
    assert Comparison("n", bn=(0.0, 3.0), base=(0.0, 0.0), kind="ratio", margin=1.0).wins() == [False, True]


def test_verdict_rule():
    holds = Comparison("a", bn=(2.0, 2.0), base=(1.0, 1.0))
    fails = Comparison("b", bn=(1.0, 1.0), base=(1.0, 1.0))
    split = Comparison("c", bn=(2.0, 1.0), base=(1.0, 1.0))
    unjudged_fail = Comparison("d", bn=(0.0, 0.0), base=(1.0, 1.0), counts=False)
    assert verdict([holds, holds, unjudged_fail]) == "supported"
    assert verdict([fails, fails]) == "not supported"
    assert verdict([]) == "not supported"
    assert verdict([holds, fails]) == "mixed"
    assert verdict([split]) == "mixed"


def curve_run(spec: TrainConfig, bn: str, seed: int, accuracies: list[float], seconds_per_point: float) -> RunResult:
    """A synthetic finished run: an evaluation every 10 batches with the given validation accuracies."""
    history = [
        {"batch": 10 * i, "split": "validation", "seconds": seconds_per_point * i, "loss": 1 - a, "accuracy": a}
        for i, a in enumerate(accuracies)
    ]
    n = 10 * (len(accuracies) - 1)
    seconds = seconds_per_point * (len(accuracies) - 1)
    return RunResult(spec.replace(bn=bn, seed=seed), "completed", n, seconds, history=history)


def costs(ratio: float) -> dict[str, dict[str, StepCost]]:
    """Costs per step for both setups: a BN step costs ``ratio`` times a plain one (in every round)."""
    return {
        setup: {"no BN": StepCost((1e-3,) * 3), "BN": StepCost((ratio * 1e-3,) * 3)} for setup in ("MLP", "ConvNet")
    }


FAST = [0.1, 0.92, 0.96, 0.975, 0.98]
SLOW = [0.1, 0.5, 0.8, 0.91, 0.93, 0.955, 0.965, 0.972]


@pytest.mark.parametrize(
    "curves, expected",
    [
        ({"mlp": (SLOW, FAST), "convnet": (SLOW, FAST)}, "supported"),
        ({"mlp": (FAST, FAST), "convnet": (SLOW, SLOW)}, "not supported"),  # same by batch, dearer iterations
        ({"mlp": (FAST, SLOW), "convnet": (SLOW, SLOW)}, "not supported"),  # BN slower
        ({"mlp": (SLOW, FAST), "convnet": (FAST, SLOW)}, "mixed"),
    ],
)
def test_claim1_verdict_from_synthetic_curves(curves, expected, tmp_path):
    lab = Lab(BUDGETS["smoke"], (0, 1), "torch")
    experiment = claim1_speed.experiment(lab)

    def lookup(spec: TrainConfig, arm: str) -> list[RunResult]:
        plain, with_bn = curves[spec.model]
        return [curve_run(spec, arm, s, with_bn if arm != "none" else plain, 1.0) for s in (0, 1)]

    result = experiment.analyse(lookup, tmp_path, costs=costs(1.2))  # the curves are in steps, the verdict in time
    assert result.verdict == expected
    assert (tmp_path / "claim1_speed.png").is_file()


def test_claim1_does_not_judge_a_threshold_that_neither_arm_reached_in_some_seed(tmp_path):
    plain, bn_by_seed = [0.1, 0.5, 0.91, 0.955], {0: FAST, 1: [0.1, 0.92, 0.96, 0.965]}  # 97%: BN in seed 0 only

    def lookup(spec: TrainConfig, arm: str) -> list[RunResult]:
        return [curve_run(spec, arm, s, plain if arm == "none" else bn_by_seed[s], 1.0) for s in (0, 1)]

    result = claim1_speed.experiment(Lab(BUDGETS["smoke"], (0, 1), "torch")).analyse(lookup, tmp_path, costs=costs(1.0))
    judged = {re.search(r"\d+%", c.name)[0]: c.counts for c in result.comparisons if c.name.startswith("MLP")}
    assert judged == {"90%": True, "95%": True, "97%": False}
    assert result.verdict == "supported"


def test_parse_claims():
    assert parse_claims("1,3-5") == [1, 3, 4, 5]
    assert parse_claims(" 7, 2,2") == [2, 7]
    for bad in ("9", "0-3", "", "one", "1,,2", "3-", "5-2", "-1"):
        with pytest.raises(UsageError):
            parse_claims(bad)


# --- Resume, report, command ----------------------------------------------------------------------


def run_files(out) -> list:
    return sorted(p / "summary.json" for p in (out / "runs").iterdir())


def test_resume_reuses_finished_runs_and_redoes_a_damaged_one(small_mnist, tmp_path):
    first = run_benefits([2, 3], budget="smoke", out_dir=tmp_path, data=small_mnist, device="cpu", log=lambda _: None)
    files = run_files(tmp_path)
    assert first.trained == len(first.runs) == len(files) > 0
    again = run_benefits([3, 2], budget="smoke", out_dir=tmp_path, data=small_mnist, device="cpu", log=lambda _: None)
    assert again.trained == 0 and [c.verdict for c in again.claims] == [c.verdict for c in first.claims]
    files[0].write_text(files[0].read_text()[:50])  # a half-written file, as a crash without atomic writes leaves
    (files[1].parent / f".{files[1].name}.tmp").write_text("{")  # a leftover temporary file is ignored
    third = run_benefits([2, 3], budget="smoke", out_dir=tmp_path, data=small_mnist, device="cpu", log=lambda _: None)
    assert third.trained == 1 and json.loads(files[0].read_text())["config"]["seed"] == 0


def test_interrupt_loses_only_the_stack_in_progress(small_mnist, tmp_path, monkeypatch):
    """Four stacks of two runs; the third is interrupted once its run directories exist."""
    spec = PAPER_MLP.replace(hidden=(16,), batch_size=16, batches=4, eval_every=2, eval_size=32)
    configs = [
        spec.replace(bn=bn, optimizer=o, lr=lr)
        for bn in ("none", "torch")
        for o in ("sgd", "adam")
        for lr in (0.01, 0.1)
    ]
    calls = []

    def interrupt(_line: str) -> None:
        raise KeyboardInterrupt

    def interrupted_on_the_third(members, *args, **kwargs):
        calls.append(members)
        if len(calls) == 3:
            kwargs["log"] = interrupt
        return train_stack(members, *args, **kwargs)

    monkeypatch.setattr(keeper, "train_stack", interrupted_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        keeper.obtain_many(configs, tmp_path, data=small_mnist, min_stack=2, **runs.QUIET)
    statuses = [
        store.read_summary(run_dir(tmp_path, c, "cpu"))["status"]
        for c in configs
        if run_dir(tmp_path, c, "cpu").exists()
    ]
    assert [len(c) for c in calls] == [2, 2, 2] and statuses.count("interrupted") == 2
    assert statuses.count("completed") + statuses.count("diverged") == 4
    monkeypatch.setattr(keeper, "train_stack", train_stack)
    resumed = keeper.obtain_many(configs, tmp_path, data=small_mnist, min_stack=2, **runs.QUIET)
    assert sorted(how for _, how in resumed.values()) == ["reused"] * 4 + ["trained"] * 4


def test_runs_a_stack_would_slow_train_alone(small_mnist, tmp_path, monkeypatch):
    """ConvNets of one structure are not stacked (a ConvNet stack is slower than its runs alone); MLPs are."""
    convnet = LAB.replace(model="convnet", depth=2, hidden=(8,), batch_size=8, batches=2, eval_every=1, eval_size=16)
    mlp = PAPER_MLP.replace(hidden=(8,), batch_size=8, batches=2, eval_every=1, eval_size=16)
    stacked = []
    monkeypatch.setattr(
        keeper, "train_stack", lambda members, *a, **k: stacked.append(members) or train_stack(members, *a, **k)
    )
    got = keeper.obtain_many(
        [spec.replace(seed=s) for spec in (convnet, mlp) for s in range(2)],
        tmp_path,
        data=small_mnist,
        min_stack=2,
        **runs.QUIET,
    )
    assert [[c.model for c in members] for members in stacked] == [["mlp", "mlp"]]
    assert sorted(how for _, how in got.values()) == ["trained"] * 4


def test_a_run_directory_holding_another_config_is_not_reused(tmp_path, small_mnist):
    spec = PAPER_MLP.replace(hidden=(8,), batches=2, eval_every=1, eval_size=16)
    device = torch.device("cpu")
    options = {"data": small_mnist, "device": device, **runs.QUIET}
    first, how = obtain(spec, tmp_path, **options)
    again, how_again = obtain(spec, tmp_path, **options)
    assert (how, how_again) == ("trained", "reused") and again.history == first.history
    other = spec.replace(seed=1)
    run_dir(tmp_path, spec, device).rename(run_dir(tmp_path, other, device))  # a folder claiming another run
    assert obtain(other, tmp_path, **options)[1] == "trained"  # trained anew, not taken from the folder


@pytest.fixture(scope="module")
def smoke_report(small_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("benefits")
    return run_benefits(budget="smoke", out_dir=out, data=small_mnist, device="cpu", log=lambda _: None), out


def test_report_files_are_well_formed_and_cover_every_claim(smoke_report):
    result, out = smoke_report
    results = json.loads((out / "results.json").read_text())
    assert [c["claim"] for c in results["claims"]] == sorted(CLAIMS)
    assert all(c["verdict"] in VERDICTS and c["headline"] and c["rule"] for c in results["claims"])
    assert len(results["runs"]) == len(result.runs) and all(
        (out / "runs" / r["run_dir"] / "summary.json").is_file() for r in results["runs"]
    )

    markdown = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    figures = [name for c in results["claims"] for name in c["figures"]]
    assert len(figures) >= len(CLAIMS)
    for number, (title, text) in CLAIMS.items():
        assert f"## {number}. {title}" in markdown and text in markdown
        assert f"<h2>{number}. {title}</h2>" in html
    for name in figures:
        assert (out / name).read_bytes().startswith(b"\x89PNG") and f"]({name})" in markdown
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == len(figures) and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http" not in html.replace("http-equiv", "")  # self-contained: nothing to fetch
    assert html.count("<table>") == html.count("</table>") and html.rstrip().endswith("</html>")
    assert markdown.count("**Verdict: ") == len(CLAIMS)


def test_html_escapes_text_and_keeps_inline_marks(tmp_path):
    html = reports.render_html([reports.Text("a < b, **bold** and `x<y`")], title="t & u", image_dir=tmp_path)
    assert (
        "<p>a &lt; b, <strong>bold</strong> and <code>x&lt;y</code></p>" in html and "<title>t &amp; u</title>" in html
    )


def test_cli_runs_a_claim_and_prints_json(tmp_path, capsys):
    code = main(["benefits", "--budget", "smoke", "--claims", "3", "--out", str(tmp_path), "--device", "cpu", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert [c["claim"] for c in printed["claims"]] == [3] and printed["claims"][0]["verdict"] in VERDICTS
    assert "3. Easier initialisation:" in captured.err
    assert (tmp_path / "report.html").is_file()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--claims", "9"], "argument --claims: there are claims 1 to 7; got '9'"),
        (["--claims", "1,x"], "argument --claims: claims must be numbers or ranges like 1,3-5"),
        (["--budget", "huge"], "argument --budget: invalid choice"),
        (["--seeds", "0"], "argument --seeds: must be >= 1"),
        (["--bn", "none"], "argument --bn: invalid choice"),
    ],
)
def test_cli_argument_errors_exit_2_with_one_line(args, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benefits", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_claim7_gives_each_arm_the_steps_that_fit_in_the_same_time(tmp_path):
    """The cheaper arm's steps at its cost are the time; the other arm is scored only on the steps that fit."""
    lab = Lab(BUDGETS["smoke"], (0, 1), "torch")
    experiment = claim7_results.experiment(lab)
    steps = BUDGETS["smoke"].best_steps
    late = [0.5] * 4 + [0.99]  # reaches 0.99 at its last evaluation only
    early = [0.5, 0.9, 0.95, 0.96, 0.96]

    def lookup(spec: TrainConfig, arm: str) -> list[RunResult]:
        accuracies = late if arm != "none" else early
        runs = []
        for seed in (0, 1):
            run = curve_run(spec, arm, seed, accuracies, 1.0)
            for i, record in enumerate(run.history):  # evaluations spread over the run's steps
                record["batch"] = round(i * spec.batches / (len(accuracies) - 1))
            runs.append(run)
        return runs

    equal = experiment.analyse(lookup, tmp_path, costs=costs(1.0))
    dearer = experiment.analyse(lookup, tmp_path, costs=costs(1.5))  # BN's last evaluation no longer fits
    assert equal.comparisons[0].bn == (0.99, 0.99) and equal.verdict == "supported"
    assert dearer.comparisons[0].bn == (0.5, 0.5) and dearer.verdict == "not supported"
    assert claim7_results.step_budgets(steps, {"no BN": 1e-3, "BN": 1.5e-3}) == (
        steps * 1e-3,
        {"no BN": steps, "BN": steps / 1.5},
    )


def test_costs_are_measured_interleaved_round_by_round(small_mnist):
    from bnlab.lab.step_cost import interleaved_costs

    spec = PAPER_MLP.replace(hidden=(8,), batch_size=16)
    blowing_up = spec.replace(lr=1e6, init=5.0)  # diverges: rebuilt within its slices, its steps still timed
    measured = interleaved_costs(
        {"plain": spec, "bn": spec.replace(bn="manual"), "diverging": blowing_up},
        small_mnist, torch.device("cpu"), rounds=4, slice_steps=3, warmup=1,
    )  # fmt: skip
    assert set(measured) == {"plain", "bn", "diverging"}
    assert all(len(cost.seconds) == 4 and min(cost.seconds) > 0 for cost in measured.values())
    median, low, high = measured["bn"].ratio(measured["plain"])
    assert low <= median <= high


def test_the_work_of_a_step_is_its_matmuls():
    from bnlab.training.work import step_flops

    config = PAPER_MLP.replace(hidden=(32, 16), batch_size=8)
    forward = 2 * 8 * (784 * 32 + 32 * 16 + 16 * 10)
    backward = 2 * forward - 2 * 8 * 784 * 32  # weight gradients everywhere, input gradients but the first layer's
    assert step_flops(config) == forward + backward == step_flops(config.replace(bn="manual", seed=3))
    # what does not shape the step does not change its count (and is counted once)
    assert step_flops(config.replace(lr=0.5, seed=7, batches=3, optimizer="sgd")) == forward + backward
    assert step_flops(config.replace(batch_size=16)) == 2 * (forward + backward)


def test_the_matmul_peak_leaves_the_thread_setting_as_it_was():
    import torch

    from bnlab.training.work import matmul_peak

    before = torch.get_num_threads()
    assert matmul_peak(size=64, repeats=3, threads=1) > 0
    assert torch.get_num_threads() == before
