"""Hierarchical group lasso (HGL) over nested tail groups of the factors' columns.

The groups of a factor C with r columns are G_b = C[:, b:] for b = 1..r (nested: G_1 > ... > G_r).
Penalty: sum_i sum_b ||U^i_{:,b:}||_F + ||V^i_{:,b:}||_F, computed from reverse cumulative sums of
the squared column norms, O(parameters).

The penalty is evaluated in every training step, so it is one autograd Function over all factors
of the model with an analytic gradient: d/dC_j sum_b ||C_{:,b:}|| = C_j sum_{b <= j} 1/||C_{:,b:}||.
A handful of kernels for the whole model instead of ~10 per factor forward and backward (on a
LeNet-5 step the per-kernel overhead, not the arithmetic, is the cost).

A federated client holds a prefix of the global factors. Its groups are the global ones, G_b = C[:, b:]
over all of the global model's columns, so the server sends the squared norm of the columns beyond the
client's cap (``tails``): without it, a client's last columns would form small groups of their own and
be pushed to zero harder than the global penalty pushes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .factorize import layers

__all__ = ["hgl_penalty", "hgl_proximal_step"]


@lru_cache(maxsize=64)
def _padded_index(ranks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Positions of the concatenated rows of all factors in a (factors, max rank) zero-padded grid."""
    width = max(ranks)
    return torch.cat([torch.arange(r) + i * width for i, r in enumerate(ranks)]).to(device)


_ROW_DIMS = {n: tuple(range(1, n)) for n in range(2, 9)}  # every axis but the rank axis


class _HGLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, beyond_sq, *factors):
        ranks = tuple(f.shape[0] for f in factors)
        norms = torch.cat([torch.linalg.vector_norm(f, dim=_ROW_DIMS[f.ndim]) for f in factors])  # (sum r,)
        index = _padded_index(ranks, norms.device)
        grid = norms.new_zeros(len(ranks) * max(ranks))  # (factors, max rank); padding adds 0 to every tail
        grid.index_copy_(0, index, norms.square())
        tail_sq = grid.view(len(ranks), -1).flip(1).cumsum(1).flip(1)  # tail_sq[f, b] = ||C_f[b:]||^2
        if beyond_sq is not None:  # with the squared norm of the columns beyond the factor's own
            tail_sq.add_(beyond_sq.to(grid).unsqueeze(1))
        ctx.save_for_backward(tail_sq, index, *factors)
        # the padding's groups are 0 unless the tails lifted them: then only the factors' groups are summed
        groups = tail_sq if beyond_sq is None else tail_sq.view(-1).index_select(0, index)
        return groups.sqrt().sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        tail_sq, index, *factors = ctx.saved_tensors
        # 1 / ||C_f[b:]||; sqrt has an infinite slope at 0, and a group that is exactly zero gets
        # subgradient 0 (its rows are zero, so the product below is 0 either way: this avoids 0 * inf).
        inv = tail_sq.rsqrt().nan_to_num_(posinf=0.0)
        scale = inv.cumsum_(1).mul_(grad).view(-1).index_select(0, index)  # (sum r,)
        # scale[j] = grad * sum_{b <= j} 1 / ||C_f[b:]|| for row j of factor f; as columns per factor
        ranks = [f.shape[0] for f in factors]
        columns = {n: scale.view(-1, *([1] * (n - 1))).split(ranks) for n in {f.ndim for f in factors}}
        grads = torch._foreach_mul(factors, [columns[f.ndim][i] for i, f in enumerate(factors)])
        return (None,) + tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:]))


def hgl_penalty(model: nn.Module, tails: Mapping[str, tuple[float, float]] | None = None) -> torch.Tensor:
    """sum over LoD layers and b of ||U_{:,b:}||_F + ||V_{:,b:}||_F (a scalar tensor).

    ``tails``: LoD layer name -> (||U's columns beyond the layer's rank||^2, the same for V), the columns
    of a larger model this one is a prefix of (a federated client's caps); they add to every group's
    norm and are constants here: the penalty sums the groups that start within this model's columns,
    each over the larger model's columns. Layers not named have no columns beyond their own.
    """
    named = layers(model)
    held = [(name, layer) for name, layer in named if layer.rank > 0]
    beyond_sq = None  # no columns beyond (every tail 0, a centralized run's or a client's that holds it all)
    if tails:
        unknown = sorted(set(tails) - {name for name, _ in named})
        if unknown:
            raise ValueError(f"hgl_penalty: tails name {unknown}, which are not LoD layers of the model; its LoD "
                             f"layers are {[name for name, _ in named]}")
        beyond = [float(sq) for name, _ in held for sq in tails.get(name, (0.0, 0.0))]
        if not all(math.isfinite(sq) and sq >= 0 for sq in beyond):
            raise ValueError(f"hgl_penalty: tails must be finite squared norms >= 0, got {dict(tails)}")
        if any(beyond):
            beyond_sq = torch.tensor(beyond, dtype=torch.float64)
    if not held:
        return torch.zeros(())
    return _HGLPenalty.apply(beyond_sq, *(f for _, layer in held for f in (layer.u, layer.v)))


@torch.no_grad()
def _prox_factor(rows: torch.Tensor, threshold: float) -> None:
    """Exact proximal operator of threshold * sum_b ||rows[b:]||_F, in place.

    For nested groups the prox is the composition of group soft-thresholds from the smallest group
    to the largest (Jenatton et al., 2011). Scaling group G_b scales every row j >= b, so row j ends
    up multiplied by prod_{b <= j} s_b; the norm of G_b when it is processed is
    N_b = sqrt(c_b^2 + s_{b+1}^2 N_{b+1}^2), with c_b the norm of row b.
    """
    rank = rows.shape[0]
    if rank == 0:
        return
    col_sq = rows.reshape(rank, -1).double().square().sum(dim=1).tolist()
    scale = [0.0] * rank
    tail_sq, next_scale = 0.0, 1.0
    for b in range(rank - 1, -1, -1):
        tail_sq = col_sq[b] + next_scale * next_scale * tail_sq
        norm = tail_sq ** 0.5
        s = max(0.0, 1.0 - threshold / norm) if norm > 0 else 0.0
        scale[b] = next_scale = s
    factors = torch.tensor(scale, dtype=torch.float64).cumprod(0).to(rows.dtype).to(rows.device)
    rows.mul_(factors.view(rank, *([1] * (rows.ndim - 1))))


def hgl_proximal_step(model: nn.Module, threshold: float) -> None:
    """Apply the exact HGL proximal operator (threshold = lr * lambda) to every LoD factor, in place."""
    if threshold <= 0:
        return
    for _, layer in layers(model):
        _prox_factor(layer.u.data, threshold)
        _prox_factor(layer.v.data, threshold)

