"""``train``: one run of a ``TrainConfig``, from building the network to the last line of its summary.

It builds the network, optimizer and batch order the config describes, runs the one loop (``loop.py``)
with the hooks of the config's cadence (``hooks.py``), and keeps the run directory (``store.py``) if given
one. At the end of a notebook-cadence run it scores validation, test and the one-at-a-time check twice
(``scores.py``): with the running (EMA) statistics the network trained with, the notebook's measure, and
with precise statistics recomputed from ``precise_samples`` training images, which says what the weights
can do whatever state the EMA is in.

The run's status ends up in summary.json whatever happens: completed, diverged (the loss became NaN
or infinite), interrupted (Ctrl-C, SIGTERM) or failed (any other error, before or during the loop).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bnlab import kernels
from bnlab.config import TrainConfig
from bnlab.data import MNIST, Batches, ClassBatches, Split, load_mnist
from bnlab.errors import TrainingDiverged, UsageError
from bnlab.models import build_network
from bnlab.training import store
from bnlab.training.distributed import ShardedBatches, World, synchronize
from bnlab.training.hooks import Checkpoints, IntervalCadence, NotebookCadence, Progress, Recorder, Scorer
from bnlab.training.loop import Hook, LoopState, fit, fit_stack, make_optimizer
from bnlab.training.result import RunResult
from bnlab.training.scores import final_scores, training_split

__all__ = ["prepare", "resolve_device", "train", "train_stack"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is the GPU when there is one; anything torch.device accepts otherwise."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def train(
    config: TrainConfig,
    data: MNIST | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    fast: bool = True,
    checkpoints: bool = True,
    raise_on_divergence: bool = True,
    replace: bool = False,
    world: World | None = None,
) -> RunResult:
    """Train ``config``'s network; keep the run directory ``run_dir`` if given (``resume``: continue the run in it).

    ``run_dir`` must be new or empty; with ``replace`` it may hold another run (unfinished, or of another
    config), which is removed first.
    ``fast=False`` turns off the speed-ups (channels_last, fused Adam, bnlab's compiled BN kernels)
    for debugging; results mean the same either way and differ only by float rounding.
    ``checkpoints=False`` writes no checkpoint (the lab keeps only the evaluations of its runs).
    A diverged run raises ``TrainingDiverged`` after recording it, unless ``raise_on_divergence`` is False.
    ``world``: this process's place in a data-parallel group (``distributed.py``); rank 0 alone keeps
    the run directory, logs and evaluates.
    """
    device = resolve_device(device)
    main = world is None or world.is_main
    with _kept(config, run_dir, resume, replace, device, fast, main) as (run, checkpoint, result):
        with contextlib.nullcontext() if fast else kernels.use_kernels(False):
            data = (data if data is not None else load_mnist(data_dir)).to(device)
            state, batches = prepare(config, data, device, channels_last=fast, fused=fast, world=world)
            result.model = state.module
            if checkpoint is not None:
                _restore(state, checkpoint, batches, result)
            _write_config(run, config, device, fast, world)
            hooks, line, bar = _hooks(config, data, batches, run, result, log, progress if main else False, checkpoints)
            try:
                fit(
                    state, batches, steps=config.batches, loss=config.loss, hooks=hooks if main else [],
                    seconds=config.seconds, clip=config.clip, world=world,
                )  # fmt: skip
            finally:
                bar.bar.close()
            _finish(config, state, data, batches.split, run, result, line, checkpoints, scores=main)
        if result.status == "diverged" and raise_on_divergence:
            raise TrainingDiverged(result.message)
    return result


def train_stack(
    configs: Sequence[TrainConfig],
    data: MNIST | None = None,
    *,
    run_dirs: Sequence[str | Path] | None = None,
    resume: bool = False,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    log: Callable[[str], None] = print,
    fast: bool = True,
    checkpoints: bool = True,
    replace: bool = False,
) -> list[RunResult]:
    """Train ``configs``, runs of one structure (``stack.structure``), as one stacked computation (``stack.py``).

    Each member's run is what ``train(config, ...)`` gives it, to float rounding: its own initial weights,
    batches, learning rate, optimizer state, evaluations, divergence and run directory (``run_dirs[m]``,
    with ``resume``/``replace`` as ``train``'s). A diverged member is recorded and the others go on; no
    exception is raised for it. An interrupt or error ends every member still training, each recorded as
    ``train`` records it; a member resumes from its last checkpoint. ``fast=False`` trains through the
    tensor-op batch norm (the kernels' speed-ups off; the stack itself is the same).
    """
    from bnlab.training.stack import NetworkStack, StackOptimizer, StackScores, stackable, structure

    configs = list(configs)
    if not configs or any(not stackable(c) or structure(c) != structure(configs[0]) for c in configs):
        raise UsageError("train_stack takes stackable runs of one structure (bnlab.training.stack.stackable)")
    if run_dirs is not None and len(run_dirs) != len(configs):
        raise UsageError(f"train_stack got {len(configs)} configs but {len(run_dirs)} run directories")
    device = resolve_device(device)
    paths = list(run_dirs) if run_dirs is not None else [None] * len(configs)
    with contextlib.ExitStack() as members:
        kept = [
            members.enter_context(_kept(c, path, resume, replace, device, fast, True))
            for c, path in zip(configs, paths, strict=True)
        ]
        with contextlib.nullcontext() if fast else kernels.use_kernels(False):
            data = (data if data is not None else load_mnist(data_dir)).to(device)
            models = [build_network(c).to(device) for c in configs]
            batches = [Batches(training_split(c, data), c.batch_size, seed=c.seed) for c in configs]
            stack = NetworkStack(models)
            first = configs[0]
            optimizer = StackOptimizer(stack, first.optimizer, [c.lr for c in configs], first.momentum)
            states = [LoopState(member, _MemberOptimizer(optimizer, m)) for m, member in enumerate(stack.members)]
            for (run, checkpoint, result), state, stream in zip(kept, states, batches, strict=True):
                result.model = state.model
                if checkpoint is not None:
                    _restore(state, checkpoint, stream, result)
                _write_config(run, result.config, device, fast, None, stack=len(configs))
            if len({state.step for state in states}) > 1:
                raise UsageError("the members of a stack must resume from the same step; resume them one by one")
            scores = StackScores(stack, first.loss)  # one pass scores every member at an evaluation
            member_hooks = [
                _hooks(c, data, stream, run, result, log, False, checkpoints, partial(scores.member, m))[0]
                for m, (c, stream, (run, _, result)) in enumerate(zip(configs, batches, kept, strict=True))
            ]
            log(f"training {len(configs)} runs of one structure as one stack")
            fit_stack(stack, optimizer, states, batches, steps=first.batches, loss=first.loss, hooks=member_hooks)
            for c, state, stream, (run, _, result) in zip(configs, states, batches, kept, strict=True):
                _finish(c, state, data, stream.split, run, result, lambda _: None, checkpoints, scores=True)
    return [result for _, _, result in kept]


class _MemberOptimizer:
    """One member's view of a stack's optimizer: its state as torch.optim's (for checkpoints and resume)."""

    def __init__(self, optimizer: Any, member: int) -> None:
        self.optimizer, self.member = optimizer, member

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.member_state_dict(self.member)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_member_state_dict(self.member, saved)


@contextlib.contextmanager
def _kept(
    config: TrainConfig,
    run_dir: str | Path | None,
    resume: bool,
    replace: bool,
    device: torch.device,
    fast: bool,
    main: bool,
) -> Iterator[tuple[store.RunDir | None, dict[str, Any] | None, RunResult]]:
    """(the run directory, its checkpoint when resuming, the run's result); on the way out, whatever ends the
    run, its status in summary.json: completed or diverged (set by the run), interrupted, or failed."""
    started = time.perf_counter()
    run, checkpoint = None, None
    if run_dir is not None and resume and not main:  # every process resumes from the one checkpoint
        checkpoint = store.load_checkpoint(store.checkpoint_path(run_dir))
    elif run_dir is not None and resume:
        run, checkpoint = store.RunDir.resume(run_dir)
    elif run_dir is not None and main:
        run = store.RunDir.create(run_dir, replace=replace)
    result = RunResult(config, "running", device=str(device), fast=fast, threads=torch.get_num_threads())
    result.run_dir = run.path if run else None
    try:
        if run is not None:
            run.write_summary(result.summary())
        yield run, checkpoint, result
    except TrainingDiverged:
        raise
    except KeyboardInterrupt:
        if result.status == "running":
            result.status, result.message = "interrupted", f"interrupted after {result.batches_done} batches"
        raise
    except BaseException as err:
        if result.status == "running":
            result.status, result.message = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        result.wall_seconds = round(time.perf_counter() - started, 3)  # as stored, so reloads compare equal
        if run is not None:
            try:
                run.write_summary(result.summary())
            except OSError:
                if result.status in store.FINISHED:  # nothing else reports the problem: this error does
                    raise
                # else the error on its way out (named by its file) is the one to report; the summary could
                # not be written even in place, so it says the run's last recorded status
            finally:
                run.close()


def _write_config(
    run: store.RunDir | None, config: TrainConfig, device: torch.device, fast: bool, world: World | None, stack: int = 1
) -> None:
    if run is None:
        return
    details: dict[str, Any] = {"world_size": world.size} if world else {}
    if stack > 1:
        details["stack"] = stack  # trained as one member of a stack of this many runs (training/stack.py)
    details["batch_norm"] = kernels.status()  # which implementation bnlab's BN used: kernels or tensor ops
    run.write_config(config, device=str(device), fast=fast, threads=torch.get_num_threads(), **details)


def _hooks(
    config: TrainConfig,
    data: MNIST,
    batches: Batches | ShardedBatches,
    run: store.RunDir | None,
    result: RunResult,
    log: Callable[[str], None],
    progress: bool | None,
    checkpoints: bool,
    scorer: Scorer | None = None,
) -> tuple[list[Hook], Callable[[str], None], Progress]:
    """The hooks of ``config``'s cadence (the interval one scoring with ``scorer``), the log printing around the
    progress bar, and the bar."""
    notebook = config.cadence == "notebook"
    recorder = Recorder(run, result, steps=notebook)
    bar = Progress(config.batches, progress)
    line = bar.line(log)
    cadence = (
        NotebookCadence(config, data.validation, recorder, line)
        if notebook
        else IntervalCadence(config, data.validation, batches.split, recorder, scorer)
    )
    hooks: list[Hook] = [recorder, cadence, bar]
    if run is not None and checkpoints:
        hooks.append(Checkpoints(config, run, batches, result))
    return hooks, line, bar


def _finish(
    config: TrainConfig,
    state: LoopState,
    data: MNIST,
    train_split: Split,
    run: store.RunDir | None,
    result: RunResult,
    line: Callable[[str], None],
    checkpoints: bool,
    scores: bool,
) -> None:
    """After the loop: the run's status from how it ended, its final scores, and its final checkpoint."""
    result.batches_done, result.train_seconds = state.step, state.clock
    if state.stop == "diverged":
        result.status, result.message = (
            "diverged",
            f"{state.message} (bn={config.bn}, lr={config.lr:g}); the run stopped. Try a smaller --lr, or batch norm.",
        )
        return
    if scores and (config.cadence == "notebook" or config.one_at_a_time or config.precise_samples):
        final_scores(config, data, train_split, result, line)
    result.status = "completed"
    if run is not None and checkpoints:  # before summary.json says "completed": a failed write makes it "failed"
        payload = {"config": config.to_dict(), "state_dict": state.module.state_dict(), "step": state.step}
        run.save_checkpoint(store.CHECKPOINT, payload | {"summary": result.summary()})


def prepare(
    config: TrainConfig,
    data: MNIST,
    device: torch.device,
    *,
    channels_last: bool = True,
    fused: bool = True,
    world: World | None = None,
) -> tuple[LoopState, Batches | ShardedBatches]:
    """The network, optimizer and batch stream of ``config``, ready for ``fit``.

    ``channels_last``: the ConvNet in channels_last (faster convolutions; bnlab's kernels take either
    layout). ``fused``: the fused Adam where the device has one. ``world``: synchronized BN and
    DistributedDataParallel around the network, and this process's shard of every batch.
    """
    torch.manual_seed(config.seed)  # dropout draws from the global generator; weights and batches have their own
    model = build_network(config).to(device)
    if channels_last and config.model == "convnet":
        model = model.to(memory_format=torch.channels_last)
    if world is not None:
        model = synchronize(model, world, device)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.momentum, fused)
    split = training_split(config, data)
    if config.classes_per_batch is None:
        batches = Batches(split, config.batch_size, seed=config.seed)
    else:
        batches = ClassBatches(split, config.batch_size, config.seed, classes=config.classes_per_batch)
    return LoopState(model, optimizer), batches if world is None else ShardedBatches(batches, world)


def _restore(
    state: LoopState, checkpoint: dict[str, Any], batches: Batches | ShardedBatches, result: RunResult
) -> None:
    """The loop's state at the checkpoint: weights, optimizer, batch order, RNG, clock and evaluations so far."""
    resume = checkpoint["resume"]
    state.module.load_state_dict(checkpoint["state_dict"])
    state.optimizer.load_state_dict(resume["optimizer"])
    batches.load_state_dict(resume["batches"])
    torch.set_rng_state(resume["rng"])
    state.step, state.clock = checkpoint["step"], resume["clock"]
    result.history = list(resume["history"])
    result.batches_done, result.train_seconds = state.step, state.clock
