"""Figures and tables of runs: PNG files written into the run (or sweep) directory.

* ``plot_centralized(run_dir)``: ``total_rank.png`` (Fig. 4a / 8: total rank sum_i r_i over training),
  ``ranks_per_layer.png`` (Fig. 4b / 9: every layer's final rank against its full rank) and
  ``training.png`` (Fig. 4c / 10: training loss, test accuracy and deployed parameters per epoch).
* ``plot_federated(run_dir)``: accuracy against rounds and against MB sent, total rank per round, every tier's
  accuracy per round.
* ``sweep_table(runs)`` / ``plot_sweep(runs, out_dir)``: a lambda sweep (``--multirun``) as Table 11
  (accuracy, inference MACs and parameters, training cost relative to the dense model) and Fig. 12
  (accuracy against parameters and MACs), plus every run's ranks per layer and total rank over
  training on shared axes (the nested ranks of Fig. 9).
* ``plot_deploy(curves, path)``: greedy deployment curves (Fig. 5a / 11): test accuracy against MACs
  and parameters, one line per method (Maestro, the SVD baseline).

``python -m fedmaestro.plot <dir> ...`` (fedmaestro/plot.py) draws these for existing directories.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import with_defaults  # noqa: E402

__all__ = ["read_records", "plot_centralized", "plot_federated", "Run", "find_runs", "sweep_table", "write_sweep",
           "plot_sweep", "read_curve", "plot_deploy", "deploy_targets", "DPI"]

log = logging.getLogger(__name__)
_WARNED_CUT: set[Path] = set()  # metrics.jsonl files whose cut-off last line was reported (once each)

DPI = 120
IGNORED_IN_LABELS = ("seed", "resume", "checkpoint", "progress", "device", "data.root", "train.threads",
                     "train.num_workers")


def read_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give the directory of a run (it holds metrics.jsonl)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # what a run killed while appending its last record leaves
                if path not in _WARNED_CUT:
                    _WARNED_CUT.add(path)
                    log.warning("%s: its last line is cut off (a run killed while writing it?); plotted without it",
                                path)
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record; the file is damaged (records are one "
                             f"JSON object a line)") from None
    return records


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_centralized(run_dir: str | Path) -> list[Path]:
    """The training figures of one run; returns the PNG paths written."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    if not records:
        return []
    epochs = [r["epoch"] for r in records]
    paths = []
    evaluated = [r for r in records if "accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    losses = [r["train_loss"] for r in records]
    axes[0].plot(epochs, losses, marker=".")
    wide = min(losses) > 0 and max(losses) / min(losses) > 5  # a log scale only where it spans a range
    axes[0].set(xlabel="epoch", ylabel="training loss (sampled ranks)", yscale="log" if wide else "linear",
                title="Training loss")
    if wide:
        axes[0].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[1].plot([r["epoch"] for r in evaluated], [r["accuracy"] for r in evaluated], marker=".", color="C2")
    axes[1].set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy (full current rank)")
    axes[2].plot(epochs, [r["params_rel"] for r in records], marker=".", color="C1", label="parameters")
    axes[2].plot(epochs, [r["macs_rel"] for r in records], marker=".", color="C3", label="MACs")
    axes[2].set(xlabel="epoch", ylabel="deployed / dense", title="Footprint (merged where cheaper)", ylim=(0, None))
    axes[2].legend(loc="lower left")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    paths.append(_save(fig, run_dir / "training.png"))
    ranks = [r.get("ranks") or {} for r in records]
    if ranks[-1]:
        full = _full_ranks(run_dir, ranks[0])
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([0] + epochs, [sum(full.values())] + [r["total_rank"] for r in records], marker=".")
        ax.set(xlabel="epoch", ylabel=r"total rank $\sum_i r_i$", title="Total rank over training (Fig. 4a)",
               ylim=(0, None))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        paths.append(_save(fig, run_dir / "total_rank.png"))
        paths.append(_plot_layer_ranks({"final": ranks[-1]}, full,
                                       run_dir / "ranks_per_layer.png", "Ranks per layer after training (Fig. 4b)"))
    return paths


def plot_federated(run_dir: str | Path) -> list[Path]:
    """A federated run's figures, from its metrics.jsonl: accuracy vs round, accuracy vs cumulative MB, total
    rank vs round, per-tier accuracy (``plot_*.png`` in the run directory)."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    evaluated = [r for r in records if "accuracy" in r]
    tier_names = list(records[-1].get("tiers", {})) if records else []
    written = []

    def save(fig, name):
        written.append(_save(fig, run_dir / name))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["round"] for r in evaluated], [r["accuracy"] for r in evaluated], marker="o", label="global, full rank")
    for name in tier_names:
        pts = [(r["round"], r["tiers"][name]["accuracy"]) for r in evaluated if "accuracy" in r["tiers"].get(name, {})]
        if pts and len(tier_names) > 1:
            ax.plot(*zip(*pts), linestyle="--", label=f"tier {name}")
    ax.set(xlabel="round", ylabel="test accuracy", title="accuracy vs round")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "plot_accuracy_round.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([(r["bytes_down"] + r["bytes_up"]) / 1e6 for r in evaluated], [r["accuracy"] for r in evaluated], marker="o")
    ax.set(xlabel="cumulative MB (down + up)", ylabel="test accuracy", title="accuracy vs communication")
    ax.grid(alpha=0.3)
    save(fig, "plot_accuracy_mb.png")

    if any(r.get("ranks") for r in records):  # a dense model (model.factorize=false) has no ranks to draw
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["round"] for r in records], [r["total_rank"] for r in records], marker="o")
        ax.set(xlabel="round", ylabel="total rank (sum over LoD layers)", title="total rank vs round", ylim=(0, None))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        save(fig, "plot_rank_round.png")

    if tier_names and evaluated:
        last = evaluated[-1]
        fig, ax = plt.subplots(figsize=(6, 4))
        names = ["global"] + [f"tier {n}" for n in tier_names]  # a tier may be named "full"
        accs = [last["accuracy"]] + [last["tiers"][n].get("accuracy", float("nan")) for n in tier_names]
        params = [last["params_rel"]] + [last["tiers"][n]["params_rel"] for n in tier_names]
        bars = ax.bar(names, accs, color="tab:blue")
        for bar, p in zip(bars, params):
            ax.annotate(f"{p:.2f}x params", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set(ylabel="test accuracy", title=f"per-tier accuracy after round {last['round']}",
               ylim=(0, min(1.0, max(accs) * 1.15 if accs else 1.0)))
        save(fig, "plot_tiers.png")
    return written


def _full_ranks(run_dir: Path, first: dict[str, int]) -> dict[str, int]:
    """Every layer's full rank min(out, fan_in), from the run's config; else the first epoch's ranks."""
    config = run_dir / "config.json"
    if config.is_file():
        try:
            from .config import resolve
            from .lod import layers
            from .train import build_model
            import torch

            cfg = resolve(json.loads(config.read_text()))
            with torch.random.fork_rng(devices=[]):
                return {n: layer.max_rank for n, layer in layers(build_model(cfg))}
        except (ValueError, KeyError) as err:  # a config this version cannot rebuild: say so, fall back
            print(f"plots: cannot rebuild the model of {config} ({err}); full ranks taken from epoch 1")
    return dict(first)


def _plot_layer_ranks(series: dict[str, dict[str, int]], full: dict[str, int], path: Path, title: str) -> Path:
    names = list(full) or list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 3.8))
    x = range(len(names))
    ax.bar(x, [full.get(n, 0) for n in names], color="none", edgecolor="grey", label="full rank")
    for k, (label, ranks) in enumerate(series.items()):
        ax.plot(x, [ranks.get(n, 0) for n in names], marker="o", ms=3, label=label, color=f"C{k % 10}")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="rank $r_i$", title=title, yscale="symlog" if max(full.values(), default=1) > 64 else "linear")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# Sweeps (Table 11-15, Fig. 12)
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    path: Path
    config: dict
    records: list[dict]
    flat: dict = field(default_factory=dict)

    @property
    def last(self) -> dict:
        return self.records[-1]

    @property
    def dense(self) -> bool:
        return not self.config.get("model", {}).get("factorize", True)

    @property
    def lambda_gl(self) -> float:
        return float(self.config.get("train", {}).get("lambda_gl", 0.0))

    @property
    def unit(self) -> str:
        """What a record counts: ``epoch`` (centralized) or ``round`` (federated)."""
        return "round" if "round" in self.last else "epoch"

    @property
    def steps(self) -> list[int]:
        return [r[self.unit] for r in self.records]

    @property
    def planned(self) -> int:
        """The epochs (rounds) the run was configured for."""
        if self.unit == "round":
            return int(self.config.get("fl", {}).get("rounds", self.last["round"]))
        return int(self.config.get("train", {}).get("epochs", self.last["epoch"]))

    @property
    def finished(self) -> bool:
        """Ran all its epochs (rounds); a lambda search's runs (``lambda_*``) stop where the search stops them."""
        return self.last[self.unit] >= self.planned or self.path.name.startswith("lambda_")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
    return out


def preset_of(run_dir: Path) -> str | None:
    """The preset (``+experiment=<name>``) a run was started with, from its Hydra job's overrides.yaml (a
    lambda search's runs: their search's), or None. The config does not hold it: the preset is a group."""
    for job in (run_dir, run_dir.parent):
        overrides = job / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            for line in overrides.read_text().splitlines():
                key, _, value = line.strip().lstrip("- ").strip("'\"").partition("=")
                if key.lstrip("+~") == "experiment" and value:
                    return value
            return None
    return None


def find_runs(*roots: str | Path, report=print) -> list[Run]:
    """Every finished-or-not run (metrics.jsonl + config.json) at or below ``roots``, centralized or federated.

    ``report`` gets one line per run that stopped before its last epoch (round), per directory with records but
    no config.json (a lambda search's lambda that did not end), and per sweep job directory (it holds Hydra's
    ``.hydra/``) without any record: a job that failed or was interrupted before its first.
    """
    runs = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist; give a run or multirun directory")
        for metrics in sorted(root.rglob("metrics.jsonl")):
            config = metrics.parent / "config.json"
            records = read_records(metrics.parent)
            if config.is_file() and records:
                cfg = with_defaults(json.loads(config.read_text()))
                flat = _flatten(cfg)
                preset = preset_of(metrics.parent)
                if preset is not None:
                    flat["experiment"] = preset
                runs.append(Run(metrics.parent, cfg, records, flat))
            elif records:  # a search writes a lambda's config.json when that lambda ends
                report(f"left out: {metrics.parent} holds records but no config.json (a lambda of a search that "
                       f"was stopped or diverged before its end)")
        for job in sorted(p.parent for p in root.rglob(".hydra")):
            if not any((job / name).is_file() for name in ("metrics.jsonl", "deploy.json", "theory.json", "hpo.json")) \
                    and not any(job.glob("lambda_*/metrics.jsonl")):  # a lambda search's runs are in lambda_*
                report(f"left out: {job} holds no records (the job failed or was stopped before its first epoch)")
    for run in runs:
        if not run.finished:
            report(f"unfinished: {run.path} stopped at {run.unit} {run.last[run.unit]} of {run.planned} "
                   f"(marked * in the table)")
    return runs


def _varying_keys(runs: list[Run]) -> list[str]:
    keys = sorted(set().union(*(r.flat for r in runs)))
    return [k for k in keys if not _ignored_in_labels(k) and len({json.dumps(r.flat.get(k)) for r in runs}) > 1]


def _ignored_in_labels(key: str) -> bool:
    """``key`` is one of IGNORED_IN_LABELS or below one (``device`` is, ``devices.tiers.0.budget`` is not)."""
    return any(key == ignored or key.startswith(ignored + ".") for ignored in IGNORED_IN_LABELS)


# sections a run of a mode does not read: a sweep over modes names a centralized run without fl.* and so on
UNREAD_BY_MODE = {"centralized": ("fl.", "devices.", "strategy.", "partition.", "hpo.", "deploy.", "theory."),
                  "hpo": ("fl.", "devices.", "strategy.", "partition.", "deploy.", "theory."),
                  "federated": ("train.epochs", "hpo.", "deploy.", "theory.")}


def _settings(run: Run, keys: list[str]) -> list[str]:
    """``name=value`` of the ``keys`` the run's mode reads; a key by its last part unless another key has it too."""
    last = [k.split(".")[-1] for k in keys]
    unread = UNREAD_BY_MODE.get(str(run.flat.get("mode")), ())
    return [f"{k if last.count(k.split('.')[-1]) > 1 else k.split('.')[-1]}={run.flat.get(k)}" for k in keys
            if not any(k == u or k.startswith(u) for u in unread)]


# what a dense (non-factorized) run does not read: the factors' lasso, rank sampling and shrinking
UNREAD_BY_DENSE = ("model.factorize", "model.skip", "model.skip_last", "train.lambda_gl", "train.lambda_stop_params",
                   "train.lambda_warmup", "train.finetune_after_stop", "train.hgl_mode", "train.eps_ps", "train.shrink",
                   "train.sampler", "train.full_pass", "train.distill_weight", "strategy.shrink_every",
                   "strategy.keep_init_norm")


def _label(run: Run, keys: list[str]) -> str:
    if run.dense:  # named by the settings it reads (train.lr: yes; train.eps_ps: no), so like runs alone are averaged
        rest = [k for k in keys if k not in UNREAD_BY_DENSE]
        return "Non-Factorized" + "".join(f", {setting}" for setting in _settings(run, rest))
    parts = [f"λ={run.lambda_gl:g}"] + _settings(run, [k for k in keys if k not in ("model.factorize", "train.lambda_gl")])
    return "Maestro (" + ", ".join(parts) + ")"


def _within_preset(runs: list[Run], preset) -> list[str]:
    """The keys that vary among the runs of one preset (``experiment``; None: the runs without one)."""
    return _varying_keys([r for r in runs if r.flat.get("experiment") == preset])


def _named(name, run: Run, keys: list[str]) -> str:
    """``name`` followed by the run's settings of ``keys`` in parentheses, where there are any."""
    shown = _settings(run, keys)
    return str(name) + (f" ({', '.join(shown)})" if shown else "")


def _series(run: Run, runs: list[Run], keys: list[str]) -> str:
    """The line a factorized run is drawn on in a sweep's figures: its row's name without lambda (its preset and
    what varies within it, or "Maestro" and what varies besides lambda), so that each variant's lambdas join."""
    preset = run.flat.get("experiment") if "experiment" in keys else None
    if preset is not None:
        return _named(preset, run, [k for k in _within_preset(runs, preset) if k != "train.lambda_gl"])
    return _named("Maestro", run, [k for k in keys if k not in ("model.factorize", "train.lambda_gl", "experiment")])


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; NaN where a value is missing (NaN: statistics.stdev fails on it)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def sweep_table(runs: list[Run]) -> list[dict]:
    """One row per variant (runs that differ only in ``seed`` are averaged): Table 11's columns.

    ``acc``, ``macs``, ``params`` (deployed, merged where cheaper), their ratios to the dense model,
    the training cost ``train_macs_rel`` / ``train_params_rel`` and, where a dense run is among
    ``runs``, the training wall time relative to it (``time_rel``; to a dense run of the same model, data set
    and mode). Sorted: dense first, then by
    lambda.
    """
    if not runs:
        raise ValueError("sweep_table: no runs (no metrics.jsonl + config.json below the given directories)")
    keys = _varying_keys(runs)
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if "experiment" in keys:  # a sweep over presets: each row is named by its preset, and what varies within it
            preset = run.flat.get("experiment")
            within = _within_preset(runs, preset)
            # a run without a preset beside them (a dense reference): named as in a plain sweep
            label = _label(run, within) if preset is None else _named(preset, run, within)
        else:
            label = _label(run, keys)
        groups[label].append(run)
    dense_wall: dict[tuple, list[float]] = defaultdict(list)  # per model, data set and mode: times compare like runs
    for r in runs:
        if r.dense:
            dense_wall[_task(r)].append(r.last["wall_s"] / max(r.last[r.unit], 1))
    rows = []
    for label, members in groups.items():
        lasts = [m.last for m in members]
        evaluated = [m.last.get("accuracy") for m in members if m.last.get("accuracy") is not None]
        row = {"variant": label, "dense": members[0].dense, "lambda_gl": members[0].lambda_gl, "runs": len(members),
               "series": None if members[0].dense else _series(members[0], runs, keys),
               "epochs": min(m.last[m.unit] for m in members),  # where runs of a row stopped apart: the fewest
               "finished": all(m.finished for m in members)}
        row["acc"], row["acc_std"] = _mean_std(evaluated) if evaluated else (math.nan, math.nan)
        for key, name in (("macs_deployed", "macs"), ("params_deployed", "params"), ("macs_rel", "macs_rel"),
                          ("params_rel", "params_rel"), ("train_macs_rel", "train_macs_rel"),
                          ("train_params_rel", "train_params_rel"), ("total_rank", "total_rank")):
            # a federated record has no training cost relative to dense: its cost is what it sent (mb)
            row[name], row[name + "_std"] = _mean_std([float(r.get(key, math.nan)) for r in lasts])
        if all("perplexity" in r for r in lasts):  # translation (Tables 3 and 14 report perplexity)
            row["ppl"], row["ppl_std"] = _mean_std([float(r["perplexity"]) for r in lasts])
        if all("bytes_down" in r for r in lasts):
            row["mb"], row["mb_std"] = _mean_std([(r["bytes_down"] + r["bytes_up"]) / 1e6 for r in lasts])
        if dense_wall.get(_task(members[0])):
            row["time_rel"] = statistics.fmean(r["wall_s"] / max(m.last[m.unit], 1) for m, r in zip(members, lasts)) \
                / statistics.fmean(dense_wall[_task(members[0])])
        row["paths"] = [str(m.path) for m in members]
        rows.append(row)
    rows.sort(key=lambda r: (not r["dense"], r["lambda_gl"], r["variant"]))
    return rows


def _task(run: Run) -> tuple:
    """What a run's wall time per epoch (round) is compared across: its model, data set and mode."""
    return run.flat.get("model.name"), run.flat.get("dataset.name"), run.flat.get("mode")


def _pm(mean: float, std: float, fmt: str, runs: int) -> str:
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if runs > 1 else "")


def write_sweep(rows: list[dict], out_dir: str | Path, notes: list[str] = ()) -> tuple[Path, Path]:
    """``sweep.csv`` (every column) and ``sweep.md`` (Table 11's layout, then ``notes``: the jobs left out) in
    ``out_dir``."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "sweep.csv", out_dir / "sweep.md"
    # every row's keys (a centralized run and a federated one have different columns), in first-seen order
    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "paths"] + ["paths"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "paths": ";".join(row["paths"])})
    has_time = any("time_rel" in r for r in rows)
    has_mb = any("mb" in r for r in rows)
    has_ppl = any("ppl" in r for r in rows)
    lines = ["| Variant | Acc. (%)" + (" | Perplexity" if has_ppl else "")
             + " | MACs (Inf.) | Params. (Inf.) | Rel. MACs / Params. (Train.)"
             + (" | MB down + up" if has_mb else "") + (" | Rel. time (Train.)" if has_time else "") + " | runs |",
             "|---|---" + ("|---" if has_ppl else "") + "|---|---|---" + ("|---" if has_mb else "")
             + ("|---" if has_time else "") + "|---|"]
    for r in rows:
        n = r["runs"]
        train = ("-" if math.isnan(r["train_macs_rel"]) else
                 f"{r['train_macs_rel']:.2f}x / {r['train_params_rel']:.2f}x")
        ppl = (f"| {_pm(r['ppl'], r['ppl_std'], '.2f', n) if 'ppl' in r else '-'} " if has_ppl else "")
        line = (f"| {r['variant']}{'' if r['finished'] else ' *'} | {_pm(100 * r['acc'], 100 * r['acc_std'], '.2f', n)} "
                f"{ppl}| {_pm(r['macs'], r['macs_std'], ',.0f', n)} ({r['macs_rel']:.2f}x) "
                f"| {_pm(r['params'], r['params_std'], ',.0f', n)} ({r['params_rel']:.3f}x) | {train}")
        if has_mb:
            line += f" | {_pm(r['mb'], r['mb_std'], '.1f', n)}" if "mb" in r else " | -"
        if has_time:
            line += f" | {r['time_rel']:.2f}x" if "time_rel" in r else " | -"
        lines.append(line + f" | {n} |")
    if not all(r["finished"] for r in rows):
        lines.append("\n\\* unfinished: stopped before its last epoch (round); the row shows where it stopped.")
    if notes:
        lines += ["", "Not in the table:", *(f"- {note}" for note in notes)]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_sweep(runs: list[Run], out_dir: str | Path, reference: list[tuple[float, float, str]] | None = None,
               notes: list[str] = ()) -> list[Path]:
    """Fig. 12 (accuracy vs deployed parameters and MACs over a lambda sweep), Fig. 8 and Fig. 9.

    ``reference``: optional (params_rel, accuracy, label) points drawn for comparison (e.g. another
    implementation's published numbers); ``notes``: lines for sweep.md (the jobs left out). Returns the PNG
    paths (and writes sweep.csv / sweep.md).
    """
    out_dir = Path(out_dir)
    rows = sweep_table(runs)
    write_sweep(rows, out_dir, notes)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines: dict[str, list[dict]] = defaultdict(list)  # one line per variant, through its lambdas (rows: by lambda)
    for r in rows:
        if not r["dense"]:
            lines[r["series"]].append(r)
    for ax, key, name in ((axes[0], "params_rel", "parameters"), (axes[1], "macs_rel", "MACs")):
        for series, maestro in lines.items():
            ax.errorbar([r[key] for r in maestro], [100 * r["acc"] for r in maestro],
                        yerr=[100 * r["acc_std"] for r in maestro], marker="o", capsize=3, label=series)
        for r in (r for maestro in lines.values() for r in maestro):
            ax.annotate(f"{r['lambda_gl']:g}" + ("" if r["finished"] else "*"), (r[key], 100 * r["acc"]), fontsize=7,
                        xytext=(3, -9),
                        textcoords="offset points")
        for r in rows:
            if r["dense"]:
                ax.axhline(100 * r["acc"], color="grey", ls="--", lw=1)
                ax.plot([1.0], [100 * r["acc"]], marker="*", ms=12, color="black", ls="none", label=r["variant"])
        if reference and key == "params_rel":
            ax.plot([p for p, _, _ in reference], [100 * a for _, a, _ in reference], marker="s", ls=":",
                    color="C3", label=reference[0][2])
        ax.set(xscale="log", xlabel=f"deployed {name} / dense (log)", ylabel="test accuracy (%)",
               title=f"Accuracy vs {name} over lambda (Fig. 12)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "sweep_accuracy.png"))
    keys = _varying_keys(runs)
    series_of = {id(r): _series(r, runs, keys) for r in runs if not r.dense}
    factorized = sorted((r for r in runs if not r.dense and r.last.get("ranks")),
                        key=lambda r: (series_of[id(r)], r.lambda_gl))
    named = len({series_of[id(r)] for r in factorized}) > 1  # several variants: each line says which

    def line_name(run: Run) -> str:
        return (f"{series_of[id(run)]}, " if named else "") + f"λ={run.lambda_gl:g}"

    if factorized:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        seeds = len({r.config.get("seed") for r in factorized}) > 1
        for k, run in enumerate(factorized):
            ax.plot(run.steps, [r["total_rank"] for r in run.records],
                    label=line_name(run) + (f", seed {run.config.get('seed')}" if seeds else ""),
                    color=plt.cm.viridis(k / max(len(factorized) - 1, 1)), marker="." if len(run.records) < 30 else None)
        ax.set(xlabel=factorized[0].unit, ylabel=r"total rank $\sum_i r_i$", title="Total rank over training (Fig. 8)",
               ylim=(0, None))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "sweep_total_rank.png"))
        full = _full_ranks(factorized[0].path, factorized[0].records[0]["ranks"])
        series = {}
        for run in factorized:
            series.setdefault(line_name(run), run.last["ranks"])  # first seed of each variant and lambda
        paths.append(_plot_layer_ranks(series, full, out_dir / "sweep_ranks.png", "Ranks per layer (Fig. 9)"))
    return paths


# ------------------------------------------------------------------------------------------------
# Deployment curves (Fig. 5a / 11)
# ------------------------------------------------------------------------------------------------

def read_curve(path: str | Path) -> list[dict]:
    """Rows of a ``deploy_curve.csv`` with numbers parsed."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed = {}
        for k, v in row.items():
            try:
                parsed[k] = float(v) if v not in ("", None) else math.nan
            except ValueError:
                parsed[k] = v
        out.append(parsed)
    return out


def deploy_targets(deploy: dict) -> dict[str, list[float]]:
    """A deploy config's (``deploy`` section, as a dict) targets, as ``plot_deploy`` draws them."""
    return {"macs_frac": list(deploy.get("target_macs") or []), "params_frac": list(deploy.get("target_params") or [])}


def plot_deploy(curves: dict[str, list[dict]], path: str | Path, targets: dict[str, list[float]] | None = None) -> Path:
    """Test accuracy against deployed MACs and parameters (ratios to the dense model), one line per method.
    ``targets``: {"macs_frac": deploy.target_macs, "params_frac": deploy.target_params}, fractions of each method's
    own starting model; each is drawn, in the method's colour, where it lands on the dense-relative axis."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, frac, name in ((axes[0], "macs_rel", "macs_frac", "MACs"), (axes[1], "params_rel", "params_frac",
                                                                              "parameters")):
        for k, (method, rows) in enumerate(curves.items()):
            for target in (targets or {}).get(frac, ()) if rows else ():
                ax.axvline(target * rows[0][key], color=f"C{k}", ls=":", lw=1)
            rows = [r for r in rows if not math.isnan(r.get("accuracy", math.nan))]
            ax.plot([r[key] for r in rows], [100 * r["accuracy"] for r in rows], marker=".", ms=4,
                    label=method, color=f"C{k}")
        ax.set(xlabel=f"deployed {name} / dense", ylabel="test accuracy (%)",
               title=f"Greedy deployment: accuracy vs {name} (Fig. 11)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(path))
