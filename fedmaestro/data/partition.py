"""Federated partitioning with flwr-datasets' partitioners, on local labels only (no download).

``partition`` wraps the labels in ``datasets.Dataset.from_dict({"idx": 0..N-1, "label": labels})``,
hands it to ``IidPartitioner``, ``DirichletPartitioner``, ``PathologicalPartitioner`` or
``ShardPartitioner`` and reads back the ``idx`` column of every partition. ``FederatedDataset`` is
never used (it downloads). Every random draw comes from ``seed``, so the same (labels, scheme,
num_partitions, seed, params) give the same partitions in every process and on every machine.

Schemes and their parameters (extra keys of other schemes are ignored, unknown keys are an error):

* ``iid``: the examples shuffled with ``seed``, then cut into ``num_partitions`` contiguous,
  near-equal parts (flwr's IidPartitioner shards without shuffling, so the shuffle comes first).
* ``dirichlet``: ``alpha`` (> 0; smaller = more skewed labels), ``min_partition_size`` (default 10:
  the classes are re-split until every partition has at least this many; flwr-datasets gives up
  after 11 draws),
  ``self_balancing`` (default False). Hsu et al. 2019 / Yurochkin et al. 2019.
* ``pathological``: ``classes_per_partition`` (default 2) classes per partition, each class split
  evenly among the partitions that hold it; ``class_assignment`` "first-deterministic" (default:
  partition i holds class i mod C and random others, so every class is used once there are at least
  C partitions), "deterministic" or "random".
* ``shard``: ``shards_per_partition`` (default 2): examples sorted by label and cut into
  num_partitions x shards_per_partition equal shards, dealt at random (McMahan et al. 2017); the
  remainder of N / (number of shards) examples is left out.

``split_local`` then splits a client's partition into local train and local test (``split_clients``:
every client, each with its own seed); the central test set is a separate split of the data set and
is never partitioned. Partitioning 60,000 labels takes a few tenths of a second; results are also
kept per process (keyed by a hash of the labels and every argument), since Flower clients in one
worker ask for the same partitions every round.
"""

from __future__ import annotations

import functools
import hashlib
import warnings

import numpy as np

from ..config import CLASS_ASSIGNMENTS
from ..config import PARTITION_SCHEMES as SCHEMES

__all__ = ["SCHEMES", "PARAMS", "partition", "split_local", "split_clients"]

PARAMS = {  # scheme -> its parameters and their defaults
    "iid": {},
    "dirichlet": {"alpha": 0.5, "min_partition_size": 10, "self_balancing": False},
    "pathological": {"classes_per_partition": 2, "class_assignment": "first-deterministic"},
    "shard": {"shards_per_partition": 2},
}
_ALL_PARAMS = {k for p in PARAMS.values() for k in p}
_CACHE: dict = {}  # (labels digest, scheme, num_partitions, seed, params) -> partitions; a few per process
_CACHE_SIZE = 8


def _rng_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"partition: seed={seed!r} must be an int")
    return int(seed) % 2**63  # numpy generators take non-negative seeds


def _positive_int(name: str, value, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"partition: {name}={value!r} must be a positive int; {fix}")
    return int(value)


def _check(labels, scheme: str, num_partitions, params: dict) -> tuple[np.ndarray, int, dict]:
    if scheme not in SCHEMES:
        raise ValueError(f"partition: unknown scheme {scheme!r}; choose one of {list(SCHEMES)}")
    unknown = sorted(set(params) - _ALL_PARAMS)
    if unknown:
        raise ValueError(f"partition: unknown parameter(s) {unknown} for scheme {scheme!r}; "
                         f"its parameters are {list(PARAMS[scheme]) or 'none'}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"partition: labels must be a 1-D integer array (one class id per example), "
                         f"got shape {labels.shape} dtype {labels.dtype}")
    n = _positive_int("num_partitions", num_partitions, "use at least one client (fl.num_clients)")
    if n > labels.size:
        raise ValueError(f"partition: more partitions ({n}) than samples ({labels.size}); use fewer clients "
                         f"(fl.num_clients <= {labels.size}) or more data (a larger data.subset)")
    if scheme == "dirichlet" and n > 1 and labels.size and labels.min() == labels.max():
        raise ValueError("partition: dirichlet splits every class among the clients by Dirichlet(alpha) shares, but "
                         "every label here is the same (a data set without classes, synthetic or multi30k, or a "
                         "one-class subset), so it would only make the clients' sizes unequal; use partition=iid "
                         "(or shard)")
    values = {**PARAMS[scheme], **{k: v for k, v in params.items() if k in PARAMS[scheme]}}
    return labels.astype(np.int64, copy=False), n, values


@functools.cache
def _table_class():
    from datasets import Dataset
    from datasets.fingerprint import generate_random_fingerprint

    class IndexTable(Dataset):
        """An in-memory ``datasets.Dataset`` whose ``select`` skips fingerprint hashing.

        The partitioners call ``select`` with Python lists of indices (of numpy scalars, for
        PathologicalPartitioner), which ``datasets`` hashes with dill for its disk cache: seconds for
        60,000 indices, and useless here since nothing is cached. A random fingerprint is what
        ``datasets`` itself uses when hashing fails.
        """

        def select(self, indices, *args, **kwargs):
            kwargs.setdefault("new_fingerprint", generate_random_fingerprint())
            return super().select(indices, *args, **kwargs)

    return IndexTable


def _table(labels: np.ndarray):
    """labels -> a Dataset with columns ``idx`` (0..N-1) and ``label``, formatted as Arrow so that the
    partitioners' ``dataset["label"]`` is one array, not a row-by-row Python iteration."""
    table = _table_class().from_dict({"idx": np.arange(labels.size, dtype=np.int64), "label": labels})
    return table.with_format("arrow")


def _indices(partitioner, num_partitions: int) -> list[np.ndarray]:
    """The original ``idx`` of every example of every partition (also after ShardPartitioner's sort)."""
    with warnings.catch_warnings():  # datasets' sort passes an option that pyarrow >= 25 deprecates
        warnings.filterwarnings("ignore", message=".*null_placement.*", category=FutureWarning)
        return [partitioner.load_partition(i)[:].column("idx").to_numpy().astype(np.int64, copy=False)
                for i in range(num_partitions)]


def _empty_fix(scheme: str) -> str:
    return {"dirichlet": "raise partition.min_partition_size to at least 1, use fewer clients (fl.num_clients), "
                         "or a larger partition.alpha (less skew)",
            "pathological": "use fewer clients (fl.num_clients) or fewer classes per partition "
                            "(partition.classes_per_partition), or more data (a larger data.subset)",
            "shard": "use fewer clients (fl.num_clients) or fewer shards per partition "
                     "(partition.shards_per_partition)",
            }.get(scheme, "use fewer clients (fl.num_clients)")


def partition(labels, scheme: str, num_partitions: int, seed: int, **params) -> list[np.ndarray]:
    """``num_partitions`` arrays of indices into the data set whose labels are given (see the module docstring).

    Raises ValueError naming the problem and the fix for: an unknown scheme or parameter, an alpha not finite and > 0,
    more partitions than samples, a partition that would be empty or smaller than ``min_partition_size``.
    """
    labels, n, p = _check(labels, scheme, num_partitions, params)
    seed = _rng_seed(seed)
    key = (hashlib.sha1(labels.tobytes()).hexdigest(), labels.size, scheme, n, seed, repr(sorted(p.items())))
    if key not in _CACHE:  # Flower clients in one process ask for the same partitions every round
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _partition(labels, scheme, n, seed, p)
    return [ix.copy() for ix in _CACHE[key]]


def _partition(labels: np.ndarray, scheme: str, n: int, seed: int, p: dict) -> list[np.ndarray]:
    from flwr_datasets import partitioner as fp

    table = _table(labels)
    if scheme == "iid":
        part = fp.IidPartitioner(num_partitions=n)
        part.dataset = table.shuffle(seed=seed)
        out = _indices(part, n)
    elif scheme == "dirichlet":
        alpha = p["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) or not 0 < alpha < np.inf:
            raise ValueError(f"partition: alpha={alpha!r} must be finite and > 0 (the Dirichlet concentration: 0.1 is very "
                             f"skewed, 1 moderate, 100 nearly IID); set partition.alpha to a positive number")
        minimum = p["min_partition_size"]
        if isinstance(minimum, bool) or not isinstance(minimum, (int, np.integer)) or minimum < 0:
            raise ValueError(f"partition: min_partition_size={minimum!r} must be an int >= 0")
        if minimum * n > labels.size:
            raise ValueError(f"partition: {n} partitions of at least min_partition_size={minimum} need "
                             f"{minimum * n} samples, there are {labels.size}; lower partition.min_partition_size "
                             f"or use fewer clients (fl.num_clients)")
        part = fp.DirichletPartitioner(num_partitions=n, partition_by="label", alpha=float(alpha),
                                       min_partition_size=int(minimum), self_balancing=bool(p["self_balancing"]),
                                       shuffle=True, seed=seed)
        part.dataset = table
        try:
            with warnings.catch_warnings():  # flwr warns at every re-draw; the outcome is reported below
                warnings.filterwarnings("ignore", message=".*min_partition_size.*")
                out = _indices(part, n)
        except ValueError as e:
            if "attempts" not in str(e):
                raise
            raise ValueError(f"partition: dirichlet with alpha={alpha} could not give every one of the {n} partitions "
                             f"at least min_partition_size={minimum} samples in 11 draws; use a larger "
                             f"partition.alpha, fewer clients (fl.num_clients) or a smaller "
                             f"partition.min_partition_size") from e
    elif scheme == "pathological":
        k = _positive_int("classes_per_partition", p["classes_per_partition"],
                          "set partition.classes_per_partition >= 1")
        classes = np.unique(labels).size
        if k > classes:
            raise ValueError(f"partition: classes_per_partition={k} but the data have only {classes} classes; "
                             f"set partition.classes_per_partition <= {classes}")
        if p["class_assignment"] not in CLASS_ASSIGNMENTS:
            raise ValueError(f"partition: class_assignment={p['class_assignment']!r}; choose one of "
                             f"{list(CLASS_ASSIGNMENTS)}")
        part = fp.PathologicalPartitioner(num_partitions=n, partition_by="label", num_classes_per_partition=k,
                                          class_assignment_mode=p["class_assignment"], shuffle=True, seed=seed)
        part.dataset = table
        try:
            with warnings.catch_warnings():  # flwr's unused-class warning names a parameter it does not have
                warnings.filterwarnings("ignore", message=".*will NOT be used.*")
                out = _indices(part, n)
        except ValueError as e:
            raise ValueError(f"partition: pathological split with {n} partitions x {k} classes is impossible: a "
                             f"partition would be empty ({e}); {_empty_fix(scheme)}") from e
        unused = np.setdiff1d(np.unique(labels), labels[np.concatenate(out)])
        if unused.size:
            fix = (f"use at least {classes} clients" if p["class_assignment"] == "first-deterministic" else
                   "partition.class_assignment=first-deterministic (client i holds class i mod C) with at least "
                   f"{classes} clients")
            warnings.warn(f"partition: pathological split leaves classes {unused.tolist()} in no partition "
                          f"({n} partitions x {k} classes, class_assignment={p['class_assignment']}); {fix} to "
                          f"train on every class", stacklevel=3)
    else:
        s = _positive_int("shards_per_partition", p["shards_per_partition"], "set it >= 1")
        if n * s > labels.size:
            raise ValueError(f"partition: {n} partitions x {s} shards = {n * s} shards but only {labels.size} "
                             f"samples, so shards would be empty; {_empty_fix(scheme)}")
        part = fp.ShardPartitioner(num_partitions=n, partition_by="label", num_shards_per_partition=s,
                                   shuffle=True, seed=seed)
        part.dataset = table
        out = _indices(part, n)
    empty = [i for i, ix in enumerate(out) if ix.size == 0]
    if empty:
        raise ValueError(f"partition: {scheme} with {n} partitions leaves partition(s) {empty[:10]} empty; "
                         f"{_empty_fix(scheme)}")
    return out


def split_local(indices, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's (local train, local test) indices: a seeded random ``test_fraction`` of ``indices`` is test.

    The test part has ceil(test_fraction * n) examples, but at most n - 1 so that local training
    keeps one; 0 when ``test_fraction`` is 0. Both parts come back sorted (cheap tensor indexing).
    Give each client its own seed (e.g. derived from the run seed and its partition id).
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float, np.floating)) \
            or not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"split_local: test_fraction={test_fraction!r} must be in [0, 1) "
                         f"(data.local_test_fraction)")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1:
        raise ValueError(f"split_local: indices must be 1-D, got shape {indices.shape}")
    n = indices.size
    # ceil with 1e-9 slack: 0.1 * 30 is 3.0000000000000004 in floating point and must give 3, not 4
    n_test = min(int(np.ceil(test_fraction * n - 1e-9)), max(n - 1, 0)) if test_fraction > 0 else 0
    order = np.random.default_rng(_rng_seed(seed)).permutation(n)
    return np.sort(indices[order[n_test:]]), np.sort(indices[order[:n_test]])


def split_clients(partitions: list[np.ndarray], test_fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``split_local`` of every partition, client ``i`` seeded with a hash of (seed, i): one rule for every
    caller (the federated runner, ``describe``), so they agree on each client's local test set."""
    from .loader import epoch_seed

    return [split_local(ix, test_fraction, epoch_seed(seed, i)) for i, ix in enumerate(partitions)]
