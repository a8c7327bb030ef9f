"""``RunResult``: what a run leaves, its status, evaluations and final scores, as ``summary.json`` stores it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from bnlab.config import TrainConfig

__all__ = ["RunResult"]


@dataclass
class RunResult:
    """What a run leaves: its status, its evaluations, and (notebook cadence) the final scores."""

    config: TrainConfig
    status: str
    batches_done: int = 0
    train_seconds: float = 0.0  # training steps only
    wall_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # the eval records of metrics.jsonl
    validation_accuracy: float | None = None
    test_accuracy: float | None = None
    one_at_a_time_accuracy: float | None = None
    precise: dict[str, Any] | None = None  # the same three with precise statistics, and what they cost
    device: str = "cpu"
    fast: bool = True
    threads: int = 1
    message: str = ""
    run_dir: Path | None = None
    model: nn.Module | None = None

    def summary(self) -> dict[str, Any]:
        keys = ("status", "message", "batches_done", "validation_accuracy", "test_accuracy", "one_at_a_time_accuracy")
        out = {key: getattr(self, key) for key in keys}
        return out | {
            "precise": self.precise,
            "train_seconds": round(self.train_seconds, 4),
            "wall_seconds": round(self.wall_seconds, 3),
            "device": self.device,
            "fast": self.fast,
            "threads": self.threads,
            "config": self.config.to_dict(),
        }

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    @property
    def seconds_per_batch(self) -> float:
        return self.train_seconds / self.batches_done if self.batches_done else math.nan
