"""Data: the data sets by name, and their federated partitions. Both modes read data only through here.

```python
from fedmaestro import data
ds = data.load("fashion_mnist", root=None, train=True)   # InMemoryDataset (60,000 x 1 x 28 x 28 uint8)
parts = data.partition(data.labels(ds), "dirichlet", num_partitions=20, seed=0, alpha=0.5)
train_idx, test_idx = data.split_local(parts[3], test_fraction=0.1, seed=3)
loader = data.BatchLoader(ds, 32, shuffle=True, seed=0, indices=train_idx)
for epoch in range(E):
    loader.set_epoch(epoch)
    for x, y in loader: ...                                  # x (B, 1, 28, 28) float normalized, y (B,) long
```

Data sets (``DATASETS``; files, layouts and errors: ``vision``, ``text``, ``synthetic``; where the
root is: ``paths``; the command ``python -m fedmaestro.data.describe`` shows a partition):

* ``fashion_mnist`` (offline default): ``<root>/FashionMNIST/raw``, else
  ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``), else a torchvision download.
* ``mnist``, ``cifar10``, ``cifar100``: torchvision layouts under the root (download when online).
* ``imagenet``: ImageFolder ``<root>/imagenet/{train,val}`` with the standard transforms.
* ``multi30k``: local ``train/val/test_2016_flickr .en/.de`` files; shared vocabulary, ``<pad>`` = 1.
* ``synthetic``: seeded linear regression y = A x + noise, x in R^6, A 9 x 6 of rank 3.

Transforms: (Fashion-)MNIST and CIFAR are normalized with their per-channel mean/std; CIFAR training
splits get random crop (pad 4) + horizontal flip; ImageNet training RandomResizedCrop(224) + flip,
evaluation Resize(256) + CenterCrop(224). Test splits are never augmented.

Memory: the in-memory sets are decoded once per process (``functools.lru_cache`` keyed by (name,
root, split)) and kept as uint8 tensors, a quarter of float32; batches become float only when drawn.
A Flower simulation holds one copy per worker process that loads the set.

| data set      | split | examples  | kept in memory as                          | resident size      |
|---------------|-------|-----------|--------------------------------------------|--------------------|
| fashion_mnist | train | 60,000    | uint8 (N, 1, 28, 28) + int64 labels        | 47.5 MB            |
| fashion_mnist | test  | 10,000    | same                                       | 7.9 MB             |
| mnist         | train | 60,000    | same                                       | 47.5 MB            |
| mnist         | test  | 10,000    | same                                       | 7.9 MB             |
| cifar10/100   | train | 50,000    | uint8 (N, 3, 32, 32) + int64 labels        | 154.0 MB           |
| cifar10/100   | test  | 10,000    | same                                       | 30.8 MB            |
| synthetic     | train | 10,000    | float32 x (N, 6) + y (N, 9)                | 0.6 MB             |
| synthetic     | test  | 2,000     | same                                       | 0.1 MB             |
| multi30k      | train | 29,000    | flat int64 token ids + offsets, vocabulary | about 7 MB         |
| multi30k      | test  | 1,000     | same (vocabulary shared)                   | about 0.3 MB       |
| imagenet      | train | 1,281,167 | not decoded: ImageFolder's file list;      | about 230 MB (list)|
|               |       |           | JPEGs are decoded per item by DataLoader   |                    |

MB = 10^6 bytes. Images: N x C x H x W bytes + 8 N for the labels (exact). Multi30k: about 13 tokens
per sentence plus ``<bos>``/``<eos>``, two sentences per pair, 8 bytes per id (estimate). ImageNet:
1.28 M (path, class) tuples as Python objects (measured with tracemalloc on a synthetic list of that
size); the JPEGs themselves (about 140 GB) stay on disk. A batch adds B x C x H x W x 4 bytes of
float32 while it is used. The CIFAR-10 training loader (crop + flip + normalization, batch 128) runs
an epoch in about 0.4-0.6 s on one CPU core, so data loading does not bound a training step.
"""

from __future__ import annotations

from .loader import BatchLoader, epoch_seed
from .memory import NORMALIZATION, InMemoryDataset, random_crop_flip
from .partition import SCHEMES, partition, split_clients, split_local
from .registry import DATASETS, check_num_classes, clear_cache, labels, load, subset, unaugmented
from .text import TranslationDataset, Vocab

__all__ = [
    "DATASETS", "SCHEMES", "NORMALIZATION", "load", "labels", "subset", "partition", "split_local", "split_clients",
    "BatchLoader", "InMemoryDataset", "TranslationDataset", "Vocab", "random_crop_flip", "epoch_seed",
    "clear_cache", "unaugmented", "check_num_classes",
]
