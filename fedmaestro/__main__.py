"""Command line: ``python -m fedmaestro [mode=federated|centralized|deploy|hpo|theory] [overrides]``.

Hydra composes conf/ (see fedmaestro/config.py for every key); each mode's module exposes
``run(cfg: Config, run_dir: Path)``. This is the one place in fedmaestro/ that may import the
Flower apps (strategies/), for the federated mode.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from . import checkpoint
from .console import echo, log_only, log_to_run_files
from .config import MODES, Config, resolve, to_dict, unknown_key

PROJECT_DIR = Path(__file__).resolve().parents[1]
# the Hydra configs: inside the installed package (a wheel maps conf/ to fedmaestro/conf), else the checkout's conf/
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = str(_PACKAGED_CONF if _PACKAGED_CONF.is_dir() else PROJECT_DIR / "conf")

MODE_RUNNERS = {
    "federated": "strategies.simulation",
    "centralized": "fedmaestro.centralized",
    "deploy": "fedmaestro.deploy",
    "hpo": "fedmaestro.hpo",
    "theory": "fedmaestro.theory",
}


# What a wrong config, path or checkpoint raises in this project's own checks: printed as one line (the
# message names the key and the fix), not as a traceback; HYDRA_FULL_ERROR=1 shows the traceback. The same
# types raised inside a library (torch, numpy, ...) are bugs, and keep their traceback. A command line that
# Hydra cannot compose (a mistyped key or option, a value of the wrong type) is a user error too. Both exit 2.
# FloatingPointError: a run that diverged; TimeoutError: a federation whose nodes did not come (strategy.connect_timeout)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, TimeoutError)
# HYDRA_FULL_ERROR as the user set it: main() sets it for Hydra, which then hands every error to main()
_show_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"


def is_user_error(e: BaseException) -> bool:
    """One of USER_ERRORS, raised by this project's code (not by a library it calls)."""
    if not isinstance(e, USER_ERRORS):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(package in path.parents for package in _our_packages())


def _our_packages() -> list[Path]:
    """The directories of this project's packages, wherever they are installed (a checkout, or site-packages
    for a wheel), found without importing them."""
    found = []
    for name in ("fedmaestro", "clients", "strategies"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            found.append(Path(spec.origin).resolve().parent)
    return found


NOT_RESUMED = ("deploy", "theory")  # modes that always start afresh (resume=true is not read)


class RunDirGuard(Callback):
    """Before Hydra writes into the run directory (its .hydra/ files describe the run that is there): a new
    run into a directory that holds one is refused, and so is a resume whose config differs from its
    checkpoint's (before any data loads). Registered in conf/config.yaml. For the length of each job it routes
    what the job prints (``console.echo``) into the job's log file too.

    In a --multirun it also collects the jobs that failed on a user error or found no model (each printed its
    one-line error and returned the exit status a single run would have had, so that the sweep went on): the
    sweep then exits with the highest of them."""

    def __init__(self) -> None:
        self.failed_jobs: dict[str, int] = {}
        self.kept: dict[Path, bytes] = {}  # a resumed sweep's files as they were before it (on_multirun_start)
        self.jobs = 0

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not str(config.hydra.run.dir or "").strip():  # Hydra would write into the working directory
            print("error: hydra.run.dir is empty (an unset shell variable?); give the run a directory, "
                  "hydra.run.dir=<dir>, or drop the override for outputs/<mode>/<time>", file=sys.stderr)
            sys.exit(2)
        run_path = Path(str(config.hydra.run.dir))
        checkpoint.note_run_dir(run_path)  # before Hydra makes it (see discard_unused_run_dir)
        blocked = next((p for p in (run_path, *run_path.parents) if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            print(f"error: hydra.run.dir={run_path}: {blocked} is a file, not a directory; give the run a "
                  f"directory (hydra.run.dir=<dir>)", file=sys.stderr)
            sys.exit(2)
        try:
            run_path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"error: hydra.run.dir={run_path} cannot be made ({e.strerror}); give the run a directory "
                  f"you can write to (hydra.run.dir=<dir>)", file=sys.stderr)
            sys.exit(2)
        mode = config.get("mode")
        if mode not in MODES:  # (a mode that does not exist: resolve says so, in run_mode)
            return
        if mode == "hpo" and config.get("checkpoint"):  # refused before anything is read from it or written here
            checkpoint.discard_unused_run_dir(run_path)
            print(f"error: {unread_by_search(config.get('checkpoint'))}", file=sys.stderr)
            sys.exit(2)
        resume = bool(config.get("resume")) and mode not in NOT_RESUMED
        try:
            checkpoint.refuse_overwrite(run_path, resume, mode, source=config.get("checkpoint"))
            path = checkpoint.resume_path(config.get("checkpoint"), run_path)
            ignored = ()
            if mode == "hpo":  # a search's lambdas, each trained with its own lambda_gl and hpo.eval_every
                path = next(iter(sorted(Path(run_path).glob("lambda_*/checkpoint.pt"))), path)
                ignored = ("train.lambda_gl", "train.eval_every")
            if resume and path.is_file():
                try:  # a config that does not resolve fails later, in run_mode, with its own message
                    job = resolve(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
                except ValueError:
                    return
                checkpoint.check_resumable(checkpoint.load(path)["config"], to_dict(job),
                                           checkpoint.resume_ignored(mode, job.dataset.name) + ignored)
        except (FileExistsError, ValueError) as e:
            checkpoint.discard_unused_run_dir(run_path)  # (made above: a refused run leaves no directory)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """A new sweep into a directory whose jobs hold runs is refused before Hydra writes anything there (it
        rewrites a job's .hydra/ and the sweep's multirun.yaml before any job could refuse)."""
        swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
                 if o.is_sweep_override()}
        mode = config.get("mode")
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if {"mode", "resume"} & swept or mode not in MODES or (bool(config.get("resume")) and mode not in NOT_RESUMED):
            # each job checks its own directory (run_mode), after Hydra has rewritten the job's .hydra/ files:
            # kept here, for a job that is refused to get its own back (on_job_end)
            self.kept = {path: path.read_bytes() for path in [sweep_dir / "multirun.yaml",
                                                              *sweep_dir.glob("*/.hydra/*.yaml")] if path.is_file()}
            return
        shown = _jobs_with_runs(sweep_dir)
        if shown:
            again = "" if mode in NOT_RESUMED else "continue that sweep with resume=true, or "
            print(f"error: hydra.sweep.dir={sweep_dir} holds the runs of an earlier sweep ({shown}); {again}give the "
                  f"new sweep its own directory (hydra.sweep.dir=...)", file=sys.stderr)
            sys.exit(2)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        log_to_run_files(config.hydra.runtime.output_dir)  # what the job prints goes into its fedmaestro.log too

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        log_to_run_files(None)
        self.jobs += 1
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, int):
            job = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
            self.failed_jobs[job.name] = job_return.return_value
            self._restore(job / ".hydra")  # a refused job's run is described by its files as they were

    def _restore(self, where: Path) -> None:
        for path, content in self.kept.items():
            if path.parent == where or path == where:
                path.write_bytes(content)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.jobs and len(self.failed_jobs) == self.jobs:  # no job ran: the sweep's description stays too
            self._restore(Path(str(config.hydra.sweep.dir)) / "multirun.yaml")
        if self.failed_jobs:
            print(f"error: {len(self.failed_jobs)} job(s) of the sweep failed (each said why above): "
                  f"{', '.join(self.failed_jobs)}", file=sys.stderr)
            sys.exit(max(self.failed_jobs.values()))


def composition_error(e: Exception) -> str:
    """The message of an error Hydra raised while composing the command line, in a few lines: which key or
    option, what is wrong, and (for a key the schema lacks) the closest key that exists."""
    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        where = getattr(cause, "object_type", None)
        if "." not in str(key) and "[" not in str(key) and dataclasses.is_dataclass(where) and where is not Config:
            # a key inside a list's entry (devices.tiers=[{...}]): OmegaConf names it without its path
            close = difflib.get_close_matches(str(key), [f.name for f in dataclasses.fields(where)], n=1)
            return (f"config: unknown keys (not in the schema, fedmaestro/config.py): {key}, in an entry of type "
                    f"{where.__name__}" + (f" (did you mean {close[0]}?)" if close else ""))
        return f"config: unknown keys (not in the schema, fedmaestro/config.py): {unknown_key(str(key))}"
    if cause is not None and key:
        message = str(cause).splitlines()[0]
        if "is not a ListConfig" in message:
            given = getattr(cause, "value", None)
            message += f" Give a list: {key}=[{given if isinstance(given, (str, int, float)) else '...'}]"
        elif "could not be converted to Integer" in message:
            message += "; give a whole number (no decimal point or exponent)"
        return f"config: {key}: {message}"
    message = str(e).split("\nConfig search path:")[0].strip()  # a missing option: Hydra lists the ones there are
    if isinstance(e, OverrideParseException):  # its message does not say which override
        key, _, value = str(e.override).partition("=")
        hint = ""
        if re.search(r"[=,]", value) and not re.search(r"[\[\]{}'\"]", value):
            hint = (f"\na value holding '=' or ',' (a --multirun job's directory name) must be quoted for Hydra: "
                    f"{_override(key, value)}")
        message = f"{e.override}: {message}{hint}"
    return message.replace("\n\n", "\n")


def _override(key: str, value: str) -> str:
    """``key=value`` as it can be pasted into a shell, quoted for Hydra where the value holds characters its
    grammar reads (a sweep job's directory name holds '=' and ',')."""
    if re.fullmatch(r"[\w./:+-]*", value):
        return f"{key}={value}"
    return f"\"{key}='{value}'\""


def unread_by_search(checkpoint_: str) -> str:
    return (f"checkpoint={checkpoint_} is not read by mode=hpo: a lambda search resumes from its run directory "
            f"(resume=true hydra.run.dir=<the search's directory>); drop checkpoint=")


def run_mode(cfg: DictConfig, run_dir: Path, sweep: bool = False) -> int | None:
    """Run ``cfg``'s mode into ``run_dir``; ``sweep``: a job of --multirun (a search that found no model returns
    the exit status 1, for the sweep to go on with its next job, instead of ending the process)."""
    config = resolve(cfg)  # validation: a bad value fails here, before any work
    if config.checkpoint and config.mode == "hpo":
        raise ValueError(unread_by_search(config.checkpoint))
    if config.resume and config.mode == "theory":
        raise ValueError("resume=true is not read by mode=theory: its experiments are short and always start afresh "
                         "(theory.*, seed); drop resume=true")
    if config.checkpoint and config.mode == "theory":
        raise ValueError(f"checkpoint={config.checkpoint} is not read by mode=theory: its experiments train small "
                         f"linear maps from scratch (theory.*, seed); drop checkpoint=")
    if config.checkpoint and config.mode in ("centralized", "federated") and not config.resume:
        raise ValueError(checkpoint.unread_checkpoint(config.checkpoint))
    # RunDirGuard checks single runs; this, a sweep's jobs too
    checkpoint.refuse_overwrite(run_dir, config.resume, config.mode, "hydra.sweep.dir" if sweep else "hydra.run.dir",
                                source=config.checkpoint)
    if sweep and config.resume and config.mode not in NOT_RESUMED and checkpoint.held_run(run_dir) is None:
        _warn_of_other_runs(run_dir)
    if config.mode in ("centralized", "hpo", "federated"):
        from .train import unused_partition_settings, unused_settings
        partition = unused_partition_settings(config.partition) if config.mode == "federated" else []
        for notice in unused_settings(config.train, config.device) + partition:
            echo(notice, style="yellow", markup=False)
    if config.mode == "theory" and (config.device not in ("auto", "cpu") or config.train.threads):
        echo("mode=theory trains 6 x 9 linear maps on one CPU thread; device and train.threads are not used",
             style="yellow", markup=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = importlib.import_module(MODE_RUNNERS[config.mode]).run(config, run_dir)
    if config.mode == "hpo" and result.chosen is None:  # scripts must tell a failed search from a found model
        message = (f"the lambda search returned no model: {result.reason} (every lambda tried: "
                   f"{run_dir / 'hpo_summary.csv'})")
        if sweep:  # the sweep goes on with its next job, and ends with a failure status
            print(f"error: job {run_dir.name}: {message}", file=sys.stderr)
            return 1
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def _jobs_with_runs(sweep_dir: Path, prefix: str = "") -> str:
    """The job directories of ``sweep_dir`` (whose names start with ``prefix``) that hold a run, named (the first
    three) for a message; "" if none."""
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.startswith(prefix)) \
        if sweep_dir.is_dir() else []
    held = [job.name for job in jobs if checkpoint.held_run(job) is not None]
    return ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")


def _warn_of_other_runs(run_dir: Path) -> None:
    """A resumed sweep's job without a run of its own, beside a job of the same number with one: the same job
    under another directory name (the names changed on 2026-12-02). (Jobs of other numbers with runs are what an
    interrupted sweep leaves: this one had not started.)"""
    number = run_dir.name.split("_", 1)[0] + "_"
    shown = _jobs_with_runs(run_dir.parent, number)  # run_dir holds none: they are the others
    if shown:
        echo(f"resume=true: {run_dir.name} holds no run, but another job {number[:-1]} of this sweep does "
             f"({shown}); this job starts "
             f"fresh. If one of them is this job under another name (sweeps started before 2026-12-02 named "
             f"train.epochs and fl.rounds in their directories), stop and resume with "
             f"'hydra.job.config.override_dirname.exclude_keys=[resume,progress,device,experiment]' added",
             style="yellow", markup=False)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> int | None:
    """Run one job; in a --multirun, a job that fails on a user error returns the exit status (RunDirGuard
    collects it) instead of raising, so that Hydra prints one line and not a traceback."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        return run_mode(cfg, run_dir, sweep=sweep)
    except KeyboardInterrupt:  # the whole sweep stops too
        resumable = cfg.get("mode") in ("federated", "centralized", "hpo")
        if resumable and not sweep and checkpoint.held_run(run_dir) is None and not cfg.get("checkpoint"):
            print(f"\ninterrupted before the run's first checkpoint: nothing to resume in {run_dir}; start it again",
                  file=sys.stderr)
            resumable = None
        # a run started from checkpoint= that has written its own checkpoint goes on from that one (resuming with
        # checkpoint= as well is refused: the directory now holds a run)
        own = "the same command without checkpoint=" if (not sweep and cfg.get("checkpoint")
                                                          and checkpoint.held_run(run_dir) is not None) else None
        again = (f"the same command (with --multirun) + resume=true {_override('hydra.sweep.dir', hydra_cfg.sweep.dir)}"
                 if sweep else f"{own or 'the same command'} + resume=true {_override('hydra.run.dir', str(run_dir))}")
        if resumable is not None:
            print(f"\ninterrupted: {run_dir} keeps what was done" + (f"; continue with {again}" if resumable else ""),
                  file=sys.stderr)
        if cfg.get("mode") == "federated":
            # Flower's message threads can be left in ray.get on actors Ray has already shut down, and Python
            # would wait for them at exit forever: leave now (the checkpoint and records are written atomically)
            logging.shutdown()
            sys.stderr.flush()
            os._exit(130)
        sys.exit(130)
    except USER_ERRORS as e:
        if not is_user_error(e) or _show_tracebacks:
            raise
        if sweep:  # one line per failed job; the sweep goes on to the next job and ends with a failure status
            print(f"error: job {run_dir.name}: {e}", file=sys.stderr)
            log_only(f"error: {e}")
            return 2  # (the job's directory stays: the sweep's table names it)
        checkpoint.discard_unused_run_dir(run_dir)
        if run_dir.is_dir():  # a run that got under way: its log says how it ended
            log_only(f"error: {e}")
        print(f"error: {e}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    if not Path(CONF_DIR).is_dir():
        print(f"error: fedmaestro's configs are not at {CONF_DIR}: this install has no conf/ tree. Reinstall it "
              f"(`pip install -e .` from a checkout, as `make install` does, or `pip install .`)", file=sys.stderr)
        sys.exit(2)
    global _show_tracebacks
    given = os.environ.get("HYDRA_FULL_ERROR")
    _show_tracebacks = given == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises; what a user did wrong is printed here, in one line
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        if _show_tracebacks or _raised_in_a_run(e):  # a bug, with its traceback
            raise
        print(f"error: {composition_error(e)}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
    finally:
        if given is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = given


def _raised_in_a_run(e: BaseException) -> bool:
    """Whether ``e`` passed through a job (the task function), rather than Hydra's composition of the command
    line (which a sweep also does between batches of jobs)."""
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "_hydra_main" and code.co_filename == __file__:
            return True
        tb = tb.tb_next
    return False


if __name__ == "__main__":
    main()
