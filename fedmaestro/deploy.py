"""Train once, deploy everywhere (Sec. 3.4): greedy rank removal from a trained model, and exports.

``python -m fedmaestro mode=deploy checkpoint=<run dir | model.pt | checkpoint.pt> [deploy.svd_baseline=<dense run>]``

Greedy search: every candidate removes ``deploy.step`` of one layer's starting rank (at least one
rank) from the end of that layer's ordered columns; each candidate's loss is estimated on one large
training batch (``deploy.batch_size``, 2048 by default; BatchNorm layers use that batch's
statistics, so no recalibration is needed to compare candidates, as in AutoSlim); the candidate
with the smallest loss increase is applied (``deploy.criterion=loss``, the paper's; or the increase
per MAC / parameter it removes). ``deploy.lazy=true`` scores a step's candidates best-first by the
score each had when last evaluated and stops once none left can beat the best so far (lazy greedy):
the same choice wherever a layer's score only grows as the model shrinks (removing columns
elsewhere makes the model more fragile), otherwise an approximation, at a few forward passes a step
instead of one per layer. Repeat until the deployed MACs (or parameters) fall to
``deploy.stop_macs`` (``stop_params``) of the start, or the test accuracy below
``deploy.min_accuracy``. Every ``deploy.eval_every`` steps the point is evaluated on the test set
(BatchNorm statistics recalibrated at its ranks first).

Footprints are those of the deployed model: every layer for which r (m + n) >= m n is merged back to
a dense layer (App. D.4), as in the training records. Ratios ``*_rel`` are to the dense model of the
config; targets (``deploy.target_macs``, ``target_params``) are fractions of the start's deployed
footprint, so for a full-rank start (lambda = 0) the two agree.

SVD baseline (Fig. 5a / 11): ``deploy.svd_baseline`` names a trained dense model
(``model.factorize=false``); it is factorized by SVD (``lod.factorize``: U = U~ sqrt(S),
V = V~ sqrt(S), columns ordered by singular value) and pruned by the same greedy search.

Outputs in the run directory: ``deploy_curve.csv`` (method, step, ranks, params/MACs deployed and
factorized, their ratios, batch loss, test accuracy), ``deploy.png``, ``deploy.json`` (the summary)
and ``deploy_<method>_<macs|params><target>.pt`` for every target: the model at the curve's first
point at or below the target, merged to dense where cheaper (``centralized.load_model`` reads it).
"""

from __future__ import annotations

import copy
import csv
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from . import data, lod
from .centralized import (apply_threads, deployed_footprint, dense_footprint, example_input, load_datasets,
                          check_vocabulary, load_model, save_model)
from .checkpoint import config_diff, get_dotted
from .config import Config, DeployConfig, to_dict
from .console import console, echo
from .footprint import Footprint, measure
from .plots import deploy_targets, plot_deploy
from .train import Task, evaluate, kept_dense, recalibrate_batchnorm, resolve_device, task_for

__all__ = ["GreedyContext", "batch_loss", "greedy_curve", "export_point", "accuracy_at", "svd_model", "run"]


CURVE_FIELDS = ("method", "step", "removed", "batch_loss", "accuracy", "params", "macs", "params_factorized",
                "macs_factorized", "params_rel", "macs_rel", "params_frac", "macs_frac", "total_rank", "ranks")


@contextmanager
def _batch_statistics(model: nn.Module):
    """Eval mode (no dropout), but BatchNorm normalizes with the batch's own statistics and leaves
    its running statistics untouched (momentum 0)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


@torch.no_grad()
def batch_loss(model: nn.Module, batch, task: Task, device: torch.device) -> float:
    """The loss of ``model`` (at its active ranks) on one batch, BatchNorm on the batch's statistics."""
    with _batch_statistics(model):
        output, target = task.forward(model, batch, device)
        return float(task.loss(output, target))


@dataclass
class GreedyContext:
    """What the greedy search needs besides the model: data, task, footprint references, config."""

    batch: tuple  # the one large batch
    task: Task
    device: torch.device
    example: tuple
    dense: Footprint  # the config's non-factorized model
    deploy: DeployConfig
    test_loader: object | None = None  # None: no test accuracy on the curve
    calib_loader: object | None = None  # BatchNorm recalibration before test evaluation


def _point(model: nn.Module, ctx: GreedyContext, start: Footprint, method: str, step: int, removed: str,
           loss: float, evaluate_now: bool) -> dict:
    """One point of the curve; its test accuracy when ``evaluate_now``, and always at a point that ends the
    curve on its footprint (a stop fraction reached, or every layer at rank 0)."""
    deployed = deployed_footprint(model, ctx.example)
    factorized = measure(model, example=ctx.example)
    ranks = {n: layer.rank for n, layer in lod.layers(model)}
    point = {"method": method, "step": step, "removed": removed, "batch_loss": loss, "accuracy": math.nan,
             "params": deployed.params, "macs": deployed.macs, "params_factorized": factorized.params,
             "macs_factorized": factorized.macs, "params_rel": deployed.params / ctx.dense.params,
             "macs_rel": deployed.macs / ctx.dense.macs, "params_frac": deployed.params / start.params,
             "macs_frac": deployed.macs / start.macs, "total_rank": sum(ranks.values()), "ranks": ranks}
    if (evaluate_now or _done(point, ctx) or point["total_rank"] == 0) and ctx.test_loader is not None:
        point["accuracy"] = _test_accuracy(model, ctx)
    return point


def _test_accuracy(model: nn.Module, ctx: GreedyContext) -> float:
    if ctx.calib_loader is not None:
        ctx.calib_loader.set_epoch(0)  # the same calibration batches every time: the accuracy is the ranks' alone
        recalibrate_batchnorm(model, ctx.calib_loader, ctx.task, ctx.device)
    return evaluate(model, ctx.test_loader, ctx.task, ctx.device)["accuracy"]


def below_floor(point: dict, d: DeployConfig) -> bool:
    """Whether ``point`` was evaluated below ``deploy.min_accuracy`` (the curve's last point, where that ended it)."""
    return d.min_accuracy is not None and point.get("accuracy", math.nan) < d.min_accuracy


def _stop_rule(point: dict, d: DeployConfig) -> str | None:
    """The stop rule that ``point`` meets, with the setting that would take the curve further; None: go on."""
    if below_floor(point, d):
        return f"accuracy {point['accuracy']:.4f} < deploy.min_accuracy={d.min_accuracy:g}; lower deploy.min_accuracy"
    if d.stop_params is not None and point["params_frac"] <= d.stop_params:
        return f"params_frac {point['params_frac']:.3f} <= deploy.stop_params={d.stop_params:g}; lower deploy.stop_params"
    if point["macs_frac"] <= d.stop_macs:
        return f"macs_frac {point['macs_frac']:.3f} <= deploy.stop_macs={d.stop_macs:g}; lower deploy.stop_macs"
    return None


def _done(point: dict, ctx: GreedyContext) -> bool:
    return _stop_rule(point, ctx.deploy) is not None


def stopped_by(last: dict, d: DeployConfig) -> str:
    """What ended a curve at its ``last`` point, and the setting that would take it further."""
    return _stop_rule(last, d) or "no rank left to remove"


@torch.no_grad()
def greedy_curve(model: nn.Module, ctx: GreedyContext, method: str = "maestro",
                 on_candidate: Callable[[int, int], None] | None = None,
                 on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """Prune ``model`` in place by the greedy search; returns the curve, one point per step (start first).

    A step scores one candidate per layer (a forward pass each), or with ``deploy.lazy`` only those that may
    beat the best: ``on_candidate(done, of)`` after each, ``on_point(point)`` after every point of the curve, for
    progress."""
    layers = lod.layers(model)
    if not layers:
        raise ValueError("deploy: the model has no LoD layers to prune; give a factorized model "
                         "(model.factorize=true)")
    if all(layer.rank == 0 for _, layer in layers):
        raise ValueError("deploy: every LoD layer of the model is at rank 0 (its lambda cut them all): nothing is "
                         "left to prune; deploy a checkpoint of a smaller lambda")
    start = deployed_footprint(model, ctx.example)
    chunk = {name: max(1, round(ctx.deploy.step * layer.rank)) for name, layer in layers}
    loss = batch_loss(model, ctx.batch, ctx.task, ctx.device)
    curve = [_point(model, ctx, start, method, 0, "", loss, True)]
    if on_point is not None:
        on_point(curve[-1])
    step = 0
    last_score: dict[str, float] = {}  # deploy.lazy: each layer's score when it was last evaluated
    while not _done(curve[-1], ctx):
        best = None
        live = [(name, layer) for name, layer in layers if layer.rank > 0]
        if ctx.deploy.lazy:  # best-first by the last scores; never-scored layers first
            live.sort(key=lambda item: last_score.get(item[0], -math.inf))
        for done, (name, layer) in enumerate(live, 1):
            if ctx.deploy.lazy and best is not None and best[0] <= last_score.get(name, -math.inf):
                break  # this layer and the rest scored at least the best at their last evaluation
            new_rank = max(0, layer.rank - chunk[name])
            layer.active_rank = new_rank
            try:
                candidate = batch_loss(model, ctx.batch, ctx.task, ctx.device)
                score = last_score[name] = _score(candidate - loss, model, layer, new_rank, ctx)
            finally:
                layer.active_rank = None
            if best is None or score < best[0]:
                best = (score, name, new_rank, candidate)
            if on_candidate is not None:
                on_candidate(done, len(live))
        if best is None:  # every layer is at rank 0
            break
        _, name, new_rank, loss = best
        lod.truncate(model, {name: new_rank})
        step += 1
        curve.append(_point(model, ctx, start, method, step, f"{name}->{new_rank}", loss,
                            step % ctx.deploy.eval_every == 0))
        if on_point is not None:
            on_point(curve[-1])
    return curve


def _stops(d: DeployConfig) -> str:
    stops = [f"deploy.stop_macs={d.stop_macs:g}"]
    if d.stop_params is not None:
        stops.append(f"deploy.stop_params={d.stop_params:g}")
    if d.min_accuracy is not None:
        stops.append(f"accuracy below deploy.min_accuracy={d.min_accuracy:g}")
    return " or ".join(stops)


def _greedy_with_progress(model: nn.Module, ctx: GreedyContext, method: str, show: bool) -> list[dict]:
    """``greedy_curve`` with a progress bar (MACs removed of what the stop removes; the step's candidates)
    and a line at every evaluated point; ``show=False`` (progress=false): neither."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show) as progress:
        macs = progress.add_task(f"{method} MACs", total=1.0 - ctx.deploy.stop_macs, info="")
        candidates = progress.add_task("candidates", total=1, info="")

        def on_point(point: dict) -> None:
            progress.update(macs, completed=min(1.0 - point["macs_frac"], 1.0 - ctx.deploy.stop_macs),
                            info=f"step {point['step']}, macs_frac {point['macs_frac']:.3f}, params_frac "
                                 f"{point['params_frac']:.3f}, batch loss {point['batch_loss']:.4f}")
            if show and not math.isnan(point["accuracy"]):  # (progress=false: the curve's CSV holds them)
                echo(f"{method} step {point['step']}: macs_frac {point['macs_frac']:.3f}, params_frac "
                     f"{point['params_frac']:.3f}, batch loss {point['batch_loss']:.4f}, test accuracy "
                     f"{point['accuracy']:.4f}", markup=False)

        return greedy_curve(model, ctx, method, on_point=on_point,
                            on_candidate=lambda done, of: progress.update(candidates, completed=done, total=of,
                                                                          info=f"{done}/{of}"))


def _score(increase: float, model: nn.Module, layer, new_rank: int, ctx: GreedyContext) -> float:
    """The loss increase, or (criterion loss_per_mac / loss_per_param) the increase per cost removed
    (the factorized layer's MACs / parameters of the removed columns)."""
    criterion = ctx.deploy.criterion
    if criterion == "loss":
        return increase
    removed_cols = layer.rank - new_rank
    if criterion == "loss_per_param":
        saved = removed_cols * (layer.out_dim + layer.fan_in)
    else:
        layer.active_rank = None
        full = measure(model, example=ctx.example).macs
        layer.active_rank = new_rank
        saved = full - measure(model, example=ctx.example).macs
    return increase / max(saved, 1)


def first_at_or_below(curve: list[dict], key: str, target: float) -> dict | None:
    """The largest model on ``curve`` whose ``key`` (``macs_frac``, ``params_frac``) is <= target."""
    return next((p for p in curve if p[key] <= target + 1e-12), None)


def accuracy_at(curve: list[dict], key: str, target: float) -> float:
    """Test accuracy at ``target``: that of the first evaluated point at or below it (in the curve's order, the
    point the export takes), interpolated linearly in ``key`` from the evaluated point before it where it lies
    below the target. Steps that change nothing of ``key`` (a layer merged to dense) make plateaus: a point is
    read by its step, never by its accuracy. NaN where the curve does not reach the target or starts below it."""
    points = [(p[key], p["accuracy"]) for p in curve if not math.isnan(p["accuracy"])]
    i = next((i for i, (x, _) in enumerate(points) if x <= target + 1e-12), None)
    if i is None or (i == 0 and points[0][0] < target - 1e-12):
        return math.nan
    x1, a1 = points[i]
    if i == 0 or x1 >= target - 1e-12:
        return a1
    x0, a0 = points[i - 1]  # x0 > target > x1
    return a1 + (a0 - a1) * (target - x1) / (x0 - x1)


def export_point(source: nn.Module, point: dict, ctx: GreedyContext, cfg: Config, path: Path) -> dict | None:
    """Cut a copy of ``source`` to the point's ranks, recalibrate, evaluate, merge, save; the summary. None, and
    nothing saved, where the model scores below ``deploy.min_accuracy`` (a point the curve did not evaluate)."""
    model = copy.deepcopy(source)
    lod.truncate(model, point["ranks"])
    accuracy = _test_accuracy(model, ctx) if ctx.test_loader is not None else math.nan
    if below_floor({"accuracy": accuracy}, ctx.deploy):
        return None
    before = {n for n, _ in lod.layers(model)}
    lod.to_dense(model)
    merged = sorted(before - {n for n, _ in lod.layers(model)})
    footprint = measure(model, example=ctx.example)
    if (footprint.params, footprint.macs) != (point["params"], point["macs"]):
        raise AssertionError(f"deploy: the exported model measures {footprint} but its curve point says "
                             f"params={point['params']}, macs={point['macs']}")
    summary = {"path": str(path), "accuracy": accuracy, "params": footprint.params, "macs": footprint.macs,
               "params_rel": point["params_rel"], "macs_rel": point["macs_rel"], "params_frac": point["params_frac"],
               "macs_frac": point["macs_frac"], "ranks": point["ranks"], "merged": merged}
    save_model(path, model, cfg, ranks=point["ranks"], merged=merged,
               deploy={k: v for k, v in summary.items() if k not in ("path", "ranks", "merged")})
    return summary


def svd_model(path: str | Path, device: torch.device) -> tuple[nn.Module, Config]:
    """The dense model at ``path``, factorized by SVD (the baseline of Fig. 5a / 11)."""
    model, cfg = load_model(path, device, key="deploy.svd_baseline")
    if lod.layers(model):
        raise ValueError(f"deploy.svd_baseline={path} is a factorized model; give a model trained with "
                         f"model.factorize=false (the SVD baseline factorizes a dense model after training)")
    lod.factorize(model, skip=kept_dense(cfg))  # as a factorized build of its config: its exports reload
    return model, cfg


def check_baseline(model_cfg: Config, baseline_cfg: Config, path: str | Path) -> None:
    """The SVD baseline must be the checkpoint's architecture on its data set: both are searched on the
    checkpoint's batch and measured against its dense model."""
    # model.skip / skip_last: the layers the baseline's SVD leaves dense, as the checkpoint left them
    keys = ("model.name", "model.kwargs", "model.skip", "model.skip_last", "dataset.name", "dataset.input_shape",
            "dataset.num_classes", "dataset.vocabulary")
    theirs, ours = to_dict(baseline_cfg), to_dict(model_cfg)
    unknown = ("dataset.vocabulary",)  # None in a file written before runs kept it: nothing to compare
    differ = [f"{k}: {get_dotted(ours, k)!r} vs {get_dotted(theirs, k)!r}" for k in keys
              if get_dotted(ours, k) != get_dotted(theirs, k)
              and not (k in unknown and None in (get_dotted(ours, k), get_dotted(theirs, k)))]
    if differ:
        raise ValueError(f"deploy.svd_baseline={path} is not the checkpoint's model on its data set "
                         f"(checkpoint vs baseline: {'; '.join(differ)}); give a dense model trained with the "
                         f"checkpoint's model, dataset and model.skip / model.skip_last (model.factorize=false)")


def _context(cfg: Config, model_cfg: Config, device: torch.device) -> GreedyContext:
    """Data of the model's data set (root / subsets / seed from the deploy config)."""
    data_cfg = copy.deepcopy(model_cfg)
    data_cfg.data, data_cfg.seed = copy.deepcopy(cfg.data), cfg.seed
    try:
        train_set, test_set = load_datasets(data_cfg)
    except FileNotFoundError as e:
        trained_on = model_cfg.data.root
        if not trained_on or trained_on == cfg.data.root:
            raise
        raise FileNotFoundError(f"{e} (the checkpoint was trained with data.root={trained_on}: deploy reads the data "
                                f"at this command's data.root; give data.root={trained_on})") from None
    check_vocabulary(data_cfg, train_set)
    train_set = data.unaugmented(train_set)  # the loss batch and the recalibration batches without augmentation
    batch = next(iter(data.BatchLoader(train_set, cfg.deploy.batch_size, shuffle=True, seed=cfg.seed)))
    task = task_for(model_cfg.dataset.name, model_cfg.train.label_smoothing)
    return GreedyContext(
        batch=batch, task=task, device=device, example=example_input(model_cfg, device),
        dense=dense_footprint(model_cfg), deploy=cfg.deploy,
        test_loader=data.BatchLoader(test_set, 512, shuffle=False),
        calib_loader=data.BatchLoader(train_set, 256, shuffle=True, seed=cfg.seed))


def _write_curve(curves: dict[str, list[dict]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        for rows in curves.values():
            for row in rows:
                writer.writerow({**row, "ranks": json.dumps(row["ranks"])})


def ignored_settings(cfg: Config, model_cfg: Config) -> list[str]:
    """``key: checkpoint's -> given`` for every model / dataset setting the user changed from its default
    (deploy uses the checkpoint's: the model is what it was trained as)."""
    given = {line.split(":", 1)[0] for line in config_diff(to_dict(Config()), to_dict(cfg), ())}
    return [line for line in config_diff(to_dict(model_cfg), to_dict(cfg), ())
            if line.startswith(("model.", "dataset.")) and line.split(":", 1)[0] in given]


def run(cfg: Config, run_dir: Path) -> dict:
    apply_threads(cfg)
    if not cfg.checkpoint:
        raise ValueError("mode=deploy needs checkpoint=<a trained model: its run directory, model.pt or "
                         "checkpoint.pt>, e.g. checkpoint=outputs/centralized/<time>")
    device = resolve_device(cfg.device)
    model, model_cfg = load_model(cfg.checkpoint, device)
    ignored = ignored_settings(cfg, model_cfg)
    if ignored:
        echo("deploy: the model and data set are the checkpoint's; these settings were not used (checkpoint -> "
             "given): " + "; ".join(ignored), style="yellow", markup=False)
    if not lod.layers(model):
        raise ValueError(f"checkpoint={cfg.checkpoint} is a dense model (model.factorize=false); deploy prunes a "
                         f"factorized one: give a Maestro model as checkpoint=, with this dense one as "
                         f"deploy.svd_baseline={cfg.checkpoint} for the SVD baseline beside it")
    sources = {"maestro": (model, model_cfg)}
    if cfg.deploy.svd_baseline:
        sources["svd"] = svd_model(cfg.deploy.svd_baseline, device)
        check_baseline(model_cfg, sources["svd"][1], cfg.deploy.svd_baseline)  # before data loads or any search
    ctx = _context(cfg, model_cfg, device)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))  # once the inputs are known good
    held = len(ctx.batch[1])  # deploy.batch_size, or the whole training set where it holds fewer
    echo(f"deploy: losses on one batch of {held:,} training examples (deploy.batch_size={cfg.deploy.batch_size}"
         f"{'' if held == cfg.deploy.batch_size else ': the training set holds no more'}), accuracy on "
         f"{len(ctx.test_loader.dataset):,} test examples (the data settings are this command's: data.root, "
         f"data.test_subset={cfg.data.test_subset})", markup=False)
    curves, exports = {}, []
    for method, (source, source_cfg) in sources.items():
        layers = lod.layers(source)
        tries = (f"up to {len(layers)} candidates, best-first by their last score (deploy.lazy)" if cfg.deploy.lazy
                 else f"{len(layers)} candidates")
        echo(f"[bold]{method}[/]: greedy search from {sum(l.rank for _, l in layers)} ranks; a step tries {tries} "
             f"(a forward pass of deploy.batch_size={cfg.deploy.batch_size} each) and the curve ends at "
             f"{_stops(cfg.deploy)}")
        pruned = copy.deepcopy(source)
        curves[method] = _greedy_with_progress(pruned, ctx, method, cfg.progress)
        curve = curves[method]
        exportable = curve[:-1] if below_floor(curve[-1], cfg.deploy) else curve  # not the point under the floor
        for key, targets in (("macs_frac", cfg.deploy.target_macs), ("params_frac", cfg.deploy.target_params)):
            for target in targets:
                point = first_at_or_below(exportable, key, target)
                if point is None:
                    reached = exportable is not curve and curve[-1][key] <= target + 1e-12
                    why = "only the point that ended the curve reaches it" if reached else "the curve stops above it"
                    echo(f"{method}: no model at {key} <= {target:g} is exported: {why} "
                         f"({stopped_by(curve[-1], cfg.deploy)})", style="yellow", markup=False)
                    continue
                name = f"deploy_{method}_{key.split('_')[0]}{target:g}.pt"
                summary = export_point(source, point, ctx, source_cfg, run_dir / name)
                if summary is None:
                    echo(f"{method}: no model at {key} <= {target:g} is exported: the first one there (step "
                         f"{point['step']}, between the curve's evaluations) scores below deploy.min_accuracy="
                         f"{cfg.deploy.min_accuracy:g}; lower deploy.min_accuracy, or evaluate every step "
                         f"(deploy.eval_every=1)", style="yellow", markup=False)
                    continue
                exports.append({"method": method, "target": f"{key}<={target:g}",
                                "curve_accuracy_at_target": accuracy_at(curve, key, target), **summary})
        _write_curve(curves, run_dir / "deploy_curve.csv")  # after every method: a later failure keeps it
    plot = plot_deploy(curves, run_dir / "deploy.png", targets=deploy_targets(to_dict(cfg)["deploy"]))
    summary = {"checkpoint": str(cfg.checkpoint), "svd_baseline": cfg.deploy.svd_baseline, "exports": exports,
               "curve_points": {m: len(c) for m, c in curves.items()}}
    (run_dir / "deploy.json").write_text(json.dumps(summary, indent=2))
    _print_exports(exports)
    echo(f"curve: {run_dir / 'deploy_curve.csv'}; plot: {plot}", markup=False)
    return summary


def _print_exports(exports: list[dict]) -> None:
    if not exports:
        echo("no model exported: no target was reached (see the lines above), or none was given "
             "(deploy.target_macs, deploy.target_params)", style="yellow")
        return
    table = Table(title="Exported models (greedy deployment)")
    for column in ("method", "target", "accuracy", "curve acc. at target", "params", "MACs", "params x", "MACs x"):
        table.add_column(column)
    for e in exports:
        table.add_row(e["method"], e["target"], f"{e['accuracy']:.4f}", f"{e['curve_accuracy_at_target']:.4f}",
                      f"{e['params']:,}", f"{e['macs']:,}", f"{e['params_rel']:.3f}", f"{e['macs_rel']:.3f}")
    echo(table)
