"""The server's global model: its arrays, its tiers' caps, shrinking and evaluation at every budget.

Plain torch and numpy (no Flower types), used by ``MaestroStrategy``. Costs of sub-models (MACs,
parameters) are linear in the ranks, with coefficients taken once from ``train.RankCost`` (one
forward pass with hooks); tier budgets given as caps on MACs or parameters are solved against them
with ``tiers.solve_caps``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from fedmaestro import data, lod, nested, tiers
from fedmaestro.centralized import deployed_footprint, example_input
from fedmaestro.config import Config, TierConfig
from fedmaestro.footprint import measure
from fedmaestro.train import RankCost, build_model, evaluate, resolve_device, seed_everything, task_for

__all__ = ["GlobalModel"]

# LeNet's three models on 2 cores: 0.30 s at 500, 0.59 s at 1000 (whose conv1 output, 14 MB, leaves the cache)
EVAL_BATCH = 500
EVAL_KEPT_BYTES = 256 * 2 ** 20  # the largest prepared test set the server keeps between rounds (test_shards)
EVAL_SHARDS = 4  # test-set shards evaluated side by side (fixed: the sums must not depend on the cores)


class GlobalModel:
    """The global model at its current ranks, with the facts the strategy needs about it."""

    def __init__(self, cfg: Config, test_set=None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.layout = nested.Layout.of(self.model)
        self.factorized = bool(self.layout.layers)
        self.example = example_input(cfg, self.device)
        dense_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, factorize=False))
        self.dense = measure(build_model(dense_cfg).to(self.device), example=self.example)
        self.costs = self._cost_models()
        self._test_set = test_set
        self._test_loader = None
        self._test_shards = None
        self.task = task_for(cfg.dataset.name, cfg.train.label_smoothing)
        # BatchNorm statistics depend on the ranks before each BN layer, so a factorized model keeps them per
        # tier ("0", "1", ...) and for the model itself ("full": the tiers that hold it whole), pooled from the
        # replies
        self.batchnorm = nested.batchnorm_names(self.model) if self.factorized else []
        self.batchnorm_stats: dict[str, dict[str, np.ndarray]] = {}

    # --- arrays and ranks ------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return nested.state_arrays(self.model)

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        nested.load_arrays(self.model, arrays)

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in lod.layers(self.model)}

    def shrink(self, eps: float) -> bool:
        """Progressive shrinking (tail-norm product <= eps); True if some rank fell."""
        before = self.ranks()
        return lod.shrink(self.model, eps) != before

    # --- budgets ---------------------------------------------------------------------------------
    def _cost_models(self) -> dict[str, tiers.CostModel]:
        if not self.factorized:
            return {}
        with torch.no_grad():
            cost = RankCost(self.model, self.example)
        names = [name for name, _ in cost.layers]
        return {"macs": tiers.CostModel(float(cost.fixed_macs), dict(zip(names, map(float, cost.mac_per_rank)))),
                "params": tiers.CostModel(float(cost.fixed_params), dict(zip(names, map(float, cost.param_per_rank))))}

    def tier_caps(self, tier: TierConfig) -> dict[str, int]:
        """Caps of every LoD layer for a tier at the current ranks: ceil(p r_i), tightened by MAC/param caps."""
        if not self.factorized:
            return {}
        limits = []
        if tier.max_macs is not None:
            limits.append((self.costs["macs"], tier.max_macs * self.dense.macs))
        if tier.max_params is not None:
            limits.append((self.costs["params"], tier.max_params * self.dense.params))
        try:
            caps, _ = tiers.solve_caps(self.ranks(), tier.budget, limits)
        except ValueError as e:
            raise ValueError(f"devices: tier {tier.name!r}: {e}") from None
        return caps

    def held_ranks(self, tier_cfgs) -> dict[str, int]:
        """The ranks the tiers of budget 1.0 hold at most, per LoD layer: what the global model can keep.

        Budgets are fractions of the global model's ranks, so once the model is cut to these, a tier of
        budget p < 1 holds at most ceil(p r_i) <= r_i columns (before the cut, against the uncut ranks, it
        may get more than a budget-1.0 tier that max_macs / max_params cut below it). Every tier's caps are
        solved here, so a budget that cannot be met fails now."""
        caps = [self.tier_caps(t) for t in tier_cfgs]
        full = [c for t, c in zip(tier_cfgs, caps) if t.budget == 1.0]
        return {name: max(c[name] for c in full) for name in self.ranks()}

    def cut_to_tiers(self, tier_cfgs, keep_norm: bool = False) -> bool:
        """Cut every LoD layer to ``held_ranks``; True if a rank fell. ``keep_norm``: scale the cut layers'
        factors so that each keeps its Frobenius norm (``lod.truncate``; for a freshly initialized model).

        Columns above every tier's caps are sent to no client: never trained, they would keep their
        initial values in the global model, and since shrinking looks at tail norms that include them,
        nothing could ever shrink (a MAC cap of 1.0x cannot hold the full-rank factorized model, which
        costs more than the dense one). After the cut the tiers of budget 1.0 hold the whole model, so
        cutting again changes nothing."""
        if not self.factorized:
            return False
        held = self.held_ranks(tier_cfgs)
        if held == self.ranks():
            return False
        lod.truncate(self.model, held, keep_norm=keep_norm)
        return True

    # --- BatchNorm statistics per tier --------------------------------------------------------------
    def pool_batchnorm(self, replies_by_tier: dict[int, list[tuple[dict, float]]], full_tiers: list[int],
                       before: dict[str, np.ndarray]) -> None:
        """After aggregation: every tier that answered gets the pooled statistics of its replies, and the
        model's own BatchNorm buffers those of ``full_tiers``, the tiers that held the whole model this round
        (kept from an earlier round when none of them answered; until one has, the model keeps its statistics
        of ``before``, the arrays the round started from: the aggregation's mean over the replies would give
        it the statistics of smaller tiers' sub-models). Clients recalibrate their statistics at their caps
        before replying. The server has no data to recalibrate with, so after a shrink a tier's statistics are
        those measured at its caps before it, until its clients answer again."""
        if not self.batchnorm:
            return
        for tier, replies in replies_by_tier.items():
            self.batchnorm_stats[str(tier)] = nested.pool_batchnorm(replies, self.batchnorm)
        full = [r for t in full_tiers for r in replies_by_tier.get(t, [])]
        if full:
            self.batchnorm_stats["full"] = nested.pool_batchnorm(full, self.batchnorm)
        keys = [f"{name}.{stat}" for name in self.batchnorm for stat in ("running_mean", "running_var")]
        own = self.batchnorm_stats.get("full") or {key: before[key] for key in keys}
        nested.load_batchnorm(self.model, own)

    def tier_batchnorm(self, tier: int) -> dict[str, np.ndarray] | None:
        """The statistics a tier's sub-model is evaluated with (the model's own until that tier answers)."""
        return self.batchnorm_stats.get(str(tier), self.batchnorm_stats.get("full"))

    # --- evaluation --------------------------------------------------------------------------------
    @property
    def test_loader(self):
        if self._test_loader is None:
            test_set = self._test_set
            if test_set is None:
                test_set = data.load(self.cfg.dataset.name, root=self.cfg.data.root, train=False)
            if self.cfg.data.test_subset:
                test_set = data.subset(test_set, self.cfg.data.test_subset)
            self._test_loader = data.BatchLoader(test_set, EVAL_BATCH, shuffle=False)
        return self._test_loader

    @property
    def test_shards(self) -> list:
        """The central test set cut into ``EVAL_SHARDS`` fixed shards of batches. An in-memory set's batches are
        made once and kept where they take at most ``EVAL_KEPT_BYTES`` as float32 (the server scores them every
        round; for Fashion-MNIST the indexing and normalization cost ~40 ms a round, the kept batches 31 MB; CIFAR's
        123 MB); other sets' are read on every pass."""
        if self._test_shards is None:
            test_set = self.test_loader.dataset
            shards = [data.BatchLoader(test_set, EVAL_BATCH, shuffle=False, indices=idx)
                      for idx in np.array_split(np.arange(len(test_set)), EVAL_SHARDS) if idx.size]
            if (isinstance(test_set, data.InMemoryDataset) and not (test_set.augment and test_set.train)
                    and test_set.inputs.numel() * 4 <= EVAL_KEPT_BYTES):
                shards = [list(shard) for shard in shards]
            self._test_shards = shards
        return self._test_shards

    def sub_model(self, caps: dict[str, int] | None) -> nn.Module:
        """A copy of the global model cut to ``caps`` (the model itself when ``caps`` is None or full)."""
        if not caps or caps == self.ranks():
            return self.model
        return lod.truncate(copy.deepcopy(self.model), caps)

    def footprint(self, model: nn.Module) -> dict:
        """params/macs as held (factorized, at its ranks), deployed (layers cheaper dense merged), and relative to
        the dense model."""
        held = measure(model, example=self.example)
        deployed = deployed_footprint(model, self.example) if self.factorized else held
        return {"params": held.params, "macs": held.macs, "params_deployed": deployed.params,
                "macs_deployed": deployed.macs, "params_rel": deployed.params / self.dense.params,
                "macs_rel": deployed.macs / self.dense.macs}

    def snapshot(self, caps_list: list[dict[str, int] | None],
                 batchnorm: list[dict[str, np.ndarray] | None] | None = None,
                 detached: bool = False) -> list[nn.Module]:
        """The global model cut to every caps in ``caps_list`` (None: whole), each with its ``batchnorm``
        statistics where given: what ``score`` scores. The cuts are copies; the whole model is copied where
        statistics are loaded into it, or where ``detached`` (untouched by later rounds)."""
        stats = list(batchnorm or []) + [None] * (len(caps_list) - len(batchnorm or []))
        models = []
        for caps, bn in zip(caps_list, stats):
            model = self.sub_model(caps)
            if model is self.model and (detached or bn):
                model = copy.deepcopy(model)
            models.append(nested.load_batchnorm(model, bn) if bn else model)
        return models

    def score(self, models: list[nn.Module], accuracy: bool = True) -> list[dict]:
        """The footprint of every model and, with ``accuracy``, its accuracy and loss on the central test set,
        side by side on the machine's cores.

        The test set is cut into ``EVAL_SHARDS`` fixed shards; every (model, shard) pair is a job for a
        pool of threads (one per core) with one torch thread each, on a model copy of its own. The shards
        and the order of the sums are fixed, so the numbers do not depend on how many cores the server
        has (a conv's sums do depend on its thread count)."""
        if not accuracy:
            return [self.footprint(model) for model in models]
        shards = self.test_shards
        jobs = [(i, shard) for i in range(len(models)) for shard in shards]
        workers = max(1, min(len(jobs), os.cpu_count() or 1))

        def run(job):
            i, shard = job
            return evaluate(copy.deepcopy(models[i]), shard, self.task, self.device)

        with ThreadPoolExecutor(workers, "fedmaestro-eval", initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            parts = list(pool.map(run, jobs))
        rows = []
        for i, model in enumerate(models):
            mine = [p for (j, _), p in zip(jobs, parts) if j == i]
            scored = sum(p["scored"] for p in mine)
            row = {"accuracy": sum(p["correct"] for p in mine) / max(scored, 1),
                   "loss": sum(p["loss"] * p["scored"] for p in mine) / max(scored, 1)}
            if "nll" in mine[0]:  # translation: exp of the mean NLL per target token, over the shards' tokens
                row["perplexity"] = math.exp(sum(p["nll"] for p in mine) / scored) if scored else math.nan
            row.update(self.footprint(model))
            rows.append(row)
        return rows

    def evaluate_many(self, caps_list: list[dict[str, int] | None],
                      batchnorm: list[dict[str, np.ndarray] | None] | None = None) -> list[dict]:
        """``score`` of the global model cut to every caps in ``caps_list`` (with its ``batchnorm`` statistics
        where given)."""
        return self.score(self.snapshot(caps_list, batchnorm))

    def evaluate(self, caps: dict[str, int] | None = None) -> dict:
        """{accuracy, loss} on the central test set, and the footprint, of the global model cut to ``caps``."""
        return self.evaluate_many([caps])[0]
