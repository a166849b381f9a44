"""``load`` / ``labels`` / ``subset``: the data sets by name, decoded once per process."""

from __future__ import annotations

import copy
import difflib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from . import paths, synthetic, text, vision
from .memory import NORMALIZATION, InMemoryDataset

__all__ = ["DATASETS", "load", "labels", "subset", "unaugmented", "check_name", "check_num_classes", "clear_cache"]

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet", "multi30k", "synthetic")
AUGMENTED = ("cifar10", "cifar100")  # random crop (pad 4) + horizontal flip on training splits


def check_name(name: str) -> str:
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint}; choose one of {list(DATASETS)}")
    return name


@lru_cache(maxsize=8)
def _decoded(name: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) tensors of an in-memory data set; decoded once per (name, root, split) and process."""
    if name in vision.MNIST_LIKE:
        return vision.load_mnist_like(name, Path(root), train)
    return vision.load_cifar(name, Path(root), train)


@lru_cache(maxsize=4)
def _image_folder(root: str, train: bool):
    return vision.load_imagenet(Path(root), train)


@lru_cache(maxsize=4)
def _multi30k(root: str, split: str) -> text.TranslationDataset:
    return text.load_multi30k(Path(root), split)


def clear_cache() -> None:
    """Forget every decoded data set (tests; or to free memory)."""
    for f in (_decoded, _image_folder, _multi30k, text.build_vocab):
        f.cache_clear()


def load(name: str, root=None, train: bool = True) -> Dataset:
    """The training (``train=True``) or test split of data set ``name``.

    MNIST, Fashion-MNIST, CIFAR-10/100 and synthetic: an ``InMemoryDataset`` (tensors decoded once per
    process and shared by every call; a fresh wrapper each call, so setting ``.train`` on one does not
    change another). ImageNet: a torchvision ``ImageFolder`` (val folder for ``train=False``) with the
    standard transforms. Multi30k: a ``TranslationDataset`` (test = test_2016_flickr). ``root``: see
    ``fedmaestro.data.paths``. Missing files raise FileNotFoundError naming where it looked and how to
    get the data; corrupt files raise ValueError.
    """
    check_name(name)
    if name == "synthetic":
        return synthetic.load_synthetic(train)
    where = str(paths.resolve_root(root))
    if name == "imagenet":
        return copy.copy(_image_folder(where, bool(train)))
    if name == "multi30k":
        return _multi30k(where, "train" if train else "test")
    inputs, targets = _decoded(name, where, bool(train))
    return InMemoryDataset(inputs, targets, train=train, name=name, norm=NORMALIZATION[name],
                           augment=name in AUGMENTED)


def unaugmented(dataset: Dataset) -> Dataset:
    """``dataset`` read without augmentation: a shallow copy of an augmented training split (in-memory
    sets with ``train=False``, ImageNet with its evaluation transform); other data sets as they are.
    For held-out local test examples, BatchNorm recalibration and deploy's loss batch."""
    from torchvision.datasets import ImageFolder

    if isinstance(dataset, InMemoryDataset) and dataset.train:
        dataset = copy.copy(dataset)
        dataset.train = False
    elif isinstance(dataset, ImageFolder):  # ImageNet, the one ImageFolder data set (``vision.load_imagenet``)
        dataset = copy.copy(dataset)
        dataset.transform = vision.imagenet_transform(False)
    return dataset


def labels(dataset: Dataset) -> np.ndarray:
    """The class label of every example, (N,) int64, read without decoding any image.

    Data sets without classes (synthetic regression, Multi30k translation) give 0 for every example,
    so that partitioning them only splits sizes (use the ``iid`` scheme).
    """
    if isinstance(dataset, InMemoryDataset):
        if dataset.classification:
            return dataset.targets.numpy().astype(np.int64)  # a copy: callers may not touch the cached tensor
        return np.zeros(len(dataset), dtype=np.int64)
    if isinstance(dataset, text.TranslationDataset):
        return np.zeros(len(dataset), dtype=np.int64)
    if isinstance(dataset, Subset):
        return labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    raise TypeError(f"labels: cannot read the labels of a {type(dataset).__name__} without decoding it; "
                    f"give it a .targets attribute or use a data set from fedmaestro.data.load")


def check_num_classes(dataset: Dataset, num_classes: int) -> None:
    """Refuse a ``dataset.num_classes`` that does not fit the data set's classes, before a model is trained with it:
    MNIST, Fashion-MNIST and CIFAR have a known count; an ImageFolder's labels must lie below it."""
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    name = getattr(base, "name", None)
    known = {**{k: v[1] for k, v in vision.MNIST_LIKE.items()}, **{k: v[4] for k, v in vision.CIFAR.items()}}
    if isinstance(base, InMemoryDataset) and name in known:
        if num_classes != known[name]:
            raise ValueError(f"config: dataset.num_classes={num_classes} but {name} has {known[name]} classes; set "
                             f"dataset.num_classes={known[name]} (or drop the override: conf/dataset/{name}.yaml sets it)")
        return
    if isinstance(base, text.TranslationDataset) or (isinstance(base, InMemoryDataset) and not base.classification):
        return
    found = labels(dataset)
    if found.size and (found.min() < 0 or found.max() >= num_classes):
        raise ValueError(f"config: dataset.num_classes={num_classes} but the data set's labels go up to "
                         f"{int(found.max())}; set dataset.num_classes={int(found.max()) + 1} or more")


def subset(dataset: Dataset, n: int) -> Dataset:
    """``n`` examples (all of them if there are fewer), as a data set of the same type where possible: the first
    ``n``, except for an ImageFolder (ImageNet), whose files are sorted by class: ``n`` evenly spaced ones, so
    that a smoke-sized subset holds every class in proportion instead of the first class alone."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"subset: n={n!r} must be a positive int (the number of examples to keep)")
    n = min(int(n), len(dataset))
    if isinstance(dataset, (InMemoryDataset, text.TranslationDataset)):
        return dataset.head(n)
    if hasattr(dataset, "samples") and hasattr(dataset, "targets"):  # ImageFolder: trim its file list
        out = copy.copy(dataset)
        keep = [i * len(dataset) // n for i in range(n)]
        out.samples, out.targets = [dataset.samples[i] for i in keep], [dataset.targets[i] for i in keep]
        if hasattr(dataset, "imgs"):
            out.imgs = out.samples
        return out
    return Subset(dataset, range(n))
