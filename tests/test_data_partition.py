"""fedmaestro.data.partition / split_local / the describe command: every scheme, determinism within and
across processes, and every bad input's message."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmaestro import data
from fedmaestro.data import describe, paths, vision
from fedmaestro.data import idx as idx_mod

REPO = Path(__file__).resolve().parents[1]
SORTED_LABELS = np.repeat(np.arange(10), 100)  # 1,000 examples sorted by class: the hard case for IID

CASES = {  # scheme -> parameters used by the determinism tests
    "iid": {},
    "dirichlet": {"alpha": 0.5, "min_partition_size": 10},
    "pathological": {"classes_per_partition": 2},
    "shard": {"shards_per_partition": 2},
}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.setenv(paths.ENV_OFFLINE, "1")
    data.clear_cache()


def _digest(parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


def _check_disjoint(parts, n_total):
    allidx = np.concatenate(parts)
    assert np.unique(allidx).size == allidx.size, "an example is in two partitions"
    assert allidx.min() >= 0 and allidx.max() < n_total
    return allidx


# ---------------------------------------------------------------- schemes

def test_iid_shuffles_before_cutting():
    parts = data.partition(SORTED_LABELS, "iid", 8, seed=0)
    allidx = _check_disjoint(parts, 1000)
    assert allidx.size == 1000 and sorted(len(p) for p in parts) == [125] * 8
    # flwr's IidPartitioner cuts contiguous blocks; on sorted labels that alone would give 1-2 classes
    # per partition. Shuffled, each of 125 draws misses a class with prob ~0.9^125 = 2e-6.
    assert all(np.unique(SORTED_LABELS[p]).size == 10 for p in parts)


def test_dirichlet_skew_follows_alpha_and_respects_min_size():
    labels = np.tile(np.arange(10), 200)  # 2,000 examples
    skewed = data.partition(labels, "dirichlet", 10, seed=1, alpha=0.05, min_partition_size=5)
    flat = data.partition(labels, "dirichlet", 10, seed=1, alpha=1000.0, min_partition_size=5)
    for parts in (skewed, flat):
        assert _check_disjoint(parts, 2000).size == 2000 and min(len(p) for p in parts) >= 5

    def share_of_top_class(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    # alpha = 1000: every client's label mix is ~uniform (top class ~0.1-0.15); alpha = 0.05: a client is
    # dominated by one or two classes (top share well above 0.5). Seeded, so this is not a flaky draw.
    assert share_of_top_class(flat) < 0.2 < 0.5 < share_of_top_class(skewed)


def test_pathological_gives_each_partition_its_classes():
    parts = data.partition(SORTED_LABELS, "pathological", 10, seed=0, classes_per_partition=3)
    _check_disjoint(parts, 1000)
    assert all(np.unique(SORTED_LABELS[p]).size == 3 for p in parts)
    assert np.unique(SORTED_LABELS[np.concatenate(parts)]).size == 10  # first-deterministic: every class used
    with pytest.warns(UserWarning, match=r"classes \[.*\] in no partition .*use at least 10 clients"):
        data.partition(SORTED_LABELS, "pathological", 3, seed=0, classes_per_partition=2)


def test_shard_deals_label_sorted_shards():
    labels = np.random.default_rng(0).permutation(SORTED_LABELS)
    parts = data.partition(labels, "shard", 10, seed=0, shards_per_partition=2)
    _check_disjoint(parts, 1000)
    assert [len(p) for p in parts] == [100] * 10  # 20 shards of floor(1000 / 20) = 50
    # shards of 50 label-sorted examples lie inside one class (100 per class): <= 2 classes per partition
    assert all(np.unique(labels[p]).size <= 2 for p in parts)
    assert np.mean([np.unique(labels[p]).size for p in parts]) < 2.01


@pytest.mark.parametrize("scheme", list(CASES))
def test_same_seed_same_partitions_other_seed_others(scheme):
    a = data.partition(SORTED_LABELS, scheme, 10, seed=7, **CASES[scheme])
    b = data.partition(SORTED_LABELS, scheme, 10, seed=7, **CASES[scheme])
    c = data.partition(SORTED_LABELS, scheme, 10, seed=8, **CASES[scheme])
    assert _digest(a) == _digest(b) != _digest(c)
    a[0][:] = -1  # the caller owns its copy: the in-process cache must not hand out the same arrays
    assert _digest(data.partition(SORTED_LABELS, scheme, 10, seed=7, **CASES[scheme])) == _digest(b)


def test_partitions_are_identical_across_processes():
    here = {s: _digest(data.partition(SORTED_LABELS, s, 10, seed=3, **kw)) for s, kw in CASES.items()}
    here["split"] = _digest(data.split_local(np.arange(100), 0.2, seed=3))
    script = (
        "import json, hashlib, numpy as np\n"
        "from fedmaestro import data\n"
        f"cases = {CASES!r}\n"
        "labels = np.repeat(np.arange(10), 100)\n"
        "def digest(parts):\n"
        "    h = hashlib.sha1()\n"
        "    for p in parts: h.update(np.asarray(p, dtype=np.int64).tobytes() + b'|')\n"
        "    return h.hexdigest()\n"
        "out = {s: digest(data.partition(labels, s, 10, seed=3, **kw)) for s, kw in cases.items()}\n"
        "out['split'] = digest(data.split_local(np.arange(100), 0.2, seed=3))\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str-hash salt must not matter
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == here


def test_partitions_never_touch_the_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("partitioning opened a connection")

    import socket

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for scheme, kw in CASES.items():
        data.partition(SORTED_LABELS, scheme, 10, seed=11, **kw)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, error, message", [
    (lambda: data.partition(SORTED_LABELS, "dirichlett", 4, 0), ValueError,
     r"unknown scheme 'dirichlett'; choose one of \['iid', 'dirichlet', 'pathological', 'shard'\]"),
    (lambda: data.partition(SORTED_LABELS, "dirichlet", 4, 0, alpha=0), ValueError,
     r"alpha=0 must be finite and > 0 .*set partition.alpha to a positive number"),
    (lambda: data.partition(SORTED_LABELS, "dirichlet", 4, 0, alpha=-1.5), ValueError, r"alpha=-1.5 must be finite and > 0"),
    (lambda: data.partition(SORTED_LABELS, "dirichlet", 4, 0, alpha=float("inf")), ValueError,
     r"alpha=inf must be finite and > 0"),
    (lambda: data.partition(np.arange(5) % 2, "iid", 6, 0), ValueError,
     r"more partitions \(6\) than samples \(5\); use fewer clients \(fl.num_clients <= 5\)"),
    (lambda: data.partition(np.arange(20) % 2, "dirichlet", 10, 0, alpha=0.5, min_partition_size=3), ValueError,
     r"10 partitions of at least min_partition_size=3 need 30 samples, there are 20"),
    (lambda: data.partition(np.zeros(20, int), "dirichlet", 4, 0, alpha=0.5), ValueError,
     r"every label here is the same .* only make the clients' sizes unequal; use partition=iid"),
    (lambda: data.partition(np.arange(100) % 10, "dirichlet", 10, 0, alpha=0.05, min_partition_size=9), ValueError,
     r"could not give every one of the 10 partitions at least min_partition_size=9 .*larger partition.alpha, "
     r"fewer clients"),
    (lambda: data.partition(np.arange(20) % 10, "dirichlet", 10, 0, alpha=0.01, min_partition_size=0), ValueError,
     r"dirichlet with 10 partitions leaves partition\(s\) \[.*\] empty; raise partition.min_partition_size to at "
     r"least 1, use fewer clients \(fl.num_clients\), or a larger partition.alpha"),
    (lambda: data.partition(SORTED_LABELS, "pathological", 4, 0, classes_per_partition=11), ValueError,
     r"classes_per_partition=11 but the data have only 10 classes"),
    (lambda: data.partition(np.array([0, 1, 1, 1]), "pathological", 3, 0, classes_per_partition=2,
                            class_assignment="deterministic"), ValueError,
     r"pathological split with 3 partitions x 2 classes is impossible: a partition would be empty .*fewer clients"),
    (lambda: data.partition(np.arange(10), "shard", 4, 0, shards_per_partition=3), ValueError,
     r"4 partitions x 3 shards = 12 shards but only 10 samples"),
    (lambda: data.partition(SORTED_LABELS, "iid", 4, 0, alhpa=0.1), ValueError,
     r"unknown parameter\(s\) \['alhpa'\] for scheme 'iid'"),
    (lambda: data.partition(SORTED_LABELS, "iid", 0, 0), ValueError, r"num_partitions=0 must be a positive int"),
    (lambda: data.partition(SORTED_LABELS.reshape(10, 100), "iid", 2, 0), ValueError, r"labels must be a 1-D integer"),
    (lambda: data.partition(SORTED_LABELS, "iid", 2, "0"), ValueError, r"seed='0' must be an int"),
    (lambda: data.split_local(np.arange(10), 1.0, 0), ValueError, r"test_fraction=1.0 must be in \[0, 1\)"),
    (lambda: data.split_local(np.arange(10), -0.1, 0), ValueError, r"test_fraction=-0.1 must be in \[0, 1\)"),
])
def test_bad_input_names_the_problem_and_the_fix(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_parameters_of_other_schemes_are_ignored():
    # callers pass the whole partition config; an iid split must not care about alpha or shards
    a = data.partition(SORTED_LABELS, "iid", 4, 0, alpha=0.1, shards_per_partition=3, classes_per_partition=2,
                       min_partition_size=10)
    assert _digest(a) == _digest(data.partition(SORTED_LABELS, "iid", 4, 0))


# ---------------------------------------------------------------- local train / test

def test_split_local_is_a_seeded_disjoint_cover():
    indices = np.arange(1000, 1030)
    train, test = data.split_local(indices, 0.1, seed=5)
    assert len(test) == 3 and len(train) == 27  # ceil(0.1 * 30) = 3 despite 0.1 * 30 = 3.0000000000000004
    assert sorted(np.concatenate([train, test]).tolist()) == indices.tolist()
    again = data.split_local(indices, 0.1, seed=5)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    assert not np.array_equal(data.split_local(indices, 0.1, seed=6)[1], test)
    assert len(data.split_local(indices, 0.0, seed=5)[1]) == 0
    assert [len(p) for p in data.split_local([4], 0.5, 0)] == [1, 0]  # one example stays for training
    assert [len(p) for p in data.split_local(np.arange(3), 0.9, 0)] == [1, 2]


def test_split_clients_gives_each_client_its_own_seed():
    parts = data.partition(SORTED_LABELS, "iid", 4, seed=0)
    splits = data.split_clients(parts, 0.2, seed=9)
    for i, (p, (tr, te)) in enumerate(zip(parts, splits)):
        expected = data.split_local(p, 0.2, data.epoch_seed(9, i))
        assert np.array_equal(tr, expected[0]) and np.array_equal(te, expected[1])
        assert len(te) == 50 and np.intersect1d(tr, te).size == 0


# ---------------------------------------------------------------- describe

def _mnist_root(root: Path, n: int = 200) -> Path:
    folder = root / "MNIST" / "raw"
    for train, count in ((True, n), (False, 20)):
        img, lab = vision.IDX_FILES[train]
        idx_mod.write_idx(folder / f"{img}.gz", np.zeros((count, 28, 28), np.uint8))
        idx_mod.write_idx(folder / f"{lab}.gz", (np.arange(count) % 10).astype(np.uint8))
    return root


def test_describe_prints_sizes_and_histograms_and_plots(tmp_path, capsys):
    root = _mnist_root(tmp_path / "data")
    png = tmp_path / "split.png"
    rc = describe.main([f"data.root={root}", "dataset=mnist", "partition=pathological", "fl.num_clients=10",
                        "partition.classes_per_partition=2", "seed=1", "data.local_test_fraction=0.25",
                        "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mnist: pathological (classes_per_partition=2), 10 clients, seed 1" in out
    assert "200 of 200 training examples assigned" in out and "classes per client mean 2.0 of 10" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000

    rows, facts = describe.describe(describe.compose([f"data.root={root}", "dataset=mnist", "partition=pathological",
                                                      "fl.num_clients=10", "seed=1", "data.local_test_fraction=0.25"]))
    labels = np.arange(200) % 10
    parts = data.partition(labels, "pathological", 10, 1, classes_per_partition=2)
    assert len(rows) == len(parts) == 10
    for row, p in zip(rows, parts):  # the table shows exactly what data.partition gives
        assert row.size == len(p) and np.array_equal(row.histogram, np.bincount(labels[p], minlength=10))
        assert row.local_test == int(np.ceil(0.25 * len(p))) and row.local_train + row.local_test == row.size
        assert f"│ {row.client:>6} │ {row.size:>4} │" in out


def test_describe_reports_bad_input_and_fails(tmp_path, capsys):
    root = _mnist_root(tmp_path / "data", n=30)
    assert describe.main([f"data.root={root}", "dataset=mnist", "partition=dirichlet", "fl.num_clients=40",
                          "--no-plot"]) == 2
    assert "more partitions (40) than samples (30)" in capsys.readouterr().err
    assert describe.main(["dataset=not_a_dataset", "--no-plot"]) == 2
    assert "not_a_dataset" in capsys.readouterr().err
    # a class count the federated run refuses is refused here too, not previewed
    assert describe.main([f"data.root={root}", "dataset=mnist", "dataset.num_classes=5", "--no-plot"]) == 2
    assert "dataset.num_classes=5 but mnist has 10 classes" in capsys.readouterr().err


def test_describe_refuses_a_plot_it_cannot_write_before_loading_anything_or_says_why_it_could_not(tmp_path, capsys):
    root = _mnist_root(tmp_path / "data", n=30)
    args = [f"data.root={root}", "dataset=mnist", "partition=iid", "fl.num_clients=3"]
    for plot, hint in ((tmp_path / "split.txt", tmp_path / "split.png"), (tmp_path, tmp_path / "partitions.png")):
        with pytest.raises(SystemExit) as e:  # a name matplotlib would not write as PNG, or write elsewhere
            describe.main(args + ["--plot", str(plot)])
        assert e.value.code == 2 and f"e.g. --plot {hint}" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert describe.main(args + ["--plot", str(blocker / "split.png")]) == 2  # its directory cannot be made
    assert f"error: --plot {blocker / 'split.png'}: cannot be written" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_describe_runs_as_a_module(tmp_path):
    root = _mnist_root(tmp_path / "data", n=60)
    result = subprocess.run([sys.executable, "-m", "fedmaestro.data.describe", f"data.root={root}", "dataset=mnist",
                             "partition=iid", "fl.num_clients=3", "--no-plot"],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, paths.ENV_OFFLINE: "1"})
    assert result.returncode == 0, result.stderr
    assert "mnist: iid, 3 clients, seed 0" in result.stdout and "60 of 60 training examples" in result.stdout


def test_split_local_rounds_up_past_floating_point_noise_only():
    # 0.07 * 100 is 7.000000000000001 in floating point: 7 test examples, not 8; the splits are sorted
    assert 0.07 * 100 > 7
    train, test = data.split_local(np.arange(100), 0.07, 0)
    assert test.size == 7 and train.size == 93 and (np.diff(train) > 0).all() and (np.diff(test) > 0).all()


def test_partition_cache_tells_labels_apart_and_hands_out_copies():
    a = np.array([0] * 4 + [1] * 4)
    b = a[::-1].copy()  # same size and class counts, other order
    pa = data.partition(a, "pathological", 2, 0, classes_per_partition=1)
    pb = data.partition(b, "pathological", 2, 0, classes_per_partition=1)
    # partition 0 holds class 0: positions 0-3 of a, 4-7 of b (a cache keyed without the labels would give b a's)
    assert set(pa[0]) == {0, 1, 2, 3} and set(pb[0]) == {4, 5, 6, 7}
    pa[0][:] = -1  # a caller's edit never reaches the next caller
    assert (data.partition(a, "pathological", 2, 0, classes_per_partition=1)[0] >= 0).all()
