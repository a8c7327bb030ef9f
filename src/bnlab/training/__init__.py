"""The training core: one config (``bnlab.config``), one loop, one run store; every feature trains through it.

loop.py      fit(): the one training loop, extended by hooks; fit_stack(): its step for a stack of runs
hooks.py     the hooks of a run: records, the notebook's and the lab's cadence, checkpoints, progress
runner.py    train(): a config's run, from building the network to its summary
stack.py     many runs of one network structure as one computation (stacked weights, vmap)
result.py    RunResult: what a run leaves
scores.py    a trained network's scores, with its stored and with precise statistics
store.py     run directories: exclusive, atomic, versioned, resumable; checkpoints validated on load
runs.py      the run keeper: a config's run in a store, reused, resumed or trained (one naming, one policy)
evaluate.py  loss, accuracy, the one-at-a-time check, dead units
"""

from bnlab.config import TrainConfig
from bnlab.training.evaluate import evaluate, loss_fn, one_at_a_time_accuracy
from bnlab.training.loop import Hook, LoopState, fit, make_optimizer
from bnlab.training.result import RunResult
from bnlab.training.runner import resolve_device, train
from bnlab.training.runs import load_run, obtain, run_dir
from bnlab.training.store import Checkpoint, RunDir, load_model

__all__ = [
    "Checkpoint",
    "Hook",
    "LoopState",
    "RunDir",
    "RunResult",
    "TrainConfig",
    "evaluate",
    "fit",
    "load_model",
    "load_run",
    "loss_fn",
    "make_optimizer",
    "obtain",
    "one_at_a_time_accuracy",
    "resolve_device",
    "run_dir",
    "train",
]
