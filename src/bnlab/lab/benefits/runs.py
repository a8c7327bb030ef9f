"""The lab's runs: every network trained twice per seed, plain and with batch norm, by the training core.

A run is a ``TrainConfig`` with the interval cadence. ``run_benefits`` keeps them in the run store
(``bnlab.training.runs``: one directory per config, reused when finished) and trains the missing ones
that share a structure as stacks (``bnlab.training.stack``). Runs with the same seed start from the
same initial weights (every shared layer) and see the same batches in the same order, so a difference
between the two arms of a pair is the work of batch norm alone. ``compare`` trains one pair, outside
any store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bnlab.config import BN_MODES, TrainConfig, check_choice
from bnlab.data import MNIST, load_mnist
from bnlab.lab.curves import curve
from bnlab.training import RunResult, resolve_device, train
from bnlab.training.runs import QUIET


@dataclass
class Pair:
    """The two arms of one paired comparison: same initial weights, same batches, BN or not."""

    plain: RunResult
    bn: RunResult

    def curves(self, y: str = "val_accuracy", x: str = "batch") -> dict[str, list[tuple[float, float]]]:
        """{"no BN": [(x, y), ...], "BN": [...]}: e.g. validation accuracy against batch or seconds."""
        return {"no BN": curve(self.plain, y, x), "BN": curve(self.bn, y, x)}


def compare(
    config: TrainConfig,
    *,
    seed: int = 0,
    bn: str = "manual",
    data: MNIST | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
) -> Pair:
    """Train ``config`` without and with batch norm from the same initial weights on the same batches.

    For example ``compare(PAPER_MLP.replace(activation="sigmoid", batches=500), seed=1).curves()["BN"]``
    is the BN arm's [(batch, validation accuracy), ...]; ``curves(x="seconds")`` puts training time on x.
    """
    check_choice("bn", bn, BN_MODES[1:])
    torch_device = resolve_device(device)
    data = (data if data is not None else load_mnist(data_dir)).to(torch_device)
    plain, with_bn = (
        train(config.replace(bn=norm, seed=seed), data, device=torch_device, **QUIET) for norm in ("none", bn)
    )
    return Pair(plain, with_bn)
