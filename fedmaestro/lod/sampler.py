"""Rank samplers: set ``active_rank`` on the LoD layers before each forward pass.

per_layer     Algorithm 1: one (layer, rank) pair per step, every other layer at its cap; the pairs
              are drawn without replacement over all sum_i cap_i pairs and reshuffled each cycle.
across_layers every layer draws its own b uniformly in 1..cap_i.
fixed         every layer at its cap (the HeteroFL-style baseline).
none          no sampling: the same as ``fixed`` (every layer at its cap, full rank when no caps are given),
              the name for a run that samples nothing (dense FedAvg, a factorized model at full rank).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from torch import nn

from .factorize import layers

__all__ = ["RankSampler", "SAMPLERS", "SAMPLING_MODES", "full_rank"]

SAMPLERS = ("per_layer", "across_layers", "fixed", "none")
SAMPLING_MODES = ("per_layer", "across_layers")  # the modes that vary the ranks from step to step


class RankSampler:
    def __init__(self, model: nn.Module, mode: str = "per_layer", caps: dict[str, int] | None = None, seed: int = 0):
        if mode not in SAMPLERS:
            raise ValueError(f"RankSampler: unknown mode {mode!r}; choose one of {list(SAMPLERS)}")
        self.mode = mode
        self.layers = layers(model)
        names = {n for n, _ in self.layers}
        unknown = sorted(set(caps or {}) - names)
        if unknown:
            raise ValueError(f"RankSampler: caps name {unknown}, which are not LoD layers; LoD layers are {sorted(names)}")
        self.caps = dict(caps or {})
        self.rng = np.random.default_rng(seed)
        self._cycle: list[tuple[int, int]] = []

    def cap(self, index: int) -> int:
        name, layer = self.layers[index]
        return min(self.caps.get(name, layer.rank), layer.rank)

    def _at_caps(self) -> None:
        for i, (_, layer) in enumerate(self.layers):
            cap = self.cap(i)
            layer.active_rank = None if cap == layer.rank else cap

    def _next_pair(self) -> tuple[int, int] | None:
        for _ in range(2):
            while self._cycle:
                i, b = self._cycle.pop()
                if b <= self.cap(i):  # pairs beyond a rank that shrank since the shuffle are dropped
                    return i, b
            pairs = [(i, b) for i in range(len(self.layers)) for b in range(1, self.cap(i) + 1)]
            order = self.rng.permutation(len(pairs))
            self._cycle = [pairs[k] for k in order[::-1]]
        return None

    def step(self) -> None:
        """Sample the active ranks for the next training step."""
        self._at_caps()
        if self.mode == "per_layer":
            pair = self._next_pair()
            if pair is not None:
                self.layers[pair[0]][1].active_rank = pair[1]
        elif self.mode == "across_layers":
            for i, (_, layer) in enumerate(self.layers):
                cap = self.cap(i)
                if cap > 0:
                    layer.active_rank = int(self.rng.integers(1, cap + 1))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "cycle": [list(p) for p in self._cycle]}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._cycle = [tuple(p) for p in state["cycle"]]


@contextmanager
def full_rank(model: nn.Module):
    """Temporarily run every LoD layer at all of its columns (evaluation); restores the active ranks."""
    saved = [(layer, layer.active_rank) for _, layer in layers(model)]
    for layer, _ in saved:
        layer.active_rank = None
    try:
        yield model
    finally:
        for layer, b in saved:
            layer.active_rank = b
