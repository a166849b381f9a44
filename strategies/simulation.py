"""``mode=federated``: the ServerApp and ClientApp in Flower's simulation engine (Ray), on this machine.

``run(cfg, run_dir)`` is what ``python -m fedmaestro`` calls. ``simulate`` is the one adapter around
``flwr.simulation.run_simulation`` (deprecated upstream in favour of ``flwr run``; when it goes, only
this function changes). The apps are the ones ``flwr run .`` loads, so a run moves to Flower's
deployment engine or a Ray cluster without code changes.

Client resources come from ``fl.client_cpus`` / ``fl.client_gpus``: Ray starts
floor(CPUs / client_cpus) workers (and at most floor(GPUs / client_gpus) where client_gpus > 0), each
serving one client at a time. Which device a client trains on is ``device``'s choice, not Ray's: with
``client_gpus=0`` and ``device=auto`` on a CUDA machine the clients share the GPU, as many at once as
the CPUs allow.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from fedmaestro.config import Config
from fedmaestro.console import echo

__all__ = ["run", "simulate", "backend_config", "check_resources", "num_workers"]

log = logging.getLogger("fedmaestro.simulation")

# Flower's link-state database set-up logs every alembic plugin at INFO, which Hydra's logging shows
logging.getLogger("alembic").setLevel(logging.WARNING)


def backend_config(cfg: Config) -> dict:
    resources = {"num_cpus": float(cfg.fl.client_cpus), "num_gpus": float(cfg.fl.client_gpus)}
    return {"client_resources": resources,
            "init_args": {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}}


def num_workers(cfg: Config, cpus: int | None = None, gpus: int | None = None) -> int:
    """How many clients Ray trains side by side, counted as Ray's actor pool does: int(CPUs / fl.client_cpus),
    and at most int(GPUs / fl.client_gpus) where client_gpus > 0. ``cpus``: the machine's (default: all of
    them; Ray counts fewer under a container's CPU quota, and a count above Ray's only weakens the order in
    which the strategy dispatches, never the parallelism)."""
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    workers = int(cpus / cfg.fl.client_cpus)
    if cfg.fl.client_gpus > 0:
        if gpus is None:
            import torch
            gpus = torch.cuda.device_count()
        workers = min(workers, int(gpus / cfg.fl.client_gpus))
    return max(1, workers)


def check_resources(cfg: Config, cpus: int | None = None, gpus: int | None = None) -> None:
    """Refuses client resources this machine cannot give even one client (Ray would start no worker and
    Flower end the run with "ActorPool is empty"); warns of GPUs reserved for clients that train on the CPU.
    ``cpus`` / ``gpus``: the machine's (default: the CPUs this process may use, the CUDA devices torch sees)."""
    import torch
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if cfg.fl.client_cpus > cpus:
        raise ValueError(f"fl.client_cpus={cfg.fl.client_cpus:g}: this machine has {cpus} CPU(s), so no client could "
                         f"start; set fl.client_cpus={cpus} or less")
    if cfg.fl.client_gpus > 0 and gpus == 0:
        raise ValueError(f"fl.client_gpus={cfg.fl.client_gpus:g}: this machine has no CUDA device, so no client could "
                         "start; set fl.client_gpus=0")
    if cfg.fl.client_gpus > gpus:
        raise ValueError(f"fl.client_gpus={cfg.fl.client_gpus:g}: this machine has {gpus} CUDA device(s), so no client "
                         f"could start; set fl.client_gpus={gpus} or less (a fraction shares one device)")
    if cfg.fl.client_gpus > 0 and cfg.device == "cpu":
        log.warning("fl.client_gpus=%g reserves GPU share for every client, but device=cpu trains them on the CPU: "
                    "the reservation only limits how many run at once; set device=auto or fl.client_gpus=0",
                    cfg.fl.client_gpus)


class _NotThisDeprecation(logging.Filter):
    """Drops Flower's notice that run_simulation is deprecated: this module is where that is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("run_simulation" in text and "deprecated" in text.lower()) and \
            "This is a deprecated feature" not in text


def simulate(server_app, client_app, num_supernodes: int, backend: dict, verbose: bool = False,
             interrupted: threading.Event | None = None) -> None:
    """Run ``server_app`` against ``num_supernodes`` virtual nodes running ``client_app`` (Ray backend);
    ``interrupted`` (the one given to ``server_app.make_app``) is set if the run is interrupted."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning about GPU env vars
    from flwr.simulation import run_simulation
    flwr_logger = logging.getLogger("flwr")
    level, quiet = flwr_logger.level, _NotThisDeprecation()
    flwr_logger.addFilter(quiet)
    if not verbose:  # Flower's per-round INFO lines would drown our progress lines; warnings still show
        flwr_logger.setLevel(logging.WARNING)
    def on_interrupt() -> None:
        flwr_logger.setLevel(logging.CRITICAL)  # not the actors' deaths that the interruption itself causes
        if interrupted is not None:
            interrupted.set()  # the ServerApp's thread stops too, instead of waiting out the round's timeout

    def on_sigint(signum, frame):
        # a terminal's Ctrl-C reaches the Ray workers too (one process group): Flower's threads log their deaths
        # as soon as they notice, so the logger goes quiet here, in the handler, before KeyboardInterrupt unwinds
        on_interrupt()
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                       backend_name="ray", backend_config=backend, verbose_logging=verbose)
    except KeyboardInterrupt:
        on_interrupt()
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(quiet)


def run(cfg: Config, run_dir: Path, launched_at: float | None = None) -> None:
    """The federated mode: simulate ``fl.num_clients`` clients; outputs go to ``run_dir``.

    ``launched_at`` (``time.perf_counter()``): where start-up is counted from (default: now)."""
    launched = time.perf_counter() if launched_at is None else launched_at
    from clients.client_app import app as client_app

    from .server_app import finish_done_run, make_app, preflight

    check_resources(cfg)
    done = preflight(cfg, Path(run_dir))
    if done >= cfg.fl.rounds:
        echo(finish_done_run(run_dir, cfg, done), markup=False)
        return
    interrupted, failed = threading.Event(), []
    simulate(make_app(cfg, Path(run_dir), launched_at=launched, interrupted=interrupted, failed=failed), client_app,
             cfg.fl.num_clients, backend_config(cfg), interrupted=interrupted)
    if failed:  # the run's own exception (a diverged run, a bug), raised here as if the run had been in-process
        raise failed[0]
