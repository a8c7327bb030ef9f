"""A run's evaluations as the lab reads them: one point per evaluation, and the figures drawn from the points.

The interval cadence records validation (and optionally training) loss and accuracy, and dead units, at
evaluation steps; a *point* gathers one step's records: ``{"batch", "seconds", "val_loss", "val_accuracy",
"train_loss", "train_accuracy", "dead_relu"}`` (what was measured). ``batch`` is the number of training
steps done; ``seconds`` the training time recorded by the run (machine- and load-dependent: the lab's
time claims use steps and separately measured costs instead).
"""

from __future__ import annotations

from bnlab.training.result import RunResult

__all__ = ["best", "curve", "final", "first_reaching", "points"]


def points(run: RunResult) -> list[dict[str, float]]:
    """Per evaluation step, in order: its batch, seconds and every measured value."""
    by_batch: dict[int, dict[str, float]] = {}
    for record in run.history:
        point = by_batch.setdefault(record["batch"], {"batch": record["batch"], "seconds": record["seconds"]})
        prefix = "val" if record["split"] == "validation" else "train"
        point[f"{prefix}_loss"], point[f"{prefix}_accuracy"] = record["loss"], record["accuracy"]
        if "dead_relu" in record:
            point["dead_relu"] = record["dead_relu"]
    return list(by_batch.values())


def final(run: RunResult, key: str = "val_accuracy") -> float | None:
    """The last point's value; None for a diverged run, whose last values mean nothing."""
    return None if run.diverged else points(run)[-1][key]


def best(run: RunResult, key: str = "val_accuracy", until: float | None = None) -> float:
    """The highest value of ``key`` over the points, those at steps up to ``until`` only if given."""
    return max(p[key] for p in points(run) if until is None or p["batch"] <= until)


def first_reaching(run: RunResult, accuracy: float) -> dict[str, float] | None:
    """The first point with validation accuracy >= ``accuracy``, if any."""
    return next((p for p in points(run) if p["val_accuracy"] >= accuracy), None)


def curve(run: RunResult, y: str = "val_accuracy", x: str = "batch") -> list[tuple[float, float]]:
    """(x, y) at every point that measured ``y``."""
    return [(p[x], p[y]) for p in points(run) if y in p]
