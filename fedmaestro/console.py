"""The rich console every mode prints its progress and tables to.

In a terminal rich fits the terminal; into a log file or a pipe it would wrap at 80 columns, which
breaks progress lines and cuts table columns, so there it is 160 columns wide.

``echo`` prints to the console and writes the same text, without markup, into the run directory's log
(``fedmaestro.log``): conf/config.yaml routes the ``fedmaestro.run_log`` logger to Hydra's file handler
alone. Outside a Hydra run that logger has no handler and ``echo`` only prints.
"""

from __future__ import annotations

import io
import logging

from rich.console import Console

__all__ = ["console", "echo"]

console = Console()
if not console.is_terminal:
    console = Console(width=160)

run_log = logging.getLogger("fedmaestro.run_log")
run_log.propagate = False  # the console shows it already


def echo(*objects, **kwargs) -> None:
    """``console.print``, and the same as plain text into the run's log file where one is set up."""
    console.print(*objects, **kwargs)
    if run_log.handlers:
        plain = Console(file=io.StringIO(), width=160, no_color=True, highlight=False)
        plain.print(*objects, **kwargs)
        text = "\n".join(line.rstrip() for line in plain.file.getvalue().splitlines()).strip()
        run_log.info("\n" + text if "\n" in text else text)  # a table starts on a line of its own
