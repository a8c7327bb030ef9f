"""The networks and training recipes the experiments start from, fixed before any run."""

from __future__ import annotations

from typing import Any

from bnlab.config import TrainConfig
from bnlab.data import VALIDATION_SIZE
from bnlab.lab.benefits.budgets import Budget

# How the lab trains and measures every network. Validation before the first step, every
# ``eval_every`` steps and after the last (the interval cadence), with dead ReLU units where there are
# ReLUs. BN's running statistics follow PyTorch's default momentum, 0.1, not the notebook's 0.01
# (TensorFlow's decay 0.99): with 0.01 they still remember their initial values for a few hundred
# batches, so eval-mode accuracy lags the network itself and every early-convergence figure would be
# charged to batch norm. Each experiment names the network, recipe and budget on top of this.
LAB = TrainConfig(
    cadence="interval", bn_momentum=0.1, dead_units=True, one_at_a_time=0, precise_samples=0, batches=1000,
    eval_every=100,
)  # fmt: skip

# The batch-norm paper's MNIST network (Ioffe & Szegedy, 2015, section 4.1): 784-100-100-100-10,
# batches of 60, softmax cross-entropy. Two recipes for it: plain SGD at 0.1 and Adam at 1e-3, common
# defaults fixed before any run and shared by both arms.
PAPER_MLP = LAB.replace(
    model="mlp", hidden=(100, 100, 100), activation="relu", init="glorot_uniform", batch_size=60, loss="softmax",
    optimizer="sgd", lr=0.1,
)  # fmt: skip
RECIPES: dict[str, dict[str, Any]] = {"SGD": dict(optimizer="sgd", lr=0.1), "Adam": dict(optimizer="adam", lr=1e-3)}
RECIPES_TEXT = "plain SGD at 0.1 and Adam at 1e-3"

# The notebook's network and procedure: 19 conv layers + dense 100, Adam 0.002, batches of 64,
# sigmoid cross-entropy. Glorot-uniform kernels in both arms (the notebook's tf.layers choice).
NOTEBOOK_CONVNET = LAB.replace(
    model="convnet", depth=19, init="glorot_uniform", optimizer="adam", lr=0.002, loss="sigmoid", batch_size=64
)


def paper_mlp_recipes(budget: Budget, **changes: Any) -> dict[str, TrainConfig]:
    """The paper's MLP, with ``changes``, under each recipe for the budget's number of batches."""
    return {
        name: PAPER_MLP.replace(**changes, **recipe, batches=budget.batches, eval_every=budget.eval_every)
        for name, recipe in RECIPES.items()
    }


def conv_eval_images(budget: Budget) -> str:
    """Which validation images a ConvNet evaluation scores under ``budget``."""
    if budget.conv_eval_size >= VALIDATION_SIZE:
        return f"all {VALIDATION_SIZE:,} validation images"
    return f"the first {budget.conv_eval_size:,} validation images"
