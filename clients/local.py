"""A client's work in plain torch: its data, the model at its caps, local training and local evaluation.

No Flower types here: ``clients.client_app`` wraps these functions in Messages, and
``bench/fl_round.py`` calls them back to back in one process for the compute floor.

Everything heavy is built once per process and kept (a Flower worker serves many clients, one call
after another): the run config parsed from its JSON, the data set with its partitions and local
splits (keyed by what determines them), and one template model per model config, whose parameters
every call overwrites (``load_state_dict`` also resizes the LoD layers to the caps). Training reuses
the centralized mode's ``train_epoch`` and ``evaluate``; nothing here is a second training loop.

Seeds: the torch and rank-sampler seeds of a client's round derive from (seed, round, partition id),
the batch order from (seed, partition id) and the epoch (round - 1) * E + e, so runs repeat exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedmaestro import data, lod, nested, tiers
from fedmaestro.centralized import check_vocabulary
from fedmaestro.config import Config, resolve
from fedmaestro.train import (build_model, evaluate, make_optimizer, recalibrate_batchnorm, resolve_device,
                              task_for, train_epoch)

__all__ = ["ClientData", "config_from_json", "client_data", "forget_data", "template", "train", "evaluate_local"]

EVAL_BATCH = 512


@lru_cache(maxsize=8)
def config_from_json(payload: str) -> Config:
    """The validated Config of a run config sent as JSON (parsed once per process and payload)."""
    return resolve(json.loads(payload))


@dataclass(frozen=True)
class ClientData:
    train_set: torch.utils.data.Dataset  # the training split (augmented where the data set is)
    eval_set: torch.utils.data.Dataset  # the same examples, never augmented (local test splits)
    splits: list[tuple[np.ndarray, np.ndarray]]  # per partition id: (local train indices, local test indices)


def _data_key(cfg: Config) -> str:
    # dataset.num_classes too: the entry is checked against it when it is built, and a later run in the same
    # process with another count must be checked again, not served the entry unchecked
    p = cfg.partition
    return json.dumps([cfg.dataset.name, cfg.dataset.num_classes, cfg.data.root, cfg.data.subset, p.scheme, p.alpha,
                       p.min_partition_size, p.classes_per_partition, p.class_assignment, p.shards_per_partition,
                       cfg.fl.num_clients, cfg.seed, cfg.data.local_test_fraction])


_DATA: dict[str, ClientData] = {}


def client_data(cfg: Config, report: Callable[[str], None] | None = None) -> ClientData:
    """The data set and every client's local (train, test) split; built once per process and key.

    What the partitioning warns of (classes no client holds, ...) goes to ``report`` (the server's pre-flight
    check logs it, once per run), not to every worker process that builds the same partitions."""
    key = _data_key(cfg)
    if key not in _DATA:
        train_set = data.load(cfg.dataset.name, root=cfg.data.root, train=True)
        data.check_num_classes(train_set, cfg.dataset.num_classes)
        eval_set = data.unaugmented(train_set)  # the same examples; local test examples are never augmented
        if cfg.data.subset:
            train_set, eval_set = data.subset(train_set, cfg.data.subset), data.subset(eval_set, cfg.data.subset)
        p = cfg.partition
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parts = data.partition(data.labels(train_set), p.scheme, cfg.fl.num_clients, cfg.seed, alpha=p.alpha,
                                   min_partition_size=p.min_partition_size,
                                   classes_per_partition=p.classes_per_partition,
                                   class_assignment=p.class_assignment, shards_per_partition=p.shards_per_partition)
        if report is not None:
            for w in caught:
                report(str(w.message))
        splits = data.split_clients(parts, cfg.data.local_test_fraction, cfg.seed)
        if len(_DATA) >= 2:
            _DATA.pop(next(iter(_DATA)))
        _DATA[key] = ClientData(train_set, eval_set, splits)
    check_vocabulary(cfg, _DATA[key].train_set)  # the server's token ids mean the same words here
    return _DATA[key]


def forget_data() -> None:
    """Drop this process's data sets and splits (``client_data`` builds them again when asked)."""
    _DATA.clear()


_MODELS: dict[str, nn.Module] = {}


def template(cfg: Config) -> nn.Module:
    """The process's model for this model config (built once; every call loads its own arrays into it)."""
    key = json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.dataset), cfg.device])
    if key not in _MODELS:
        if len(_MODELS) >= 2:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = build_model(cfg).to(resolve_device(cfg.device))
    return _MODELS[key]


def _partition(cfg: Config, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    splits = client_data(cfg).splits
    if not 0 <= partition_id < len(splits):
        raise ValueError(f"partition-id {partition_id} is outside [0, fl.num_clients={len(splits)}); the node's "
                         f"partition-id must be below fl.num_clients")
    return splits[partition_id]


def _load(cfg: Config, arrays: dict[str, np.ndarray], caps: dict[str, int] | None) -> nn.Module:
    model = template(cfg)
    nested.load_arrays(model, arrays)
    if caps is not None:
        ranks = {name: layer.rank for name, layer in lod.layers(model)}
        if ranks != caps:
            wrong = {n: (ranks.get(n), caps.get(n)) for n in set(ranks) | set(caps) if ranks.get(n) != caps.get(n)}
            raise ValueError(f"the arrays' ranks differ from the caps sent (layer: (rank, cap)): {wrong}")
    return model


def train(cfg: Config, partition_id: int, arrays: dict[str, np.ndarray], *, rnd: int, caps: dict[str, int],
          hgl_tails: dict[str, tuple[float, float]] | None = None, lr: float, lambda_gl: float, local_epochs: int,
          sampler: str, seed: int) -> tuple[dict, dict]:
    """E local epochs of LoD training at ``caps`` from ``arrays``; (arrays after training, metrics).
    ``hgl_tails``: the squared norms of the global factors beyond ``caps`` (``nested.beyond_caps_sq``), which the
    HGL groups extend over. On CUDA with ``train.amp``, autocast with a GradScaler; a new one every round, whose
    scale starts at 2^16, so a round's first steps may be skipped while it calibrates (a centralized run keeps one).

    metrics: num_examples (local training examples: the aggregation weight), loss (the mean over the
    predictions of every epoch), scored (those predictions: examples trained on, or target tokens), seconds, steps.
    """
    start = time.perf_counter()
    d = client_data(cfg)
    train_idx, _ = _partition(cfg, partition_id)
    model = _load(cfg, arrays, caps)
    device = next(model.parameters()).device
    t = dataclasses.replace(cfg.train, lr=lr, lambda_gl=lambda_gl, sampler=sampler)
    s = tiers.client_seed(seed, rnd, partition_id)
    torch.manual_seed(s)
    rank_sampler = lod.RankSampler(model, sampler, caps=caps, seed=s) if lod.layers(model) else None
    loader = data.BatchLoader(d.train_set, t.batch_size, shuffle=True, seed=tiers.derive_seed(seed, partition_id),
                              indices=train_idx)
    optimizer = make_optimizer(model, t)
    task = task_for(cfg.dataset.name, t.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if t.amp and device.type == "cuda" else None
    total, predictions, steps = 0.0, 0, 0
    for epoch in range(local_epochs):
        loader.set_epoch((rnd - 1) * local_epochs + epoch)
        stats = train_epoch(model, loader, optimizer, t, task, device, sampler=rank_sampler, scaler=scaler,
                            hgl_tails=hgl_tails)
        total += stats["loss"] * stats["predictions"]  # the loss is a mean over predictions (tokens, or examples)
        predictions += stats["predictions"]
        steps += stats["steps"]
    if rank_sampler is not None and nested.batchnorm_names(model):
        # the running statistics mix the sub-models the steps sampled: re-estimated at the caps, on the local
        # training examples (unaugmented), so that the server can pool them per tier
        size = max(t.batch_size, 256)  # every batch weighs the same in the average: no short last one
        calib = data.BatchLoader(data.unaugmented(d.train_set), size, shuffle=True, seed=s, indices=train_idx,
                                 drop_last=train_idx.size >= size)
        recalibrate_batchnorm(model, calib, task, device)
    metrics = {"num_examples": int(train_idx.size), "loss": total / max(predictions, 1), "scored": predictions,
               "steps": steps, "seconds": time.perf_counter() - start}
    return nested.state_arrays(model), metrics


def evaluate_local(cfg: Config, partition_id: int, arrays: dict[str, np.ndarray]) -> dict:
    """Accuracy and loss of ``arrays`` on the client's local test split: {accuracy, loss, num_examples, scored}
    (``train.evaluate``'s)."""
    d = client_data(cfg)
    _, test_idx = _partition(cfg, partition_id)
    if test_idx.size == 0:
        return {"accuracy": 0.0, "loss": 0.0, "num_examples": 0, "scored": 0}
    model = _load(cfg, arrays, None)
    device = next(model.parameters()).device
    loader = data.BatchLoader(d.eval_set, EVAL_BATCH, shuffle=False, indices=test_idx)
    return evaluate(model, loader, task_for(cfg.dataset.name, cfg.train.label_smoothing), device)
