"""The BN-LSTM layers: per-step statistics, the paper's equations and initialisation, nn.LSTM's interface."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import bnlab
from bnlab.errors import UsageError
from bnlab.nn import recurrent
from bnlab.nn.recurrent import BNLSTM, BNLSTMCell, SequenceBatchNorm

FAST = settings(max_examples=12, deadline=None)


def _trained(model: nn.Module, x: torch.Tensor, batches: int = 3) -> nn.Module:
    """model after a few training-mode passes on shifted inputs: running statistics away from their start."""
    model.train()
    with torch.no_grad():
        for k in range(batches):
            model(x * (1 + 0.5 * k) + 0.1 * k)
    return model


# ---- SequenceBatchNorm: statistics per time step ----


def test_steps_keep_separate_statistics_and_steps_past_max_share_the_last_row():
    site = SequenceBatchNorm(2, max_steps=3, momentum=1.0)  # momentum 1: a row holds the last batch's statistics
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 2, generator=g) + torch.arange(5.0).view(1, 5, 1) * 10  # step t has mean 10 t
    site(x[:, 0], 0)
    site(x[:, 1], 1)
    for t in (2, 3, 4):  # past max_steps: all update row 2, in turn
        site(x[:, t], t)
    torch.testing.assert_close(site.running_mean, x[:, [0, 1, 4]].mean(0))
    torch.testing.assert_close(site.running_var, x[:, [0, 1, 4]].var(0))
    assert site.num_batches_tracked.tolist() == [1, 1, 3]
    assert site.running_mean.shape == site.running_var.shape == (3, 2)

    site.eval()  # steps 2, 4 and 9 all normalize with row 2
    y = torch.stack([site(x[:, t], step) for t, step in ((1, 1), (2, 2), (4, 4), (4, 9))], 1)
    row = (x[:, [1, 2, 4, 4]] - site.running_mean[[1, 2, 2, 2]]) / (site.running_var[[1, 2, 2, 2]] + site.eps).sqrt()
    torch.testing.assert_close(y, row * 0.1)


@FAST
@given(
    steps=st.integers(1, 7),
    max_steps=st.integers(1, 5),
    first_step=st.integers(0, 6),
    earlier=st.integers(0, 6),
    momentum=st.sampled_from([0.1, 1.0, None]),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_steps_is_forward_step_by_step(steps, max_steps, first_step, earlier, momentum, training, seed):
    """The all-steps path (one batch_norm call where it can) = one call per step, outputs and tables."""
    g = torch.Generator().manual_seed(seed)
    one = SequenceBatchNorm(3, max_steps, affine_bias=False, momentum=momentum, dtype=torch.float64)
    if earlier:  # an earlier pass of another length: rows counted differently (momentum None: per-row momenta)
        one.forward_steps(torch.randn(4, earlier, 3, generator=g, dtype=torch.float64))
    other = copy.deepcopy(one)
    one.train(training)
    other.train(training)
    x = torch.randn(4, steps, 3, generator=g, dtype=torch.float64) * 3 + 1
    bias = torch.randn(3, generator=g, dtype=torch.float64)  # the gates' shared bias, passed in as BNLSTMCell does
    y = one.forward_steps(x, first_step, bias=bias)
    expected = torch.stack([other(x[:, t], first_step + t, bias=bias) for t in range(steps)], 1)
    torch.testing.assert_close(y, expected)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(one.state_dict()[key], value, msg=key)


def test_cumulative_average_per_row_with_momentum_none():
    site = SequenceBatchNorm(2, max_steps=2, momentum=None)
    batches = [torch.randn(8, 3, 2) + k for k in range(3)]
    for x in batches:
        site.forward_steps(x)
    torch.testing.assert_close(site.running_mean[0], torch.stack([x[:, 0].mean(0) for x in batches]).mean(0))
    # row 1 averages steps 1 and 2 of every batch: six updates, each weighing the same
    torch.testing.assert_close(site.running_mean[1], torch.cat([x[:, 1:].mean(0) for x in batches]).mean(0))
    assert site.num_batches_tracked.tolist() == [3, 6]


def test_reset_and_layer_attributes():
    site = SequenceBatchNorm(4, 3, affine_bias=False, eps=1e-3, momentum=0.2)
    site.forward_steps(torch.randn(5, 3, 4))
    assert (site.eps, site.momentum, site.track_running_stats, site.unbiased_running_var) == (1e-3, 0.2, True, True)
    assert site.process_group is None and site.bias is None
    site.reset_parameters()
    assert (site.running_mean == 0).all() and (site.running_var == 1).all() and (site.num_batches_tracked == 0).all()
    assert (site.weight == 0.1).all()
    with pytest.raises(ValueError, match="has a bias of its own"):
        SequenceBatchNorm(4, 3)(torch.randn(5, 4), 0, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="count from 0"):
        site(torch.randn(5, 4), -1)
    with pytest.raises(ValueError, match=r"expects input \(N, T, C\)"):
        site.forward_steps(torch.randn(5, 0, 4))


def test_without_running_stats_batch_statistics_always():
    site = SequenceBatchNorm(3, 2, track_running_stats=False).eval()
    x = torch.randn(6, 4, 3)
    assert site.running_mean is None
    expected = (x - x.mean(0)) / (x.var(0, unbiased=False) + site.eps).sqrt() * 0.1
    torch.testing.assert_close(site.forward_steps(x), expected)


# ---- the BN-LSTM ----


def test_layout_and_initialisation():
    cell = BNLSTMCell(3, 4, max_steps=6)
    h = 4
    for block in cell.weight_hh.detach().split(h):
        torch.testing.assert_close(block, torch.eye(h))
    w = cell.weight_ih.detach()
    torch.testing.assert_close(w.T @ w, torch.eye(3))  # orthogonal columns
    assert cell.bias.tolist() == [0.0] * h + [1.0] * h + [0.0] * 2 * h  # i, f, g, o: forget gate 1
    for site in (cell.bn_ih, cell.bn_hh, cell.bn_c):
        assert (site.weight == 0.1).all()
    assert cell.bn_ih.bias is None and cell.bn_hh.bias is None and (cell.bn_c.bias == 0).all()

    torch.manual_seed(0)
    with_bn = BNLSTM(3, 4, max_steps=6, num_layers=2)
    torch.manual_seed(0)
    plain = BNLSTM(3, 4, max_steps=6, num_layers=2, bn=False)  # same initialisation, no BN sites
    assert {k: v for k, v in with_bn.named_parameters() if "bn_" not in k}.keys() == dict(
        plain.named_parameters()
    ).keys()
    for name, value in plain.named_parameters():
        torch.testing.assert_close(value, with_bn.get_parameter(name))


def test_state_dict_layout_and_round_trip():
    model = BNLSTM(2, 3, max_steps=5)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "layers.0.weight_ih": (12, 2),
        "layers.0.weight_hh": (12, 3),
        "layers.0.bias": (12,),
        "layers.0.bn_ih.weight": (12,),
        "layers.0.bn_ih.running_mean": (5, 12),
        "layers.0.bn_ih.running_var": (5, 12),
        "layers.0.bn_ih.num_batches_tracked": (5,),
        "layers.0.bn_hh.weight": (12,),
        "layers.0.bn_hh.running_mean": (5, 12),
        "layers.0.bn_hh.running_var": (5, 12),
        "layers.0.bn_hh.num_batches_tracked": (5,),
        "layers.0.bn_c.weight": (3,),
        "layers.0.bn_c.bias": (3,),
        "layers.0.bn_c.running_mean": (5, 3),
        "layers.0.bn_c.running_var": (5, 3),
        "layers.0.bn_c.num_batches_tracked": (5,),
    }
    assert list(BNLSTM(2, 3, max_steps=5, bn=False).state_dict()) == [
        "layers.0.weight_ih",
        "layers.0.weight_hh",
        "layers.0.bias",
    ]

    x = torch.randn(7, 4, 2)
    _trained(model, x).eval()
    restored = BNLSTM(2, 3, max_steps=5)
    restored.load_state_dict(model.state_dict())
    restored.eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)
    torch.testing.assert_close(restored(x)[0], model(x)[0])


@FAST
@given(
    num_layers=st.integers(1, 3),
    batch_first=st.booleans(),
    steps=st.integers(1, 6),
    batch=st.integers(1, 4),
    sizes=st.tuples(st.integers(1, 4), st.integers(1, 5)),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_without_bn_it_is_nn_lstm(num_layers, batch_first, steps, batch, sizes, with_state, seed):
    torch.manual_seed(seed)
    input_size, hidden = sizes
    lstm = nn.LSTM(input_size, hidden, num_layers, batch_first=batch_first, dtype=torch.float64)
    ours = BNLSTM.from_lstm(lstm, max_steps=4)
    assert not ours.bn and ours.batch_first == batch_first
    shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(num_layers, batch, hidden, dtype=torch.float64) for _ in range(2)) if with_state else None
    expected, (h_n, c_n) = lstm(x, hx)
    (dx,) = torch.autograd.grad(expected.sum(), x)
    got, (h, c) = ours(x, hx)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(h, h_n)
    torch.testing.assert_close(c, c_n)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], dx)


def test_cell_without_bn_is_nn_lstm_cell():
    torch.manual_seed(0)
    ref = nn.LSTMCell(3, 5)
    cell = BNLSTMCell(3, 5, max_steps=2, bn=False)
    with torch.no_grad():
        cell.weight_ih.copy_(ref.weight_ih)
        cell.weight_hh.copy_(ref.weight_hh)
        cell.bias.copy_(ref.bias_ih + ref.bias_hh)
    x, h, c = torch.randn(4, 3), torch.randn(4, 5), torch.randn(4, 5)
    for got, expected in zip(cell(x, (h, c), step=0), ref(x, (h, c)), strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 5 * 12 * 4, 1 << 20])  # chunks of 1, 4 and all steps
def test_the_cell_step_by_step_is_the_sequence_layer(monkeypatch, chunk_bytes):
    """BNLSTM's loop (input path in chunks, rows settled once) computes what the cell computes step by step."""
    monkeypatch.setattr(recurrent, "_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    model = BNLSTM(2, 3, max_steps=5, momentum=0.3)
    cell = copy.deepcopy(model.layers[0])
    x = torch.randn(7, 5, 2)  # 7 steps > max_steps
    h, c = torch.randn(5, 3), torch.randn(5, 3)
    output, (h_n, c_n) = model(x, (h[None], c[None]))
    outputs = []
    for t in range(7):
        h, c = cell(x[t], (h, c), step=t)
        outputs.append(h)
    torch.testing.assert_close(output, torch.stack(outputs))
    torch.testing.assert_close((h_n[0], c_n[0]), (h, c))
    for key, value in cell.state_dict().items():
        torch.testing.assert_close(model.layers[0].state_dict()[key], value, msg=key)


def test_cell_follows_the_papers_equations():
    torch.manual_seed(0)
    cell = BNLSTMCell(2, 3, max_steps=3)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x, h, c = torch.randn(6, 2), torch.randn(6, 3), torch.randn(6, 3)

    def bn(v, gamma, beta=0.0):
        return (v - v.mean(0)) / (v.var(0, unbiased=False) + 1e-5).sqrt() * gamma + beta

    gates = bn(h @ cell.weight_hh.T, cell.bn_hh.weight) + bn(x @ cell.weight_ih.T, cell.bn_ih.weight) + cell.bias
    i, f, g, o = gates.chunk(4, 1)
    c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_t = torch.sigmoid(o) * torch.tanh(bn(c_t, cell.bn_c.weight, cell.bn_c.bias))
    got = cell(x, (h, c), step=1)
    torch.testing.assert_close(got, (h_t, c_t))
    assert cell.bn_hh.num_batches_tracked.tolist() == [0, 1, 0]


def test_gradcheck_bn_training_float64():
    torch.manual_seed(0)
    model = BNLSTM(2, 2, max_steps=2, num_layers=2, dtype=torch.float64)  # 3 steps: one past max_steps
    names, values = zip(*[(k, v.detach().clone().requires_grad_()) for k, v in model.named_parameters()], strict=True)
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def run(x, h0, c0, *params):
        output, (h, c) = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x, (h0, c0)))
        return output, h, c

    assert model.training
    assert torch.autograd.gradcheck(run, (x, h0, c0, *values), fast_mode=True)  # random directions: 2 layers stay fast

    cell = BNLSTMCell(2, 2, max_steps=2, dtype=torch.float64)
    state = tuple(torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, h, c: cell(x, (h, c), step=1), (x[0], *state))


def test_eval_output_of_a_sequence_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    model = BNLSTM(2, 4, max_steps=5, num_layers=2, h0_noise_std=0.1)
    x = torch.randn(8, 6, 2)  # 8 steps > max_steps: the last rows serve steps 4..7
    _trained(model, x).eval()
    with torch.no_grad():
        together, (h_n, c_n) = model(x)
        for k in range(6):
            alone, (h, c) = model(x[:, k : k + 1])
            torch.testing.assert_close(alone[:, 0], together[:, k])
            torch.testing.assert_close((h[:, 0], c[:, 0]), (h_n[:, k], c_n[:, k]))
        torch.testing.assert_close(model(x)[0], together)  # eval: no h0 noise, no state change


def test_h0_noise_only_in_training():
    model = BNLSTM(1, 3, max_steps=4, h0_noise_std=0.1)
    x = torch.randn(4, 5, 1)
    with torch.no_grad():
        assert not torch.equal(model(x)[0], model(x)[0])  # fresh noise each call
        model.eval()
        h, c = model.layers[0].initial_state(5)
        assert (h == 0).all() and (c == 0).all()


def test_sequence_lengths_may_change_between_calls():
    model = BNLSTM(1, 3, max_steps=5, batch_first=True)
    for steps in (3, 7, 5):
        output, (h, _) = model(torch.randn(4, steps, 1))
        assert output.shape == (4, steps, 3) and h.shape == (1, 4, 3)
    assert model.layers[0].bn_hh.num_batches_tracked.tolist() == [3, 3, 3, 2, 4]
    model.eval()
    assert model(torch.randn(2, 9, 1))[0].shape == (2, 9, 3)


def test_packed_sequences_and_lists_are_refused():
    model = BNLSTM(1, 3, max_steps=5)
    packed = pack_sequence([torch.randn(4, 1), torch.randn(2, 1)])
    with pytest.raises(UsageError, match=r"not a PackedSequence.*same length"):
        model(packed)
    with pytest.raises(UsageError, match="not a list of sequences"):
        model([torch.randn(4, 1), torch.randn(2, 1)])


def test_a_batch_of_one_in_training_is_refused():
    model = BNLSTM(1, 3, max_steps=5)
    with pytest.raises(UsageError, match=r"at least 2 sequences per batch.*\.eval\(\)"):
        model(torch.randn(4, 1, 1))
    with pytest.raises(UsageError, match="at least 2 sequences"):
        model.layers[0](torch.randn(1, 1))
    model.eval()
    assert model(torch.randn(4, 1, 1))[0].shape == (4, 1, 3)
    assert BNLSTM(1, 3, max_steps=5, bn=False)(torch.randn(4, 1, 1))[0].shape == (4, 1, 3)


def test_bad_shapes_are_refused():
    model = BNLSTM(2, 3, max_steps=5)
    with pytest.raises(ValueError, match=r"\(T, N, input_size\)"):
        model(torch.randn(4, 3, 1))
    with pytest.raises(ValueError, match="hx must be"):
        model(torch.randn(4, 3, 2), (torch.zeros(1, 3, 3), torch.zeros(2, 3, 3)))
    with pytest.raises(UsageError, match="bidirectional"):
        BNLSTM.from_lstm(nn.LSTM(2, 3, bidirectional=True), 5)


def test_dtype_and_exports():
    model = bnlab.BNLSTM(2, 3, max_steps=4, num_layers=2, dtype=torch.float64)
    assert {t.dtype for t in model.parameters()} == {torch.float64}
    assert {b.dtype for n, b in model.named_buffers() if "running" in n} == {torch.float64}
    assert {b.dtype for n, b in model.named_buffers() if "num_batches" in n} == {torch.long}
    assert model(torch.randn(3, 2, 2, dtype=torch.float64))[0].dtype == torch.float64
    assert bnlab.BNLSTMCell is BNLSTMCell and bnlab.nn.SequenceBatchNorm is SequenceBatchNorm


def test_process_group_reaches_every_training_batch_norm(monkeypatch):
    seen = []
    real = recurrent.batch_norm

    def recording(*args, process_group=None, **kwargs):
        seen.append(process_group)
        return real(*args, **kwargs)

    monkeypatch.setattr(recurrent, "batch_norm", recording)
    group = object()  # stands for a process group: recorded, not used
    model = BNLSTM(1, 3, max_steps=4, num_layers=2, process_group=group)
    model(torch.randn(6, 4, 1))  # past max_steps: the input path makes per-step calls too
    assert len(seen) == 2 * (1 + 2 + 6 + 6) and all(g is group for g in seen)
    seen.clear()
    model.eval()
    model(torch.randn(6, 4, 1))
    assert seen and all(g is None for g in seen)


def test_a_copy_shares_the_process_group_and_copies_the_rest():
    """precise_copy deep-copies a model trained with --nproc; a process group cannot be copied, only shared."""
    group = threading.Lock()  # stands for a process group: deepcopy of it raises
    for model in (BNLSTM(1, 3, max_steps=4, process_group=group), bnlab.BatchNorm1d(3, process_group=group)):
        copied = copy.deepcopy(model)
        sites = [m for m in copied.modules() if hasattr(m, "process_group") and m.process_group is not None]
        assert sites and all(m.process_group is group for m in sites)
        originals = dict(model.named_buffers())
        for name, buffer in copied.named_buffers():
            assert buffer.data_ptr() != originals[name].data_ptr()
            torch.testing.assert_close(buffer, originals[name])


def test_nn_lstm_positional_arguments_cannot_build_the_wrong_layer():
    """nn.LSTM(28, 100, 2) is two layers; the same call must not become one layer with two steps of statistics."""
    with pytest.raises(TypeError, match="max_steps"):
        BNLSTM(28, 100, 2)
    with pytest.raises(TypeError, match="positional argument"):
        BNLSTMCell(28, 100, True)  # nn.LSTMCell's third positional argument is bias
    model = BNLSTM(28, 100, 2, max_steps=28)
    assert model.num_layers == 2 and model.max_steps == 28 and model.batch_dim == 1
    assert BNLSTM(28, 100, max_steps=28, batch_first=True).batch_dim == 0
