"""The lab's runs: every network trained twice per seed, plain and with batch norm, by the training core.

A run is a ``TrainConfig`` with the interval cadence; the lab trains it with ``bnlab.training.runner``
and keeps it in the run store, one run directory per config under ``OUT/runs/`` (named by the network,
its normalization, seed, config hash and device type: timings from a GPU are not reused on a CPU).
Runs with the same seed start from the same initial weights (every shared layer) and see the same
batches in the same order, so a difference between the two arms of a pair is the work of batch norm
alone. An interrupted lab loses at most the run in progress; a run whose directory cannot be read
back is trained again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bnlab.config import BN_MODES, TrainConfig, check_choice
from bnlab.data import MNIST, load_mnist
from bnlab.training import RunResult, resolve_device
from bnlab.training.runner import train_or_reuse


def run_dir(root: Path, config: TrainConfig, device: torch.device) -> Path:
    return root / f"{config.model}-{config.bn}-seed{config.seed}-{config.key()}-{device.type}"


def lab_run(config: TrainConfig, data: MNIST, device: torch.device, root: Path | None = None) -> tuple[RunResult, bool]:
    """(the run of ``config``, whether it was trained now); reused from ``root`` when finished there.

    A NaN or infinite loss ends the run as "diverged"; it never raises.
    """
    quiet = {"log": lambda _: None, "progress": False, "checkpoints": False, "raise_on_divergence": False}
    if root is None:
        from bnlab.training import train

        return train(config, data, device=device, **quiet), True
    return train_or_reuse(config, data, run_dir(root, config, device), device=device, **quiet)


@dataclass
class Pair:
    """The two arms of one paired comparison: same initial weights, same batches, BN or not."""

    plain: RunResult
    bn: RunResult

    def curves(self, y: str = "val_accuracy", x: str = "batch") -> dict[str, list[tuple[float, float]]]:
        """{"no BN": [(x, y), ...], "BN": [...]}: e.g. validation accuracy against batch or seconds."""
        return {"no BN": self.plain.curve(y, x), "BN": self.bn.curve(y, x)}


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
    plain, with_bn = (lab_run(config.replace(bn=norm, seed=seed), data, torch_device)[0] for norm in ("none", bn))
    return Pair(plain, with_bn)
