"""Argument types shared by the benchmark scripts (run as ``python bench/<script>.py``: this folder is on the path)."""

from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    """argparse type: an int >= 1 (timed passes, steps, threads)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
