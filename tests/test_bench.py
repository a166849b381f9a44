"""The benchmark scripts refuse bad arguments with a one-line error and exit status 2 (1 means a missed target)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})


def test_fl_round_refuses_a_bad_override_before_it_writes_anything(tmp_path):
    done = bench(tmp_path, "fl_round.py", "fl.bogus=1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: config: unknown keys" in done.stderr and "fl.bogus" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no fl_round_* work directory left behind


@pytest.mark.parametrize("script, arg", [("train_step.py", "--steps"), ("train_step.py", "--repeats"),
                                         ("train_step.py", "--threads"), ("layers.py", "--repeats")])
def test_timing_scripts_refuse_counts_below_one(tmp_path, script, arg):
    done = bench(tmp_path, script, arg, "0")
    assert done.returncode == 2 and f"argument {arg}: must be >= 1, got 0" in done.stderr, done.stderr[-2000:]
