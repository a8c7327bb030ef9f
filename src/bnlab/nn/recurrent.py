"""Recurrent batch normalization (Cooijmans et al., 2016; ICLR 2017): the BN-LSTM as library layers.

One step of the batch-normalized LSTM, gates in PyTorch's ``nn.LSTM`` order (i, f, g, o)::

    i, f, g, o = BN(W_h h_{t-1}; gamma_h) + BN(W_x x_t; gamma_x) + b     # the two BNs have no shift
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))

The recurrent and the input term are normalized separately, so gamma_h and gamma_x set their
relative weight; their shifts would duplicate b, so the paper drops them. c_t itself is not
normalized: the cell update stays an LSTM's, and gradients flow through it unchanged.

Statistics are kept per time step (``SequenceBatchNorm``): the activations of the first steps have
other statistics than the steady state, and averaging over time hurts (the paper's appendix). Steps
0 .. max_steps - 1 each own a row of the running-statistics tables; later steps use (and in training
update) the last row, as the paper does beyond T_max at test time. gamma, beta and b are shared
over time. gamma starts at 0.1: at unit variance tanh saturates and gradients vanish over long
sequences (the paper's section 4; 0.01 or lower was unstable).

The normalization itself is ``bnlab.nn.batch_norm`` (closed-form backward, compiled CPU kernels,
``process_group``), called once per site and step (the input term: once per chunk of steps); this
file holds only the bookkeeping of statistics per step and the recurrence around it. See
docs/recurrent.md for the state_dict layout and measured speed.

Why this file is over 500 lines: the per-step statistics, the cell and the layer only make sense
together (the layer drives the cell's per-step rows, the cell the statistics' step index), and most
of its length is input checks and docstrings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from bnlab.errors import UsageError
from bnlab.nn import batch_norm
from bnlab.nn.batchnorm import copy_sharing_process_group
from bnlab.nn.functional import StatisticsObserver

__all__ = ["BNLSTM", "BNLSTMCell", "SequenceBatchNorm"]

GAMMA_INIT = 0.1  # the paper's initial gamma for every BN site
_CHUNK_BYTES = 1 << 20  # input-path chunk size, see _chunk_steps


class SequenceBatchNorm(nn.Module):
    """Batch norm of one site of a recurrent network, with running statistics per time step.

    ``forward(x, step)`` normalizes x (N, C) with the batch statistics in training, updating row
    ``min(step, max_steps - 1)`` of ``running_mean``/``running_var`` (tables of shape
    (max_steps, C)); in eval mode it normalizes with that row. ``weight`` (gamma, initialised to
    ``gamma_init``) and ``bias`` (beta, zeros; absent with ``affine_bias=False``) are shared by all
    steps. Otherwise it behaves as bnlab's ``BatchNorm1d``: same ``eps``, ``momentum`` (``None``:
    a cumulative average, counted per row in ``num_batches_tracked`` (max_steps,)),
    ``track_running_stats``, ``unbiased_running_var`` and ``process_group``.

    ``forward_steps(x, first_step)`` normalizes a stretch of steps (N, T, C) at once, each step
    against its row: for a term that does not depend on the recurrence (W_x x_t), one ``batch_norm``
    call for many steps.
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        *,
        affine_bias: bool = True,
        gamma_init: float = GAMMA_INIT,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        unbiased_running_var: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features < 1 or max_steps < 1:
            raise ValueError(f"num_features and max_steps must be positive, got {num_features} and {max_steps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.max_steps = max_steps
        self.gamma_init = gamma_init
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.unbiased_running_var = unbiased_running_var
        self.process_group = process_group
        self.observer: StatisticsObserver | None = None  # as bnlab's BatchNorm layers': set by recalibrate
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory)) if affine_bias else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(max_steps, num_features, **factory))
            self.register_buffer("running_var", torch.ones(max_steps, num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.zeros(max_steps, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def __deepcopy__(self, memo: dict[int, Any]) -> SequenceBatchNorm:
        return copy_sharing_process_group(self, memo)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, step: int, *, bias: Tensor | None = None) -> Tensor:
        """x (N, C) at time step ``step`` (0-based) -> (N, C).

        ``bias`` (C,) is a shift added after normalizing, for a layer without its own: it lets a
        caller fold a bias that follows the BN (BN(x) + b) into the same pass.
        """
        self._check(x, 2, "(N, C)", step)
        return self._stepper(step, step + 1, bias)(x, 0)

    def forward_steps(self, x: Tensor, first_step: int = 0, *, bias: Tensor | None = None) -> Tensor:
        """x (N, T, C) holding steps first_step .. first_step + T - 1 -> (N, T, C).

        The same as ``forward`` step by step, in fewer calls: the steps that own distinct rows
        (below max_steps) are one ``batch_norm`` call on x viewed as (N, T * C) features against
        those rows of the tables, flattened (contiguous views, so the in-place update writes the
        tables). Steps from max_steps on all update the last row, so they go one call each, in turn;
        so do all steps when ``momentum=None`` has counted their rows differently (each row then
        has its own momentum).
        """
        self._check(x, 3, "(N, T, C)", first_step)
        return self._chunker(first_step, first_step + x.shape[1], bias)(x, first_step)

    def _check(self, x: Tensor, dim: int, shape: str, step: int) -> None:
        if x.dim() != dim or x.shape[-1] != self.num_features or 0 in x.shape[:-1]:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects input {shape} with C = "
                f"{self.num_features} and no empty dimension, got shape {tuple(x.shape)}"
            )
        if step < 0:
            raise ValueError(f"{type(self).__name__}: time steps count from 0, got step {step}")

    def _shift(self, bias: Tensor | None) -> Tensor | None:
        if bias is not None and self.bias is not None:
            raise ValueError(f"{type(self).__name__} has a bias of its own (affine_bias=True); pass no bias")
        return self.bias if bias is None else bias

    def _updating(self) -> bool:
        return self.training and self.track_running_stats

    def _count(self, start: int, stop: int) -> list[float]:
        """Count steps start .. stop-1 as batches of their rows; the momentum each step's update uses."""
        last = self.max_steps - 1
        first_row = min(start, last)
        rows = self.num_batches_tracked[first_row : min(stop - 1, last) + 1]  # the rows these steps use
        counts = rows.tolist()
        momenta = []
        for t in range(start, stop):
            row = min(t, last) - first_row
            counts[row] += 1
            momenta.append(1.0 / counts[row] if self.momentum is None else self.momentum)
        rows.copy_(torch.tensor(counts))
        return momenta

    def _stepper(
        self, start: int, stop: int, bias: Tensor | None = None, momenta: list[float] | None = None
    ) -> Callable[[Tensor, int], Tensor]:
        """normalize(x, t): x (N, C) at step start + t, for one pass over steps start .. stop-1.

        Counts, momenta and options are settled once here, so each step is one ``batch_norm`` call
        on a row of each table (a view: updated in place). ``momenta``: those ``_count`` already
        gave for these steps.
        """
        shift = self._shift(bias)
        if momenta is None:
            momenta = self._count(start, stop) if self._updating() else [0.0] * (stop - start)
        if self.running_mean is None or (self.training and not self.track_running_stats):
            means = variances = None  # batch statistics, nothing kept (as BatchNorm1d)
            training = True
        else:
            means, variances = self.running_mean, self.running_var
            training = self.training
        weight, last, eps, unbiased = self.weight, self.max_steps - 1, self.eps, self.unbiased_running_var
        group = self.process_group if self.training else None

        def normalize(x: Tensor, t: int) -> Tensor:
            row = min(start + t, last)
            return batch_norm(
                x,
                None if means is None else means[row],
                None if variances is None else variances[row],
                weight,
                shift,
                training=training,
                momentum=momenta[t],
                eps=eps,
                unbiased_running_var=unbiased,
                process_group=group,
                observer=self.observer,
            )

        return normalize

    def _chunker(self, start: int, stop: int, bias: Tensor | None = None) -> Callable[[Tensor, int], Tensor]:
        """normalize(x, first): x (N, k, C) holding steps first .. first+k-1 of one pass over start .. stop-1."""
        shift = self._shift(bias)
        momenta = self._count(start, stop) if self._updating() else None

        def normalize(x: Tensor, first: int) -> Tensor:
            n, steps, c = x.shape
            mine = None if momenta is None else momenta[first - start : first - start + steps]
            distinct = max(0, min(steps, self.max_steps - first))  # steps with a row of their own
            if mine is None:  # nothing updated: any row may be read by several steps
                head = steps
            elif len(set(mine[:distinct])) == 1:
                head = distinct
            else:
                head = 0
            parts = []
            if head:
                if self.running_mean is None or (self.training and not self.track_running_stats):
                    mean = var = None
                elif mine is not None:  # contiguous views of rows first .. first+head-1: updated in place
                    mean = self.running_mean[first : first + head].view(-1)
                    var = self.running_var[first : first + head].view(-1)
                else:  # eval: copies of the rows, any step past the table reading the last one
                    rows = torch.arange(first, first + head, device=self.running_mean.device)
                    rows = rows.clamp_(max=self.max_steps - 1)
                    mean, var = self.running_mean[rows].view(-1), self.running_var[rows].view(-1)
                y = batch_norm(
                    x[:, :head].reshape(n, head * c),
                    mean,
                    var,
                    self.weight.repeat(head),
                    None if shift is None else shift.repeat(head),
                    training=self.training or mean is None,
                    momentum=0.0 if mine is None else mine[0],
                    eps=self.eps,
                    unbiased_running_var=self.unbiased_running_var,
                    process_group=self.process_group if self.training else None,
                    observer=self.observer,
                )
                parts.append(y.view(n, head, c))
            if head < steps:
                step = self._stepper(first, first + steps, bias, mine)
                rest = x[:, head:].unbind(1)
                parts.append(torch.stack([step(x_t.contiguous(), head + t) for t, x_t in enumerate(rest)], 1))
            return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

        return normalize

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_steps={self.max_steps}, affine_bias={self.bias is not None}, "
            f"eps={self.eps}, momentum={self.momentum}, track_running_stats={self.track_running_stats}, "
            f"unbiased_running_var={self.unbiased_running_var}"
        )


def _gate_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """(c_t, sigmoid(o)) from the pre-activations (N, 4H), in the order i, f, g, o, and c_{t-1} (N, H)."""
    i, f, g, o = gates.chunk(4, 1)
    c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
    return c, torch.sigmoid(o)


def _chunk_steps(batch: int, features: int, itemsize: int) -> int:
    """How many steps of the input path to project and normalize at once: about 1 MiB of (N, k, 4H).

    One call for several steps saves per-call overhead (in the BN most of all); a chunk that
    stays in cache keeps the saving. On the 2-core machine of docs/recurrent.md the whole
    784-step sequence in one call (125 MB at batch 100, hidden 100) was far slower than step by
    step, and chunks of a few steps faster than either.
    """
    return max(1, _CHUNK_BYTES // (batch * features * itemsize))


class BNLSTMCell(nn.Module):
    """One step of the batch-normalized LSTM; ``bn=False``: the plain LSTM, same ops, same initialisation.

    Parameters: ``weight_ih`` (4H, input_size), ``weight_hh`` (4H, H) and the shared gate bias
    ``bias`` (4H,), as ``nn.LSTMCell``'s (whose ``bias_ih + bias_hh`` is ``bias``). With ``bn=True``
    three ``SequenceBatchNorm`` sites: ``bn_ih`` and ``bn_hh`` (4H features, gamma only) and ``bn_c``
    (H features, gamma and beta).

    Initialisation (the paper's sequential-MNIST setup): ``weight_hh`` has an identity in each of
    its four gate blocks, ``weight_ih`` is orthogonal, every gamma is ``gamma_init`` (0.1), beta is
    0, and ``bias`` is 0 except the forget gate's, ``forget_bias`` (1, as in the authors' code: the
    cell starts out keeping its memory, which a 784-step sequence needs).

    ``h0_noise_std``: with no initial state given, h_0 is zero plus, in training only, Gaussian
    noise of this std (the paper uses 0.1 on sequential MNIST). Without it W_h h_0 is the same for
    every sample and so is everything up to the first non-black pixel: a zero variance, which
    batch norm turns into exploding gradients. In eval mode h_0 is zero, the noise's mean, so an
    output does not depend on chance or on the rest of the batch. c_0 is always zero.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        max_steps: int,
        bn: bool = True,
        gamma_init: float = GAMMA_INIT,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        unbiased_running_var: bool = True,
        forget_bias: float = 1.0,
        h0_noise_std: float = 0.0,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be positive, got {input_size} and {hidden_size}")
        if h0_noise_std < 0:
            raise ValueError(f"h0_noise_std must be >= 0, got {h0_noise_std}")
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.max_steps = max_steps
        self.bn = bn
        self.forget_bias = forget_bias
        self.h0_noise_std = h0_noise_std
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        self.bn_ih: SequenceBatchNorm | None = None
        self.bn_hh: SequenceBatchNorm | None = None
        self.bn_c: SequenceBatchNorm | None = None
        if bn:
            options: dict[str, Any] = dict(
                gamma_init=gamma_init,
                eps=eps,
                momentum=momentum,
                unbiased_running_var=unbiased_running_var,
                process_group=process_group,
                **factory,
            )
            self.bn_ih = SequenceBatchNorm(4 * hidden_size, max_steps, affine_bias=False, **options)
            self.bn_hh = SequenceBatchNorm(4 * hidden_size, max_steps, affine_bias=False, **options)
            self.bn_c = SequenceBatchNorm(hidden_size, max_steps, affine_bias=True, **options)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation (see the class docstring); BN sites back to gamma_init and fresh statistics."""
        h = self.hidden_size
        with torch.no_grad():
            nn.init.orthogonal_(self.weight_ih)
            eye = torch.eye(h, dtype=self.weight_hh.dtype, device=self.weight_hh.device)
            self.weight_hh.copy_(eye.repeat(4, 1))
            self.bias.zero_()
            self.bias[h : 2 * h] = self.forget_bias
        for site in (self.bn_ih, self.bn_hh, self.bn_c):
            if site is not None:
                site.reset_parameters()

    def initial_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """(h_0, c_0), each (batch_size, H): zeros, plus h_0 noise in training if ``h0_noise_std``."""
        factory = {"device": self.weight_hh.device, "dtype": self.weight_hh.dtype}
        c = torch.zeros(batch_size, self.hidden_size, **factory)
        if self.training and self.h0_noise_std > 0:
            return torch.randn(batch_size, self.hidden_size, **factory).mul_(self.h0_noise_std), c
        return torch.zeros(batch_size, self.hidden_size, **factory), c

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None, step: int = 0) -> tuple[Tensor, Tensor]:
        """x (N, input_size) at time step ``step`` (0-based), state (h, c) each (N, H) -> (h_t, c_t).

        ``step`` picks the row of running statistics (the last row from ``max_steps - 1`` on); the
        caller counts the steps. With ``hx=None`` the state starts as ``initial_state``.
        """
        if x.dim() != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"{type(self).__name__} expects x of shape (N, {self.input_size}), got {tuple(x.shape)}")
        self._check_batch(x.shape[0])
        h, c = self.initial_state(x.shape[0]) if hx is None else hx
        if self.bn_ih is None or self.bn_hh is None or self.bn_c is None:
            gates = torch.addmm(torch.addmm(self.bias, x, self.weight_ih.t()), h, self.weight_hh.t())
            c, o = _gate_update(gates, c)
            return o * torch.tanh(c), c
        xw = self.bn_ih(torch.mm(x, self.weight_ih.t()), step, bias=self.bias)
        c, o = _gate_update(self.bn_hh(torch.mm(h, self.weight_hh.t()), step) + xw, c)
        return o * torch.tanh(self.bn_c(c, step)), c

    def _check_batch(self, n: int) -> None:
        if self.bn and self.training and n < 2:
            raise UsageError(
                f"{type(self).__name__} with bn=True normalizes each step over the batch, so training needs at "
                f"least 2 sequences per batch (got {n}). Batch two or more sequences together, or call "
                ".eval() to normalize with the population statistics."
            )

    def _sequence(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Steps 0 .. T-1 over x (T, N, input_size) from (h, c) -> ([h_1 .. h_T], h_T, c_T).

        The input path, which does not depend on h, is projected (and normalized) a chunk of
        steps at a time, in one matmul (and one batch_norm) per chunk; the loop holds only what
        depends on h. Chunks rather than the whole sequence: see ``_chunk_steps``.
        """
        steps, n = x.shape[0], x.shape[1]
        w_ih, w_hh = self.weight_ih.t(), self.weight_hh.t()
        chunk = _chunk_steps(n, 4 * self.hidden_size, x.element_size())
        outputs = []
        if self.bn_ih is None or self.bn_hh is None or self.bn_c is None:
            for first in range(0, steps, chunk):
                for x_t in nn.functional.linear(x[first : first + chunk], self.weight_ih, self.bias).unbind(0):
                    c, o = _gate_update(torch.addmm(x_t, h, w_hh), c)
                    h = o * torch.tanh(c)
                    outputs.append(h)
            return outputs, h, c
        norm_x = self.bn_ih._chunker(0, steps, self.bias)
        norm_h, norm_c = self.bn_hh._stepper(0, steps), self.bn_c._stepper(0, steps)
        for first in range(0, steps, chunk):
            xw = torch.matmul(x[first : first + chunk].transpose(0, 1), w_ih)  # (N, k, 4H)
            for t, x_t in enumerate(norm_x(xw, first).unbind(1), first):
                c, o = _gate_update(norm_h(torch.mm(h, w_hh), t) + x_t, c)
                h = o * torch.tanh(norm_c(c, t))
                outputs.append(h)
        return outputs, h, c

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, max_steps={self.max_steps}, bn={self.bn}, "
            f"forget_bias={self.forget_bias}, h0_noise_std={self.h0_noise_std}"
        )


class BNLSTM(nn.Module):
    """A multi-layer batch-normalized LSTM with ``nn.LSTM``'s interface: ``forward(x, hx=None)``.

    x: (T, N, input_size), or (N, T, input_size) with ``batch_first``. Returns ``(output, (h_n, c_n))``:
    output (T, N, H) (or (N, T, H)), the last layer's h_t for every t; h_n, c_n (num_layers, N, H).
    ``hx``: (h_0, c_0), each (num_layers, N, H); ``None``: every layer starts from its
    ``initial_state`` (zeros; h_0 noise in training if ``h0_noise_std``). Layer k's input is layer
    k-1's output sequence. Each call is a sequence starting at step 0; its length may change
    between calls (steps past ``max_steps`` use the last row of statistics).

    ``bn=False`` is the plain LSTM built from the same ops with the same initialisation, so a
    comparison isolates batch norm; ``from_lstm`` copies an ``nn.LSTM``'s weights in.

    Refused: a PackedSequence or a list of sequences of different lengths (each step is normalized
    over the whole batch, so every sequence must be present at every step: batch sequences of equal
    length together), and, with bn=True in training, a batch of one.

    Layers are ``layers[k]``, ``BNLSTMCell``s; keyword options go to every cell (see there).
    Positional arguments are ``nn.LSTM``'s, ``(input_size, hidden_size, num_layers)``; ``max_steps``
    is keyword-only, so ``BNLSTM(28, 100, 2)`` swapped in for ``nn.LSTM(28, 100, 2)`` is refused
    rather than built as one layer with two steps of statistics. ``batch_dim`` says which input
    dimension holds the samples (1 time-major, 0 with ``batch_first``), for ``bnlab.recalibrate``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        max_steps: int,
        batch_first: bool = False,
        bn: bool = True,
        gamma_init: float = GAMMA_INIT,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        unbiased_running_var: bool = True,
        forget_bias: float = 1.0,
        h0_noise_std: float = 0.0,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.max_steps = max_steps
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.bn = bn
        options: dict[str, Any] = dict(
            bn=bn,
            gamma_init=gamma_init,
            eps=eps,
            momentum=momentum,
            unbiased_running_var=unbiased_running_var,
            forget_bias=forget_bias,
            h0_noise_std=h0_noise_std,
            process_group=process_group,
            device=device,
            dtype=dtype,
        )
        self.layers = nn.ModuleList(
            BNLSTMCell(input_size if k == 0 else hidden_size, hidden_size, max_steps=max_steps, **options)
            for k in range(num_layers)
        )

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, max_steps: int, *, bn: bool = False, **options: Any) -> BNLSTM:
        """A BNLSTM with ``lstm``'s sizes, layout, device, dtype and weights (bias = bias_ih + bias_hh).

        With ``bn=False`` it computes what ``lstm`` computes, to float rounding. Bidirectional
        LSTMs, projections (``proj_size``) and dropout have no counterpart here and are refused.
        """
        if lstm.bidirectional or lstm.proj_size or lstm.dropout:
            raise UsageError("BNLSTM.from_lstm: bidirectional LSTMs, proj_size and dropout are not supported")
        first = lstm.weight_ih_l0
        model = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            max_steps=max_steps,
            batch_first=lstm.batch_first,
            bn=bn,
            device=first.device,
            dtype=first.dtype,
            **options,
        )
        with torch.no_grad():
            for k, cell in enumerate(model.layers):
                cell.weight_ih.copy_(getattr(lstm, f"weight_ih_l{k}"))
                cell.weight_hh.copy_(getattr(lstm, f"weight_hh_l{k}"))
                if lstm.bias:
                    torch.add(getattr(lstm, f"bias_ih_l{k}"), getattr(lstm, f"bias_hh_l{k}"), out=cell.bias)
                else:
                    cell.bias.zero_()
        return model

    @property
    def batch_dim(self) -> int:
        return 0 if self.batch_first else 1

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (T, N, input_size) (or (N, T, input_size)) -> (output, (h_n, c_n)), as ``nn.LSTM``."""
        seq = self._time_major(x)  # (T, N, input_size)
        n = seq.shape[1]
        if hx is not None:
            shape = (self.num_layers, n, self.hidden_size)
            if len(hx) != 2 or any(t.shape != shape for t in hx):
                got = [tuple(t.shape) for t in hx]
                raise ValueError(f"{type(self).__name__}: hx must be (h_0, c_0), each of shape {shape}; got {got}")
        h_n, c_n = [], []
        for k, cell in enumerate(self.layers):
            cell._check_batch(n)
            h, c = cell.initial_state(n) if hx is None else (hx[0][k], hx[1][k])
            outputs, h, c = cell._sequence(seq, h, c)
            last = k == self.num_layers - 1
            seq = torch.stack(outputs, 1 if last and self.batch_first else 0)
            h_n.append(h)
            c_n.append(c)
        return seq, (torch.stack(h_n), torch.stack(c_n))

    def _time_major(self, x: Tensor) -> Tensor:
        if isinstance(x, (PackedSequence, list, tuple)):
            raise UsageError(
                f"{type(self).__name__} takes one tensor of equal-length sequences, not "
                f"{'a PackedSequence' if isinstance(x, PackedSequence) else 'a list of sequences'}: each time step "
                "is normalized with the statistics of the whole batch, so every sequence must be present at every "
                "step. Batch sequences of the same length together (the length may change from batch to batch)."
            )
        layout = "(N, T, input_size)" if self.batch_first else "(T, N, input_size)"
        if x.dim() != 3 or x.shape[2] != self.input_size or 0 in x.shape[:2]:
            raise ValueError(
                f"{type(self).__name__} expects x of shape {layout} with input_size = {self.input_size} and "
                f"N, T >= 1, got {tuple(x.shape)}"
            )
        return x.transpose(0, 1) if self.batch_first else x

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, max_steps={self.max_steps}, num_layers={self.num_layers}, "
            f"batch_first={self.batch_first}, bn={self.bn}"
        )
