"""Lambda search (Algorithm 2): halve lambda_gl from a large value until a model meets the constraints.

``python -m fedmaestro mode=hpo hpo.min_accuracy=0.87 hpo.max_params=0.3 [train.* ...]``

For lambda = ``hpo.lambda_large``, /2, /4, ... while lambda > ``hpo.lambda_small``: train a fresh
model (same seed, ``train.*`` recipe, except that the grid sets ``lambda_gl`` and ``hpo.eval_every`` replaces
``train.eval_every``) in ``<run dir>/lambda_<value>``. At every evaluation epoch
(every ``hpo.eval_every`` epochs, and the last one) measure accuracy and the deployed parameter
count (layers merged to dense where cheaper, relative to the dense model):

* accuracy >= ``min_accuracy`` and params <= ``max_params``: return this model (Algorithm 2, line 12);
* params < ``few_params``: the model is too sparse, stop training this lambda (line 16).

After a lambda's training: if its params exceed ``max_params`` no smaller lambda can meet the limit
(lambda only shrinks models less), so return the previous lambda's model, the last one that met the
parameter limit (line 23; none if it was the first); otherwise halve lambda. If lambda reaches
``lambda_small`` without success, return that last model too.

Algorithm 2 evaluates at ``t mod E_eval == 0`` for t = 0..E-1, i.e. already after the first epoch;
here the checks run after epochs E_eval, 2 E_eval, ... and after the last epoch, so the final model
of every lambda is checked. Accuracy (Algorithm 2's CalculateAcc) is measured on a seeded
``hpo.val_fraction`` of the training set, held out from every lambda's training, so the test set
does not choose lambda; the records also hold test accuracy. ``hpo.val_fraction=0`` checks the test
set instead (all the training set trains; the choice is then optimistic)

Outputs: ``hpo_summary.csv`` and ``hpo.json`` (every lambda tried: epochs, accuracy, parameters,
MACs, training cost relative to one dense training, outcome, ``diverged`` where its loss became NaN or inf,
which the search passes over; ``constraints_met``: false where the
returned model is the fallback), ``model.pt`` (the returned model, also in its lambda's directory,
with that lambda's records and plots). ``resume=true`` continues an interrupted search: finished lambdas are
replayed from their records, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

import numpy as np

from . import data
from .centralized import Trainer, apply_threads, load_datasets
from .config import Config, TrainConfig, to_dict
from .console import echo
from .train import divergence_fix

__all__ = ["Trial", "HPOResult", "search", "run"]

log = logging.getLogger("fedmaestro.hpo")


@dataclass
class Trial:
    lambda_gl: float
    run_dir: str
    epochs: int = 0  # epochs trained
    accuracy: float | None = None  # test set, at the last evaluation
    val_accuracy: float | None = None  # held-out training examples (hpo.val_fraction), at the last evaluation
    params: int = 0  # deployed, at the end of this lambda's training
    macs: int = 0
    params_rel: float = 0.0
    macs_rel: float = 0.0
    train_macs_rel: float = 0.0  # this lambda's training MACs / one full dense training (train.epochs)
    outcome: str = ""  # met | too_sparse | over_params | under_params | diverged


@dataclass
class HPOResult:
    chosen: Trial | None
    reason: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def constraints_met(self) -> bool:
        """Whether the returned model meets both constraints (else it is Algorithm 2's fallback: the last model
        within the parameter limit, below the accuracy target)."""
        return self.chosen is not None and self.chosen.outcome == "met"

    @property
    def cost(self) -> float:
        """Training MACs of the whole search, in units of one full dense training."""
        return sum(t.train_macs_rel for t in self.trials)


def _lambdas(large: float, small: float):
    lam = large
    while lam > small:
        yield lam
        lam /= 2


def _checked_accuracy(h) -> str:
    """The record key Algorithm 2 checks ``min_accuracy`` against."""
    return "val_accuracy" if h.val_fraction > 0 else "accuracy"


def _check(record: dict, h) -> str | None:
    """Algorithm 2, lines 8-17, on one epoch record: 'met', 'too_sparse' or None (go on)."""
    accuracy = record.get(_checked_accuracy(h))
    if accuracy is None:
        return None
    if accuracy >= h.min_accuracy and record["params_rel"] <= h.max_params:
        return "met"
    if record["params_rel"] < h.few_params:
        return "too_sparse"
    return None


def _train_one(cfg: Config, lam: float, run_dir: Path, datasets, validation) -> tuple[Trial, str | None]:
    sub = copy.deepcopy(cfg)
    sub.train.lambda_gl = lam
    sub.train.eval_every = cfg.hpo.eval_every
    trainer = Trainer(sub, run_dir, datasets, validation=validation)
    if cfg.resume:
        trainer.resume()
    decision = None
    for record in trainer.records:  # a resumed lambda: replay the decisions on its finished epochs
        decision = _check(record, cfg.hpo)
        if decision:
            break
    if decision is None:
        def on_epoch(record: dict) -> bool:
            nonlocal decision
            decision = _check(record, cfg.hpo)
            return decision is not None

        try:
            trainer.fit(on_epoch=on_epoch)
        except FloatingPointError as e:  # this lambda diverged: its finished epochs are what it cost
            echo(f"hpo: lambda_gl = {lam:g} diverged: {e}", style="yellow", markup=False)
            done = trainer.records
            return Trial(lambda_gl=lam, run_dir=str(run_dir), epochs=done[-1]["epoch"] if done else 0,
                         train_macs_rel=_training_cost(done[-1], cfg) if done else 0.0, outcome="diverged"), "diverged"
    (run_dir / "config.json").write_text(json.dumps(to_dict(trainer.cfg), indent=2))
    trainer.save_model(run_dir / "model.pt")
    trainer.plot()
    last = trainer.records[-1]
    evaluated = [r for r in trainer.records if r.get("accuracy") is not None]
    trial = Trial(lambda_gl=lam, run_dir=str(run_dir), epochs=last["epoch"],
                  accuracy=evaluated[-1]["accuracy"] if evaluated else None,
                  val_accuracy=evaluated[-1].get("val_accuracy") if evaluated else None, params=last["params_deployed"],
                  macs=last["macs_deployed"], params_rel=last["params_rel"], macs_rel=last["macs_rel"],
                  train_macs_rel=_training_cost(last, cfg))
    return trial, decision


def _training_cost(last: dict, cfg: Config) -> float:
    """A lambda's training MACs up to its ``last`` epoch record, in units of one full dense training (train.epochs)."""
    return last["train_macs_rel"] * last["epoch"] / max(cfg.train.epochs, 1)


def search(cfg: Config, run_dir: Path, datasets: tuple | None = None) -> HPOResult:
    """Algorithm 2; every lambda trains in ``run_dir/lambda_<value>``. Writes the summary files."""
    h = cfg.hpo
    if not cfg.model.factorize:
        raise ValueError("mode=hpo searches train.lambda_gl, the lasso on a factorized model's ranks, but "
                         "model.factorize=false leaves no rank to prune: set model.factorize=true (a dense model "
                         "trains with mode=centralized)")
    if cfg.train.epochs < 1:
        raise ValueError(f"mode=hpo: train.epochs={cfg.train.epochs}; every lambda must train at least one epoch "
                         f"(Algorithm 2 evaluates every hpo.eval_every={h.eval_every} epochs): set train.epochs >= 1")
    validation = None
    if h.val_fraction > 0:
        datasets = datasets if datasets is not None else load_datasets(cfg)
        _, validation = data.split_local(np.arange(len(datasets[0])), h.val_fraction, cfg.seed)
    checked = "validation" if validation is not None else "test"
    echo(f"hpo: lambda_gl from hpo.lambda_large={h.lambda_large:g}, halved while above hpo.lambda_small="
         f"{h.lambda_small:g} (train.lambda_gl is not used); {checked} accuracy checked every "
         f"hpo.eval_every={h.eval_every} epoch(s) and after the last", markup=False)
    if cfg.train.eval_every != TrainConfig().eval_every:
        log.warning("train.eval_every=%d is not used by mode=hpo; set hpo.eval_every", cfg.train.eval_every)
    result = HPOResult(chosen=None, reason="")
    previous: Trial | None = None
    for lam in _lambdas(h.lambda_large, h.lambda_small):
        echo(f"[bold]hpo[/]: lambda_gl = {lam:g}")
        trial, decision = _train_one(cfg, lam, run_dir / f"lambda_{lam:.6g}", datasets, validation)
        result.trials.append(trial)
        if decision == "diverged":  # no model to check or return; a smaller lambda may train (it pulls less)
            continue
        if decision == "met":
            trial.outcome = "met"
            result.chosen = trial
            result.reason = (f"lambda {lam:g} met {checked} accuracy >= {h.min_accuracy} and params <= "
                             f"{h.max_params}x at epoch {trial.epochs}")
            break
        if trial.params_rel > h.max_params:
            trial.outcome = "over_params"
            result.chosen = previous
            result.reason = (f"lambda {lam:g} ends above the parameter limit ({trial.params_rel:.3f}x > "
                             f"{h.max_params}x) and smaller lambdas shrink less: "
                             + ("returning the last model within the limit" if previous else
                                "no lambda tried reached it; raise hpo.lambda_large or hpo.max_params"))
            break
        trial.outcome = "too_sparse" if decision == "too_sparse" else "under_params"
        previous = trial
    else:
        result.chosen = previous
        result.reason = (f"lambda reached hpo.lambda_small={h.lambda_small:g} without meeting accuracy >= "
                         f"{h.min_accuracy} ({checked}); returning the last model within the parameter limit")
        if all(t.outcome == "diverged" for t in result.trials):
            result.reason = (f"every lambda diverged (the training loss became NaN or inf): "
                             f"{divergence_fix(cfg.train)}")
    _write(result, run_dir)
    return result


def _write(result: HPOResult, run_dir: Path) -> None:
    rows = [asdict(t) for t in result.trials]
    with (run_dir / "hpo_summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(Trial(0.0, "")).keys()))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"chosen": asdict(result.chosen) if result.chosen else None,
               "constraints_met": result.constraints_met, "reason": result.reason,
               "search_cost_dense_trainings": result.cost, "trials": rows}
    (run_dir / "hpo.json").write_text(json.dumps(summary, indent=2))
    if result.chosen is not None:
        shutil.copyfile(Path(result.chosen.run_dir) / "model.pt", run_dir / "model.pt")


def _print(result: HPOResult) -> None:
    table = Table(title="Lambda search (Algorithm 2)")
    for column in ("lambda", "epochs", "val. accuracy", "test accuracy", "params", "params x", "MACs x",
                   "train cost x dense", "outcome"):
        table.add_column(column)
    for t in result.trials:
        table.add_row(f"{t.lambda_gl:g}", str(t.epochs), "-" if t.val_accuracy is None else f"{t.val_accuracy:.4f}",
                      "-" if t.accuracy is None else f"{t.accuracy:.4f}",
                      *(["-"] * 3 if t.outcome == "diverged" else
                        [f"{t.params:,}", f"{t.params_rel:.3f}", f"{t.macs_rel:.3f}"]),
                      f"{t.train_macs_rel:.2f}", t.outcome)
    echo(table)
    echo(f"search cost: {result.cost:.2f}x one dense training; {result.reason}", markup=False)
    if result.chosen:
        met = ("it meets both constraints" if result.constraints_met else
               "[yellow]it meets the parameter limit only, not the accuracy target[/yellow] (hpo.json: constraints_met "
               "false)")
        echo(f"returned: lambda {result.chosen.lambda_gl:g}, {escape(result.chosen.run_dir)}/model.pt; {met}")


def run(cfg: Config, run_dir: Path) -> HPOResult:
    apply_threads(cfg)
    result = search(cfg, run_dir)
    _print(result)
    return result
