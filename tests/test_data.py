"""fedmaestro.data: loading (real Fashion-MNIST; every other data set from tiny files written here in the
real layouts), transforms, BatchLoader, subset/labels, and the errors for missing or corrupt files.

Partitioning and the describe command: tests/test_data_partition.py.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from fedmaestro import data
from fedmaestro.data import idx as idx_mod
from fedmaestro.data import memory, paths, synthetic, text, vision

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No test may try a download or see a FEDMAESTRO_DATA of the environment; decoded caches start empty."""
    monkeypatch.setenv(paths.ENV_OFFLINE, "1")
    monkeypatch.delenv(paths.ENV_ROOT, raising=False)
    data.clear_cache()
    yield
    data.clear_cache()


# ---------------------------------------------------------------- fixtures: real layouts, tiny files

def make_idx_split(folder: Path, train: bool, n: int, gz: bool = True, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """IDX images/labels as torchvision and Debian lay them out; image i is filled with i % 256, label i % 10."""
    images = np.stack([np.full((size, size), i % 256, dtype=np.uint8) for i in range(n)])
    labels = (np.arange(n) % 10).astype(np.uint8)
    img_name, lab_name = vision.IDX_FILES[train]
    suffix = ".gz" if gz else ""
    idx_mod.write_idx(folder / f"{img_name}{suffix}", images)
    idx_mod.write_idx(folder / f"{lab_name}{suffix}", labels)
    return images, labels


def make_mnist_like(root: Path, name: str = "mnist", n_train: int = 50, n_test: int = 20, gz: bool = True) -> Path:
    folder = root / vision.MNIST_LIKE[name][0] / "raw"
    make_idx_split(folder, True, n_train, gz)
    make_idx_split(folder, False, n_test, gz)
    return folder


def make_cifar(root: Path, name: str = "cifar10", per_batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR python batches (pickled dicts with 'data' (N, 3072) uint8 and 'labels'/'fine_labels')."""
    folder_name, train_files, test_files, label_key, classes, _ = vision.CIFAR[name]
    folder = root / folder_name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for fname in [*train_files, *test_files]:
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, classes, size=per_batch).tolist()
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": x, label_key: y, "batch_label": fname}, f)
        written[fname] = (x, np.asarray(y))
    return written


def make_image_folder(root: Path, classes=("n01", "n02", "n03"), per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / "imagenet" / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / f"{c}_{i}.png")


MULTI30K = {
    "train": (["A man rides a horse.", "A man walks a dog.", "Two dogs run.", "A woman's T-shirt is red.",
               "A man rides a bike."],
              ["Ein Mann reitet ein Pferd.", "Ein Mann führt einen Hund aus.", "Zwei Hunde rennen.",
               "Das T-Shirt einer Frau ist rot.", "Ein Mann fährt ein Rad."]),
    "val": (["A man runs."], ["Ein Mann rennt."]),
    "test_2016_flickr": (["A man rides a zebra."], ["Ein Mann reitet ein Zebra."]),
}


def make_multi30k(folder: Path, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (en, de) in MULTI30K.items():
        for lang, lines in (("en", en), ("de", de)):
            body = "\n".join(lines) + "\n"
            if gz:
                with gzip.open(folder / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
                    f.write(body)
            else:
                (folder / f"{stem}.{lang}").write_text(body, encoding="utf-8")
    return folder


def indexed_dataset(n: int, name: str = "cifar10", train: bool = True) -> data.InMemoryDataset:
    """Random images whose target is their own index, to see which examples a loader yields."""
    g = torch.Generator().manual_seed(0)
    shape = (n, 3, 32, 32) if name.startswith("cifar") else (n, 1, 28, 28)
    inputs = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return data.InMemoryDataset(inputs, torch.arange(n), train=train, name=name, norm=data.NORMALIZATION[name],
                                augment=name.startswith("cifar"))


# ---------------------------------------------------------------- the registry

def test_dataset_names_are_the_contract():
    assert data.DATASETS == ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet", "multi30k", "synthetic")


def test_unknown_dataset_names_the_choices_and_a_close_match():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar-10' \(did you mean 'cifar10'\?\).*'fashion_mnist'"):
        data.load("cifar-10")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*choose one of"):
        data.load("svhn")


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} absent: install the Debian package "
                                                      f"dataset-fashion-mnist (make install)")
def test_real_fashion_mnist_counts_and_normalization(tmp_path):
    train = data.load("fashion_mnist", root=tmp_path, train=True)  # empty root: falls back to the Debian files
    test = data.load("fashion_mnist", root=tmp_path, train=False)
    assert isinstance(train, data.InMemoryDataset) and isinstance(test, data.InMemoryDataset)
    assert train.inputs.shape == (60_000, 1, 28, 28) and train.inputs.dtype == torch.uint8
    assert test.inputs.shape == (10_000, 1, 28, 28)
    assert train.targets.dtype == torch.long
    assert np.array_equal(np.bincount(data.labels(train)), np.full(10, 6000))
    assert np.array_equal(np.bincount(data.labels(test)), np.full(10, 1000))
    # The constants 0.2860 / 0.3530 are the training set's pixel mean/std rounded to 4 digits, so the
    # normalized set has mean 0 and std 1 up to that rounding (< 2e-4); 1e-3 leaves room for float32 sums.
    x = train.transform(train.inputs)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    assert data.load("fashion_mnist", root=tmp_path).inputs is train.inputs  # decoded once per process


# ---------------------------------------------------------------- MNIST-like: lookup order, decoding, errors

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_torchvision_layout(tmp_path, gz):
    make_mnist_like(tmp_path, "mnist", 50, 20, gz=gz)
    train, test = data.load("mnist", tmp_path, train=True), data.load("mnist", tmp_path, train=False)
    assert train.inputs.shape == (50, 1, 28, 28) and test.inputs.shape == (20, 1, 28, 28)
    assert torch.equal(train.inputs[7], torch.full((1, 28, 28), 7, dtype=torch.uint8))
    assert train.targets.tolist() == [i % 10 for i in range(50)]
    x, y = train[7]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and int(y) == 7
    # MNIST normalization: (7 / 255 - 0.1307) / 0.3081 in every pixel (float32 rounding only)
    torch.testing.assert_close(x, torch.full((1, 28, 28), (7 / 255 - 0.1307) / 0.3081), rtol=1e-6, atol=1e-6)


def test_fashion_mnist_lookup_order(tmp_path, monkeypatch):
    system = tmp_path / "system"
    make_idx_split(system, True, 40)
    monkeypatch.setattr(vision, "SYSTEM_FASHION_MNIST", system)
    # 1. the configured root wins over the system files
    make_mnist_like(tmp_path / "root", "fashion_mnist", n_train=30)
    assert len(data.load("fashion_mnist", tmp_path / "root")) == 30
    # 2. an empty root falls back to the Debian package's folder
    assert len(data.load("fashion_mnist", tmp_path / "empty")) == 40


def test_fashion_mnist_download_is_the_last_resort(tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "SYSTEM_FASHION_MNIST", tmp_path / "no-system")
    monkeypatch.setattr(paths, "network_available", lambda url: True)
    calls = []

    class FakeFashionMNIST:  # what torchvision's download leaves behind: <root>/FashionMNIST/raw/*.gz
        mirrors = ["http://fashion-mnist.example/"]

        def __init__(self, root, train, download):
            calls.append((root, train, download))
            make_idx_split(Path(root) / "FashionMNIST" / "raw", train, 12)

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FakeFashionMNIST)
    ds = data.load("fashion_mnist", tmp_path / "root", train=False)
    assert len(ds) == 12 and calls == [(str(tmp_path / "root"), False, True)]


def test_fashion_mnist_missing_everywhere_names_paths_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "SYSTEM_FASHION_MNIST", tmp_path / "no-system")
    with pytest.raises(FileNotFoundError) as err:
        data.load("fashion_mnist", tmp_path / "root")
    msg = str(err.value)
    assert str(tmp_path / "root" / "FashionMNIST" / "raw") in msg and str(tmp_path / "no-system") in msg
    assert "train-images-idx3-ubyte" in msg and "dataset-fashion-mnist" in msg and "FEDMAESTRO_OFFLINE" in msg


def test_failed_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "network_available", lambda url: True)

    class Broken:
        mirrors = ["https://ossci-datasets.s3.amazonaws.com/mnist/"]

        def __init__(self, *a, **k):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr("torchvision.datasets.MNIST", Broken)
    with pytest.raises(FileNotFoundError, match=r"download from ossci-datasets.s3.amazonaws.com failed: "
                                                r"RuntimeError.*torchvision.datasets.MNIST\(root, download=True\)"):
        data.load("mnist", tmp_path)


def test_offline_means_no_connection_attempt(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("connected although FEDMAESTRO_OFFLINE=1")

    monkeypatch.setattr(paths.socket, "create_connection", refuse)
    assert paths.network_available("https://example.org/x") is False


@pytest.mark.parametrize("damage, message", [
    ("truncate_gz", "corrupt or truncated gzip file"),
    ("truncate_raw", "IDX file truncated"),
    ("trailing", "has trailing bytes"),
    ("swap_magic", "magic number is 2049, expected 2051"),
    ("not_gzip", "corrupt or truncated gzip file"),
    ("count_mismatch", "holds 50 images but .* holds 49 labels"),
    ("bad_label", "has label 12, but there are only 10 classes"),
])
def test_corrupt_idx_files_name_the_file_and_the_fix(tmp_path, damage, message):
    folder = make_mnist_like(tmp_path, "mnist", gz=damage not in ("truncate_raw", "trailing"))
    images = next(folder.glob("train-images*"))
    labels = next(folder.glob("train-labels*"))
    if damage == "truncate_gz":
        blob = images.read_bytes()
        images.write_bytes(blob[: len(blob) // 2])
    elif damage == "truncate_raw":
        images.write_bytes(images.read_bytes()[:-5])
    elif damage == "trailing":
        images.write_bytes(images.read_bytes() + b"\0")
    elif damage == "swap_magic":
        images.write_bytes(labels.read_bytes())
    elif damage == "not_gzip":
        images.write_bytes(b"<html>404</html>")
    elif damage == "count_mismatch":
        idx_mod.write_idx(labels, np.zeros(49, dtype=np.uint8))
    elif damage == "bad_label":
        idx_mod.write_idx(labels, np.full(50, 12, dtype=np.uint8))
    with pytest.raises(ValueError, match=message) as err:
        data.load("mnist", tmp_path)
    assert "get the data again" in str(err.value)
    assert str(images) in str(err.value) or str(labels) in str(err.value)


def test_root_from_environment_then_cwd_data(tmp_path, monkeypatch):
    make_mnist_like(tmp_path / "env", "mnist", n_train=11)
    monkeypatch.setenv(paths.ENV_ROOT, str(tmp_path / "env"))
    assert len(data.load("mnist")) == 11
    monkeypatch.delenv(paths.ENV_ROOT)
    make_mnist_like(tmp_path / "cwd" / "data", "mnist", n_train=13)
    monkeypatch.chdir(tmp_path / "cwd")
    assert len(data.load("mnist")) == 13


# ---------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_python_batches(tmp_path, name):
    written = make_cifar(tmp_path, name)
    train, test = data.load(name, tmp_path, train=True), data.load(name, tmp_path, train=False)
    files = vision.CIFAR[name]
    assert train.inputs.shape == (4 * len(files[1]), 3, 32, 32) and train.inputs.dtype == torch.uint8
    assert test.inputs.shape == (4, 3, 32, 32)
    first = written[files[1][0]]
    # row-major (3, 32, 32): the first 1024 bytes are the red plane, as in the CIFAR format
    assert np.array_equal(train.inputs[0].numpy().reshape(-1), first[0][0])
    assert np.array_equal(train.targets[:4].numpy(), first[1])
    assert np.array_equal(test.targets.numpy(), written[files[2][0]][1])
    assert train.train and train.augment and not test.train


def test_a_data_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "data").write_text("")
    for name in ("fashion_mnist", "cifar10", "multi30k"):  # fashion_mnist fell back to the Debian package silently
        with pytest.raises(ValueError, match=r"data root .*data is a file, not a directory: point data.root"):
            data.load(name, tmp_path / "data")


def test_cifar_missing_files_name_folder_and_url(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar10: missing data_batch_1, .*data_batch_5 in .*"
                                                r"cifar-10-batches-py .*cifar-10-python.tar.gz"):
        data.load("cifar10", tmp_path)
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"cifar10: missing test_batch in"):
        data.load("cifar10", tmp_path, train=False)


@pytest.mark.parametrize("damage, message", [
    ("garbage", "corrupt or truncated CIFAR batch"),
    ("truncated", "corrupt or truncated CIFAR batch"),
    ("keys", "not a CIFAR batch: needs keys 'data' and 'labels'"),
    ("shape", r"data of shape \(4, 100\)"),
    ("label shape", r"'labels' must be a list of integers, found int64 of shape \(4, 1\)"),
    ("label type", r"'labels' must be a list of integers, found float64"),
    ("pixels", r"pixels must be integers in 0..255, found int64 values outside that"),
    ("pixel type", r"pixels must be integers in 0..255, found float32 data"),
])
def test_corrupt_cifar_batches(tmp_path, damage, message):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "garbage":
        path.write_bytes(b"not a pickle at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "keys":
        path.write_bytes(pickle.dumps({"images": 1}))
    elif damage == "shape":
        path.write_bytes(pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}))
    elif damage == "label shape":  # would have failed in np.concatenate without naming the file
        path.write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [[0]] * 4}))
    elif damage == "label type":  # 3.5 would have become class 3
        path.write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 3.5, 2]}))
    elif damage == "pixels":  # 300 would have wrapped round to 44
        path.write_bytes(pickle.dumps({"data": np.full((4, 3072), 300), "labels": [0] * 4}))
    elif damage == "pixel type":
        path.write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}))
    with pytest.raises(ValueError, match=message) as err:
        data.load("cifar10", tmp_path)
    assert str(path) in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)


# ---------------------------------------------------------------- augmentation and normalization

def _crops(image: torch.Tensor, pad: int = 4) -> list[torch.Tensor]:
    """Every crop + flip that RandomCrop(32, padding=4) + RandomHorizontalFlip can produce."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[-2:]
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[..., dy:dy + h, dx:dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_cifar_training_batches_are_crops_and_flips_of_the_originals():
    ds = indexed_dataset(16)
    x, y = ds.batch(torch.arange(16), torch.Generator().manual_seed(1))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and torch.equal(y, torch.arange(16))
    eval_ds = indexed_dataset(16, train=False)
    for i in range(16):
        candidates = [eval_ds.transform(c[None].clone())[0] for c in _crops(ds.inputs[i])]
        assert any(torch.equal(x[i], c) for c in candidates), f"image {i} is no crop/flip of its original"
    # not the identity: P(all 16 draws are the centred, unflipped crop) = (1/162)^16
    assert not torch.equal(x, eval_ds.batch(torch.arange(16))[0])


def test_crop_offsets_and_flips_are_uniform():
    # channel 0 holds column numbers 1..32, channel 1 row numbers (0 = padding): the output reveals dx, dy, flip
    n = 4000
    cols = torch.arange(1, 33, dtype=torch.uint8).expand(32, 32)
    img = torch.stack([cols, cols.T])  # (2, 32, 32)
    out = memory.random_crop_flip(img.expand(n, 2, 32, 32), generator=torch.Generator().manual_seed(0))
    flipped = out[:, 0, 16, 17] < out[:, 0, 16, 16]
    dx = torch.where(flipped, out[:, 0, 16, 16] - 12, out[:, 0, 16, 16] - 13).long()  # centre = dx + 13 (- 1 flipped)
    dy = (out[:, 1, 16, 16] - 13).long()
    # Binomial(4000, p): sd of a frequency is sqrt(p(1-p)/4000) <= 0.008; 0.04 / 0.03 are > 5 sd, yet a
    # wrong range (8 offsets instead of 9: p = 0.125 vs 0.111) or a biased flip would fail.
    assert abs(float(flipped.float().mean()) - 0.5) < 0.04
    for offsets in (dx, dy):
        freq = torch.bincount(offsets, minlength=9).float() / n
        assert freq.numel() == 9 and float((freq - 1 / 9).abs().max()) < 0.03


def test_evaluation_splits_are_never_augmented(tmp_path):
    make_cifar(tmp_path)
    test = data.load("cifar10", tmp_path, train=False)
    x1, _ = test.batch(torch.arange(4), torch.Generator().manual_seed(0))
    x2, _ = test.batch(torch.arange(4), torch.Generator().manual_seed(1))
    norm = data.NORMALIZATION["cifar10"]
    mean, std = torch.tensor(norm.mean).view(1, 3, 1, 1), torch.tensor(norm.std).view(1, 3, 1, 1)
    expected = (test.inputs.float() / 255 - mean) / std
    assert torch.equal(x1, x2)
    torch.testing.assert_close(x1, expected, rtol=1e-6, atol=1e-6)  # float32 rounding of the same arithmetic
    # a training split read with .train = False is not augmented either (and does not change another load)
    train = data.load("cifar10", tmp_path, train=True)
    train.train = False
    assert torch.equal(train.batch(torch.arange(3), torch.Generator().manual_seed(5))[0],
                       train.batch(torch.arange(3), torch.Generator().manual_seed(6))[0])
    assert data.load("cifar10", tmp_path, train=True).train


def test_mnist_training_split_is_not_augmented(tmp_path):
    make_mnist_like(tmp_path)
    train = data.load("mnist", tmp_path)
    assert train.train and not train.augment
    assert torch.equal(train.batch(torch.arange(5), torch.Generator().manual_seed(0))[0],
                       train.batch(torch.arange(5), torch.Generator().manual_seed(1))[0])


# ---------------------------------------------------------------- BatchLoader

def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_batch_loader_covers_every_example_once_and_counts_batches():
    ds = indexed_dataset(23)
    loader = data.BatchLoader(ds, 5, shuffle=True, seed=0)
    batches = _epoch(loader)
    assert len(loader) == 5 and [b[1].numel() for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(23))
    assert torch.cat([b[1] for b in batches]).tolist() != list(range(23))  # shuffled (P(identity) = 1/23!)
    dropping = data.BatchLoader(ds, 5, shuffle=True, seed=0, drop_last=True)
    assert len(dropping) == 4 and [b[1].numel() for b in _epoch(dropping)] == [5, 5, 5, 5]
    ordered = data.BatchLoader(ds, 10, shuffle=False, indices=[4, 2, 9])
    assert [b[1].tolist() for b in ordered] == [[4, 2, 9]] and ordered.num_examples == 3


def test_batch_loader_is_a_function_of_seed_and_epoch():
    ds = indexed_dataset(40)  # CIFAR-like training data: order and augmentation both come from (seed, epoch)
    a = data.BatchLoader(ds, 8, shuffle=True, seed=3)
    b = data.BatchLoader(ds, 8, shuffle=True, seed=3)
    a0, b0 = _epoch(a), _epoch(b)
    assert _same(a0, b0)
    a1 = _epoch(a)  # without set_epoch the next pass is epoch 1: a new order and new crops
    assert not _same(a0, a1)
    assert not _same(a0, _epoch(data.BatchLoader(ds, 8, shuffle=True, seed=4)))
    # resume: a fresh loader put at epoch 1 repeats the interrupted run's epoch 1
    resumed = data.BatchLoader(ds, 8, shuffle=True, seed=3)
    resumed.set_epoch(1)
    assert _same(_epoch(resumed), a1)
    a.set_epoch(0)
    assert _same(_epoch(a), a0)
    assert data.epoch_seed(3, 1) == data.epoch_seed(3, 1) != data.epoch_seed(3, 2)


def test_batch_loader_restricts_to_indices_and_pickles():
    ds = indexed_dataset(30)
    idx = np.array([3, 7, 11, 19, 23, 29])
    loader = data.BatchLoader(ds, 4, shuffle=True, seed=1, indices=idx)
    first = _epoch(loader)
    assert sorted(torch.cat([b[1] for b in first]).tolist()) == idx.tolist()
    copy = pickle.loads(pickle.dumps(loader))
    copy.set_epoch(0)
    assert _same(_epoch(copy), first)


def test_batch_loader_slices_tensors_without_per_item_calls(monkeypatch):
    ds = indexed_dataset(20)

    def forbidden(self, i):
        raise AssertionError("BatchLoader called __getitem__ per item")

    monkeypatch.setattr(data.InMemoryDataset, "__getitem__", forbidden)
    assert sum(y.numel() for _, y in data.BatchLoader(ds, 6, shuffle=True)) == 20


def test_batch_loader_rejects_bad_arguments():
    ds = indexed_dataset(5)
    with pytest.raises(ValueError, match="batch_size=0 must be a positive int"):
        data.BatchLoader(ds, 0, shuffle=True)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        data.BatchLoader(ds, 2, shuffle=True, indices=[0, 5])
    with pytest.raises(ValueError, match="1-D integer array"):
        data.BatchLoader(ds, 2, shuffle=True, indices=[[0, 1]])


# ---------------------------------------------------------------- subset / labels

def test_subset_keeps_the_in_memory_class_and_the_first_examples(tmp_path):
    make_mnist_like(tmp_path)
    ds = data.load("mnist", tmp_path)
    small = data.subset(ds, 12)
    assert isinstance(small, data.InMemoryDataset) and len(small) == 12 and small.name == "mnist"
    assert torch.equal(small.inputs, ds.inputs[:12]) and small.inputs.data_ptr() == ds.inputs.data_ptr()  # a view
    assert len(data.subset(ds, 10_000)) == len(ds)
    assert np.array_equal(data.labels(small), np.arange(12) % 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="must be a positive int"):
            data.subset(ds, bad)


def test_labels_of_subsets_and_unlabelled_sets():
    ds = indexed_dataset(10)
    assert np.array_equal(data.labels(torch.utils.data.Subset(ds, [7, 2])), [7, 2])
    assert np.array_equal(data.labels(data.load("synthetic", train=False)), np.zeros(synthetic.NUM_TEST))

    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 1

    with pytest.raises(TypeError, match="cannot read the labels of a Opaque"):
        data.labels(Opaque())


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_seeded_linear_regression():
    train, test = data.load("synthetic", train=True), data.load("synthetic", train=False)
    assert train.inputs.shape == (synthetic.NUM_TRAIN, 6) and train.targets.shape == (synthetic.NUM_TRAIN, 9)
    assert train.inputs.dtype == torch.float32 and train.targets.dtype == torch.float32
    assert torch.equal(data.load("synthetic").inputs, train.inputs)  # same seed, same data
    assert not torch.equal(train.inputs[:100], test.inputs[:100])
    a = train.info["A"]
    assert torch.equal(a, test.info["A"]) and a.shape == (9, 6) and int(torch.linalg.matrix_rank(a)) == 3
    residual = train.targets - train.inputs @ a.T  # = the noise
    # 90,000 N(0, 0.01^2) draws: the sample std is within 1% of 0.01 with overwhelming probability
    # (relative sd 1/sqrt(2 * 90000) = 0.24%); the mean is ~ 0.01 / 300 = 3e-5 (sd).
    assert abs(float(residual.std()) - synthetic.NOISE) < 1e-4 and abs(float(residual.mean())) < 2e-4
    x, y = train[0]
    assert torch.equal(x, train.inputs[0]) and torch.equal(y, train.targets[0])
    batches = list(data.BatchLoader(train, 1000, shuffle=False))
    assert torch.equal(batches[0][0], train.inputs[:1000])  # no normalization of float features
    assert isinstance(data.subset(train, 5), data.InMemoryDataset) and data.subset(train, 5).info["A"] is a


# ---------------------------------------------------------------- ImageNet (ImageFolder)

def test_imagenet_image_folder_with_standard_transforms(tmp_path):
    make_image_folder(tmp_path)
    train, val = data.load("imagenet", tmp_path, train=True), data.load("imagenet", tmp_path, train=False)
    assert isinstance(train, ImageFolder) and len(train) == 9 and len(val) == 9
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert [type(t).__name__ for t in val.transform.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    x, y = val[4]
    assert x.shape == (3, 224, 224) and y == 1
    assert torch.equal(val[4][0], x)  # evaluation is deterministic
    assert np.array_equal(data.labels(val), [0, 0, 0, 1, 1, 1, 2, 2, 2])
    small = data.subset(val, 4)
    assert isinstance(small, ImageFolder) and len(small) == 4 and len(val) == 9
    assert np.array_equal(data.labels(small), [0, 0, 1, 2])  # evenly spaced: sorted by class, first N would be 0s
    loader = data.BatchLoader(val, 4, shuffle=True, seed=0, indices=[0, 3, 6, 8])
    batches = list(loader)
    assert len(loader) == 1 and batches[0][0].shape == (4, 3, 224, 224)
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))[1], batches[0][1])  # seeded order


def test_unaugmented_imagenet_training_split_reads_with_the_evaluation_transform(tmp_path):
    make_image_folder(tmp_path)
    train = data.load("imagenet", tmp_path, train=True)
    plain = data.unaugmented(train)  # local test examples, BatchNorm recalibration, deploy's loss batch
    assert [type(t).__name__ for t in plain.transform.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert type(train.transform.transforms[0]).__name__ == "RandomResizedCrop"  # a copy: the original augments
    assert len(plain) == len(train) and torch.equal(plain[4][0], plain[4][0])


def test_imagenet_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"imagenet: no val folder; looked in .*imagenet/val.*image-net.org"):
        data.load("imagenet", tmp_path, train=False)


def test_imagenet_val_takes_the_train_folders_labels(tmp_path):
    make_image_folder(tmp_path)
    shutil.rmtree(tmp_path / "imagenet" / "val" / "n02")  # a sample of val without class n02
    (tmp_path / "imagenet" / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    train, val = data.load("imagenet", tmp_path, train=True), data.load("imagenet", tmp_path, train=False)
    assert train.classes == val.classes == ["n01", "n02", "n03"]
    copied = pickle.loads(pickle.dumps(val))  # a DataLoader worker started by spawn gets it so
    assert copied.classes == val.classes and copied.samples == val.samples
    assert np.array_equal(data.labels(val), [0, 0, 0, 2, 2, 2])  # n03 is 2 in both splits, not 1
    (tmp_path / "imagenet" / "val" / "n09").mkdir()
    data.clear_cache()
    with pytest.raises(ValueError, match=r"val has class folders that .*train lacks \(n09\)"):
        data.load("imagenet", tmp_path, train=False)


def test_imagenet_flat_val_folder_and_split_trees(tmp_path):
    make_image_folder(tmp_path, classes=("n01",))
    val = tmp_path / "imagenet" / "val"
    for f in (val / "n01").iterdir():
        f.rename(val / f.name)
    (val / "n01").rmdir()  # the raw ILSVRC2012 val tarball: images directly in val/
    with pytest.raises(FileNotFoundError, match=r"no class folders \(images directly in it.*valprep.sh"):
        data.load("imagenet", tmp_path, train=False)
    (tmp_path / "val" / "n01").mkdir(parents=True)  # <root>/val is not mixed with <root>/imagenet/train
    data.clear_cache()
    with pytest.raises(FileNotFoundError, match=r"no class folders"):
        data.load("imagenet", tmp_path, train=False)


def test_imagenet_without_images_names_the_folder_and_the_fix(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"imagenet/train has no class folders \(it is empty\).*image-net.org"):
        data.load("imagenet", tmp_path, train=True)
    make_image_folder(tmp_path / "more", classes=("n01", "n02"))
    for f in (tmp_path / "more" / "imagenet" / "train" / "n02").iterdir():
        f.unlink()  # a train class without images: torchvision's error, with the folder and the fix
    with pytest.raises(FileNotFoundError, match=r"imagenet/train: Found no valid file for the classes n02.*"
                                                r"every train class needs at least one image.*image-net.org"):
        data.load("imagenet", tmp_path / "more", train=True)
    for f in (tmp_path / "more" / "imagenet" / "val" / "n01").iterdir():
        f.unlink()
    for f in (tmp_path / "more" / "imagenet" / "val" / "n02").iterdir():
        f.unlink()  # val may lack classes, but not every image
    with pytest.raises(FileNotFoundError, match=r"imagenet/val's class folders hold no image files.*valprep.sh"):
        data.load("imagenet", tmp_path / "more", train=False)


# ---------------------------------------------------------------- Multi30k

def test_tokenizer():
    assert text.tokenize("A man's T-shirt.") == ["a", "man", "'", "s", "t", "-", "shirt", "."]
    assert text.tokenize("Ein Mann führt  einen Hund aus.") == ["ein", "mann", "führt", "einen", "hund", "aus", "."]


@pytest.mark.parametrize("gz, nested", [(False, True), (True, False)])
def test_multi30k_pairs_and_shared_vocabulary(tmp_path, gz, nested):
    make_multi30k(tmp_path / "multi30k" if nested else tmp_path, gz=gz)
    train, test = data.load("multi30k", tmp_path, train=True), data.load("multi30k", tmp_path, train=False)
    vocab = train.vocab
    assert vocab.itos[:4] == ["<unk>", "<pad>", "<bos>", "<eos>"] and vocab["<pad>"] == 1
    # min frequency 2 over English + German training text: "man" (4x), "ein" (4x), "." (10x) are in;
    # "horse", "pferd", "bike" (once) are not
    for tok in ("man", "ein", "mann", ".", "a", "rides"):
        assert vocab[tok] >= 4, tok
    for tok in ("horse", "pferd", "bike", "zebra"):
        assert tok not in vocab.stoi
    assert vocab.itos[4] == "."  # most frequent first
    assert len(train) == 5 and len(test) == 1 and test.vocab is vocab
    src, tgt = train[0]
    assert src.dtype == torch.long and src[0] == text.BOS and src[-1] == text.EOS and tgt[0] == text.BOS
    assert vocab.decode(src) == ["a", "man", "rides", "a", text.SPECIALS[0], "."]
    assert vocab.decode(test[0][1]) == ["ein", "mann", "<unk>", "ein", "<unk>", "."]  # "reitet": once in train
    val = text.load_multi30k(text.find_multi30k_dir(tmp_path), "val")
    assert vocab.decode(val[0][0]) == ["a", "man", "<unk>", "."]  # "runs" is not in train
    assert data.labels(train).tolist() == [0] * 5


def test_multi30k_batches_are_padded_with_index_1(tmp_path):
    make_multi30k(tmp_path)
    ds = data.load("multi30k", tmp_path)
    loader = data.BatchLoader(ds, 5, shuffle=True, seed=0)
    (src, tgt), = list(loader)
    lengths = [len(ds[i][0]) for i in range(5)]
    assert src.shape == (5, max(lengths)) and src.dtype == torch.long and tgt.shape[0] == 5
    assert int((src == text.PAD).sum()) == sum(max(lengths) - n for n in lengths)
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))[0], src)  # seeded order
    small = data.subset(ds, 2)
    assert isinstance(small, data.TranslationDataset) and len(small) == 2
    assert torch.equal(small[1][1], ds[1][1]) and small.vocab is ds.vocab


def test_multi30k_reads_past_a_byte_order_mark(tmp_path):
    make_multi30k(tmp_path)
    (tmp_path / "train.en").write_text("\ufeffA man rides.\n" * 5, encoding="utf-8")  # as Windows editors write
    (tmp_path / "train.de").write_text("Ein Mann reitet.\n" * 5, encoding="utf-8")
    train = data.load("multi30k", tmp_path)
    assert train.vocab.decode(train[0][0]) == ["a", "man", "rides", "."]  # no <unk> for the mark
    assert len(train.head(99)) == 5 and len(train.head(2)) == 2  # head(n) past the end: every pair, as subset


def test_multi30k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"multi30k: no train.en\[.gz\] in .*github.com/multi30k/dataset"):
        data.load("multi30k", tmp_path)
    make_multi30k(tmp_path)
    (tmp_path / "train.de").write_text("Ein Satz.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="train.en has 5 lines but .*train.de has 1"):
        data.load("multi30k", tmp_path)
    make_multi30k(tmp_path)
    (tmp_path / "test_2016_flickr.de").unlink()
    with pytest.raises(FileNotFoundError, match=r"no test file for 'de' .*test_2016_flickr.de, .*test.de"):
        data.load("multi30k", tmp_path, train=False)
    (tmp_path / "train.en").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load("multi30k", tmp_path)
