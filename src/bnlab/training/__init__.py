"""The training core: one config (``bnlab.config``), one loop, one run store; every feature trains through it.

loop.py      fit(): the one training loop, extended by hooks
evaluate.py  loss, accuracy, the one-at-a-time check, dead units
store.py     run directories: exclusive, atomic, versioned, resumable; checkpoints validated on load
runner.py    train(): a config's run, from building the network to its summary
"""

from bnlab.config import TrainConfig
from bnlab.training.evaluate import evaluate, loss_fn, one_at_a_time_accuracy
from bnlab.training.loop import Hook, LoopState, fit, make_optimizer
from bnlab.training.runner import RunResult, load_run, resolve_device, train, train_or_reuse
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
    "one_at_a_time_accuracy",
    "resolve_device",
    "train",
    "train_or_reuse",
]
