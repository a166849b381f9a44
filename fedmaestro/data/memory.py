"""In-memory data sets: decoded once into tensors, normalized and augmented a whole batch at a time.

Images are kept as uint8 (N, C, H, W), a quarter of float32's memory; a batch becomes float, is
augmented (CIFAR training splits: random crop with 4 zero pixels of padding + horizontal flip, as
torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``) and normalized by
``InMemoryDataset.batch`` in a few tensor operations, with no per-item Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

__all__ = ["Normalization", "NORMALIZATION", "InMemoryDataset", "random_crop_flip", "CROP_PADDING"]

CROP_PADDING = 4  # the paper's CIFAR recipe: pad 4, crop back to 32x32


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]


NORMALIZATION = {
    "mnist": Normalization((0.1307,), (0.3081,)),
    "fashion_mnist": Normalization((0.2860,), (0.3530,)),
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def random_crop_flip(images: torch.Tensor, padding: int = CROP_PADDING,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding, then random horizontal flip (p = 1/2), per image, vectorized.

    images: (B, C, H, W), any dtype; returns the same shape and dtype. Offsets and flips are drawn
    from ``generator`` (the global RNG when None), so a seeded generator gives repeatable batches.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)  # (B,) crop offsets
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5  # (B,)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    # one gather over the flattened padded planes; the (B, 1, H*W) index is shared by the C channels
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, flat).view(b, c, h, w)  # (B, C, H, W)


class InMemoryDataset(Dataset):
    """A data set held as two tensors.

    inputs:  (N, C, H, W) uint8 images, or (N, D) float features (synthetic).
    targets: (N,) long class labels, or (N, K) float regression targets (synthetic).
    train:   the training split: CIFAR-like sets (``augment=True``) are augmented while it is True;
             set it to False to read a training split without augmentation.
    name:    the data set's name in ``fedmaestro.data.DATASETS``.
    norm:    per-channel mean/std applied to images after scaling to [0, 1]; None: inputs as stored.
    info:    extra read-only facts (the synthetic set's true map ``A``), kept by ``subset``.

    ``ds[i]`` returns (x float normalized, y) like a torchvision data set (one item, augmented with the
    global RNG); ``ds.batch(idx, generator)`` does the same for a whole index tensor at once, which is
    what ``fedmaestro.data.BatchLoader`` uses.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, *, train: bool, name: str,
                 norm: Normalization | None = None, augment: bool = False, info: dict | None = None):
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"{name}: {inputs.shape[0]} inputs but {targets.shape[0]} targets; they must match")
        if inputs.dtype == torch.uint8 and inputs.ndim != 4:
            raise ValueError(f"{name}: uint8 images must be (N, C, H, W), got shape {tuple(inputs.shape)}")
        self.inputs, self.targets = inputs, targets
        self.train, self.name, self.norm, self.augment = bool(train), name, norm, bool(augment)
        self.info = dict(info or {})
        if norm is not None:
            c = len(norm.mean)
            self._mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, c, 1, 1)
            self._std = torch.tensor(norm.std, dtype=torch.float32).view(1, c, 1, 1)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def classification(self) -> bool:
        return self.targets.dtype == torch.long and self.targets.ndim == 1

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw inputs (B, ...) -> model inputs: augmentation (training CIFAR-like splits), [0,1], normalization."""
        if x.dtype != torch.uint8:
            return x.float()
        if self.augment and self.train:
            x = random_crop_flip(x, generator=generator)
        x = x.float().div_(255.0)  # (B, C, H, W) in [0, 1]
        if self.norm is not None:
            x = x.sub_(self._mean).div_(self._std)
        return x

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, ...) float, y (B, ...)) of the examples at ``idx`` (a 1-D long tensor)."""
        return self.transform(self.inputs[idx], generator), self.targets[idx]

    def __getitem__(self, i: int):
        x, y = self.batch(torch.as_tensor([i]))
        return x[0], y[0]

    def head(self, n: int) -> "InMemoryDataset":
        """The first ``n`` examples as a new data set of the same kind (views, no copy)."""
        return InMemoryDataset(self.inputs[:n], self.targets[:n], train=self.train, name=self.name, norm=self.norm,
                               augment=self.augment, info=self.info)

    def __repr__(self) -> str:
        return (f"InMemoryDataset({self.name!r}, train={self.train}, n={len(self)}, "
                f"inputs={tuple(self.inputs.shape)} {self.inputs.dtype}, augment={self.augment and self.train})")
