"""Hierarchical group lasso (HGL) over nested tail groups of the factors' columns.

The groups of a factor C with r columns are G_b = C[:, b:] for b = 1..r (nested: G_1 > ... > G_r).
Penalty: sum_i sum_b ||U^i_{:,b:}||_F + ||V^i_{:,b:}||_F, computed from reverse cumulative sums of
the squared column norms, O(parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from .factorize import layers

__all__ = ["hgl_penalty", "tail_norms", "hgl_proximal_step"]


def tail_norms(factor_rows: torch.Tensor) -> torch.Tensor:
    """(rank,) Frobenius norms of the tail groups; ``factor_rows`` has one rank component per row."""
    col_sq = factor_rows.reshape(factor_rows.shape[0], -1).square().sum(dim=1)  # (rank,)
    tail_sq = col_sq.flip(0).cumsum(0).flip(0)  # tail_sq[b] = sum_{j >= b} col_sq[j]
    # sqrt has an infinite slope at 0: groups that are exactly zero get subgradient 0 instead of NaN.
    return tail_sq.clamp_min(torch.finfo(tail_sq.dtype).tiny).sqrt()


def hgl_penalty(model: nn.Module) -> torch.Tensor:
    """sum over LoD layers and b of ||U_{:,b:}||_F + ||V_{:,b:}||_F (a scalar tensor)."""
    terms = [tail_norms(layer.u).sum() + tail_norms(layer.v).sum() for _, layer in layers(model) if layer.rank > 0]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


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

