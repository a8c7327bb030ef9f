"""vmap rules for bnlab's operators: M independent batch norms computed as one, by the same operator.

Under ``torch.vmap`` an input of shape (M, N, C, *) (the vmapped dimension anywhere) holds M independent
problems, each with its own weight, bias and running statistics. Merged as (N, M * C, *), feature
``m * C + c`` is member m's feature c, and batch statistics per feature are per member and feature: one
call of the *same* operator, with weight, bias and running statistics viewed as (M * C,), computes
every member's batch norm, forward and backward, on the kernels or the tensor ops (``statistics.py``).
No second copy of the maths; what the rule adds is one copy of x into the merged layout and one of the
output back.

The running statistics of a vmapped training call must be vmapped too (stacked buffers, as
``torch.func.stack_module_state`` gives them): the batch statistics differ per member, so one unbatched
buffer cannot follow them all. PyTorch's rule for its own batch norm refuses that case too; this one
says which fix applies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.nn import ops

__all__ = ["merge_members", "split_members"]


def merge_members(x: Tensor, dim: int | None, members: int) -> Tensor:
    """x with the members' dimension folded into the features: (N, M * C, *)."""
    x = x.unsqueeze(0).expand(members, *x.shape) if dim is None else x.movedim(dim, 0)
    members_first = x.movedim(0, 1)  # (N, M, C, *)
    return members_first.reshape(x.shape[1], members * x.shape[2], *x.shape[3:])


def split_members(y: Tensor, members: int) -> Tensor:
    """The merged (N, M * C, *) output as (N, M, C, *): members along dimension 1."""
    return y.view(y.shape[0], members, y.shape[1] // members, *y.shape[2:])


def _per_feature(t: Tensor | None, dim: int | None, members: int) -> Tensor | None:
    """A per-feature tensor as (M * C,): each member's own, or one shared by all."""
    if t is None:
        return None
    return t.repeat(members) if dim is None else t.movedim(dim, 0).reshape(-1)


def _running(t: Tensor | None, dim: int | None) -> tuple[Tensor | None, Tensor | None]:
    """(the buffer as (M * C,), the stacked buffer to copy it back into when that is not a view of it)."""
    if t is None:
        return None, None
    if dim is None:
        raise RuntimeError(
            "vmap of bnlab's batch norm in training: the running statistics are not vmapped, but the batch "
            "statistics differ per member. Stack them too (torch.func.stack_module_state), or use "
            "track_running_stats=False"
        )
    stacked = t.movedim(dim, 0)
    if stacked.is_contiguous():
        return stacked.view(-1), None
    return stacked.reshape(-1), stacked


@torch.library.register_vmap("bnlab::batch_norm_train")
def _train(info, in_dims, x, weight, bias, running_mean, running_var, momentum, eps, unbiased, relu):
    x_dim, w_dim, b_dim, mean_dim, var_dim = in_dims[:5]
    m = info.batch_size
    mean, mean_back = _running(running_mean, mean_dim)
    var, var_back = _running(running_var, var_dim)
    merged = merge_members(x, x_dim, m)
    y, stats = ops.batch_norm_train(
        merged, _per_feature(weight, w_dim, m), _per_feature(bias, b_dim, m), mean, var, momentum, eps, unbiased, relu
    )
    for back, flat in ((mean_back, mean), (var_back, var)):
        if back is not None:
            back.copy_(flat.view(back.shape))
    return (split_members(y, m), stats.view(3, m, -1)), (1, 1)


@torch.library.register_vmap("bnlab::batch_norm_eval")
def _eval(info, in_dims, x, weight, bias, mean, var, eps, relu):
    x_dim, w_dim, b_dim, mean_dim, var_dim = in_dims[:5]
    m = info.batch_size
    y = ops.batch_norm_eval(
        merge_members(x, x_dim, m),
        _per_feature(weight, w_dim, m),
        _per_feature(bias, b_dim, m),
        _per_feature(mean, mean_dim, m),
        _per_feature(var, var_dim, m),
        eps,
        relu,
    )
    return split_members(y, m), 1


@torch.library.register_vmap("bnlab::batch_norm_backward")
def _backward(info, in_dims, x, weight, stats, dy, y):
    x_dim, w_dim, stats_dim, dy_dim, y_dim = in_dims
    m = info.batch_size
    # stats (3, C) per member -> (3, M * C): members' features side by side, as in the merged input
    merged_stats = stats.unsqueeze(0).expand(m, *stats.shape) if stats_dim is None else stats.movedim(stats_dim, 0)
    merged_stats = merged_stats.movedim(0, 1).reshape(3, -1)
    dx, dweight, dbias = ops.batch_norm_backward(
        merge_members(x, x_dim, m),
        _per_feature(weight, w_dim, m),
        merged_stats,
        merge_members(dy, dy_dim, m),
        None if y is None else merge_members(y, y_dim, m),
    )
    return (split_members(dx, m), dweight.view(m, -1), dbias.view(m, -1)), (1, 0, 0)
