"""Device tiers: who is in which tier, what each tier may hold, who takes part in a round, who fails.

Pure and seeded: every function is a deterministic function of its arguments (no global RNG, no
Flower node ids), so two runs with one seed make the same decisions, and a resumed run makes the
decisions the uninterrupted one would have made.

Budgets. A tier's budget is a fraction ``p`` of every LoD layer's current rank, ``k_i = ceil(p r_i)``
(FjORD's uniform width), optionally tightened by caps on MACs and/or parameters, given as fractions
of the dense model's. Cost is linear in the ranks, ``cost(k) = fixed + sum_i c_i k_i`` (``CostModel``),
so the caps are solved exactly: the largest ``p <= budget`` (among the finitely many points where some
``ceil(p r_i)`` changes) whose caps satisfy every limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .protocol import DROPOUT, STRAGGLER

__all__ = ["CostModel", "fraction_caps", "solve_caps", "assign", "sample_clients", "draw_faults", "derive_seed",
           "client_seed"]

# Salts keep the streams of different decisions independent for one seed.
_SALT_ASSIGN, _SALT_SAMPLE, _SALT_FAULT, _SALT_CLIENT = 101, 202, 303, 404


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence hashing: the same in every process)."""
    state = np.random.SeedSequence([int(k) & (2**64 - 1) for k in keys]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def client_seed(seed: int, rnd: int, partition_id: int) -> int:
    """The seed of one client's work in one round (torch, rank sampler)."""
    return derive_seed(seed, _SALT_CLIENT, rnd, partition_id)


@dataclass(frozen=True)
class CostModel:
    """cost(caps) = fixed + sum_i per_rank[i] * caps[i] (MACs or parameters of a sub-model)."""

    fixed: float
    per_rank: dict[str, float]

    def __call__(self, caps: Mapping[str, int]) -> float:
        return self.fixed + sum(c * caps[name] for name, c in self.per_rank.items())


def fraction_caps(ranks: Mapping[str, int], p: float) -> dict[str, int]:
    """k_i = ceil(p r_i), at least 1 for a layer of rank >= 1 (a rank-0 layer stays 0)."""
    if not 0 < p <= 1:
        raise ValueError(f"fraction_caps: p={p} must be in (0, 1]")
    # 1e-9 slack: 0.3 * 10 is 3.0000000000000004 in floating point and must give 3, not 4
    return {name: (max(1, math.ceil(p * r - 1e-9)) if r > 0 else 0) for name, r in ranks.items()}


def solve_caps(ranks: Mapping[str, int], budget: float = 1.0,
               limits: Sequence[tuple[CostModel, float]] = ()) -> tuple[dict[str, int], float]:
    """(caps, p): the largest p <= ``budget`` whose ``fraction_caps`` satisfy ``cost(caps) <= limit`` for
    every (cost, limit) in ``limits``.

    Raises ValueError if even the smallest sub-model (every layer at rank 1) exceeds a limit, naming the
    limit and the smallest cost reachable.
    """
    if not limits:
        return fraction_caps(ranks, budget), budget
    # caps(p) is constant on ((j-1)/r, j/r], so these points are all the distinct sub-models, each at its largest p
    points = sorted({j / r for r in ranks.values() if r > 0 for j in range(1, r + 1) if j / r < budget} | {budget})

    def feasible(p: float) -> bool:
        caps = fraction_caps(ranks, p)
        return all(cost(caps) <= limit * (1 + 1e-12) for cost, limit in limits)

    if not feasible(points[0]):
        smallest = fraction_caps(ranks, points[0])
        worst = [(limit, cost(smallest)) for cost, limit in limits if cost(smallest) > limit * (1 + 1e-12)]
        raise ValueError(f"solve_caps: no sub-model fits: the smallest (every layer at rank <= 1, p={points[0]:.4g}) "
                         f"costs {worst[0][1]:,.0f} against a limit of {worst[0][0]:,.0f}; raise the tier's "
                         f"max_macs / max_params")
    lo, hi = 0, len(points) - 1  # invariant: points[lo] feasible; find the last feasible point (cost is monotone)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if feasible(points[mid]):
            lo = mid
        else:
            hi = mid - 1
    return fraction_caps(ranks, points[lo]), points[lo]


def assign(num_clients: int, shares: Sequence[float], seed: int) -> list[int]:
    """Tier index of every partition id 0..num_clients-1.

    Counts follow the shares (normalised) by largest remainder, ties to the earlier tier, so 20 clients
    over shares (0.334, 0.333, 0.333) give 7, 7, 6; which clients land in which tier is a seeded
    permutation.
    """
    if num_clients <= 0:
        raise ValueError(f"assign: num_clients={num_clients} must be > 0")
    s = np.asarray(shares, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"assign: shares must be a non-empty list of positive numbers, got {list(shares)}")
    exact = s / s.sum() * num_clients
    counts = np.floor(np.round(exact, 9)).astype(int)  # round: 0.35 * 20 must count as 7
    remainders = exact - counts
    for i in sorted(range(len(s)), key=lambda i: (-round(remainders[i], 9), i))[: num_clients - counts.sum()]:
        counts[i] += 1
    labels = np.repeat(np.arange(len(s)), counts)
    order = np.random.default_rng(derive_seed(seed, _SALT_ASSIGN)).permutation(num_clients)
    out = np.empty(num_clients, dtype=int)
    out[order] = labels
    return out.tolist()


def sample_clients(num_clients: int, k: int, seed: int, rnd: int) -> list[int]:
    """The partition ids taking part in round ``rnd``: k of 0..num_clients-1 without replacement, sorted."""
    if not 0 < k <= num_clients:
        raise ValueError(f"sample_clients: k={k} must be in [1, num_clients={num_clients}]")
    rng = np.random.default_rng(derive_seed(seed, _SALT_SAMPLE, rnd))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def draw_faults(partition_ids: Sequence[int], dropout: Mapping[int, float], straggler: Mapping[int, float],
                seed: int, rnd: int) -> dict[int, str]:
    """Which sampled clients fail this round: {partition id: "dropout" | "straggler"} (absent = healthy).

    One uniform draw u per (seed, round, partition id): dropout if u < p_dropout, straggler if
    p_dropout <= u < p_dropout + p_straggler, with the probabilities of the client's tier.
    """
    out = {}
    for pid in partition_ids:
        pd, ps = dropout.get(pid, 0.0), straggler.get(pid, 0.0)
        if pd + ps > 1 + 1e-12:
            raise ValueError(f"draw_faults: client {pid} has dropout {pd} + straggler {ps} > 1")
        u = np.random.default_rng(derive_seed(seed, _SALT_FAULT, rnd, pid)).random()
        if u < pd:
            out[pid] = DROPOUT
        elif u < pd + ps:
            out[pid] = STRAGGLER
    return out
