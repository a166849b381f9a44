"""Image data sets: MNIST and Fashion-MNIST (IDX files), CIFAR-10/100 (python pickle batches), ImageNet.

Layouts are torchvision's, so a data root that torchvision filled works as is:

* ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/``: ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain
  or ``.gz``. Fashion-MNIST is also read from ``/usr/share/datasets/fashion-mnist`` (the Debian
  package ``dataset-fashion-mnist``, which ``make install`` installs).
* ``<root>/cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``) and
  ``<root>/cifar-100-python/`` (``train``, ``test``), as in the official tarballs.
* ImageNet: ``<root>/imagenet/{train,val}/<wnid>/*.JPEG`` (or ``<root>/{train,val}/...``), the
  usual ImageFolder layout with the validation images moved into class folders.

MNIST-like sets and CIFAR are decoded here with numpy, not by torchvision's data set classes, so that
every check (magic numbers, sizes, counts, label ranges) fails with a message naming the file and the
fix, and so that files of the right layout that are not the official ones (the tests' small files)
are read too: torchvision's CIFAR classes accept only files with the official MD5 sums. torchvision
is used to download, when a network exists; it leaves the same layouts behind.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import torch

from . import paths
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from .memory import NORMALIZATION

__all__ = ["load_mnist_like", "load_cifar", "load_imagenet", "find_imagenet_dir", "SYSTEM_FASHION_MNIST"]

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

IDX_FILES = {  # split -> (images, labels), without the optional .gz
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_LIKE = {  # name -> (torchvision class name = folder under the root, number of classes, how to get it)
    "mnist": ("MNIST", 10, "on a machine with internet run torchvision.datasets.MNIST(root, download=True) "
                           "and copy the four *-idx*-ubyte.gz files it leaves in <root>/MNIST/raw to {raw}"),
    "fashion_mnist": ("FashionMNIST", 10, "install the Debian package (sudo apt-get install dataset-fashion-mnist, "
                                          "or `make install`), or copy the four *-idx*-ubyte.gz files from "
                                          "https://github.com/zalandoresearch/fashion-mnist to {raw}"),
}
CIFAR = {  # name -> (folder, train files, test files, label key, classes, tarball url)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100,
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_candidates(name: str, root: Path) -> list[Path]:
    folder = root / MNIST_LIKE[name][0] / "raw"
    return [folder, SYSTEM_FASHION_MNIST] if name == "fashion_mnist" else [folder]


def _download_mnist_like(name: str, root: Path, train: bool) -> str | None:
    import torchvision

    cls = getattr(torchvision.datasets, MNIST_LIKE[name][0])
    return paths.try_download(cls.mirrors[0], lambda: cls(str(root), train=train, download=True))


def load_mnist_like(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, H, W) uint8, labels (N,) long) of MNIST or Fashion-MNIST; see the module docstring."""
    folder_name, num_classes, how = MNIST_LIKE[name]
    how = how.format(raw=root / folder_name / "raw")
    stems = IDX_FILES[train]

    def locate(tried: list[str]) -> list[Path] | None:
        """This split's two files, from the first folder that holds all four (so that train and test come from
        one copy), else from the first that holds these two."""
        held = [(folder, {s: _find_file(folder, s) for split in IDX_FILES.values() for s in split})
                for folder in _idx_candidates(name, root)]
        for _, files in held:
            if all(files.values()):
                return [files[s] for s in stems]
        for folder, files in held:
            if all(files[s] for s in stems):
                return [files[s] for s in stems]
            missing = [s + "[.gz]" for s in stems if files[s] is None]
            tried.append(f"{folder} (missing {', '.join(missing)})")
        return None

    tried: list[str] = []
    found = locate(tried)
    if found is None:
        why = _download_mnist_like(name, root, train)
        found = locate([]) if why is None else None
        if found is None:
            raise FileNotFoundError(f"{name}: {'train' if train else 'test'} files not found. Looked in: "
                                    f"{'; '.join(tried)}; {why or 'the download left no files there'}. "
                                    f"To get the data: {how}.")
    if found[0].parent == SYSTEM_FASHION_MNIST:  # not the user's to delete
        fix = (f"reinstall it (sudo apt-get install --reinstall dataset-fashion-mnist), or put good copies in "
               f"{root / folder_name / 'raw'}, which is read first")
    else:
        fix = f"delete it and get the data again ({how})"
    images = read_idx(found[0], IMAGES_MAGIC, fix)  # (N, H, W)
    labels = read_idx(found[1], LABELS_MAGIC, fix)  # (N,)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{name}: {found[0]} holds {images.shape[0]} images but {found[1]} holds "
                         f"{labels.shape[0]} labels; the files do not belong together: {fix}")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{name}: {found[1]} has label {int(labels.max())}, but there are only {num_classes} "
                         f"classes; corrupt file: {fix}")
    inputs = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W), owning its memory
    return inputs, torch.from_numpy(labels.astype(np.int64))


def _read_cifar_batch(path: Path, label_key: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            ModuleNotFoundError) as e:
        raise ValueError(f"{path}: corrupt or truncated CIFAR batch ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{path}: not a CIFAR batch: needs keys 'data' and {label_key!r}, found {keys}; {fix}")
    try:
        data, labels = np.asarray(entry["data"]), np.asarray(entry[label_key])
    except ValueError as e:  # ragged lists
        raise ValueError(f"{path}: not a CIFAR batch ({e}); {fix}") from e
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(f"{path}: CIFAR batch's {label_key!r} must be a list of integers, found {labels.dtype} of "
                         f"shape {labels.shape}; {fix}")
    if data.size and (data.dtype.kind not in "iu" or (data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255))):
        raise ValueError(f"{path}: CIFAR batch's pixels must be integers in 0..255, found {data.dtype} "
                         f"{'values' if data.dtype.kind in 'iu' else 'data'} outside that; {fix}")
    data, labels = data.astype(np.uint8, copy=False), labels.astype(np.int64, copy=False)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: CIFAR batch has data of shape {data.shape} and {labels.shape[0]} labels; "
                         f"expected (N, 3072) with N labels; {fix}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32) uint8, labels (N,) long) of CIFAR-10 or CIFAR-100."""
    folder_name, train_files, test_files, label_key, num_classes, url = CIFAR[name]
    folder = root / folder_name
    files = [folder / f for f in (train_files if train else test_files)]
    how = (f"download {url} on a machine with internet and unpack it into {root} "
           f"(or torchvision.datasets.{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}(root, download=True))")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        why = paths.try_download(url, lambda: cls(str(root), train=train, download=True))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{name}: missing {', '.join(missing)} in {folder} "
                                    f"({why or 'the download left no files there'}). "
                                    f"To get the data: {how}.")
    fix = f"delete it and get the data again: {how}"
    parts = [_read_cifar_batch(f, label_key, fix) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}: labels outside [0, {num_classes}) in {folder}; corrupt files: {fix}")
    return torch.from_numpy(images), torch.from_numpy(labels)


IMAGENET_HOW = ("ImageNet cannot be downloaded automatically: get ILSVRC2012 from https://image-net.org "
                "(registration), unpack the images into one folder per class (<root>/imagenet/{split}/<wnid>/*.JPEG; "
                "for val, move the images into class folders with the usual valprep.sh) and set data.root=<root>")


def find_imagenet_dir(root: Path, train: bool) -> Path:
    """The train or val folder of the first of ``<root>/imagenet`` and ``<root>`` that holds either split, so
    that both splits always come from one tree."""
    split = "train" if train else "val"
    bases = [root / "imagenet", root]
    base = next((b for b in bases if (b / "train").is_dir() or (b / "val").is_dir()), None)
    if base is None or not (base / split).is_dir():
        looked = base / split if base is not None else " and ".join(str(b / split) for b in bases)
        raise FileNotFoundError(f"imagenet: no {split} folder; looked in {looked}. "
                                + IMAGENET_HOW.format(split=split))
    return base / split


def _class_folders(folder: Path) -> list[str]:
    """The class folders (wnids) of an ImageFolder split, sorted; hidden folders (.ipynb_checkpoints) are not
    classes."""
    return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))


def imagenet_transform(train: bool):
    """The standard ImageNet transforms: train RandomResizedCrop(224) + flip; eval Resize(256) + CenterCrop(224)."""
    from torchvision import transforms as T

    norm = NORMALIZATION["imagenet"]
    head = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train else [T.Resize(256), T.CenterCrop(224)]
    return T.Compose([*head, T.ToTensor(), T.Normalize(norm.mean, norm.std)])


def load_imagenet(root: Path, train: bool):
    """torchvision ImageFolder over the train or val folder, with the standard transforms.

    Both splits number the classes by the train folder's sorted class folders, so a val folder with
    fewer classes (a sample of it) keeps the train labels; a val class the train folder lacks is refused.
    """
    folder = find_imagenet_dir(root, train)
    how = IMAGENET_HOW.format(split="train" if train else "val")
    own = _class_folders(folder)
    if not own:
        loose = any(e.is_file() for e in folder.iterdir())
        what = "images directly in it, as in the raw ILSVRC2012 val tarball?" if loose else "it is empty"
        raise FileNotFoundError(f"imagenet: {folder} has no class folders ({what}). " + how)
    train_folder = folder.parent / "train"
    classes = own if train or not train_folder.is_dir() else _class_folders(train_folder)
    unknown = sorted(set(own) - set(classes))
    if unknown:
        raise ValueError(f"imagenet: {folder} has class folders that {train_folder} lacks ({', '.join(unknown[:5])}"
                         f"{', ...' if len(unknown) > 5 else ''}); both splits take their labels from the train "
                         f"folder's classes: remove them from val, or add them to train")
    try:
        split = _imagenet_split_class()(str(folder), classes, transform=imagenet_transform(train), allow_empty=not train)
    except FileNotFoundError as e:  # torchvision: a train class folder without an image file
        raise FileNotFoundError(f"imagenet: {folder}: {e}; every train class needs at least one image. " + how) from None
    if not len(split):
        raise FileNotFoundError(f"imagenet: {folder}'s class folders hold no image files. " + how)
    return split


@functools.cache
def _imagenet_split_class():
    from torchvision.datasets import ImageFolder

    class ImageNetSplit(ImageFolder):
        """An ImageFolder whose classes are given (the train folder's) instead of found in its own folder."""

        def __init__(self, root: str, classes: list[str], **kwargs):
            self.given_classes = classes
            super().__init__(root, **kwargs)

        def find_classes(self, directory):
            return self.given_classes, {c: i for i, c in enumerate(self.given_classes)}

    ImageNetSplit.__module__, ImageNetSplit.__qualname__ = __name__, "ImageNetSplit"  # pickled by this name
    return ImageNetSplit


def __getattr__(name: str):
    """``ImageNetSplit``, built on first use (torchvision loads only then), also where a DataLoader worker
    started by spawn unpickles the data set."""
    if name == "ImageNetSplit":
        return _imagenet_split_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
