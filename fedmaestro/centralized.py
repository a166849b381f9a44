"""Centralized mode: Algorithm 1 epoch by epoch, with progressive shrinking, checkpoints and metrics.

``python -m fedmaestro mode=centralized model=lenet dataset=fashion_mnist train.lambda_gl=3.2e-4``

Every epoch: train (rank sampling + HGL), progressive shrinking with ``eps_ps`` (physical, optimizer
state kept), BatchNorm recalibration, evaluation, one line of ``metrics.jsonl`` and a checkpoint.
``resume=true`` continues from ``<run dir>/checkpoint.pt`` to the same final metrics.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from . import checkpoint, data, lod
from .config import Config, to_dict
from .footprint import Footprint, measure
from .train import (RankCost, build_model, evaluate, make_optimizer, make_scheduler, recalibrate_batchnorm,
                    resolve_device, seed_everything, task_for, train_epoch)

__all__ = ["Trainer", "run", "example_input", "deployed_footprint", "load_datasets"]

console = Console()


def example_input(cfg: Config, device: torch.device | str = "cpu") -> tuple:
    """One example (batch 1) of the model's input, for footprints."""
    if cfg.dataset.name == "multi30k":
        tokens = torch.full((1, 32), 4, dtype=torch.long, device=device)  # 32 non-special tokens each side
        return tokens, tokens
    return (torch.zeros(1, *cfg.dataset.input_shape, device=device),)


def deployed_footprint(model: nn.Module, example: tuple) -> Footprint:
    """Footprint after merging every layer that is cheaper dense (App. D.4), as deployed."""
    return measure(lod.to_dense(copy.deepcopy(model)), example=example)


def load_datasets(cfg: Config):
    """(train, test) data sets of the config, with ``data.subset`` / ``data.test_subset`` applied."""
    train_set = data.load(cfg.dataset.name, root=cfg.data.root, train=True)
    test_set = data.load(cfg.dataset.name, root=cfg.data.root, train=False)
    if cfg.data.subset:
        train_set = data.subset(train_set, cfg.data.subset)
    if cfg.data.test_subset:
        test_set = data.subset(test_set, cfg.data.test_subset)
    return train_set, test_set


class Trainer:
    """A centralized run: model, optimizer, sampler, loaders, the epoch loop, checkpoints and records."""

    def __init__(self, cfg: Config, run_dir: Path, datasets: tuple | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        train_set, test_set = datasets if datasets is not None else load_datasets(cfg)
        t = cfg.train
        self.train_loader = data.BatchLoader(train_set, t.batch_size, shuffle=True, seed=cfg.seed)
        self.test_loader = data.BatchLoader(test_set, max(t.batch_size, 256), shuffle=False)
        self.task = task_for(cfg.dataset.name, t.label_smoothing)
        self.example = example_input(cfg, self.device)
        self.dense = measure(build_model(_dense_cfg(cfg)), example=example_input(cfg))
        seed_everything(cfg.seed)  # the model's init does not depend on whether the dense reference was built
        self.model = build_model(cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, t)
        self.scheduler = make_scheduler(self.optimizer, t)
        self.factorized = bool(lod.layers(self.model))
        self.sampler = lod.RankSampler(self.model, t.sampler, seed=cfg.seed) if self.factorized else None
        self.cost = RankCost(self.model, self.example)
        self.scaler = torch.amp.GradScaler("cuda") if t.amp and self.device.type == "cuda" else None
        self.epoch, self.records, self.wall = 0, [], 0.0
        self.examples_seen = 0

    # ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def state_dict(self) -> dict:
        return {
            "config": to_dict(self.cfg), "epoch": self.epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler else {}, "records": self.records,
            "rng": torch.get_rng_state(), "wall": self.wall, "examples_seen": self.examples_seen,
            "cost": [self.cost.macs, self.cost.params],
            "scaler": self.scaler.state_dict() if self.scaler else {},
        }

    def load_state_dict(self, state: dict) -> None:
        diff = checkpoint.config_diff(state["config"], to_dict(self.cfg), checkpoint.IGNORED_KEYS + ("train.epochs",))
        if diff:
            raise ValueError("resume: the checkpoint was written with a different config; keys that differ "
                             "(checkpoint -> now):\n  " + "\n  ".join(diff) +
                             "\nRun with the checkpoint's config, or start a new run directory.")
        self.model.load_state_dict(state["model"])  # LoD layers resize to the saved ranks
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler:
            self.sampler.load_state_dict(state["sampler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.records, self.wall = state["epoch"], list(state["records"]), state["wall"]
        self.examples_seen = state["examples_seen"]
        self.cost.refresh()
        self.cost.macs, self.cost.params = state["cost"]

    def resume(self) -> bool:
        path = Path(self.cfg.checkpoint) if self.cfg.checkpoint else self.checkpoint_path
        if not path.is_file():
            console.print(f"[yellow]resume=true but {path} does not exist: starting from epoch 0")
            return False
        self.load_state_dict(checkpoint.load(path, map_location=self.device))
        console.print(f"resumed from {path} at epoch {self.epoch}")
        return True

    # ----------------------------------------------------------------------------------------------
    def run_epoch(self) -> dict:
        t, start = self.cfg.train, time.perf_counter()
        self.train_loader.set_epoch(self.epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        stats = train_epoch(self.model, self.train_loader, self.optimizer, t, self.task, self.device,
                            sampler=self.sampler, scaler=self.scaler, cost=self.cost)
        self.scheduler.step()
        self.examples_seen += stats["num_examples"]
        if self.factorized and t.shrink and t.eps_ps is not None:
            before = [layer.rank for _, layer in lod.layers(self.model)]
            lod.shrink(self.model, t.eps_ps, self.optimizer)
            if [layer.rank for _, layer in lod.layers(self.model)] != before:
                self.cost.refresh()
                recalibrate_batchnorm(self.model, self.train_loader, self.task, self.device)
        self.epoch += 1
        record = {"epoch": self.epoch, "lr": lr, "train_loss": stats["loss"], "train_s": stats["seconds"]}
        if self.epoch % t.eval_every == 0 or self.epoch == t.epochs:
            record.update(evaluate(self.model, self.test_loader, self.task, self.device))
            record.pop("num_examples")
        record.update(self.footprint_record())
        self.wall += time.perf_counter() - start
        record["wall_s"] = round(self.wall, 3)
        self.records.append(record)
        return record

    def footprint_record(self) -> dict:
        now = measure(self.model, example=self.example)
        deployed = deployed_footprint(self.model, self.example)
        ranks = {name: layer.rank for name, layer in lod.layers(self.model)}
        seen = max(self.examples_seen, 1)
        return {
            "params": now.params, "macs": now.macs, "params_deployed": deployed.params,
            "macs_deployed": deployed.macs, "params_rel": deployed.params / self.dense.params,
            "macs_rel": deployed.macs / self.dense.macs, "ranks": ranks, "total_rank": sum(ranks.values()),
            # training cost so far relative to training the dense model on the same examples (Tables 11-15)
            "train_macs_rel": self.cost.macs / (seen * self.dense.macs),
            "train_params_rel": self.cost.params / (max(self._steps_seen(), 1) * self.dense.params),
        }

    def _steps_seen(self) -> int:
        return sum(len(self.train_loader) for _ in range(self.epoch))

    def fit(self, on_epoch: Callable[[dict], bool] | None = None, show_progress: bool = True) -> list[dict]:
        """Train until ``train.epochs`` (or until ``on_epoch(record)`` returns True); returns the records."""
        metrics_path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_records(metrics_path)  # on resume: exactly the records of the checkpoint
        total = self.cfg.train.epochs
        columns = [TextColumn("[bold]epoch"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn()]
        with Progress(*columns, console=console, disable=not (show_progress and self.cfg.progress)) as progress:
            bar = progress.add_task("train", total=total, completed=self.epoch, info="")
            while self.epoch < total:
                record = self.run_epoch()
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                checkpoint.save(self.checkpoint_path, self.state_dict())
                acc = record.get("accuracy")
                progress.update(bar, completed=self.epoch, info=(
                    f"loss {record['train_loss']:.4f}  acc {acc if acc is None else f'{acc:.4f}'}  "
                    f"rank {record['total_rank']}  params {record['params_deployed']:,} "
                    f"({record['params_rel']:.2f}x)"))
                if on_epoch is not None and on_epoch(record):
                    break
        return self.records

    def _write_records(self, path: Path) -> None:
        with path.open("w") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")

    def save_model(self, path: Path) -> None:
        """The final model: state dict (at its ranks) + the config that rebuilds it."""
        checkpoint.save(path, {"config": to_dict(self.cfg), "model": self.model.state_dict(),
                               "ranks": {n: layer.rank for n, layer in lod.layers(self.model)}})


def _dense_cfg(cfg: Config) -> Config:
    dense = copy.deepcopy(cfg)
    dense.model.factorize = False
    return dense


def load_model(path: str | Path, map_location="cpu") -> tuple[nn.Module, Config]:
    """Rebuild a model saved by ``Trainer.save_model`` or a checkpoint: (model at its saved ranks, config)."""
    from .config import resolve

    state = checkpoint.load(path, map_location)
    cfg = resolve(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model, cfg


def run(cfg: Config, run_dir: Path) -> Trainer:
    trainer = Trainer(cfg, run_dir)
    if cfg.resume:
        trainer.resume()
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    records = trainer.fit()
    trainer.save_model(run_dir / "model.pt")
    if records:
        last = records[-1]
        console.print(f"done: accuracy {last.get('accuracy')}, params {last['params_deployed']:,} "
                      f"({last['params_rel']:.3f}x dense), MACs {last['macs_deployed']:,} ({last['macs_rel']:.3f}x), "
                      f"training cost {last['train_macs_rel']:.2f}x MACs / {last['train_params_rel']:.2f}x params; "
                      f"run dir {run_dir}")
    try:
        from .plots import plot_centralized
        plot_centralized(run_dir)
    except ImportError:  # the plots module arrives with the plotting work; metrics.jsonl is complete without it
        pass
    return trainer
