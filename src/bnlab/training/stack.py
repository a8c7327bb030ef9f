"""Many runs of one network as one computation: M members' parameters and buffers stacked, trained together.

    stack = NetworkStack([build_network(c) for c in configs])      # members of one structure
    optimizer = StackOptimizer(stack, "adam", lrs=[c.lr for c in configs])
    logits = stack(images)                                         # images (M, B, ...) -> (M, B, classes)

The members share a structure (the same layers and shapes) and differ in their weights, learning rates
and data. ``torch.func.stack_module_state`` stacks their tensors along a new dimension 0, and the
forward pass is ``torch.func.functional_call`` of one template under ``torch.vmap``: every layer runs
once for all members (a linear layer as one batched matmul, a convolution as one grouped convolution,
batch norm as one call of the same operator with the members' features side by side:
``bnlab.nn.batching`` for bnlab's, PyTorch's own rule for ``torch.nn``'s). Gradients come from ordinary
autograd on the stacked tensors: the members' losses are summed, and each member's gradient is that of
its own loss, since no computation mixes members.

Each member keeps a module of its own (``stack.members[m]``), built from its config and rebound to views
of the stacked tensors: it always holds that member's current weights and statistics, so evaluation,
checkpoints and the run store handle it as any single run (``bnlab.training.evaluate`` on it gives what
the member's sequential run would give).

The optimizers are the single-run ones, written once over stacked state with a learning rate per member
(``StackOptimizer``: SGD with momentum, Adam): the same formulas as ``torch.optim``'s, so a member's
update equals its sequential run's to float rounding. A member that stops (it diverged) keeps its
weights from then on; the others go on, unaffected.

Why not for every run: dropout (its masks come from the global generator in the order of the
sequential run, which vmap cannot reproduce), gradient clipping, RMSProp, time budgets and recurrent
networks are trained one run at a time (``stackable``), and so are the small-batch family's norms and
class batches (their vmap forms are not tested against their runs alone). And a ConvNet, which a stack can train, is
trained alone where runs are grouped (``stack_pays``): its grouped convolutions under vmap are slower.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from bnlab.config import BN_MODES, TrainConfig
from bnlab.data import Split
from bnlab.training.evaluate import loss_fn

__all__ = ["NetworkStack", "StackOptimizer", "StackScores", "stack_pays", "stackable", "structure"]

STACKED_OPTIMIZERS = ("sgd", "adam")
ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}  # the notebook's, as bnlab.training.loop.make_optimizer


def stackable(config: TrainConfig) -> bool:
    """Whether ``config``'s run can train as a member of a stack (see the module docstring for why not)."""
    return (
        config.model in ("mlp", "convnet")
        and config.bn in BN_MODES
        and config.classes_per_batch is None
        and config.optimizer in STACKED_OPTIMIZERS
        and config.dropout == 0
        and config.clip is None
        and config.seconds is None
    )


def stack_pays(config: TrainConfig) -> bool:
    """Whether ``config``'s run trains faster in a stack (of 8 or more) than alone, as measured by
    ``benchmarks/stack_speed.py``: the MLPs, 1.2-1.6x per run-step at one thread. Not the ConvNet: vmap
    makes its convolutions grouped ones, which ran at 0.5-0.7x the run alone in channels_last (stacks
    of 1, 8 and 15, both arms, 2026-12-03). Not measured on CUDA, where the ConvNet is trained alone too
    until a measurement there says otherwise."""
    return stackable(config) and config.model == "mlp"


def structure(config: TrainConfig) -> TrainConfig:
    """What members of one stack share: the config with what may differ between them (seed, so weights and
    data order; learning rate; initialisation) set to one value. Equal structures train as one stack."""
    init: str | float = config.init if config.model == "convnet" else "glorot_uniform"
    return config.replace(seed=0, lr=1.0, init=init)


class NetworkStack:
    """M networks of one structure, their parameters and buffers stacked, run as one computation.

    ``params`` are the leaves autograd and the optimizer see. A linear layer's weight is kept transposed,
    (M, in, out): the batched matmul then reads it and writes its gradient in place, where nn.Linear's
    (out, in) layout would have every step copy a transposed gradient of the whole stack (the largest
    tensors of an MLP, and memory traffic sets the pace of a stack). ``member_tensor`` gives member m's
    slice of any stacked tensor in its module's own layout.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        if not members:
            raise ValueError("a stack needs at least one member")
        shapes = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in members}
        if len(shapes) > 1:
            raise ValueError("the members of a stack must share one structure (the same tensors and shapes)")
        self.members = list(members)
        params, self.buffers = stack_module_state(self.members)
        first = self.members[0]
        self.transposed = {
            name
            for name in params
            if name.rpartition(".")[2] == "weight"
            and isinstance(first.get_submodule(name.rpartition(".")[0]), nn.Linear)
        }
        self.params = {
            name: value.detach().transpose(1, 2).contiguous().requires_grad_() if name in self.transposed else value
            for name, value in params.items()
        }
        self.template = copy.deepcopy(first).to("meta")
        for m, module in enumerate(self.members):  # each member's own module: views of its slice of the stack
            for name, value in self.params.items():
                module.get_parameter(name).data = self.member_tensor(name, value.detach(), m)
            for name, value in self.buffers.items():
                owner, _, attribute = name.rpartition(".")
                module.get_submodule(owner)._buffers[attribute] = value[m]
        self._forward = vmap(self._one, in_dims=(0, 0, 0), randomness="error")
        self._shared = vmap(self._one, in_dims=(0, 0, None), randomness="error")

    def __len__(self) -> int:
        return len(self.members)

    def member_tensor(self, name: str, stacked: Tensor, m: int) -> Tensor:
        """Member m's slice of ``stacked`` (laid out as ``params[name]``), in its module's layout: a view."""
        return stacked[m].t() if name in self.transposed else stacked[m]

    def _one(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def train(self, mode: bool = True) -> NetworkStack:
        self.template.train(mode)
        for member in self.members:
            member.train(mode)
        return self

    def __call__(self, x: Tensor, shared: bool = False) -> Tensor:
        """x (M, B, ...): member m's batch at x[m] -> its outputs at [m]; ``shared``: x (B, ...), every member's."""
        params = {n: p.transpose(1, 2) if n in self.transposed else p for n, p in self.params.items()}
        return (self._shared if shared else self._forward)(params, self.buffers, x)

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    @torch.no_grad()
    def snapshot(self, m: int) -> dict[str, Tensor]:
        """Member m's parameters and buffers now, copied (``restore`` puts them back)."""
        return {name: t[m].clone() for name, t in [*self.params.items(), *self.buffers.items()]}

    @torch.no_grad()
    def restore(self, m: int, saved: dict[str, Tensor]) -> None:
        for name, t in [*self.params.items(), *self.buffers.items()]:
            t[m].copy_(saved[name])


class StackScores:
    """Every member's (loss, accuracy) on a split in one pass of the stack, for the members' evaluations.

    At an evaluation step all the members still training ask for the same split: the first request scores
    every member (``evaluate``'s eval mode, chunks and sums, the images shared), the others read their
    member's scores. Only the latest step's are kept. Equal to ``evaluate`` on each member's module to float
    rounding (batched matmuls), as the stack's training is to each run alone.
    """

    def __init__(self, stack: NetworkStack, loss: str, chunk: int = 256) -> None:
        self.stack, self.loss, self.chunk = stack, loss, chunk
        self._key: tuple[int, int, int] | None = None
        self._scores: list[tuple[float, float]] = []

    def member(self, m: int, state: Any, split: Split) -> tuple[float, float]:
        """Member m's scores at ``state.step`` (``hooks.Scorer``'s form, with the member first)."""
        key = (state.step, id(split.images), len(split))
        if key != self._key:
            self._scores, self._key = self.score(split), key
        return self._scores[m]

    def score(self, split: Split) -> list[tuple[float, float]]:
        was_training = self.stack.template.training
        self.stack.train(False)
        try:
            with torch.inference_mode():
                total = torch.zeros(len(self.stack), device=split.labels.device)
                correct = torch.zeros(len(self.stack), device=split.labels.device, dtype=torch.long)
                for start in range(0, len(split), self.chunk):
                    images, labels = split.images[start : start + self.chunk], split.labels[start : start + self.chunk]
                    logits = self.stack(images, shared=True)  # (M, B, classes)
                    losses = vmap(partial(loss_fn, self.loss), in_dims=(0, None))(logits, labels)
                    total += losses * labels.shape[0]
                    correct += (logits.argmax(2) == labels).sum(1)
        finally:
            self.stack.train(was_training)
        n = len(split)
        return [(loss / n, hits / n) for loss, hits in zip(total.tolist(), correct.tolist(), strict=True)]


class StackOptimizer:
    """SGD (with momentum) or Adam for a stack: ``torch.optim``'s formulas, a learning rate per member.

    ``step(active)`` updates the members where ``active`` is True; the others keep their weights and
    state. ``member_state_dict(m)`` is member m's state in ``torch.optim``'s own format (and
    ``load_member_state_dict`` reads one), so a member's checkpoint resumes in a stack or alone.
    """

    def __init__(self, stack: NetworkStack, name: str, lrs: Sequence[float], momentum: float = 0.0) -> None:
        if name not in STACKED_OPTIMIZERS:
            raise ValueError(f"a stack trains with {' or '.join(STACKED_OPTIMIZERS)}, not {name}")
        self.stack, self.name, self.momentum = stack, name, momentum
        self.names = list(stack.params)
        self.lrs = torch.tensor(list(lrs), dtype=torch.float64)
        self.steps = 0  # steps of the members training now (they step together)
        self.member_steps = [0] * len(lrs)  # each member's own: a member that stopped keeps its count
        self.state: dict[str, dict[str, Tensor]] = {}
        for key, p in stack.params.items():
            if name == "adam":
                self.state[key] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            elif momentum:
                self.state[key] = {"momentum_buffer": torch.zeros_like(p)}

    def zero_grad(self) -> None:
        for p in self.stack.params.values():
            p.grad = None

    def _per_member(self, values: Tensor, like: Tensor) -> Tensor:
        return values.to(like.dtype).view(-1, *[1] * (like.dim() - 1))

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        """One update of every member where ``active``; in place, one pass per state tensor where it can.

        The members not active keep their weights and optimizer state: their slices are copied before the
        update and put back after it, a cost in proportion to how many they are (a stack with one stopped
        member of 32 does not copy the other 31)."""
        self.steps += 1
        for m in active.nonzero().flatten().tolist():
            self.member_steps[m] += 1
        resting = (~active.bool()).nonzero().flatten().to(next(iter(self.stack.params.values())).device)
        for key, p in self.stack.params.items():
            if p.grad is None:
                continue
            tensors = (p, *self.state.get(key, {}).values())
            kept = [t.index_select(0, resting) for t in tensors] if len(resting) else []
            if self.name == "sgd":
                grad = p.grad
                if self.momentum:
                    buffer = self.state[key]["momentum_buffer"]
                    buffer.mul_(self.momentum).add_(grad)  # from zeros: the first step's buffer is the gradient
                    grad = buffer
                p.addcmul_(grad, self._per_member(-self.lrs, p))
            else:
                self._adam(p, self.state[key])
            for t, saved in zip(tensors[: len(kept)], kept, strict=True):  # the resting members' as they were
                t.index_copy_(0, resting, saved)

    def _adam(self, p: Tensor, state: dict[str, Tensor]) -> None:
        (beta1, beta2), eps = ADAM["betas"], ADAM["eps"]
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        step_size = self.lrs / (1 - beta1**self.steps)
        denom = state["exp_avg_sq"].sqrt().div_(math.sqrt(1 - beta2**self.steps)).add_(eps)
        p.addcdiv_(state["exp_avg"], denom.div_(self._per_member(-step_size, p)))  # p - step_size * m / denom

    def member_state_dict(self, m: int) -> dict[str, Any]:
        """Member m's optimizer state as ``torch.optim.SGD``/``Adam.state_dict()`` gives it."""
        state: dict[int, dict[str, Tensor]] = {}
        for index, key in enumerate(self.names):
            entry = {k: self.stack.member_tensor(key, v, m).clone() for k, v in self.state.get(key, {}).items()}
            if self.name == "adam":
                entry["step"] = torch.tensor(float(self.member_steps[m]))
            if entry and self.member_steps[m]:  # as torch.optim: no state before the first step
                state[index] = entry
        group: dict[str, Any] = {"lr": float(self.lrs[m]), "params": list(range(len(self.names)))}
        if self.name == "sgd":
            group |= {"momentum": self.momentum, "dampening": 0, "weight_decay": 0, "nesterov": False}
        else:
            group |= {"betas": ADAM["betas"], "eps": ADAM["eps"], "weight_decay": 0, "amsgrad": False}
        group |= {"maximize": False, "foreach": None, "differentiable": False, "fused": None}
        return {"state": state, "param_groups": [group]}

    @torch.no_grad()
    def snapshot(self, m: int) -> dict[str, dict[str, Tensor]]:
        """Member m's optimizer state now, copied (``restore`` puts it back)."""
        return {key: {name: v[m].clone() for name, v in state.items()} for key, state in self.state.items()}

    @torch.no_grad()
    def restore(self, m: int, saved: dict[str, dict[str, Tensor]]) -> None:
        for key, state in self.state.items():
            for name, v in state.items():
                v[m].copy_(saved[key][name])

    @torch.no_grad()
    def load_member_state_dict(self, m: int, saved: dict[str, Any]) -> None:
        """Member m's state from a ``torch.optim`` state dict (of the same optimizer and parameters)."""
        for index, key in enumerate(self.names):
            entry = saved["state"].get(index, {})
            for name, value in self.state.get(key, {}).items():
                mine = self.stack.member_tensor(key, value, m)
                if name in entry:
                    mine.copy_(entry[name])
                else:
                    mine.zero_()
            if "step" in entry:
                self.steps = self.member_steps[m] = int(entry["step"])
