"""Rank importance, progressive shrinking and truncation: physical cuts of the factors' tails."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .factorize import layers
from .layers import LoDLayer, replace_data

__all__ = ["importance", "shrink", "truncate", "cut_rank", "norm_keeping_scale"]

log = logging.getLogger(__name__)


def _exact_tail_norms(rows: torch.Tensor) -> torch.Tensor:
    col_sq = rows.detach().reshape(rows.shape[0], -1).double().square().sum(dim=1)
    return col_sq.flip(0).cumsum(0).flip(0).sqrt()


def _importance64(layer: LoDLayer) -> torch.Tensor:
    # the groups are the tails U_{:,b:} (eq. 5, Sec. 3.3), not the prefixes U_{:b} that Algorithm 1's
    # shorthand writes: a tail of near-zero columns is what can be cut
    return _exact_tail_norms(layer.u) * _exact_tail_norms(layer.v)


def importance(layer: LoDLayer) -> torch.Tensor:
    """(rank,) ||U_{:,b:}||_F * ||V_{:,b:}||_F for b = 1..rank (non-increasing in b), in the factors' dtype."""
    return _importance64(layer).to(layer.u.dtype)


@torch.no_grad()
def cut_rank(layer: LoDLayer, rank: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep the first ``rank`` columns of U and V; slice gradients and optimizer state alike.

    The Parameter objects are kept (their data shrinks), so the optimizer's param groups stay valid
    and training continues exactly as if the cut columns had never existed. Safe while a graph
    of an earlier step (say the last ``loss``) is alive: see ``layers.replace_data``.
    """
    if not 0 <= rank <= layer.rank:
        raise ValueError(f"cut_rank: rank must be in [0, {layer.rank}] (the layer's current rank), got {rank}")
    if rank == layer.rank:
        return
    for param in (layer.u, layer.v):
        old_shape = param.shape
        replace_data(param, param.data[:rank].clone())
        if param.grad is not None:
            param.grad = param.grad[:rank].clone()
        state = optimizer.state.get(param) if optimizer is not None else None
        for key, value in (state or {}).items():
            if isinstance(value, torch.Tensor) and value.shape == old_shape:
                state[key] = value[:rank].clone()
    if layer.active_rank is not None and layer.active_rank > rank:
        layer.active_rank = None


def shrink(model: nn.Module, eps: float, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Progressive shrinking (Algorithm 1, lines 9-17): r_i = b - 1 at the first b whose importance <= eps.

    Physical: parameters, gradients and optimizer state (SGD momentum, Adam moments) become smaller.
    Returns the new rank of every LoD layer.
    """
    ranks, held = {}, False
    for name, layer in layers(model):
        if layer.rank > 0:
            held = True
            below = torch.nonzero(_importance64(layer) <= eps)  # in float64: float16 would round 1e-8 to 0
            if len(below):
                cut_rank(layer, int(below[0]), optimizer)
        ranks[name] = layer.rank
    if held and not any(ranks.values()):
        log.warning("progressive shrinking cut every LoD layer to rank 0 (eps_ps=%g is above every column's "
                    "importance): the model now computes its biases only; lower train.eps_ps or train.lambda_gl "
                    "(theory.eps_ps or theory.lambda_gl in mode=theory)", eps)
    return ranks


def norm_keeping_scale(norm_before: float, norm_after: float) -> float:
    """The factor by which a cut layer's U and V are both multiplied so that ||U^T V||_F returns from
    ``norm_after`` to ``norm_before``: sqrt(norm_before / norm_after), scaling U and V alike (1 where the cut
    left nothing, ``norm_after`` = 0)."""
    if norm_before < 0 or norm_after < 0:
        raise ValueError(f"norm_keeping_scale: norms must be >= 0, got {norm_before} and {norm_after}")
    return (norm_before / norm_after) ** 0.5 if norm_after > 0 else 1.0


def truncate(model: nn.Module, ranks: dict[str, int], optimizer: torch.optim.Optimizer | None = None,
             keep_norm: bool = False) -> nn.Module:
    """Physically cut the named LoD layers to the given ranks (deployment, federated budgets).

    ``keep_norm``: every layer whose rank falls has its U and V scaled alike (``norm_keeping_scale``) so that
    U^T V keeps the Frobenius norm it had before the cut. Meant for a freshly initialized model: the truncated
    SVD of a random initialization keeps only part of its norm (LeNet's fc1 cut from rank 120 to 27: 68%), so
    the cut layer's outputs start smaller than the initialization chose; a trained model's kept columns already
    carry what it learned, and are cut as they are.
    """
    by_name = dict(layers(model))
    unknown = sorted(set(ranks) - set(by_name))
    if unknown:
        raise ValueError(f"truncate: {unknown} are not LoD layers of this model; LoD layers are {sorted(by_name)}")
    for name, rank in ranks.items():
        layer = by_name[name]
        if not 0 <= rank <= layer.rank:
            raise ValueError(f"truncate: {name} has rank {layer.rank}; cannot cut it to {rank} "
                             f"(allowed: 0..{layer.rank})")
        if keep_norm and rank < layer.rank:
            with torch.no_grad():
                before = float(layer.dense_weight(layer.rank).double().norm())
                cut_rank(layer, rank, optimizer)
                scale = norm_keeping_scale(before, float(layer.dense_weight(rank).double().norm()))
                layer.u.mul_(scale)
                layer.v.mul_(scale)
        else:
            cut_rank(layer, rank, optimizer)
    return model
