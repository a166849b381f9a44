"""The rich console every mode prints its progress and tables to.

In a terminal rich fits the terminal; into a log file or a pipe it would wrap at 80 columns, which
breaks progress lines and cuts table columns, so there it is 160 columns wide.
"""

from __future__ import annotations

from rich.console import Console

__all__ = ["console"]

console = Console()
if not console.is_terminal:
    console = Console(width=160)
