"""Structured configs: the schema of every key under conf/, validated before any work starts.

Hydra composes conf/config.yaml over these dataclasses (registered in the ConfigStore as
``base_config``), so a value of the wrong type (and an unknown key without ``+``) fails at
composition; ``resolve(cfg)`` then builds the dataclasses, names the unknown keys composition let
through (``+train.lrr=...``), and ``__post_init__`` checks the values, naming the key, the value and
what is allowed. Checks added after runs were stored (``_check_new``) apply to new runs only.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

MODES = ("federated", "centralized", "deploy", "hpo", "theory")
SAMPLER_MODES = ("per_layer", "across_layers", "fixed", "none")
HGL_MODES = ("subgradient", "proximal")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("multistep", "inverse_sqrt")
DEPLOY_CRITERIA = ("loss", "loss_per_mac", "loss_per_param")
LOSS_REDUCTIONS = ("mean", "sum")
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "shard")
CLASS_ASSIGNMENTS = ("first-deterministic", "deterministic", "random")  # pathological (flwr-datasets' modes)


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"config: {key}={value!r} is not allowed; choose one of {list(allowed)}")


def _check(key: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"config: {key}={value!r} is invalid: {rule}")


# A stored config (a checkpoint's, a config.json) was valid when its run started: the checks added since
# (``_check_new``) are for new runs, and skipped while one is read back (``resolve`` of a dict), so that a model
# trained before them still loads, deploys and plots.
_READING_STORED: ContextVar[bool] = ContextVar("reading_stored_config", default=False)


def _check_new(key: str, value: Any, ok: bool, rule: str) -> None:
    """``_check`` for a rule added on 2026-12-03: new runs only."""
    if not _READING_STORED.get():
        _check(key, value, ok, rule)


def _check_finite(prefix: str, section: Any) -> None:
    """Every float of a config section (and of its lists) is a finite number: inf and nan are refused here, by
    key, before a range check could let them through or a run turn them into a NaN loss (new runs only)."""
    if _READING_STORED.get():
        return
    for f in fields(section):
        value = getattr(section, f.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"config: {prefix}.{f.name}={value!r} is invalid: must be a finite number")


@dataclass
class ModelConfig:
    name: str = "lenet"
    factorize: bool = True
    skip: list[str] = field(default_factory=list)  # module names kept dense (lod.factorize's skip)
    skip_last: bool = False  # also keep the output layer (the classifier: models.CLASSIFIER) dense
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to models.build


@dataclass
class DatasetConfig:
    name: str = "fashion_mnist"
    input_shape: list[int] = field(default_factory=lambda: [1, 28, 28])  # one example, for footprints
    num_classes: int = 10
    # filled in by the run, never given: the fingerprint of a text data set's vocabulary (``Vocab.fingerprint``),
    # so that a resume, a deployment or a client on a data copy whose token ids mean other words is refused
    vocabulary: Optional[str] = None


@dataclass
class DataConfig:
    root: Optional[str] = None  # where data sets live (torchvision layouts); None = the defaults
    subset: Optional[int] = None  # first N training samples (smoke runs; evenly spaced ones for ImageNet)
    test_subset: Optional[int] = None  # first N test samples (likewise)
    # federated: share of each client's partition held out as its local test split (fl.federated_eval_every);
    # held out whether or not federated evaluation runs, so that turning it on leaves the training data as it was
    local_test_fraction: float = 0.1

    def __post_init__(self):
        _check_finite("data", self)
        _check("data.subset", self.subset, self.subset is None or self.subset > 0, "must be a positive int or null")
        _check("data.test_subset", self.test_subset, self.test_subset is None or self.test_subset > 0,
               "must be a positive int or null")
        _check("data.local_test_fraction", self.local_test_fraction, 0.0 <= self.local_test_fraction < 1.0,
               "must be in [0, 1)")


@dataclass
class PartitionConfig:
    scheme: str = "dirichlet"
    alpha: float = 0.5  # dirichlet
    classes_per_partition: int = 2  # pathological
    # pathological: which classes each partition gets; first-deterministic: partition i holds class i mod C and random
    # others (every class is used once there are at least C partitions); deterministic: classes i .. i + k - 1; random
    class_assignment: str = "first-deterministic"
    shards_per_partition: int = 2  # shard
    min_partition_size: int = 10  # dirichlet: resample until every partition has this many

    def __post_init__(self):
        _check_finite("partition", self)
        _check_choice("partition.scheme", self.scheme, PARTITION_SCHEMES)
        _check_choice("partition.class_assignment", self.class_assignment, CLASS_ASSIGNMENTS)
        _check("partition.alpha", self.alpha, self.alpha > 0, "must be > 0 (smaller = more skewed labels)")


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0  # applied to weights only, never to 1-D parameters (bias, norms)
    milestones: list[int] = field(default_factory=list)  # multi-step LR decay epochs (federated: rounds)
    gamma: float = 0.1
    warmup_epochs: int = 0  # linear warm-up (Transformer recipe; federated: rounds)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # adam
    grad_clip: Optional[float] = None
    label_smoothing: float = 0.0
    # the data loss that lambda * HGL is added to: the mean over the batch's predictions (examples, or target tokens
    # for translation), or their sum, as the paper's Transformer code (from Pufferfish) trains; the records' loss is
    # the mean either way. With sum, lambda weighs ~ 1 / (predictions per batch) as much against the data
    loss_reduction: str = "mean"
    lambda_gl: float = 0.0  # HGL strength
    # epochs (federated: rounds) at the start trained without HGL (lambda 0, ranks still sampled); the lasso
    # starts after them, on a model that has learned something, instead of shrinking the initialization
    lambda_warmup: int = 0
    # HGL off (lambda 0) from the first epoch (federated: round) that starts with the model's deployed
    # params at or below this fraction of the dense model's; null = HGL all along
    lambda_stop_params: Optional[float] = None
    # once the lasso has stopped, train without rank sampling (every layer at its cap): fine-tuning at the
    # ranks reached, which recovers what sampling costs (the paper, Sec. 3.3); needs lambda_stop_params
    finetune_after_stop: bool = False
    # the paper's penalty in the loss, or the exact proximal step of threshold lr * lambda after each optimizer step
    # (proximal gradient descent for plain SGD; with momentum or Adam the same operator, a common heuristic)
    hgl_mode: str = "subgradient"
    eps_ps: float = 1e-5  # progressive shrinking threshold (train.shrink=false turns shrinking off)
    shrink: bool = True
    sampler: str = "per_layer"
    # extra full-rank pass with self-distillation ("w/ full-training"): every step also trains the model at its
    # caps and distills it into the sampled sub-model; only where ranks are sampled (a factorized model, sampler
    # per_layer / across_layers, not after finetune_after_stop's switch), where else the two are the same network
    full_pass: bool = False
    distill_weight: float = 1.0  # the distillation term's weight in full_pass
    amp: bool = False  # CUDA autocast with a GradScaler (centralized and federated clients)
    eval_every: int = 1
    num_workers: int = 0
    lr_schedule: str = "multistep"  # multistep (CNN recipes) | inverse_sqrt (Transformer: warm-up, then 1/sqrt)
    threads: Optional[int] = None  # torch.set_num_threads for the run (CPU); null = torch's default

    def __post_init__(self):
        _check_finite("train", self)
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check("train.threads", self.threads, self.threads is None or self.threads > 0, "must be a positive int or null")
        _check("train.eval_every", self.eval_every, self.eval_every > 0, "must be > 0 (epochs between evaluations)")
        _check_choice("train.hgl_mode", self.hgl_mode, HGL_MODES)
        _check_choice("train.loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _check_choice("train.sampler", self.sampler, SAMPLER_MODES)
        _check("train.epochs", self.epochs, self.epochs >= 0, "must be >= 0")
        _check("train.batch_size", self.batch_size, self.batch_size > 0, "must be > 0")
        _check("train.lr", self.lr, self.lr > 0, "must be > 0")
        _check("train.lambda_gl", self.lambda_gl, self.lambda_gl >= 0, "must be >= 0")
        _check("train.lambda_warmup", self.lambda_warmup, isinstance(self.lambda_warmup, int) and
               self.lambda_warmup >= 0, "must be an int >= 0 (epochs, or federated rounds, before the lasso starts)")
        _check("train.lambda_stop_params", self.lambda_stop_params,
               self.lambda_stop_params is None or 0 < self.lambda_stop_params <= 1,
               "must be null or a fraction in (0, 1] of the dense model's parameters")
        _check_new("train.lambda_stop_params", self.lambda_stop_params,
                   self.lambda_stop_params is None or self.lambda_stop_params < 1,
                   "must be null or a fraction in (0, 1) of the dense model's parameters (the model starts at or below "
                   "1.0x, so 1 would stop the lasso before the first epoch; null keeps it on all along)")
        _check("train.finetune_after_stop", self.finetune_after_stop,
               not self.finetune_after_stop or self.lambda_stop_params is not None,
               "needs train.lambda_stop_params (the params target that ends the lasso and starts the fine-tuning)")
        _check("train.eps_ps", self.eps_ps, self.eps_ps >= 0, "must be >= 0")
        _check("train.momentum", self.momentum, 0 <= self.momentum < 1, "must be in [0, 1)")
        _check("train.weight_decay", self.weight_decay, self.weight_decay >= 0, "must be >= 0")
        _check("train.gamma", self.gamma, self.gamma > 0, "must be > 0 (the LR is multiplied by it at each milestone)")
        _check("train.milestones", self.milestones, all(m > 0 for m in self.milestones),
               "every milestone must be an epoch > 0")
        _check("train.milestones", self.milestones, not self.milestones or self.lr_schedule == "multistep",
               f"are the LR decays of lr_schedule=multistep; {self.lr_schedule} ignores them: set train.milestones=[]")
        _check("train.warmup_epochs", self.warmup_epochs, self.warmup_epochs >= 0, "must be >= 0")
        _check("train.betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               "must be two numbers in [0, 1) (Adam's beta1, beta2)")
        _check("train.grad_clip", self.grad_clip, self.grad_clip is None or self.grad_clip > 0,
               "must be > 0 (the largest gradient norm) or null for no clipping")
        _check("train.label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "must be in [0, 1)")
        _check("train.distill_weight", self.distill_weight, self.distill_weight >= 0, "must be >= 0")
        _check("train.num_workers", self.num_workers, self.num_workers >= 0, "must be >= 0")


@dataclass
class TierConfig:
    name: str = "full"
    share: float = 1.0  # share of the clients in this tier
    budget: float = 1.0  # fraction p of every layer's current rank: caps k_i = ceil(p r_i)
    max_macs: Optional[float] = None  # and/or: a cap on MACs, as a fraction of the dense model's (solved into caps)
    max_params: Optional[float] = None  # and/or: a cap on parameters, as a fraction of the dense model's
    # fault injection, per round and client: the server hears nothing from the client before the round's
    # timeout (strategy.round_timeout) and goes on without it; the records count the two kinds apart
    dropout: float = 0.0  # probability that a client of this tier does not answer a round (the device is gone)
    straggler: float = 0.0  # probability that it answers after the round's timeout (its update comes too late)

    def __post_init__(self):
        _check_finite(f"devices.tiers[{self.name}]", self)
        _check(f"devices.tiers[{self.name}].budget", self.budget, 0 < self.budget <= 1, "must be in (0, 1]")
        _check(f"devices.tiers[{self.name}].share", self.share, self.share > 0, "must be > 0")
        for key in ("max_macs", "max_params"):
            value = getattr(self, key)
            _check(f"devices.tiers[{self.name}].{key}", value, value is None or value > 0,
                   "must be null or a fraction > 0 of the dense model's count")
        for key in ("dropout", "straggler"):
            value = getattr(self, key)
            _check(f"devices.tiers[{self.name}].{key}", value, 0 <= value <= 1, "must be a probability in [0, 1]")
        _check(f"devices.tiers[{self.name}].dropout + straggler", self.dropout + self.straggler,
               self.dropout + self.straggler <= 1, "the two fault probabilities must sum to at most 1")


@dataclass
class DevicesConfig:
    name: str = "homogeneous"
    tiers: list[TierConfig] = field(default_factory=lambda: [TierConfig()])

    def __post_init__(self):
        _check("devices.tiers", len(self.tiers), len(self.tiers) > 0, "give at least one tier")
        names = [t.name for t in self.tiers]
        _check("devices.tiers.name", names, len(set(names)) == len(names), "tier names must be unique")
        _check_new("devices.tiers", [f"{t.name}: dropout {t.dropout:g} + straggler {t.straggler:g}" for t in self.tiers],
                   any(t.dropout + t.straggler < 1 for t in self.tiers),
                   "no client of any tier could ever answer a round in time (dropout + straggler = 1 in every tier); "
                   "lower a tier's fault probabilities")
        largest = max(t.budget for t in self.tiers)
        _check("devices.tiers.budget", [t.budget for t in self.tiers], largest == 1.0,
               "the largest budget must be 1.0: budgets are fractions of the global model's ranks, and the global "
               f"model is what the largest tier holds (divide them by {largest:g}; cap compute with max_macs / "
               "max_params instead)")


@dataclass
class StrategyConfig:
    name: str = "maestro"
    shrink_every: int = 1  # rounds between server-side progressive shrinking; 0 = never
    round_timeout: float = 600.0  # seconds a round waits for replies
    eval_tiers: bool = True  # evaluate the global model at every tier's budget
    eval_every: int = 1  # rounds between server-side evaluations (the last round is always evaluated)
    # evaluate round r's global model while round r+1's clients train: for servers with cores of their own (a
    # simulation's server shares the clients' cores, which then train slower: docs/federated-results.md)
    overlap_eval: bool = False
    connect_timeout: float = 120.0  # seconds to wait for fl.num_clients nodes to connect and answer the query
    # where budgets cut the freshly initialized global model before round 1 (a max_params / max_macs cap on the
    # budget-1.0 tiers), scale each cut layer's U and V so that U V^T keeps its initial Frobenius norm: a truncated
    # SVD of a random initialization keeps only part of it, and the cut layers would start with smaller outputs
    keep_init_norm: bool = True

    def __post_init__(self):
        _check_finite("strategy", self)
        _check_choice("strategy.name", self.name, ("maestro",))
        _check("strategy.shrink_every", self.shrink_every, self.shrink_every >= 0, "must be >= 0 (0 = never)")
        _check("strategy.round_timeout", self.round_timeout, self.round_timeout > 0, "must be > 0 seconds")
        _check("strategy.eval_every", self.eval_every, self.eval_every >= 1, "must be >= 1")
        _check("strategy.connect_timeout", self.connect_timeout, self.connect_timeout > 0, "must be > 0 seconds")


@dataclass
class FLConfig:
    num_clients: int = 20
    rounds: int = 20
    clients_per_round: int = 10
    local_epochs: int = 1
    client_cpus: float = 1.0  # Ray resources per client; torch threads per client = max(1, int(client_cpus))
    client_gpus: float = 0.0  # Ray's GPU share per client (0.25: at most 4 at once on a GPU); `device` picks the device
    # rounds between federated evaluations on local test splits (and the last); 0 = never. Each sends every client
    # its tier's model, counted in bytes_down (the records' bytes are all the run's traffic)
    federated_eval_every: int = 0

    def __post_init__(self):
        _check_finite("fl", self)
        _check("fl.num_clients", self.num_clients, self.num_clients > 0, "must be > 0")
        _check("fl.rounds", self.rounds, self.rounds >= 1, "must be >= 1")
        _check("fl.clients_per_round", self.clients_per_round, 0 < self.clients_per_round <= self.num_clients,
               f"must be in [1, fl.num_clients={self.num_clients}]")
        _check("fl.local_epochs", self.local_epochs, self.local_epochs > 0, "must be > 0")
        _check("fl.client_cpus", self.client_cpus, self.client_cpus > 0, "must be > 0")
        _check("fl.client_gpus", self.client_gpus, self.client_gpus >= 0, "must be >= 0")
        _check("fl.federated_eval_every", self.federated_eval_every, self.federated_eval_every >= 0,
               "must be >= 0 (0 = never)")


@dataclass
class DeployConfig:
    batch_size: int = 2048  # the one large batch that estimates each candidate's loss
    step: float = 0.1  # share of one layer's ranks a candidate removes
    target_macs: list[float] = field(default_factory=lambda: [0.5])  # fractions of the start's MACs to export
    min_accuracy: Optional[float] = None
    svd_baseline: Optional[str] = None  # checkpoint of a dense model for the SVD baseline
    target_params: list[float] = field(default_factory=list)  # fractions of the start's params to export
    stop_macs: float = 0.05  # the greedy curve stops at this fraction of the start's MACs
    stop_params: Optional[float] = None  # ... or at this fraction of the start's parameters
    criterion: str = "loss"  # the paper's: smallest loss increase; or the increase per MAC / parameter removed
    eval_every: int = 1  # greedy steps between test-set evaluations on the curve
    # re-score a step's candidates best-first by their last score and stop once none left can beat the best (lazy
    # greedy): the same choices where a candidate's loss increase only grows as the model shrinks, in a few forward
    # passes a step instead of one per layer (hours -> minutes for a Transformer or ResNet-50 on the CPU)
    lazy: bool = False

    def __post_init__(self):
        _check_finite("deploy", self)
        _check("deploy.batch_size", self.batch_size, self.batch_size > 0, "must be > 0")
        _check("deploy.step", self.step, 0 < self.step <= 1, "must be in (0, 1] (share of a layer's ranks)")
        for key in ("target_macs", "target_params"):
            values = getattr(self, key)
            _check(f"deploy.{key}", values, all(0 < v <= 1 for v in values), "every entry must be in (0, 1]")
        _check("deploy.stop_macs", self.stop_macs, 0 <= self.stop_macs < 1, "must be in [0, 1)")
        _check("deploy.stop_params", self.stop_params, self.stop_params is None or 0 <= self.stop_params < 1,
               "must be in [0, 1) or null")
        _check_new("deploy.min_accuracy", self.min_accuracy, self.min_accuracy is None or 0 <= self.min_accuracy <= 1,
                   "must be null or an accuracy in [0, 1] (a fraction, not a percentage)")
        for key, stop in (("target_macs", self.stop_macs), ("target_params", self.stop_params)):
            below = [v for v in getattr(self, key) if stop is not None and v < stop]
            stop_key = key.replace("target", "stop")
            _check_new(f"deploy.{key}", getattr(self, key), not below,
                       f"{below} lie below deploy.{stop_key}={stop:g}, where the greedy curve stops before reaching "
                       f"them; lower deploy.{stop_key}" if below else "")
        _check_choice("deploy.criterion", self.criterion, DEPLOY_CRITERIA)
        _check("deploy.eval_every", self.eval_every, self.eval_every > 0, "must be > 0")


@dataclass
class HPOConfig:
    min_accuracy: float = 0.85
    max_params: float = 0.3  # fraction of the dense model's parameters
    lambda_large: float = 5.12e-3
    lambda_small: float = 1e-5
    eval_every: int = 5
    few_params: float = 0.01  # below this fraction the model is too sparse: stop that lambda
    # share of the training set held out to check min_accuracy on (Algorithm 2's CalculateAcc); every lambda
    # trains on the rest. 0: check on the test set, as the paper's tables report (an optimistic choice)
    val_fraction: float = 0.1

    def __post_init__(self):
        _check_finite("hpo", self)
        _check("hpo.min_accuracy", self.min_accuracy, 0 <= self.min_accuracy <= 1, "must be in [0, 1]")
        _check("hpo.max_params", self.max_params, 0 < self.max_params <= 1, "must be in (0, 1] (share of dense)")
        _check("hpo.lambda_large", self.lambda_large, self.lambda_large > self.lambda_small,
               f"must be > hpo.lambda_small={self.lambda_small} (Algorithm 2 halves lambda from large to small)")
        _check("hpo.lambda_small", self.lambda_small, self.lambda_small > 0, "must be > 0")
        _check("hpo.eval_every", self.eval_every, self.eval_every > 0, "must be > 0 (epochs)")
        _check("hpo.val_fraction", self.val_fraction, 0 <= self.val_fraction < 1,
               "must be in [0, 1) (share of the training set held out; 0 checks accuracy on the test set)")
        _check("hpo.few_params", self.few_params, 0 <= self.few_params < self.max_params,
               f"must be in [0, hpo.max_params={self.max_params}) (share of dense below which a model is too sparse)")


@dataclass
class TheoryConfig:
    steps: int = 2500  # SGD steps of every experiment (the paper's Fig. 7: 2500)
    lr: float = 0.05
    batch_size: int = 64
    lambda_gl: float = 0.02  # HGL strength of the adaptivity experiment (Fig. 7)
    hgl_mode: str = "subgradient"  # lambda * HGL in the loss, or the exact proximal step (zeros)
    eps_ps: float = 1e-4  # shrinking threshold of the adaptivity experiment
    shrink_every: int = 50  # steps between progressive shrinks ("an epoch")
    log_every: int = 10  # steps between recorded points of the curves

    def __post_init__(self):
        _check_finite("theory", self)
        _check_choice("theory.hgl_mode", self.hgl_mode, HGL_MODES)
        for key in ("steps", "batch_size", "shrink_every", "log_every"):
            value = getattr(self, key)
            _check(f"theory.{key}", value, value > 0, "must be > 0")
        _check("theory.lr", self.lr, self.lr > 0, "must be > 0")
        _check("theory.lambda_gl", self.lambda_gl, self.lambda_gl >= 0, "must be >= 0")
        _check("theory.eps_ps", self.eps_ps, self.eps_ps >= 0, "must be >= 0")


@dataclass
class Config:
    mode: str = "federated"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: bool = False
    checkpoint: Optional[str] = None
    progress: bool = True  # false: no progress bar (centralized) / no line per round (federated); results still print
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    hpo: HPOConfig = field(default_factory=HPOConfig)
    theory: TheoryConfig = field(default_factory=TheoryConfig)

    def __post_init__(self):
        _check_choice("mode", self.mode, MODES)
        _check("seed", self.seed, self.seed >= 0, "must be >= 0 (numpy's and torch's generators take no negative seed)")
        _check_new("seed", self.seed, self.seed < 2 ** 32,
                   "must be in [0, 2**32) (numpy's and torch's generators take no negative seed, torch none of 2**63 or "
                   "more, and the runs derive further seeds from it)")
        _check_new("fl.federated_eval_every", self.fl.federated_eval_every,
                   self.mode != "federated" or not self.fl.federated_eval_every or self.data.local_test_fraction > 0,
                   "needs local test splits to evaluate on, but data.local_test_fraction=0 holds none out: set "
                   "data.local_test_fraction (0.1) or fl.federated_eval_every=0")
        if self.train.lambda_warmup and self.mode in ("federated", "centralized", "hpo"):  # the modes that train
            unit, key, length = (("round", "fl.rounds", self.fl.rounds) if self.mode == "federated" else
                                 ("epoch", "train.epochs", self.train.epochs))
            _check("train.lambda_warmup", self.train.lambda_warmup, self.train.lambda_warmup < length,
                   f"leaves no {unit} with the lasso ({key}={length}): lower it below {key}, or set train.lambda_gl=0 "
                   f"for a run without the lasso")
        _check("device", self.device, re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
               "must be auto, cpu, cuda, cuda:N or mps")


def register() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent). The root schema types every group's options
    too (conf/model/*.yaml merge into Config.model, a ModelConfig), so no group needs a schema of its own,
    which ``--help`` would list as an option."""
    ConfigStore.instance().store(name="base_config", node=Config)


def resolve(cfg: DictConfig | Config | dict) -> Config:
    """The typed, validated Config of a composed DictConfig, or of a stored plain dict (a checkpoint's, a
    config.json, a run config sent to a client); raises ValueError naming the bad key.

    A stored config was resolved when it was written, so an interpolation in one (``${oc.env:...}``) is
    refused, not resolved: a shared model file must not read the environment of whoever loads it.
    """
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, dict):
        interpolated = sorted(_interpolations(cfg))
        if interpolated:
            raise ValueError(f"config: a stored config holds interpolations, which are not resolved from files or "
                             f"messages: {', '.join(interpolated[:5])}; write the values themselves")
        token = _READING_STORED.set(True)
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
        finally:
            _READING_STORED.reset(token)
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    except InterpolationResolutionError as e:  # ${oc.env:UNSET}, ${a.key.that.is.not.there}
        key = getattr(e, "full_key", None) or "a value"
        raise ValueError(f"config: {key}: the interpolation does not resolve ({str(e).splitlines()[0]}); fix the "
                         f"${{...}} in that override or set what it reads") from None
    if isinstance(cfg, DictConfig):  # a composed config: a key the schema lacks would be dropped silently
        unknown = _unknown_keys(OmegaConf.to_container(cfg, resolve=False), to_dict(config))
        if unknown:
            raise ValueError("config: unknown keys (not in the schema, fedmaestro/config.py): " + "; ".join(unknown))
    return config


def _unknown_keys(given: Any, known: Any, path: str = "") -> list[str]:
    """``key`` (with a close known key, if any) for every key of ``given`` that ``known`` lacks."""
    if isinstance(given, dict) and isinstance(known, dict):
        out = []
        for key, value in given.items():
            full = f"{path}.{key}" if path else str(key)
            if key in known:
                out += _unknown_keys(value, known[key], full)
            else:
                close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
                out.append(full + (f" (did you mean {path + '.' if path else ''}{close[0]}?)" if close else ""))
        return out
    if isinstance(given, list) and isinstance(known, list):
        return [hit for i, (g, k) in enumerate(zip(given, known)) for hit in _unknown_keys(g, k, f"{path}[{i}]")]
    return []


def unknown_key(dotted: str) -> str:
    """``dotted`` (a key the schema lacks, e.g. ``train.epoch`` or ``devices.tiers[0].dropuot``) up to its first
    part the schema lacks, with the closest key that exists there, if any."""
    known: Any = to_dict(Config())
    done: list[str] = []
    for part in dotted.split("."):
        name, index = re.fullmatch(r"(.*?)((?:\[\d+\])*)", part).groups()
        if not isinstance(known, dict):
            break
        if name not in known:
            path = ".".join(done)
            close = difflib.get_close_matches(name, [str(k) for k in known], n=1)
            return ((f"{path}.{name}" if path else name)
                    + (f" (did you mean {path + '.' if path else ''}{close[0]}?)" if close else ""))
        known = known[name]
        for _ in re.findall(r"\[\d+\]", index):  # an entry of a list: every entry has the first one's keys
            known = known[0] if isinstance(known, list) and known else None
        done.append(part)
    return dotted


def _interpolations(node: Any, path: str = "") -> list[str]:
    """``key=value`` of every string under ``node`` that OmegaConf would interpolate (contains ``${``)."""
    if isinstance(node, dict):
        return [hit for k, v in node.items() for hit in _interpolations(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [hit for i, v in enumerate(node) for hit in _interpolations(v, f"{path}[{i}]")]
    return [f"{path}={node!r}"] if isinstance(node, str) and "${" in node else []


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


# keys added to the schema with a default that changes what a run does: a config written before them ran
# as these values, not as the default (a lambda search from before hpo.val_fraction checked the test set; a
# federated run from before strategy.keep_init_norm cut its initial model without keeping the norm)
BEFORE_ADDED = {("hpo", "val_fraction"): 0.0, ("strategy", "keep_init_norm"): False}


def with_defaults(stored: dict) -> dict:
    """A stored config (a checkpoint's, a config.json) with every key added to the schema since it was
    written set to its default (or to how runs behaved before it, ``BEFORE_ADDED``), so that comparing it
    with a current config lists only real differences."""
    before = copy.deepcopy(stored)
    for (section, key), value in BEFORE_ADDED.items():
        if isinstance(before.get(section), dict) and key not in before[section]:
            before[section][key] = value
    return _fill(to_dict(Config()), before)


def _fill(defaults: dict, stored: dict) -> dict:
    out = dict(stored)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _fill(value, out[key])
    return out


register()
