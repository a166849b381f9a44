"""Centralized mode: Algorithm 1 epoch by epoch, with progressive shrinking, checkpoints and metrics.

``python -m fedmaestro mode=centralized model=lenet dataset=fashion_mnist train.lambda_gl=3.2e-4``
(or a preset: ``python -m fedmaestro +experiment=paper/lenet_fmnist``).

Every epoch: train (rank sampling + HGL), progressive shrinking with ``eps_ps`` (physical, optimizer
state kept), BatchNorm recalibration at the model's ranks (of a factorized model, before every evaluation
and when ranks changed), evaluation, one line of ``metrics.jsonl``
and a checkpoint. ``resume=true`` continues from ``<run dir>/checkpoint.pt`` (or ``checkpoint=...``)
to the same final metrics as an uninterrupted run; a checkpoint written with another config is
refused with the list of keys that differ. At the end: ``model.pt`` and the plots.

A record (one per epoch) holds ``epoch``, ``lr``, ``train_loss``, ``accuracy`` and ``loss`` (test
set, at full current rank), ``params``/``macs`` (the factorized model), ``params_deployed``/
``macs_deployed`` (layers merged to dense where cheaper, App. D.4) and their ratios to the dense
model ``params_rel``/``macs_rel``, ``ranks`` (layer -> rank), ``total_rank``, the training cost so
far relative to training the dense model on as many examples (``train_macs_rel``,
``train_params_rel``; see ``train.RankCost``), and the times ``train_s`` (this epoch's training)
and ``wall_s`` (the run so far, resumptions included).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from . import checkpoint, data, lod
from .config import Config, resolve, to_dict
from .console import console, echo
from .footprint import Footprint, measure
from .plots import plot_centralized
from .train import (RankCost, build_model, evaluate, lasso_schedule, make_optimizer, make_scheduler,
                    recalibrate_batchnorm, resolve_device, seed_everything, task_for, train_epoch)

__all__ = ["Trainer", "run", "example_input", "deployed_footprint", "dense_footprint", "load_datasets",
           "load_model", "save_model", "needs_data_facts", "with_data_facts", "check_vocabulary", "apply_threads",
           "TIME_FIELDS"]


TIME_FIELDS = ("train_s", "wall_s")  # the record fields that differ between identical runs


def example_input(cfg: Config, device: torch.device | str = "cpu") -> tuple:
    """One example (batch 1) of the model's input, for footprints."""
    if cfg.dataset.name == "multi30k":
        # S = T = 28 tokens: the lengths at which the paper's Transformer has Table 14's 1.370 GMACs
        # (fedmaestro/models/transformer.py; 1.384 G with the attention products, which are counted here)
        tokens = torch.full((1, 28), 4, dtype=torch.long, device=device)
        return tokens, tokens
    return (torch.zeros(1, *cfg.dataset.input_shape, device=device),)


def deployed_footprint(model: nn.Module, example: tuple) -> Footprint:
    """Footprint after merging every layer that is cheaper dense (App. D.4), as deployed."""
    return measure(lod.to_dense(copy.deepcopy(model)), example=example)


def dense_footprint(cfg: Config) -> Footprint:
    """Footprint of the non-factorized model of ``cfg`` (the 1.00x of the paper's tables)."""
    dense = copy.deepcopy(cfg)
    dense.model.factorize = False
    with torch.random.fork_rng(devices=[]):  # building it must not move the caller's RNG
        return measure(build_model(dense), example=example_input(cfg))


def load_datasets(cfg: Config):
    """(train, test) data sets of the config, with ``data.subset`` / ``data.test_subset`` applied."""
    train_set = data.load(cfg.dataset.name, root=cfg.data.root, train=True)
    data.check_num_classes(train_set, cfg.dataset.num_classes)
    test_set = data.load(cfg.dataset.name, root=cfg.data.root, train=False)
    if cfg.data.subset:
        train_set = data.subset(train_set, cfg.data.subset)
    if cfg.data.test_subset:
        test_set = data.subset(test_set, cfg.data.test_subset)
    return train_set, test_set


def needs_data_facts(cfg: Config) -> bool:
    """Whether ``cfg`` lacks something a run takes from its data set (``with_data_facts``): a translation data
    set's vocabulary fingerprint, the Transformer's vocabulary size."""
    if task_for(cfg.dataset.name).kind != "translation":
        return False
    return cfg.dataset.vocabulary is None or (cfg.model.name == "transformer" and "vocab_size" not in cfg.model.kwargs)


def with_data_facts(cfg: Config, dataset) -> Config:
    """``cfg`` with what a run takes from its data set: the fingerprint of its vocabulary
    (``dataset.vocabulary``) and the Transformer's vocabulary size. A config that already names another
    vocabulary (a checkpoint's, a server's) is refused: the same token ids would mean other words."""
    vocab = getattr(dataset, "vocab", None)
    if vocab is None:
        return cfg
    check_vocabulary(cfg, dataset)
    cfg = copy.deepcopy(cfg)
    cfg.dataset.vocabulary = vocab.fingerprint
    if cfg.model.name == "transformer":
        cfg.model.kwargs.setdefault("vocab_size", len(vocab))
    return cfg


def check_vocabulary(cfg: Config, dataset) -> None:
    """Raise if ``dataset``'s vocabulary is not the one ``cfg`` was built on (``dataset.vocabulary``), or has
    more tokens than the Transformer's embedding (``model.kwargs.vocab_size``)."""
    vocab = getattr(dataset, "vocab", None)
    if vocab is None:
        return
    where = f"the {cfg.dataset.name} files under data.root={cfg.data.root}"
    if len(vocab) <= len(data.text.SPECIALS):
        raise ValueError(f"{where} give a vocabulary of the special tokens {data.text.SPECIALS} alone: no word "
                         f"occurs {data.text.MIN_FREQ} times or more in the training split, so every word would read "
                         f"as <unk>; give data.root the full training files")
    size = cfg.model.kwargs.get("vocab_size") if cfg.model.name == "transformer" else None
    if cfg.dataset.vocabulary not in (None, vocab.fingerprint):
        raise ValueError(f"{where} have another vocabulary ({len(vocab):,} tokens, fingerprint {vocab.fingerprint}) "
                         f"than the one the model was built on (fingerprint {cfg.dataset.vocabulary}"
                         f"{'' if size is None else f', {size:,} tokens'}): the same token ids would mean other "
                         f"words. Give data.root the copy of the data set it was trained on")
    if size is not None and size < len(vocab):
        raise ValueError(f"model.kwargs.vocab_size={size} is smaller than the vocabulary of {where} ({len(vocab):,} "
                         f"tokens); drop model.kwargs.vocab_size (the run takes it from the data set)")


def apply_threads(cfg: Config) -> None:
    """``train.threads``: the number of CPU threads torch uses in this process."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


class Trainer:
    """A centralized run: model, optimizer, sampler, loaders, the epoch loop, checkpoints and records."""

    def __init__(self, cfg: Config, run_dir: Path, datasets: tuple | None = None, *,
                 validation: np.ndarray | None = None):
        """``validation``: indices of training examples held out (not trained on); every evaluated epoch
        also records ``val_accuracy`` / ``val_loss`` on them (the lambda search checks its constraint there)."""
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.device)
        train_set, test_set = datasets if datasets is not None else load_datasets(cfg)
        self.cfg = cfg = with_data_facts(cfg, train_set)
        t = cfg.train
        seed_everything(cfg.seed)
        trained = None if validation is None else np.setdiff1d(np.arange(len(train_set)), validation)
        self.val_loader = None if validation is None else data.BatchLoader(
            data.unaugmented(train_set), max(t.batch_size, 256), shuffle=False, indices=np.sort(validation),
            num_workers=t.num_workers)
        self.train_loader = data.BatchLoader(train_set, t.batch_size, shuffle=True, seed=cfg.seed, indices=trained,
                                             num_workers=t.num_workers)
        self.test_loader = data.BatchLoader(test_set, max(t.batch_size, 256), shuffle=False,
                                            num_workers=t.num_workers)
        # BatchNorm recalibration (after shrinking, before evaluating) reads the training split without
        # augmentation, in an order that depends on (seed, epoch) only: a resumed run recalibrates on the same
        # batches
        self.calib_loader = data.BatchLoader(data.unaugmented(train_set), max(t.batch_size, 256), shuffle=True,
                                             seed=cfg.seed + 1, indices=trained, num_workers=t.num_workers)
        if len(self.train_loader) == 0:
            raise ValueError(f"the training set of {cfg.dataset.name!r} is empty; check data.subset / data.root")
        late = [m for m in t.milestones if m >= t.epochs]
        if late:
            echo(f"train.milestones {late} >= train.epochs={t.epochs}: those LR decays never happen in this run",
                 style="yellow", markup=False)
        self.task = task_for(cfg.dataset.name, t.label_smoothing)
        self.example = example_input(cfg, self.device)
        self.dense = dense_footprint(cfg)
        self.model = build_model(cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, t)
        self.scheduler = make_scheduler(self.optimizer, t)
        self.factorized = bool(lod.layers(self.model))
        if not self.factorized and t.lambda_gl > 0:
            raise ValueError(f"config: train.lambda_gl={t.lambda_gl} needs a factorized model, but "
                             f"model.factorize={cfg.model.factorize} leaves no LoD layer; set train.lambda_gl=0")
        self.sampler = lod.RankSampler(self.model, t.sampler, seed=cfg.seed) if self.factorized else None
        self.cost = RankCost(self.model, self.example)
        self.scaler = torch.amp.GradScaler("cuda") if t.amp and self.device.type == "cuda" else None
        self.epoch, self.records, self.wall, self.examples_seen, self.steps_seen = 0, [], 0.0, 0, 0

    # ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def state_dict(self) -> dict:
        state = {
            "config": to_dict(self.cfg), "epoch": self.epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler else {}, "records": self.records,
            "rng": torch.get_rng_state(), "wall": self.wall, "examples_seen": self.examples_seen,
            "steps_seen": self.steps_seen, "cost": self.cost.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "ranks": {n: layer.rank for n, layer in lod.layers(self.model)},
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        checkpoint.check_resumable(state["config"], to_dict(self.cfg),
                                   checkpoint.resume_ignored("centralized", self.cfg.dataset.name))
        self.model.load_state_dict(state["model"])  # LoD layers resize to the saved ranks
        self.optimizer.load_state_dict(state["optimizer"])  # momentum / moments at the saved ranks
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler:
            self.sampler.load_state_dict(state["sampler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch, self.records, self.wall = state["epoch"], list(state["records"]), state["wall"]
        self.examples_seen, self.steps_seen = state["examples_seen"], state["steps_seen"]
        self.cost.refresh()
        self.cost.load_state_dict(state["cost"])

    def resume(self) -> bool:
        """Continue from ``checkpoint=...`` or ``<run dir>/checkpoint.pt``; False (a fresh start) if absent."""
        path = checkpoint.resume_path(self.cfg.checkpoint, self.run_dir)
        if not path.is_file():
            if self.cfg.checkpoint:
                raise FileNotFoundError(checkpoint.missing_resume_source(path, self.run_dir))
            echo(f"resume=true but {path} does not exist: starting from epoch 0", style="yellow", markup=False)
            return False
        state = checkpoint.load(path, map_location="cpu")  # RNG states must stay CPU tensors; the model and
        # optimizer states move to their parameters' device as they load
        if "round" in state and "epoch" not in state:
            raise ValueError(f"resume: {path} is a federated run's checkpoint; continue it with mode=federated "
                             "(the centralized mode resumes the checkpoint.pt of a centralized run)")
        missing = sorted({"epoch", "optimizer", "scheduler", "rng", "records"} - set(state))
        if missing:
            raise ValueError(f"resume: {path} is not a training checkpoint (it has no {missing}); a model file "
                             f"(model.pt) cannot be resumed: give the run's checkpoint.pt")
        self.load_state_dict(state)
        echo(f"resumed from {path} at epoch {self.epoch}", markup=False)
        return True

    # ----------------------------------------------------------------------------------------------
    def run_epoch(self, on_step: Callable[[int], None] | None = None) -> dict:
        t, start = self.cfg.train, time.perf_counter()
        self.train_loader.set_epoch(self.epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        lam, sampler = t.lambda_gl, self.sampler
        mode = t.sampler if self.factorized else None  # the rank sampler this epoch trains with (recorded)
        if self.factorized:
            params_rel = None
            if t.lambda_stop_params is not None:  # the previous epoch's record measured the model as it is now
                params_rel = self.records[-1]["params_rel"] if self.records else \
                    deployed_footprint(self.model, self.example).params / self.dense.params
            lam, mode = lasso_schedule(t, params_rel, self.epoch)
            t = dataclasses.replace(t, lambda_gl=lam)
            if mode != t.sampler:  # fine-tuning: every step at the model's ranks
                sampler = None
        stats = train_epoch(self.model, self.train_loader, self.optimizer, t, self.task, self.device,
                            sampler=sampler, scaler=self.scaler, cost=self.cost, on_step=on_step)
        self.scheduler.step()
        self.examples_seen += stats["num_examples"]
        self.steps_seen += stats["steps"]
        shrunk = False
        if self.factorized and t.shrink:
            before = [layer.rank for _, layer in lod.layers(self.model)]
            lod.shrink(self.model, t.eps_ps, self.optimizer)
            shrunk = [layer.rank for _, layer in lod.layers(self.model)] != before
            if shrunk:
                self.cost.refresh()
        evaluated = (self.epoch + 1) % t.eval_every == 0 or self.epoch + 1 == t.epochs
        if shrunk or evaluated:
            # BatchNorm's running statistics mix the sub-models the epoch sampled (and ranks since cut):
            # re-estimated at the model's ranks before it is evaluated (or saved: the last epoch evaluates).
            # A dense model's too, so that both are scored alike (and the SVD baseline starts where its dense
            # run ended); a model without BatchNorm is left as it is
            self.calib_loader.set_epoch(self.epoch)
            recalibrate_batchnorm(self.model, self.calib_loader, self.task, self.device)
        self.epoch += 1
        record = {"epoch": self.epoch, "lr": lr, "lambda_gl": lam, "sampler": mode, "train_loss": stats["loss"],
                  "train_s": round(stats["seconds"], 3)}
        if evaluated:
            result = evaluate(self.model, self.test_loader, self.task, self.device)
            record.update(accuracy=result["accuracy"], loss=result["loss"])
            if "perplexity" in result:  # translation: the paper's metric for the Transformer
                record["perplexity"] = result["perplexity"]
            if self.val_loader is not None:
                result = evaluate(self.model, self.val_loader, self.task, self.device)
                record.update(val_accuracy=result["accuracy"], val_loss=result["loss"])
        record.update(self.footprint_record())
        self.wall += time.perf_counter() - start
        record["wall_s"] = round(self.wall, 3)
        self.records.append(record)
        return record

    def footprint_record(self) -> dict:
        now = measure(self.model, example=self.example)
        deployed = deployed_footprint(self.model, self.example)
        ranks = {name: layer.rank for name, layer in lod.layers(self.model)}
        steps, seen = max(self.steps_seen, 1), max(self.examples_seen, 1)
        return {
            "params": now.params, "macs": now.macs, "params_deployed": deployed.params,
            "macs_deployed": deployed.macs, "params_rel": deployed.params / self.dense.params,
            "macs_rel": deployed.macs / self.dense.macs, "ranks": ranks, "total_rank": sum(ranks.values()),
            # training cost so far relative to training the dense model on the same examples (Tables 11-15)
            "train_macs_rel": self.cost.macs / (seen * self.dense.macs),
            "train_params_rel": self.cost.stored_params / (steps * self.dense.params),
            "train_active_params_rel": self.cost.params / (steps * self.dense.params),
        }

    def fit(self, on_epoch: Callable[[dict], bool] | None = None, show_progress: bool = True) -> list[dict]:
        """Train until ``train.epochs`` (or until ``on_epoch(record)`` returns True); returns the records.

        Writes ``metrics.jsonl`` (rewritten from the checkpoint's records on resume, then one line per
        epoch) and ``checkpoint.pt`` after every epoch.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_records()
        total = self.cfg.train.epochs
        columns = [TextColumn("[bold]{task.description}"), MofNCompleteColumn(), BarColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console, disable=not (show_progress and self.cfg.progress)) as progress:
            epochs = progress.add_task("epoch", total=total, completed=self.epoch, info="")
            steps = progress.add_task("step", total=len(self.train_loader), info="")
            while self.epoch < total:
                progress.reset(steps, total=len(self.train_loader))
                record = self.run_epoch(on_step=lambda n: progress.update(steps, completed=n))
                with self.metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                checkpoint.save(self.checkpoint_path, self.state_dict())
                summary = _summary(record)
                progress.update(epochs, completed=self.epoch, info=summary)
                echo(f"epoch {self.epoch}/{total}  {summary}  {record['train_s']:.1f}s")
                if on_epoch is not None and on_epoch(record):
                    break
        return self.records

    def _write_records(self) -> None:
        with self.metrics_path.open("w") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")

    def save_model(self, path: Path) -> None:
        """The model at its ranks + the config that rebuilds it (``load_model``)."""
        save_model(path, self.model, self.cfg)

    def plot(self) -> list[Path]:
        """The run's figures (``plots.plot_centralized``) in its directory; the paths written."""
        return plot_centralized(self.run_dir)


def _summary(record: dict) -> str:
    acc, ppl = record.get("accuracy"), record.get("perplexity")
    return (f"loss {record['train_loss']:.4f}  acc {'-' if acc is None else f'{acc:.4f}'}  "
            + ("" if ppl is None else f"ppl {ppl:.2f}  ")
            + (f"rank {record['total_rank']}  " if record["ranks"] else "dense  ")
            + f"params {record['params_deployed']:,} ({record['params_rel']:.3f}x)  MACs {record['macs_rel']:.3f}x")


def save_model(path: str | Path, model: nn.Module, cfg: Config, *, ranks: dict[str, int] | None = None,
               merged: tuple[str, ...] | list[str] = (), **extra) -> None:
    """A model file: state dict at the current ranks, the ranks and the config (``load_model``).

    A model with layers merged to dense (``lod.to_dense``) passes ``ranks`` (every decomposed
    layer's rank before merging) and ``merged`` (the names ``to_dense`` replaced): ``load_model``
    rebuilds the same architecture (factorize, cut to the ranks, merge). ``extra`` entries (numbers,
    strings, lists, dicts) are stored alongside.
    """
    current = {n: layer.rank for n, layer in lod.layers(model)}
    ranks = dict(ranks or current)
    missing = sorted((set(current) | set(merged)) - set(ranks))
    if missing:
        raise ValueError(f"save_model: ranks lacks the decomposed layers {missing}")
    stored_cfg = copy.deepcopy(cfg)
    if ranks:
        stored_cfg.model.factorize = True  # e.g. an SVD-factorized dense model: rebuilt factorized
    checkpoint.save(path, {"config": to_dict(stored_cfg), "model": model.state_dict(), "ranks": ranks,
                           "merged": sorted(merged), **extra})


def load_model(path: str | Path, map_location="cpu", key: str = "checkpoint") -> tuple[nn.Module, Config]:
    """Rebuild a model written by ``save_model``, ``Trainer`` (``checkpoint.pt``) or deploy's exports.

    ``path`` may be a run directory (its ``model.pt``). Returns (model at its saved ranks, config). ``key``: the
    setting that named ``path``, for the message where it does not exist.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    state = checkpoint.load(path, map_location, key)  # (refuses a file without fedmaestro's config and model)
    cfg = resolve(state["config"])
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg)
    ranks, merged = state.get("ranks", {}), list(state.get("merged", []))
    if ranks:
        lod.truncate(model, ranks)
    if merged:
        lod.to_dense(model)  # merges exactly where r (m + n) >= m n, as it did when the file was written
        now_merged = sorted(set(ranks) - {n for n, _ in lod.layers(model)})
        if now_merged != sorted(merged):
            raise ValueError(f"{path}: the file lists merged layers {sorted(merged)} but its ranks merge "
                             f"{now_merged}; the file is inconsistent")
    model.load_state_dict(state["model"])
    return model.to(map_location), cfg


def run(cfg: Config, run_dir: Path) -> Trainer:
    if cfg.train.epochs < 1:
        raise ValueError(f"mode=centralized: train.epochs={cfg.train.epochs} trains nothing; set train.epochs >= 1")
    apply_threads(cfg)
    trainer = Trainer(cfg, run_dir)
    done = cfg.resume and trainer.resume() and trainer.epoch >= cfg.train.epochs
    if done:  # nothing to train: the run's config stays as it is
        echo(f"{run_dir}: the run has done all train.epochs={cfg.train.epochs} epochs (its checkpoint is at "
             f"epoch {trainer.epoch}); raise train.epochs to continue it", markup=False)
        if (run_dir / "model.pt").is_file():  # (an interruption after the last checkpoint may have left none)
            return trainer
    if not done or not (run_dir / "config.json").is_file():
        (run_dir / "config.json").write_text(json.dumps(to_dict(trainer.cfg), indent=2))
    records = trainer.fit()
    trainer.save_model(run_dir / "model.pt")
    if records:
        last = records[-1]
        acc, ppl = last.get("accuracy"), last.get("perplexity")
        echo(f"done: accuracy {'-' if acc is None else f'{acc:.4f}'}"
             f"{'' if ppl is None else f', perplexity {ppl:.2f}'}, params {last['params_deployed']:,} "
             f"({last['params_rel']:.3f}x dense), MACs {last['macs_deployed']:,} ({last['macs_rel']:.3f}x), "
             f"training cost {last['train_macs_rel']:.2f}x MACs / {last['train_params_rel']:.2f}x params; "
             f"run dir {run_dir}", markup=False)
        for path in trainer.plot():
            echo(f"plot: {path}", markup=False)
    return trainer
