"""End to end: the notebook's experiment at its full settings (800 batches of 64, seed 0).

This is the product's central claim, so it runs in the default suite (a couple of minutes on two
CPU cores). What is asserted is what the product guarantees on any machine, not one seed's final
eval-mode accuracy: that accuracy is chaotic (the running averages lag the weights, and float
rounding differs between CPUs), and the same commit gave 0.94 on one machine and 0.72 on another.

- With precise statistics (recomputed after training), both BN networks reach a high accuracy.
- With the running (EMA) statistics, accuracy is far above chance: they are tracked and used.
- Without BN the network stays near chance.

The bnlab network is also trained with the compiled kernels off (``BNLAB_KERNELS=0``), which
changes the float rounding as another CPU would; the same statements must hold.
"""

from __future__ import annotations

import csv
import json

import pytest

from bnlab import kernels
from bnlab.lab.reproduce import reproduce

pytestmark = pytest.mark.slow

CHANCE = 0.1
FAR_ABOVE_CHANCE = 3 * CHANCE  # what tracked and used statistics give at the very least
HIGH = 0.93  # precise statistics: the notebook's TF runs span 0.925-0.968 with BN across seeds


@pytest.fixture(scope="module")
def outcome(mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    return reproduce(1, out_dir=out, data=mnist, device="cpu", log=lambda _: None, progress=False)


@pytest.fixture(scope="module")
def without_kernels(mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-no-kernels")
    with kernels.use_kernels(False):
        return reproduce(1, out_dir=out, data=mnist, device="cpu", modes=("manual",), log=lambda _: None)


def _assert_learns_and_uses_population_statistics(result) -> None:
    assert result.batches_done == 800
    assert result.precise["test_accuracy"] >= HIGH, result.precise
    assert result.precise["one_at_a_time_accuracy"] >= HIGH - 0.05, result.precise  # 100 images: +-0.03
    assert result.test_accuracy >= FAR_ABOVE_CHANCE
    assert result.one_at_a_time_accuracy >= FAR_ABOVE_CHANCE  # one image at a time: population statistics work


@pytest.mark.parametrize("bn", ["torch", "manual"])
def test_batch_norm_networks_learn_and_use_population_statistics(outcome, bn):
    (result,) = outcome.runs[bn]
    _assert_learns_and_uses_population_statistics(result)


def test_the_same_holds_with_other_float_rounding(without_kernels):
    (result,) = without_kernels.runs["manual"]
    assert json.loads((result.run_dir / "config.json").read_text())["batch_norm"].startswith("tensor ops")
    _assert_learns_and_uses_population_statistics(result)


def test_network_without_batch_norm_does_not_learn(outcome):
    (result,) = outcome.runs["none"]
    assert result.test_accuracy <= 0.20 and result.precise is None


def test_reports_are_written_and_finished_runs_reused(outcome, mnist):
    out = outcome.out_dir
    table = (out / "table.md").read_text()
    assert "bnlab BN (bnlab.BatchNorm2d, TF settings)" in table and "0.9745" in table
    assert "test EMA" in table and "test precise" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["bn"] for r in rows] == ["none", "torch", "manual"]
    assert float(rows[2]["precise_test_accuracy_mean"]) >= HIGH
    assert json.loads((out / "results.json").read_text())["rows"][2]["notebook_test_accuracy"] == 0.9605
    assert (out / "validation_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines: list[str] = []
    again = reproduce(1, out_dir=out, data=mnist, device="cpu", log=lines.append, progress=False)
    assert sum(line.strip().startswith("reused:") for line in lines) == 3
    assert again.rows() == outcome.rows()
