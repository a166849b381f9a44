"""Seeded linear-regression data for the theory experiments (the paper's Fig. 2) and fast tests.

x ~ N(0, I_d) in R^DIM_IN, y = A x + noise, noise ~ N(0, NOISE^2 I). A is a fixed DIM_OUT x DIM_IN
matrix of rank RANK (Fig. 2a: a random 9 x 6 matrix of rank 3), the same for the train and the test
split and on every machine: it depends only on MATRIX_SEED. The data set's ``info["A"]`` holds it.
"""

from __future__ import annotations

import torch

from .memory import InMemoryDataset

__all__ = ["make_matrix", "make_synthetic", "load_synthetic", "DIM_IN", "DIM_OUT", "RANK", "NOISE",
           "NUM_TRAIN", "NUM_TEST", "MATRIX_SEED", "SPLIT_SEEDS"]

DIM_IN, DIM_OUT, RANK = 6, 9, 3
NOISE = 0.01
NUM_TRAIN, NUM_TEST = 10_000, 2_000
MATRIX_SEED = 0
SPLIT_SEEDS = {True: 1, False: 2}  # train, test: different samples of x and noise


def make_matrix(dim_out: int = DIM_OUT, dim_in: int = DIM_IN, rank: int = RANK,
                seed: int = MATRIX_SEED) -> torch.Tensor:
    """A (dim_out, dim_in) float32 matrix of exactly ``rank``: the product of two Gaussian factors."""
    if not 0 < rank <= min(dim_out, dim_in):
        raise ValueError(f"synthetic: rank={rank} must be in [1, min(dim_out, dim_in) = {min(dim_out, dim_in)}]")
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(dim_out, rank, generator=g, dtype=torch.float64)
    right = torch.randn(rank, dim_in, generator=g, dtype=torch.float64)
    return (left @ right / rank ** 0.5).float()  # (dim_out, dim_in)


def make_synthetic(n: int, matrix: torch.Tensor, noise: float = NOISE, seed: int = 0,
                   train: bool = True) -> InMemoryDataset:
    """``n`` pairs (x (dim_in,), y = A x + noise (dim_out,)), float32, drawn with ``seed``."""
    if n <= 0:
        raise ValueError(f"synthetic: n={n} must be > 0")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, matrix.shape[1], generator=g)  # (N, d_in)
    y = x @ matrix.T + noise * torch.randn(n, matrix.shape[0], generator=g)  # (N, d_out)
    return InMemoryDataset(x, y, train=train, name="synthetic", info={"A": matrix, "noise": noise})


def load_synthetic(train: bool) -> InMemoryDataset:
    """The default split: NUM_TRAIN or NUM_TEST examples of the module's fixed problem."""
    return make_synthetic(NUM_TRAIN if train else NUM_TEST, make_matrix(), NOISE, SPLIT_SEEDS[train], train)
