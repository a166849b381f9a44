"""``BatchLoader``: seeded, resumable batches; whole-batch tensor slicing for in-memory data sets."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .memory import InMemoryDataset
from .text import TranslationDataset, collate

__all__ = ["BatchLoader", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed from (seed, epoch), the same in every process (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), int(epoch) & (2**64 - 1)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class BatchLoader:
    """Iterable of (x, y) batches over ``dataset`` (or over its examples at ``indices``).

    Every pass draws its order (``shuffle``) and its augmentation from one ``torch.Generator`` seeded
    with ``epoch_seed(seed, epoch)``, so a pass is a function of (seed, epoch) only: a run resumed at
    epoch e calls ``set_epoch(e)`` and sees the batches the interrupted run would have seen. Each pass
    uses the epoch given to ``set_epoch``, then the next pass uses epoch + 1 (starting at 0), so a loop
    that never calls ``set_epoch`` still gets a new order every epoch.

    ``InMemoryDataset``: each batch is one index into the tensors (``dataset.batch``): scaling,
    normalization and the CIFAR crop + flip run on the whole batch, with no per-item Python code and no
    worker processes. Other data sets (ImageFolder, Multi30k) go through ``torch.utils.data.DataLoader``
    with the seeded generator (its per-item transforms draw from torch's global RNG when
    ``num_workers=0``); Multi30k batches are padded with ``<pad>`` = 1 into (src (B, S), tgt (B, T)).

    Construction copies nothing but ``indices``; the object pickles with its data set.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, indices=None,
                 drop_last: bool = False, num_workers: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"BatchLoader: batch_size={batch_size!r} must be a positive int")
        if indices is not None:
            indices = np.asarray(indices)
            if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
                raise ValueError(f"BatchLoader: indices must be a 1-D integer array, got shape {indices.shape} "
                                 f"dtype {indices.dtype}")
            indices = indices.astype(np.int64, copy=False)
            if indices.size and (indices.min() < 0 or indices.max() >= len(dataset)):
                raise ValueError(f"BatchLoader: indices must lie in [0, {len(dataset)}) for this data set, got "
                                 f"[{indices.min()}, {indices.max()}]")
        self.dataset, self.batch_size, self.shuffle = dataset, int(batch_size), bool(shuffle)
        self.seed, self.indices, self.drop_last, self.num_workers = int(seed), indices, bool(drop_last), num_workers
        self.epoch = 0  # the epoch of the next pass

    def set_epoch(self, epoch: int) -> None:
        """The next pass draws its order and augmentation from (seed, epoch)."""
        self.epoch = int(epoch)

    @property
    def num_examples(self) -> int:
        return len(self.dataset) if self.indices is None else int(self.indices.size)

    def __len__(self) -> int:
        n = self.num_examples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        if isinstance(self.dataset, InMemoryDataset):
            return self._in_memory(generator)
        return iter(self._data_loader(generator))

    def _in_memory(self, generator: torch.Generator):
        n = self.num_examples
        order = torch.arange(n) if self.indices is None else torch.from_numpy(self.indices)  # (n,)
        if self.shuffle:
            order = order[torch.randperm(n, generator=generator)]
        stop = len(self) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            yield self.dataset.batch(order[start:start + self.batch_size], generator)

    def _data_loader(self, generator: torch.Generator) -> DataLoader:
        data = self.dataset if self.indices is None else Subset(self.dataset, self.indices.tolist())
        return DataLoader(data, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator,
                          drop_last=self.drop_last, num_workers=self.num_workers,
                          collate_fn=collate if isinstance(self.dataset, TranslationDataset) else None)

    def __repr__(self) -> str:
        return (f"BatchLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"seed={self.seed}, examples={self.num_examples}, epoch={self.epoch})")
