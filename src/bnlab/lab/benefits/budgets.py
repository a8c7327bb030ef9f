"""The lab's budgets: smoke (the whole pipeline in seconds), quick (minutes) and full (the real study)."""

from __future__ import annotations

from dataclasses import dataclass

from bnlab.config import FC_INITS


@dataclass(frozen=True)
class Budget:
    """How much of each experiment to run: the designs are the same in every budget, only sizes change."""

    name: str
    seeds: int
    runtime: str  # wall time on this project's 2-core CPU, as measured (docs/benefits.md)
    batches: int  # claims 2-5: training steps per run
    eval_every: int
    speed_batches: tuple[int, int]  # claim 1: MLP, ConvNet
    speed_eval_every: tuple[int, int]
    conv_eval_size: int  # validation images scored at each ConvNet evaluation
    sgd_lrs: tuple[float, ...]  # claim 2
    adam_lrs: tuple[float, ...]
    init_stds: tuple[float, ...]  # claim 3
    init_schemes: tuple[str, ...]
    activations: tuple[str, ...]  # claim 4
    depths: tuple[int, ...]  # claim 5
    overfit_size: int  # claim 6: training images
    overfit_batches: int
    # claim 7: Adam learning rates, MLP and ConvNet. The ConvNet's include the notebook's 0.002 and its runs
    # train claim 1's steps at claim 1's cadence, so claim 1's ConvNet runs are claim 7's at 0.002.
    best_lrs: tuple[tuple[float, ...], tuple[float, ...]]
    best_steps: int  # claim 7: the MLP's steps for the cheaper arm, the time both arms get (the ConvNet: claim 1's)
    best_eval_every: int  # claim 7: the MLP's evaluations
    cost_slices: tuple[int, int]  # claims 1 and 7: rounds, and steps per slice, of the interleaved cost measurement


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(
        "smoke",
        seeds=1,
        runtime="seconds, for CI (about 25 s on 2 CPU cores, most of it starting the workers)",
        batches=20,
        eval_every=10,
        speed_batches=(40, 4),
        speed_eval_every=(10, 2),
        conv_eval_size=100,
        sgd_lrs=(0.1, 10.0),
        adam_lrs=(1e-3, 0.1),
        init_stds=(0.01, 5.0),
        init_schemes=("glorot_uniform",),
        activations=("sigmoid", "relu"),
        depths=(2, 5),
        overfit_size=300,
        overfit_batches=20,
        best_lrs=((1e-3,), (2e-3,)),
        best_steps=40,
        best_eval_every=10,
        cost_slices=(3, 3),
    ),
    "quick": Budget(
        "quick",
        seeds=2,
        runtime="about 4.5 min on 2 CPU cores",
        batches=600,
        eval_every=100,
        speed_batches=(4000, 400),
        speed_eval_every=(50, 25),
        conv_eval_size=1000,
        sgd_lrs=(0.01, 0.1, 1.0, 10.0),
        adam_lrs=(1e-4, 1e-3, 1e-2, 1e-1),
        init_stds=(0.01, 0.1, 1.0, 5.0),
        init_schemes=("glorot_uniform", "he_normal"),
        activations=("sigmoid", "tanh", "relu", "leaky_relu", "elu", "swish"),
        depths=(2, 5, 10, 20),
        overfit_size=2000,
        overfit_batches=500,
        best_lrs=((1e-3, 1e-2), (2e-3, 1e-2)),
        best_steps=3000,
        best_eval_every=250,
        cost_slices=(9, 10),
    ),
    "full": Budget(
        "full",
        seeds=5,
        runtime="about 80 min on 2 CPU cores (docs/benefits.md; the first engine took 2 h 40 min)",
        batches=5000,
        eval_every=250,
        speed_batches=(20000, 3000),
        speed_eval_every=(100, 100),
        conv_eval_size=5000,
        sgd_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
        adam_lrs=(3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
        init_stds=(0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 5.0),
        init_schemes=FC_INITS,
        activations=("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "swish"),
        depths=(2, 3, 5, 10, 20, 30),  # claim5_depth.TRIMMED_RULE
        overfit_size=2000,
        overfit_batches=5000,
        best_lrs=((1e-3, 3e-3, 1e-2), (1e-3, 2e-3, 1e-2)),  # claim7_results.TRIMMED_RULE
        best_steps=38000,  # about the 20 s the plain MLP had in the first full study
        best_eval_every=1000,
        cost_slices=(15, 20),
    ),
}
