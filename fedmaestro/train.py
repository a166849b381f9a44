"""Training and evaluation steps (Algorithm 1), shared by the centralized mode and the Flower clients.

One epoch: every step the rank sampler sets the active ranks, the loss (+ lambda * HGL, or the
exact proximal step after the optimizer step) is back-propagated through the sampled sub-model,
the optimizer steps. Progressive shrinking happens between epochs (centralized) or rounds
(federated, on the server).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import lod, models
from .config import Config, PartitionConfig, TrainConfig
from .data.partition import PARAMS as PARTITION_PARAMS
from .models.transformer import PAD_INDEX

__all__ = [
    "Task", "task_for", "resolve_device", "kept_dense", "build_model", "make_optimizer", "make_scheduler", "train_epoch",
    "evaluate", "recalibrate_batchnorm", "RankCost", "seed_everything",
]


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; otherwise the named device (``cpu``, ``cuda``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config: device={name!r} but CUDA is not available here; use device=auto or device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"config: device={name!r} but Apple's MPS is not available here; use device=auto or device=cpu")
    return device


def unused_settings(train: TrainConfig, device_name: str) -> list[str]:
    """Notices for ``train`` settings that have no effect: ``train.amp=true`` where autocast (CUDA's) does
    nothing, an SGD momentum given to Adam, Adam's betas given to SGD, a decay factor without milestones to
    apply it at. (Only values that differ from the defaults are named: the defaults are always there.)"""
    defaults, notices = TrainConfig(), []
    if train.amp and resolve_device(device_name).type != "cuda":
        notices.append(f"train.amp=true: mixed precision is for CUDA; device={device_name} trains on the CPU, in "
                       f"float32 (train.amp=false says so)")
    if train.optimizer == "adam" and train.momentum != defaults.momentum:
        notices.append(f"train.momentum={train.momentum:g} is SGD's; Adam uses train.betas={list(train.betas)}")
    if train.optimizer == "sgd" and list(train.betas) != defaults.betas:
        notices.append(f"train.betas={list(train.betas)} are Adam's; SGD uses train.momentum={train.momentum:g}")
    if train.lambda_warmup and not train.lambda_gl:
        notices.append(f"train.lambda_warmup={train.lambda_warmup} delays the lasso, and train.lambda_gl=0 turns it off")
    if train.gamma != defaults.gamma and not train.milestones:
        notices.append(f"train.gamma={train.gamma:g} multiplies the LR at train.milestones, and there are none "
                       f"(lr_schedule={train.lr_schedule})")
    if train.full_pass and train.sampler not in lod.SAMPLING_MODES:
        notices.append(f"train.full_pass=true adds a full-rank pass where ranks are sampled; train.sampler="
                       f"{train.sampler} samples none, so the two passes would be one network and it is skipped")
    if train.distill_weight != defaults.distill_weight and not train.full_pass:
        notices.append(f"train.distill_weight={train.distill_weight:g} weighs the distillation of train.full_pass, "
                       f"which is off")
    return notices


# each scheme's own settings (those of data.partition's PARAMS that the config has): setting -> scheme
PARTITION_KEYS = {key: scheme for scheme, params in PARTITION_PARAMS.items() for key in params
                  if key in PartitionConfig.__dataclass_fields__}


def unused_partition_settings(partition: PartitionConfig) -> list[str]:
    """Notices for ``partition`` settings the scheme does not read (given values only, as ``unused_settings``)."""
    defaults = PartitionConfig()
    return [f"partition.{key}={getattr(partition, key)} is read by partition={scheme} only; "
            f"partition={partition.scheme} does not use it"
            for key, scheme in PARTITION_KEYS.items()
            if partition.scheme != scheme and getattr(partition, key) != getattr(defaults, key)]


@dataclass(frozen=True)
class Task:
    """How a batch turns into a loss and a score: classification or translation."""

    kind: str  # "classification" | "translation"
    label_smoothing: float = 0.0

    def forward(self, model: nn.Module, batch, device: torch.device):
        """(output logits or predictions, targets) of one batch."""
        x, y = (t.to(device, non_blocking=True) for t in batch)
        if self.kind == "translation":
            tgt_in, y = y[:, :-1], y[:, 1:]  # teacher forcing: predict token t+1 from tokens <= t
            return model(x, tgt_in), y
        return model(x), y

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "translation":
            return F.cross_entropy(output.flatten(0, 1), target.flatten(), ignore_index=PAD_INDEX,
                                   label_smoothing=self.label_smoothing)
        return F.cross_entropy(output, target, label_smoothing=self.label_smoothing)

    def predictions(self, target: torch.Tensor) -> torch.Tensor | int:
        """How many predictions ``loss`` averages over: the examples, or the target tokens but padding."""
        if self.kind == "translation":
            return (target != PAD_INDEX).sum()  # a tensor: no host sync in the training step
        return target.shape[0]

    def score(self, output: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
        """(number correct, number counted)."""
        if self.kind == "translation":
            mask = target != PAD_INDEX
            return float((output.argmax(-1).eq(target) & mask).sum()), int(mask.sum())
        return float(output.argmax(-1).eq(target).sum()), target.shape[0]


def task_for(dataset: str, label_smoothing: float = 0.0) -> Task:
    if dataset == "synthetic":
        raise ValueError("config: dataset=synthetic is the linear-regression data of the theory experiments "
                         "(mode=theory) and of the library (data.load('synthetic')); the models of the training modes "
                         "classify images or translate: pick an image data set (fashion_mnist, mnist, cifar10, "
                         "cifar100, imagenet) or multi30k")
    return Task("translation" if dataset == "multi30k" else "classification", label_smoothing)


def kept_dense(cfg: Config) -> list[str]:
    """The layers factorizing leaves dense: ``model.skip``, and the output layer (``models.CLASSIFIER``)
    with ``model.skip_last``."""
    skip = list(cfg.model.skip)
    if cfg.model.skip_last:
        if cfg.model.name not in models.CLASSIFIER:
            raise ValueError(f"config: model.skip_last=true but {cfg.model.name} has no output layer to keep "
                             "dense (its output projection is tied to the embeddings); set model.skip_last=false")
        skip.append(models.CLASSIFIER[cfg.model.name])
    return skip


def build_model(cfg: Config) -> nn.Module:
    """The configured model, factorized (but for ``kept_dense``) unless ``model.factorize=false``."""
    if (cfg.model.name == "transformer") != (task_for(cfg.dataset.name).kind == "translation"):  # before it is built
        raise ValueError(f"config: model.name={cfg.model.name} does not fit dataset={cfg.dataset.name}: the transformer "
                         f"translates (dataset=multi30k) and the other models classify images; pick a model and a data "
                         f"set that go together")
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.name not in ("transformer",):
        kwargs.setdefault("num_classes", cfg.dataset.num_classes)
        if cfg.dataset.input_shape:
            kwargs.setdefault("in_channels", cfg.dataset.input_shape[0])
    try:
        model = models.build(cfg.model.name, **kwargs)
    except TypeError as e:  # a keyword the model's constructor does not take
        if "argument" not in str(e):
            raise
        raise ValueError(f"config: model.kwargs={dict(cfg.model.kwargs)} does not fit model.name={cfg.model.name}: "
                         f"{e}; drop or rename the key (see fedmaestro/models/)") from None
    _check_model_fits_data(model, cfg, kwargs)
    if cfg.model.factorize:
        lod.factorize(model, skip=kept_dense(cfg))
    return model


_FITTING: set[str] = set()  # model / data set combinations already checked in this process


def _check_model_fits_data(model: nn.Module, cfg: Config, kwargs: dict) -> None:
    """Refuse a (dense) model that cannot take the data set's examples, before any training step: one forward
    pass of one zero example, in evaluation mode (BatchNorm statistics untouched), once per process and
    combination."""
    name, dataset, shape, classes = cfg.model.name, cfg.dataset.name, list(cfg.dataset.input_shape), cfg.dataset.num_classes
    key = repr((name, sorted(kwargs.items()), dataset, shape, classes))
    if key in _FITTING:
        return
    mismatch = f"config: model.name={name} does not fit dataset={dataset}"
    if name != "transformer":
        training = model.training
        try:
            with torch.no_grad():
                out = model.eval()(torch.zeros(1, *shape))
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"{mismatch}: it cannot take the data set's examples of shape {shape} "
                             f"({type(e).__name__}: {str(e).splitlines()[0]}); pick a model for this data set "
                             f"(lenet: 28 x 28 images; resnet18, vgg19: 32 x 32; resnet50: 224 x 224)") from None
        finally:
            model.train(training)
        if classes and tuple(out.shape) != (1, classes):
            raise ValueError(f"{mismatch}: its output has shape {list(out.shape[1:])} for {classes} classes; "
                             f"check model.kwargs")
    _FITTING.add(key)


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or Adam; weight decay on weights only, never on 1-D parameters (biases, norms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train.lr, betas=tuple(train.betas), eps=1e-8)
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)


def lr_factor(train: TrainConfig, epoch: int) -> float:
    """The learning rate's multiplier in epoch ``epoch`` (0-based; a round in federated mode).

    ``multistep`` (the CNN recipes, App. D.3): linear warm-up over ``warmup_epochs``, then the rate
    times ``gamma`` at every epoch in ``milestones``. ``inverse_sqrt`` (the Transformer recipe,
    Vaswani et al.'s schedule in epochs): a linear rise to ``lr`` over ``warmup_epochs``, then
    ``lr * sqrt(warmup_epochs / epoch)``.
    """
    warmup = train.warmup_epochs
    if train.lr_schedule == "multistep":
        warm = min(1.0, (epoch + 1) / warmup) if warmup > 0 else 1.0
        return warm * train.gamma ** sum(epoch >= m for m in train.milestones)
    e = epoch + 1  # inverse_sqrt (TrainConfig refuses any other schedule)
    return min(e / warmup, math.sqrt(warmup / e)) if warmup > 0 else 1.0 / math.sqrt(e)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule (stepped once per epoch): ``lr_factor``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(train, epoch))


class RankCost:
    """Exact training cost of every step (Tables 11-15, last column), accumulated over the run.

    ``macs``: forward MACs of the sampled sub-model, times the examples of the step (summed);
    ``params``: parameters of the sampled sub-model (each LoD layer at its active rank), per step;
    ``stored_params``: parameters held and updated, every LoD layer at its current rank r_i, per
    step: the paper's "Params. (Train.)" (Table 11 gives 1.49x for lambda = 0, exactly the
    full-rank factorized LeNet's 66,274 / 44,426).

    MACs and parameters are linear in each layer's rank b: cost = fixed + sum_i c_i b_i. The
    coefficients come from one forward pass with hooks at the current ranks (``refresh`` after a
    shrink), so a step costs one short Python loop over the layers.
    """

    def __init__(self, model: nn.Module, example: tuple):
        self.model, self.example = model, example
        self.macs = self.params = self.stored_params = 0.0
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        from .footprint import measure

        self.layers = lod.layers(self.model)
        pixels: dict[int, int] = {}
        hooks = [layer.register_forward_hook(  # summed: a layer called twice in a forward costs twice
            lambda m, i, o: pixels.__setitem__(id(m), pixels.get(id(m), 0) + o.numel() // m.out_dim))
            for _, layer in self.layers]
        with lod.full_rank(self.model):
            total = measure(self.model, example=self.example)
        for h in hooks:
            h.remove()
        self.mac_per_rank = [pixels.get(id(m), 0) * (m.fan_in + m.out_dim) for _, m in self.layers]
        self.param_per_rank = [m.fan_in + m.out_dim for _, m in self.layers]
        ranks = [m.rank for _, m in self.layers]
        self.fixed_macs = total.macs - sum(c * r for c, r in zip(self.mac_per_rank, ranks))
        self.fixed_params = total.params - sum(c * r for c, r in zip(self.param_per_rank, ranks))
        self.full_macs, self.full_params = total.macs, total.params

    def add_step(self, examples: int, full_pass: bool = False) -> None:
        """Count one step on ``examples`` examples at the active ranks (+ a full-rank pass if ``full_pass``)."""
        macs, params = self.fixed_macs, self.fixed_params
        for (_, m), cm, cp in zip(self.layers, self.mac_per_rank, self.param_per_rank):
            b = m.rank if m.active_rank is None else m.active_rank
            macs += cm * b
            params += cp * b
        if full_pass:
            macs += self.full_macs
        self.macs += examples * macs
        self.params += params
        self.stored_params += self.full_params

    def state_dict(self) -> dict:
        return {"macs": self.macs, "params": self.params, "stored_params": self.stored_params}

    def load_state_dict(self, state: dict) -> None:
        self.macs, self.params, self.stored_params = state["macs"], state["params"], state["stored_params"]


def lasso_schedule(train: TrainConfig, params_rel: float | None, epoch: int) -> tuple[float, str]:
    """(HGL strength, rank sampler) for epoch ``epoch`` (0-based; federated: round - 1) of a model at ``params_rel``
    x the dense model's deployed parameters (None: not measured, where ``lambda_stop_params`` is not set):
    ``lambda_gl`` and ``sampler``, with lambda 0 in the first ``lambda_warmup`` epochs; once ``lambda_stop_params``
    is reached, lambda 0 (the model trains on at its ranks) and, with ``finetune_after_stop``, ``fixed`` (every
    layer at its cap: no rank sampling)."""
    if train.lambda_stop_params is not None and params_rel is not None and params_rel <= train.lambda_stop_params:
        return 0.0, "fixed" if train.finetune_after_stop else train.sampler
    return (0.0 if epoch < train.lambda_warmup else train.lambda_gl), train.sampler


def divergence_fix(train: TrainConfig) -> str:
    """What to change when training diverges: the learning rate, and the gradient clip (set it, or lower it)."""
    clip = f"lower train.grad_clip (now {train.grad_clip:g})" if train.grad_clip else "set train.grad_clip"
    return f"lower train.lr (now {train.lr:g}) or {clip}"


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, train: TrainConfig, task: Task,
                device: torch.device, sampler: lod.RankSampler | None = None, scaler=None,
                cost: RankCost | None = None, on_step: Callable[[int], None] | None = None,
                hgl_tails: Mapping[str, tuple[float, float]] | None = None) -> dict:
    """One pass over ``loader``; returns {"loss", "num_examples", "predictions", "steps", "seconds"} (the loss is the
    mean over the predictions: the examples, or the target tokens but padding for translation).

    Per step (Algorithm 1, lines 3-7): ``sampler.step()`` sets the active ranks, the loss (the mean over the
    batch's predictions, or with ``loss_reduction=sum`` their sum; + ``lambda_gl`` * HGL in ``subgradient``
    mode) is back-propagated through the sampled
    sub-model, the optimizer steps; in ``proximal`` mode the exact HGL proximal operator with
    threshold lr * lambda follows the step. ``full_pass`` adds the "w/ full-training" ablation: a
    full-rank pass trained on the labels, which also teaches the sampled pass (self-distillation,
    KL(teacher || student) weighted by ``distill_weight``); only where ranks are sampled (without a
    sampler, or with ``fixed`` / ``none``, the two passes would be the same network). ``on_step(steps_done)``
    is called after every step (progress bars). The loss is summed on the device: no host sync per step.
    ``hgl_tails``: a federated client's view of the global HGL groups (``lod.hgl_penalty``'s ``tails``), in
    ``subgradient`` mode; the proximal step works on the model's own groups (with a constant tail the groups'
    prox has no closed form).
    """
    model.train()
    # a batch of one example cannot train BatchNorm (no variance over a 1 x 1 map): skipped, as drop_last would
    single_batch_fails = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    proximal = train.lambda_gl > 0 and train.hgl_mode == "proximal"
    penalty = train.lambda_gl > 0 and train.hgl_mode == "subgradient"
    summed = train.loss_reduction == "sum"
    use_amp = scaler is not None
    full_pass = train.full_pass and sampler is not None and sampler.mode in lod.SAMPLING_MODES
    params = [p for p in model.parameters() if p.requires_grad]
    total_loss = torch.zeros((), device=device)
    total_predictions = torch.zeros((), device=device)  # what the loss is a mean over: examples, or target tokens
    examples, steps, start = 0, 0, time.perf_counter()
    for batch in loader:
        if single_batch_fails and len(batch[1]) == 1:
            continue
        if sampler is not None:
            sampler.step()
        with torch.autocast(device.type, enabled=use_amp):
            if full_pass:
                with lod.full_rank(model):
                    teacher_out, target = task.forward(model, batch, device)
            output, target = task.forward(model, batch, device)
            loss = task.loss(output, target)
            objective = loss
            if full_pass:
                objective = objective + task.loss(teacher_out, target)
                objective = objective + train.distill_weight * _distillation(output, teacher_out, target, task)
            # summed: the gradient of n * (the means above) + lambda HGL, as n * that of (the means + lambda / n HGL),
            # scaled by n after the backward pass: float16 gradients of the sum would overflow GradScaler's scale
            predictions = task.predictions(target)
            n_predictions = predictions if summed else 1
            if penalty:
                objective = objective + (train.lambda_gl / n_predictions) * lod.hgl_penalty(model, hgl_tails)
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(objective).backward()
            scaler.unscale_(optimizer)
        else:
            objective.backward()
        if summed:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], n_predictions)
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        stepped = True
        if use_amp:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= scale  # the scale drops exactly when inf/NaN gradients skipped the step
        else:
            optimizer.step()
        if proximal and stepped:  # the proximal operator belongs to the gradient step it follows
            lod.hgl_proximal_step(model, optimizer.param_groups[0]["lr"] * train.lambda_gl)
        n = target.shape[0]
        if cost is not None:
            cost.add_step(n, full_pass=full_pass)
        total_loss += loss.detach().float() * predictions
        total_predictions += predictions
        examples += n
        steps += 1
        if on_step is not None:
            on_step(steps)
    if sampler is not None:
        for _, layer in lod.layers(model):
            layer.active_rank = None
    loss = float(total_loss) / max(float(total_predictions), 1.0)
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss}; {divergence_fix(train)}")
    return {"loss": loss, "num_examples": examples, "predictions": int(total_predictions), "steps": steps,
            "seconds": time.perf_counter() - start}


def _distillation(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, task: Task) -> torch.Tensor:
    """KL(teacher || student) per example (per target token for translation, padding excluded)."""
    log_p = F.log_softmax(student.float(), -1)
    q = F.softmax(teacher.detach().float(), -1)
    if task.kind == "translation":
        keep = (target != PAD_INDEX).flatten()  # (B T,)
        log_p, q = log_p.flatten(0, 1)[keep], q.flatten(0, 1)[keep]
    return F.kl_div(log_p, q, reduction="batchmean")


@torch.no_grad()
def evaluate(model: nn.Module, loader, task: Task, device: torch.device) -> dict:
    """Loss and accuracy at the model's current ranks, all columns active; {"accuracy", "loss", "num_examples",
    "scored", "correct"} (scored: the predictions accuracy counts, examples or target tokens; correct: how many
    of them are right; loss: the mean over those predictions). Translation adds "perplexity" (the paper's Transformer metric, Tables 3 and 14):
    exp of the mean negative log-likelihood per target token, padding excluded, without label smoothing, and
    "nll", that likelihood summed over the scored tokens (evaluations of parts of a test set add up)."""
    model.eval()
    total_loss, correct, counted, examples, nll = 0.0, 0.0, 0, 0, 0.0
    with lod.full_rank(model):
        for batch in loader:
            output, target = task.forward(model, batch, device)
            c, k = task.score(output, target)  # k: the batch's scored predictions (examples, or target tokens)
            total_loss += float(task.loss(output, target)) * k  # the loss is a mean over them
            correct, counted, examples = correct + c, counted + k, examples + target.shape[0]
            if task.kind == "translation":
                nll += float(F.cross_entropy(output.flatten(0, 1).float(), target.flatten(), ignore_index=PAD_INDEX,
                                             reduction="sum"))
    out = {"accuracy": correct / max(counted, 1), "loss": total_loss / max(counted, 1), "num_examples": examples,
           "scored": counted, "correct": int(correct)}
    if task.kind == "translation":
        out["nll"] = nll
        out["perplexity"] = math.exp(nll / counted) if counted else math.nan
    return out


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, task: Task, device: torch.device, max_batches: int = 50) -> bool:
    """Re-estimate BatchNorm running statistics at the current ranks (after shrinking); False if no BN."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    model.train()
    with lod.full_rank(model):
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            if len(batch[1]) > 1:  # (one example: no variance to estimate, and BatchNorm refuses it)
                task.forward(model, batch, device)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return True
