"""The work of a benefits lab, by kind of run, from its results.json: before and after, side by side.

    python benchmarks/lab_work.py docs/benefits-first-full/results.json docs/benefits-full/results.json

For each file: per kind of run (MLP or ConvNet; trained for a number of steps, or for a wall-clock
budget as the first engine's claim 7 did), the runs, their training steps, the FLOPs of those steps
(``bnlab.training.work.step_flops``: matmuls and convolutions, forward and backward, as PyTorch's
FlopCounterMode counts them, so the first layer's unused input gradient is not counted) and the
training seconds the runs recorded (worker seconds: runs trained side by side each count their own).
It reads the first engine's format (runs with a ``spec``) and today's (runs with a ``config``), so the
first full study and a regenerated one compare in one table. Seconds are the machines' of their days:
compare FLOPs as they are, and seconds only with the day's speed in mind (docs/benefits.md).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from bnlab.config import TrainConfig
from bnlab.training.work import step_flops

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("results", nargs="+", type=Path, help="a lab's results.json")
args = parser.parse_args()


def config_of(run: dict) -> tuple[TrainConfig, bool]:
    """The run's config (what its step's FLOPs depend on) and whether it trained for a time budget."""
    if "config" in run:
        config = TrainConfig.from_dict(run["config"])
        return config, config.seconds is not None
    spec = run["spec"]  # the first engine's: family for model; a ConvNet's hidden and init were not its own
    mlp = spec["family"] == "mlp"
    config = TrainConfig(
        model=spec["family"], bn=run["bn"], hidden=tuple(spec["hidden"]) if mlp else (100,), depth=spec["depth"],
        activation=spec["activation"], init=spec["init"] if mlp else "glorot_uniform", loss=spec["loss"],
        batch_size=spec["batch_size"], optimizer=spec["optimizer"], lr=spec["lr"],
    )  # fmt: skip
    return config, spec["seconds"] is not None


print("| results | kind of run | runs | training steps | TFLOP | training, worker-min | GFLOP/s |")
print("|---|---|---:|---:|---:|---:|---:|")
for path in args.results:
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])
    for run in json.loads(path.read_text())["runs"]:
        config, timed = config_of(run)
        steps = run.get("batches_done", run["batches"])
        row = kinds[f"{'MLP' if config.model == 'mlp' else 'ConvNet'}, {'time budget' if timed else 'steps'}"]
        row[0] += 1
        row[1] += steps
        row[2] += step_flops(config) * steps
        row[3] += run["train_seconds"]
    kinds["all"] = [sum(row[i] for row in list(kinds.values())) for i in range(4)]
    for kind, (runs, steps, flops, seconds) in kinds.items():
        print(
            f"| {path} | {kind} | {runs:.0f} | {steps:,.0f} | {flops / 1e12:.1f} | {seconds / 60:.1f} | "
            f"{flops / seconds / 1e9:.0f} |"
        )
