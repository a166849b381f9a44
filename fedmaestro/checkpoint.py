"""Checkpoints that load with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts.

A checkpoint carries the full resolved config, so a file alone can be reloaded (the model is rebuilt
from its config, then the state dict resizes every LoD layer to the saved ranks). Writes are atomic
(temporary file + rename), so a kill mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .config import with_defaults

log = logging.getLogger(__name__)

__all__ = ["save", "load", "config_diff", "check_resumable", "refuse_overwrite", "resume_ignored", "resume_path",
           "missing_resume_source", "unread_checkpoint",
           "note_run_dir", "discard_unused_run_dir", "get_dotted"]

# Keys that may change between an interrupted run and its resumption: where and how fast it runs
# (the data root may move with the run between machines). train.num_workers is one too, but for ImageNet
# (``resume_ignored``, ``WHY_KEPT``): the in-memory sets never start loader workers, and Multi30k's items draw
# nothing random.
IGNORED_KEYS = ("resume", "checkpoint", "progress", "device", "data.root", "train.threads",
                "fl.client_cpus", "fl.client_gpus")
# Of those, the ones that change float rounding (other kernels, other thread counts): such a resume goes
# on, with a warning that its numbers will not match an uninterrupted run's digit for digit.
ROUNDING_KEYS = ("device", "train.threads", "fl.client_cpus", "fl.client_gpus")
# Why a key that looks like one of how fast a run goes must stay as it was (said when a resume changes it)
WHY_KEPT = {"train.num_workers": "ImageNet's random crops come from torch's RNG without loader workers and from "
                                 "each worker's seed with them: another count trains on other crops"}


def save(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str | Path, map_location: str | torch.device = "cpu", key: str = "checkpoint") -> dict[str, Any]:
    """The file at ``path``, loaded with ``weights_only=True``; ``key``: the setting that named it (for messages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key} {path} does not exist; give {key}=<a run directory, or its model.pt "
                                f"or checkpoint.pt>")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError) as e:  # never retried without weights_only
        raise ValueError(_not_a_checkpoint(path, e)) from e
    except OSError as e:  # torch's zip reader on a truncated file (EINVAL); permissions and I/O errors are not ours
        if e.errno != errno.EINVAL:
            raise
        raise ValueError(_not_a_checkpoint(path, e)) from e
    except RuntimeError as e:  # a torch.save file's format; any other RuntimeError (devices, memory) is not ours
        if "PytorchStreamReader" not in str(e) and "zip archive" not in str(e):
            raise
        raise ValueError(_not_a_checkpoint(path, e)) from e
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and isinstance(state.get("model"), dict)):
        raise ValueError(_not_a_checkpoint(path, "it lacks fedmaestro's 'config' and 'model' dicts"))  # a tensor's
    return state


def _not_a_checkpoint(path: Path, why: BaseException | str) -> str:
    why = why if isinstance(why, str) else f"torch.load with weights_only=True refused it: {type(why).__name__}"
    return (f"{path} is not a checkpoint or model file written by fedmaestro ({why}); give a run directory, its "
            f"model.pt or checkpoint.pt")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# keys a run fills in from its data set (centralized.with_data_facts): the command line that resumes a run never
# names them, and a checkpoint written before a key was added lacks it
DATA_FACTS = ("model.kwargs.vocab_size", "dataset.vocabulary")


def get_dotted(d: dict, key: str) -> Any:
    """``d``'s value at the dotted ``key`` (``"model.kwargs.vocab_size"``); None where a part is absent."""
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _fill_in(d: dict, key: str, value: Any) -> None:
    """Set ``key`` (dotted) in ``d`` to ``value`` where ``d`` leaves it unset (absent or None)."""
    if value is None or get_dotted(d, key) is not None:
        return
    *parents, last = key.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def config_diff(saved: dict, current: dict, ignored: tuple[str, ...] = IGNORED_KEYS) -> list[str]:
    """Lines ``key: saved -> current`` for every config key that differs (ignoring ``ignored``); a key the
    schema gained after ``saved`` was written counts at its default (``config.with_defaults``), and a
    ``DATA_FACTS`` key set on one side only counts as the same on both (a Transformer run filled in its
    vocabulary size from its data; the command line that resumes it does not name it)."""
    saved, current = with_defaults(saved), copy.deepcopy(current)
    for key in DATA_FACTS:
        _fill_in(current, key, get_dotted(saved, key))
        _fill_in(saved, key, get_dotted(current, key))
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in a.keys() | b.keys() if not any(k == i or k.startswith(i + ".") for i in ignored))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys if a.get(k) != b.get(k)]


def check_resumable(saved: dict, current: dict, ignored: tuple[str, ...] = IGNORED_KEYS) -> None:
    """Raise if the config a checkpoint was written with differs from ``current`` outside ``ignored`` (the
    error lists the keys); warn if a key of ``ROUNDING_KEYS`` differs."""
    diff = config_diff(saved, current, ignored)
    if any(line.startswith("dataset.vocabulary:") for line in diff):
        data_facts = [line for line in diff if line.split(":", 1)[0] in DATA_FACTS]
        raise ValueError("resume: the data set is not the one the checkpoint was trained on (checkpoint -> now: "
                         + "; ".join(data_facts) + "); give data.root the copy of the data set it was trained on")
    if diff:
        lines = [f"{line} ({WHY_KEPT[line.split(':', 1)[0]]})" if line.split(":", 1)[0] in WHY_KEPT else line
                 for line in diff]
        raise ValueError("resume: the checkpoint was written with a different config; keys that differ "
                         "(checkpoint -> now):\n  " + "\n  ".join(lines) +
                         "\nRun with the checkpoint's config, or start a new run directory.")
    rounding = [line for line in config_diff(saved, current, ()) if line.split(":", 1)[0] in ROUNDING_KEYS]
    if rounding:
        log.warning("resume: %s. The run goes on, but other kernels or thread counts round floats differently, so "
                    "its numbers will not match an uninterrupted run's digit for digit", "; ".join(rounding))


RUN_NAMES = {"federated": "federated run", "centralized": "centralized run", "hpo": "lambda search",
             "deploy": "deployment", "theory": "theory run"}
# what a finished run leaves besides its checkpoint, which a user may delete to save space: the run is still there
FINISHED_RUN_FILES = {"hpo.json": "hpo", "theory.json": "theory", "summary.json": "federated", "model.pt": None}


def _mode_of(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "config.json").read_text()).get("mode")
    except (OSError, ValueError, AttributeError):
        return None


def held_run(run_dir: str | Path) -> tuple[str | None, Path] | None:
    """(mode, file) of the run a directory holds: its checkpoint.pt (the mode from its config.json, None if
    unreadable), a lambda search's ``lambda_*/checkpoint.pt``, a deployment's deploy.json, or else what a
    finished run leaves without its checkpoint (``FINISHED_RUN_FILES``); None if none of these."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoint.pt").is_file():
        return _mode_of(run_dir), run_dir / "checkpoint.pt"
    searches = sorted(run_dir.glob("lambda_*/checkpoint.pt"))
    if searches:
        return "hpo", searches[0]
    if (run_dir / "deploy.json").is_file():
        return "deploy", run_dir / "deploy.json"
    for name, mode in FINISHED_RUN_FILES.items():  # a mode's own file first: a search's dir has no config.json
        if (run_dir / name).is_file():
            return mode or _mode_of(run_dir), run_dir / name
    return None


def refuse_overwrite(run_dir: str | Path, resume: bool, mode: str, dir_key: str = "hydra.run.dir",
                     source: str | None = None) -> None:
    """A run of ``mode`` into a directory that holds one would overwrite its records, checkpoints, models
    or exports: raise FileExistsError naming the ways out, unless it resumes the run of the same mode that is
    there. ``source``: the ``checkpoint=`` a resume continues from; one outside ``run_dir`` would continue
    another run here, over this one. ``dir_key``: the override that gives a run its own directory (a sweep's
    jobs: ``hydra.sweep.dir``)."""
    held = held_run(run_dir)
    if held is None:
        return
    recorded, path = held
    there = mode if recorded is None else recorded
    where = f"{Path(run_dir)} already holds a {RUN_NAMES.get(there, there + ' run')} ({path.relative_to(run_dir)})"
    own_dir = f"give the new run its own directory ({dir_key}=...)"
    if there != mode:
        raise FileExistsError(f"{where}, not a {RUN_NAMES.get(mode, mode + ' run')}; {own_dir}")
    if recorded == "hpo" and path == Path(run_dir) / "checkpoint.pt":  # a search keeps its lambdas' in lambda_*/
        raise FileExistsError(f"{Path(run_dir)} holds one lambda of a lambda search: a run here would start a search "
                              f"inside it, over its model.pt; resume the search with "
                              f"{dir_key}={Path(run_dir).resolve().parent}, or {own_dir}")
    if mode in ("deploy", "theory"):
        raise FileExistsError(f"{where}; {own_dir}")
    resumable = path.name == "checkpoint.pt"
    if not resume:
        raise FileExistsError(f"{where}; " + (f"continue it with resume=true, or {own_dir}" if resumable else own_dir))
    if not resumable and not source:
        raise FileExistsError(f"{where} but no checkpoint.pt to continue it from (resume=true would start afresh "
                              f"over it); {own_dir}")
    if source and resume_path(source, run_dir).resolve().parent != Path(run_dir).resolve():
        raise FileExistsError(f"{where}; resume=true checkpoint={source} would continue that other run here, over "
                              f"this one: drop checkpoint= to continue the run that is here, or {own_dir}")


def resume_ignored(mode: str, dataset: str) -> tuple[str, ...]:
    """The keys a resumed run of ``mode`` may change: ``IGNORED_KEYS``, the run's length (``train.epochs``;
    ``fl.rounds``), the federated server's timeouts and when it evaluates, and ``train.num_workers`` where it
    changes nothing (federated clients read their data without loader workers)."""
    if mode == "federated":
        # (strategy.keep_init_norm acts on a fresh model only, before round 1: a resumed run goes on from its
        # checkpoint's factors)
        return IGNORED_KEYS + ("fl.rounds", "strategy.round_timeout", "strategy.connect_timeout",
                               "strategy.overlap_eval", "strategy.keep_init_norm", "train.num_workers")
    return IGNORED_KEYS + ("train.epochs",) + (() if dataset == "imagenet" else ("train.num_workers",))


def missing_resume_source(path: Path, run_dir: str | Path) -> str:
    """What a resume from a ``checkpoint=`` that does not exist says (a typo would otherwise start afresh)."""
    return (f"resume: checkpoint={path} does not exist; give checkpoint= the directory of the run to continue (or "
            f"its checkpoint.pt), or drop checkpoint= to start fresh in {run_dir}")


def unread_checkpoint(checkpoint: str) -> str:
    """What a centralized or federated run given ``checkpoint=`` without ``resume=true`` says."""
    return (f"checkpoint={checkpoint} is read only with resume=true (the run goes on from it) or by mode=deploy; "
            f"add resume=true, or drop checkpoint=")


def resume_path(checkpoint: str | None, run_dir: str | Path | None) -> Path | None:
    """The checkpoint ``resume=true`` continues from: ``checkpoint=`` (a file, or a run directory's checkpoint.pt),
    else the run directory's checkpoint.pt."""
    if checkpoint:
        return Path(checkpoint) / "checkpoint.pt" if Path(checkpoint).is_dir() else Path(checkpoint)
    return Path(run_dir) / "checkpoint.pt" if run_dir is not None else None


HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes in a run's .hydra/
_new_dirs: list[Path] = []  # a single run's directory and the parents Hydra is about to make for it, innermost first


def note_run_dir(run_dir: str | Path) -> None:
    """Remember which of ``run_dir`` and its parents do not exist yet (called before Hydra makes them)."""
    missing, path = [], Path(run_dir).resolve()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    _new_dirs[:] = missing


def discard_unused_run_dir(run_dir: str | Path) -> None:
    """Remove the directory this command made (``note_run_dir``) for a run that failed before writing anything,
    where it holds only what Hydra wrote (``.hydra/`` and an empty ``fedmaestro.log``), and the parents made with
    it (``outputs/<mode>/``) if left empty. A directory that existed before, or holds anything else, stays."""
    run_dir = Path(run_dir).resolve()
    if not _new_dirs or _new_dirs[0] != run_dir:
        return
    hydra_dir, log_file = run_dir / ".hydra", run_dir / "fedmaestro.log"
    try:
        if not {p.name for p in run_dir.iterdir()} <= {".hydra", "fedmaestro.log"} \
                or (hydra_dir.is_dir() and not {p.name for p in hydra_dir.iterdir()} <= HYDRA_FILES) \
                or (log_file.is_file() and log_file.stat().st_size):
            return
        for path in (*(hydra_dir.iterdir() if hydra_dir.is_dir() else ()), log_file):
            path.unlink(missing_ok=True)
        for path in (hydra_dir, *_new_dirs):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    except OSError:  # a directory that cannot be tidied is left as it is
        return
