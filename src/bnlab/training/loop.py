"""The training loop: the one place where a bnlab network takes a step.

    state = LoopState(model, optimizer)
    fit(state, batches, steps=800, loss="sigmoid", hooks=[...])

Each step: forward, loss, backward, optimizer step. What varies between uses is a ``Hook``'s
business: when to evaluate and what to log (the notebook's cadence, the lab's), writing metrics and
checkpoints, progress bars, time budgets, step timers for the benchmarks. ``bnlab.training.runner``
assembles the hooks for a ``TrainConfig``; distributed training runs this same loop in every process
with a DistributedDataParallel model and sharded batches.

Stopping: after ``steps`` steps; when the training steps (evaluation excluded) have taken
``seconds``; when a hook sets ``state.stop``; or when the loss is NaN or infinite, checked before the
step is applied, which ends the run with ``state.stop = "diverged"``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bnlab.training.evaluate import loss_fn

if TYPE_CHECKING:
    from bnlab.training.distributed import World
    from bnlab.training.stack import NetworkStack, StackOptimizer


@dataclass
class LoopState:
    """The loop's state, shared with the hooks."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0  # training steps done
    clock: float = 0.0  # seconds spent in training steps, evaluation and hooks excluded
    loss: float = math.nan  # the last batch's loss
    images: Tensor | None = None  # the last batch
    labels: Tensor | None = None
    stop: str | None = None  # why the loop ended early: "diverged", "time", or a hook's reason
    message: str = ""

    @property
    def module(self) -> nn.Module:
        """The network itself (under DistributedDataParallel's wrapper): what to evaluate and checkpoint."""
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model


class Hook:
    """Called by ``fit``: ``start`` before the first step (also on resume), ``after_step`` after each."""

    def start(self, state: LoopState) -> None:
        pass

    def after_step(self, state: LoopState) -> None:
        pass


def fit(
    state: LoopState,
    batches: Iterator[tuple[Tensor, Tensor]],
    *,
    steps: int,
    loss: str,
    hooks: Sequence[Hook] = (),
    seconds: float | None = None,
    clip: float | None = None,
    world: World | None = None,
) -> LoopState:
    """Train ``state.model`` until ``state.step == steps`` (or a stop); returns the state.

    ``clip`` clips the gradients' global norm. ``world``: one process of a data-parallel group
    (``distributed.py``): the batches are its shards, the logged loss the global batch's, and every
    process leaves the loop after the same step.
    """
    model, optimizer = state.model, state.optimizer
    parameters = [p for p in model.parameters() if p.requires_grad]
    cuda = any(p.is_cuda for p in parameters)
    for hook in hooks:
        hook.start(state)
    model.train()
    while state.step < steps and state.stop is None:
        images, labels = next(batches)
        start = time.perf_counter()
        if world is None:
            objective = loss_fn(loss, model(images), labels)
            value = objective.item()
        else:
            objective, value = world.mean_loss(loss, model(images), labels)
        if not math.isfinite(value):  # every process sees the same global value: all stop here
            state.stop, state.message = "diverged", f"loss became {value} at batch {state.step}"
            break
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()  # the clock measures the step, not the launch
        state.clock += time.perf_counter() - start
        state.step += 1
        state.loss, state.images, state.labels = value, images, labels
        if seconds is not None and state.clock >= seconds:
            state.stop = "time"
        if world is not None and seconds is not None:  # clocks differ: agree on time before the hooks see it
            state.stop = world.agree(state.stop)
        for hook in hooks:
            hook.after_step(state)
        if world is not None:  # a hook's stop (rank 0's evaluation) reaches every process
            state.stop = world.agree(state.stop)
    return state


def fit_stack(
    stack: NetworkStack,
    optimizer: StackOptimizer,
    states: Sequence[LoopState],
    batches: Sequence[Iterator[tuple[Tensor, Tensor]]],
    *,
    steps: int,
    loss: str,
    hooks: Sequence[Sequence[Hook]],
) -> None:
    """``fit`` for the members of a stack (``stack.py``): one step for all at once, everything else per member.

    ``states[m]``, ``batches[m]`` and ``hooks[m]`` are member m's own: its module and position, its batch
    stream (exactly its sequential run's), its evaluations and records. Each step draws every member's
    batch, runs one stacked forward and takes every member's loss; a member whose loss is NaN or
    infinite stops there as diverged (``stop`` and ``message`` as ``fit`` sets them), the others' summed
    losses go backward, and one optimizer step updates the members still training. Then each of those
    members' hooks see its state; a hook's stop ends that member alone. A stopped member is left, at the
    end, as it was when it stopped (weights, statistics, optimizer state), whatever the others' steps did
    to the stack. A member's ``clock`` is its share of the stack's training time (the step's time over the
    members it trained).
    """
    for member_hooks, state in zip(hooks, states, strict=True):
        for hook in member_hooks:
            hook.start(state)
    stack.train()
    stopped: dict[int, tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]] = {}  # member -> its state then

    def stop(m: int) -> None:
        stopped[m] = stack.snapshot(m), optimizer.snapshot(m)

    try:
        while True:
            training = [m for m, state in enumerate(states) if state.step < steps and state.stop is None]
            if not training:
                return
            drawn = [next(stream) for stream in batches]
            images, labels = torch.stack([x for x, _ in drawn]), torch.stack([y for _, y in drawn])
            start = time.perf_counter()
            losses = torch.vmap(partial(loss_fn, loss))(stack(images), labels)
            values = losses.tolist()
            for m in training:
                if not math.isfinite(values[m]):
                    states[m].stop, states[m].message = "diverged", f"loss became {values[m]} at batch {states[m].step}"
                    stop(m)  # as fit leaves a diverged run: the forward's statistics in, the step not taken
            training = [m for m in training if states[m].stop is None]
            if not training:
                return
            active = torch.zeros(len(states), dtype=torch.bool)
            active[training] = True
            optimizer.zero_grad()
            torch.where(active.to(losses.device), losses, 0).sum().backward()  # where: a NaN loss sends no gradient
            optimizer.step(active)
            if any(p.is_cuda for p in stack.parameters()):
                torch.cuda.synchronize()
            share = (time.perf_counter() - start) / len(training)
            for m in training:
                state = states[m]
                state.clock += share
                state.step += 1
                state.loss, state.images, state.labels = values[m], drawn[m][0], drawn[m][1]
                for hook in hooks[m]:
                    hook.after_step(state)
                if state.stop is not None:
                    stop(m)
    finally:  # later steps of the others moved a stopped member's statistics and moments: back as it stopped
        for m, (tensors, moments) in stopped.items():
            stack.restore(m, tensors)
            optimizer.restore(m, moments)


def make_optimizer(name: str, parameters: Sequence[nn.Parameter], lr: float, momentum: float = 0.0, fast: bool = True):
    """Adam (the notebook's betas 0.9/0.999, eps 1e-8), SGD or RMSProp; fused implementations where available."""
    parameters = list(parameters)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, momentum=momentum)
    if fast:
        try:
            return torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except RuntimeError:  # fused Adam needs a device/dtype this build supports
            pass
    return torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999), eps=1e-8)
