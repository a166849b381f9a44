"""The rich console every mode prints its progress and tables to.

In a terminal rich fits the terminal; into a log file or a pipe it would wrap at 80 columns, which
breaks progress lines and cuts table columns, so there it is 160 columns wide.

``echo`` prints to the console and writes the same text, without markup, into the run directory's log
(``fedmaestro.log``): for the length of a Hydra job the ``fedmaestro.run_log`` logger gets the job's
log file handlers (``log_to_run_files``), and only those. Outside a Hydra run it has no handler and
``echo`` only prints.
"""

from __future__ import annotations

import io
import logging
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

__all__ = ["console", "echo", "log_only", "log_to_run_files", "run_log_file"]

console = Console()
if not console.is_terminal:
    console = Console(width=160)

run_log = logging.getLogger("fedmaestro.run_log")
run_log.propagate = False  # the console shows it already


def log_to_run_files(run_dir: str | Path | None) -> None:
    """Route ``run_log`` to the file handlers of the root logger that write below ``run_dir`` (what Hydra's
    job logging set up: none with ``hydra/job_logging=disabled`` or ``stdout``); None: to nothing."""
    run_log.handlers.clear()
    if run_dir is None:
        return
    run_dir = Path(run_dir).resolve()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and run_dir in Path(handler.baseFilename).resolve().parents:
            run_log.addHandler(handler)
    run_log.setLevel(logging.INFO)


@contextmanager
def run_log_file(run_dir: Path):
    """``run_dir/fedmaestro.log`` for a run that Hydra's job logging does not set up (``flwr run``'s ServerApp
    composes its config with ``hydra.compose``): this project's loggers (at INFO) and ``echo`` write there, in
    Hydra's format, until the block ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "fedmaestro.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    loggers = [logging.getLogger(name) for name in ("fedmaestro", "strategies", "clients")]
    levels = [logger.level for logger in loggers]
    for logger in loggers + [run_log]:
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        run_log.removeHandler(handler)
        handler.close()


def echo(*objects, **kwargs) -> None:
    """``console.print``, and the same as plain text into the run's log file where one is set up. A line that
    holds a path or a value a user gave is printed with ``markup=False`` (and a ``style``): rich would read
    ``[conv1,conv2]`` in a sweep job's directory name as markup and drop it."""
    console.print(*objects, **kwargs)
    if run_log.handlers:
        plain = Console(file=io.StringIO(), width=160, no_color=True, highlight=False)
        plain.print(*objects, **kwargs)
        text = "\n".join(line.rstrip() for line in plain.file.getvalue().splitlines()).strip()
        run_log.info("\n" + text if "\n" in text else text)  # a table starts on a line of its own


def log_only(text: str) -> None:
    """``text`` (plain, no markup) into the run's log file alone, where one is set up: what the console does not
    show but the log keeps (round lines with ``progress=false``, the error that ended a run)."""
    if run_log.handlers:
        run_log.info(text)
