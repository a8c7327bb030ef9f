"""The lab's budgets: smoke (the whole pipeline in seconds), quick (minutes) and full (the real study)."""

from __future__ import annotations

from dataclasses import dataclass

from bnlab.config import FC_INITS


@dataclass(frozen=True)
class Budget:
    """How much of each experiment to run: the designs are the same in every budget, only sizes change."""

    name: str
    seeds: int
    runtime: str  # measured (quick, smoke) or estimated (full) wall time on the 2-core CPU
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
    best_lrs: tuple[float, ...]  # claim 7: Adam learning rates
    best_steps: tuple[int, int]  # claim 7: the cheaper arm's steps in the time both arms get, MLP and ConvNet
    best_eval_every: tuple[int, int]
    cost_slices: tuple[int, int]  # claims 1 and 7: rounds, and steps per slice, of the interleaved cost measurement


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(
        "smoke",
        seeds=1,
        runtime="about 12 s",
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
        best_lrs=(1e-3,),
        best_steps=(40, 4),
        best_eval_every=(10, 2),
        cost_slices=(3, 3),
    ),
    "quick": Budget(
        "quick",
        seeds=2,
        runtime="about 6.5 min",
        batches=1000,
        eval_every=100,
        speed_batches=(4000, 600),
        speed_eval_every=(50, 50),
        conv_eval_size=1000,
        sgd_lrs=(0.01, 0.1, 1.0, 10.0),
        adam_lrs=(1e-4, 1e-3, 1e-2, 1e-1),
        init_stds=(0.01, 0.1, 1.0, 5.0),
        init_schemes=("glorot_uniform", "he_normal"),
        activations=("sigmoid", "tanh", "relu", "leaky_relu", "elu", "swish"),
        depths=(2, 5, 10, 20, 50),
        overfit_size=2000,
        overfit_batches=1000,
        best_lrs=(1e-4, 1e-3, 1e-2),
        best_steps=(6000, 600),
        best_eval_every=(500, 50),
        cost_slices=(9, 10),
    ),
    "full": Budget(
        "full",
        seeds=5,
        runtime="about 2 h 40 min, measured",
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
        depths=(2, 3, 5, 10, 20, 30, 50),
        overfit_size=2000,
        overfit_batches=5000,
        best_lrs=(1e-3, 3e-3, 1e-2),  # claim7_results.TRIMMED_RULE
        best_steps=(38000, 3800),  # about the 20 s and 40 s the plain arms had in the first full study
        best_eval_every=(1000, 200),
        cost_slices=(15, 20),
    ),
}
