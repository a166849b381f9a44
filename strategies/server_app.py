"""The Flower ServerApp: runs ``MaestroStrategy`` on whatever Grid Flower gives it.

Two ways in, one code path (``serve``):

* ``flwr run .`` (``[tool.flwr.app.components] serverapp = "strategies.server_app:app"``): the run
  config's ``overrides`` string carries Hydra overrides (``flwr run . --run-config
  'overrides="fl.rounds=5 devices=five_tiers hydra.run.dir=/abs/dir"'``); ``compose`` builds the
  Config from ``conf/`` with ``hydra.compose``, as the command line would.
* ``python -m fedmaestro`` (``strategies.simulation.run``): Hydra has composed the Config already;
  ``make_app(cfg, run_dir)`` wraps it in a ServerApp for ``flwr.simulation.run_simulation``.
"""

from __future__ import annotations

import logging
import shlex
import threading
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedmaestro import checkpoint
from fedmaestro.console import run_log_file
from fedmaestro.config import Config, resolve, to_dict

from .maestro import MaestroStrategy
from .simulation import num_workers

__all__ = ["app", "make_app", "serve", "compose", "preflight", "OVERRIDES_KEY"]

log = logging.getLogger(__name__)

OVERRIDES_KEY = "overrides"  # [tool.flwr.app.config] key: Hydra overrides, one string


def compose(overrides: list[str]) -> tuple[Config, Path]:
    """(validated Config, run directory) of Hydra overrides, composed from conf/ as the command line does.

    The run directory is ``hydra.run.dir`` (default ``outputs/federated/<timestamp>``, relative to the
    working directory of the process; give an absolute ``hydra.run.dir=...`` under ``flwr run``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from fedmaestro.__main__ import CONF_DIR, composition_error

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            raw = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:  # as the command line words it: the key and the fix
        raise ValueError(composition_error(e)) from e
    run_dir = Path(str(OmegaConf.select(raw, "hydra.run.dir")))
    with open_dict(raw):
        del raw["hydra"]
    cfg = resolve(raw)
    if cfg.mode != "federated":
        raise ValueError(f"config: mode={cfg.mode!r}, but the ServerApp runs the federated mode; drop the mode override")
    return cfg, run_dir


def preflight(cfg: Config, run_dir: Path, server_has_data: bool = True) -> int:
    """What would otherwise fail on every client in every round (each reply an error, dropped), or only after
    Ray's start-up, fails here, once, before any client is asked: the model and the tiers' budgets, the data
    set, the partitions (as each client builds them) and a resume's config. Returns the rounds a resumed run
    has done (0 for a new run). Both ways in run it: ``python -m fedmaestro`` before Ray starts, ``flwr run``
    in the ServerApp before its first round. ``server_has_data=False`` (``flwr run``, where the server may
    hold only the test set): a training set the server cannot find is a warning, not an error (the clients
    read theirs), and the partitions go unchecked."""
    from clients import local
    from fedmaestro import data

    MaestroStrategy(cfg, None, show_progress=False)  # the model and the tiers' budgets
    try:
        local.client_data(cfg, report=lambda message: log.warning("%s", message))
    except FileNotFoundError as e:
        if server_has_data:
            raise
        log.warning("preflight: the server has no copy of the clients' training set (%s); their partitions are "
                    "not checked before round 1", e)
    local.forget_data()  # the server process does not train: free the copy (the workers load their own)
    data.clear_cache()
    path = checkpoint.resume_path(cfg.checkpoint, run_dir)
    if cfg.checkpoint and not cfg.resume:  # (python -m fedmaestro refuses it first; flwr run comes here)
        raise ValueError(checkpoint.unread_checkpoint(cfg.checkpoint))
    if cfg.resume and cfg.checkpoint and not path.is_file():
        raise FileNotFoundError(checkpoint.missing_resume_source(path, run_dir))
    if not (cfg.resume and path.is_file()):
        return 0
    state = checkpoint.load(path)
    checkpoint.check_resumable(state["config"], to_dict(cfg), checkpoint.resume_ignored("federated", cfg.dataset.name))
    return int(state["round"])


def finish_done_run(run_dir: Path, cfg: Config, done: int) -> str:
    """Says so, and writes the final model and figures where an interruption after the last checkpoint left none."""
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    strategy.resume()
    if not (run_dir / "model.pt").is_file():
        strategy.runlog.finish(strategy.global_model)
    strategy.refuse_untrained(done)  # a run whose every round went without a valid reply stays a failed run
    return (f"{run_dir}: the run has done all fl.rounds={cfg.fl.rounds} rounds (its checkpoint is at round {done}); "
            "raise fl.rounds to continue it")


IN_MEMORY_POLL_S = 0.01  # the simulation's grid checks for replies this often (Flower's default: 0.1 s)


class RunInterrupted(RuntimeError):
    """The simulation was interrupted; the ServerApp's thread stops at its next poll of the grid."""


def _stop_when(interrupted: threading.Event, grid: InMemoryGrid) -> None:
    """The ServerApp runs in a thread of its own, which would otherwise wait out the round's timeout for
    replies that no worker will send once the simulation's main thread is interrupted (Ctrl-C)."""
    pull = grid.pull_messages

    def pull_messages(message_ids):
        if interrupted.is_set():
            raise RunInterrupted("the simulation was interrupted")
        return pull(message_ids)

    grid.pull_messages = pull_messages


def serve(grid: Grid, cfg: Config, run_dir: Path | None, launched_at: float | None = None,
          interrupted: threading.Event | None = None, dispatch_window: int | None = None) -> Result:
    """Run the strategy on ``grid``; ``interrupted``: set by the simulation adapter on Ctrl-C; ``dispatch_window``:
    the strategy's (``MaestroStrategy.dispatch_window``), which the simulation adapter knows from its workers."""
    if isinstance(grid, InMemoryGrid):  # a poll of the in-process state costs microseconds; a late one, up to 0.1 s
        grid.pull_interval = min(grid.pull_interval, IN_MEMORY_POLL_S)
        if interrupted is not None:
            _stop_when(interrupted, grid)
    strategy = MaestroStrategy(cfg, run_dir, launched_at=launched_at)
    strategy.dispatch_window = dispatch_window
    return strategy.start(grid)


def make_app(cfg: Config, run_dir: Path | None, launched_at: float | None = None,
             interrupted: threading.Event | None = None, failed: list[BaseException] | None = None) -> ServerApp:
    """A ServerApp bound to an already composed Config (the simulation adapter's). ``failed``: where an exception
    of the run goes, for the adapter to raise in the main thread once the simulation has ended (Flower would
    log it with a traceback and end the simulation as if the run had succeeded). The engine's workers take the
    messages first in, first out: the strategy keeps one more in flight than there are workers, longest first."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, cfg, run_dir, launched_at, interrupted, dispatch_window=num_workers(cfg) + 1)
        except Exception as e:  # noqa: BLE001  (handed to the main thread, which raises it)
            if failed is None or isinstance(e, RunInterrupted):
                raise
            failed.append(e)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    overrides = shlex.split(str(context.run_config.get(OVERRIDES_KEY, "")))
    cfg, run_dir = compose(overrides)
    checkpoint.refuse_overwrite(run_dir, cfg.resume, "federated", source=cfg.checkpoint)
    done = preflight(cfg, run_dir, server_has_data=False)
    if done >= cfg.fl.rounds:
        log.warning(finish_done_run(run_dir, cfg, done))
        return
    with run_log_file(run_dir):  # no Hydra job logging here: the run's fedmaestro.log, as python -m fedmaestro's
        serve(grid, cfg, run_dir)
