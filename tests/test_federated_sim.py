"""Federated mode in Flower's real engines: ``python -m fedmaestro`` (run_simulation, Ray) and ``flwr run .``
(a local SuperLink in simulation mode, started by the flwr CLI), against the in-process LocalGrid.

One tiny job (4 clients, 3 per round, 2 rounds, 1,200 training examples, three tiers) runs three ways;
the records must be the same apart from wall time: the protocol (sampling by partition id, seeds, caps,
aggregation order) makes the result independent of the engine, of Flower's random node ids, and of
which Ray worker served which client. Each engine run costs 30-60 s (Ray and worker start-up), so the
tests are marked slow (``make test`` still runs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmaestro import plot
from strategies.local_grid import LocalGrid
from strategies.maestro import MaestroStrategy
from strategies.records import TIME_KEYS
from strategies.server_app import compose
from clients import client_app as real_client

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB = ["data.subset=1200", "data.test_subset=500", "fl.num_clients=4", "fl.clients_per_round=3", "fl.rounds=2",
       "devices=three_tiers", "train.lambda_gl=1e-3", "train.eps_ps=1e-3"]
PLOTS = ("plot_accuracy_round.png", "plot_accuracy_mb.png", "plot_rank_round.png", "plot_tiers.png")

pytestmark = pytest.mark.slow


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timeless(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> list[dict]:
    """The job over the in-process grid: the records every engine must reproduce."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    cfg, _ = compose(JOB + ["progress=false", f"hydra.run.dir={run_dir}"])
    MaestroStrategy(cfg, run_dir, show_progress=False).start(LocalGrid(real_client.app, cfg.fl.num_clients))
    return records(run_dir)


def check_run(run_dir: Path, expected: list[dict]) -> None:
    rs = records(run_dir)
    assert [r["round"] for r in rs] == [1, 2]
    for r in rs:
        for key in ("accuracy", "loss", "params", "macs", "ranks", "wall_s", "bytes_down", "bytes_up", "tiers"):
            assert key in r, key
        assert set(r["tiers"]) == {"small", "medium", "large"}
        assert all({"accuracy", "params", "macs"} <= set(t) for t in r["tiers"].values())
        assert len(r["clients"]["valid"]) == 3  # every sampled client answered
    assert 0 < rs[0]["bytes_down"] < rs[1]["bytes_down"] and 0 < rs[0]["bytes_up"] < rs[1]["bytes_up"]
    assert rs[1]["tiers"]["small"]["params"] < rs[1]["tiers"]["medium"]["params"] < rs[1]["tiers"]["large"]["params"]
    assert rs[1]["loss"] < rs[0]["loss"] and rs[1]["train_loss"] < rs[0]["train_loss"]  # it learns
    assert timeless(rs) == timeless(expected)  # the same job, the same records, whatever the engine
    for name in PLOTS + ("summary.json", "model.pt", "checkpoint.pt", "config.json"):
        assert (run_dir / name).is_file(), name


def test_python_m_fedmaestro_runs_a_ray_simulation(tmp_path, local_run):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedmaestro", *JOB, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_run(run_dir, local_run)
    assert "round   2/2" in proc.stdout and "start-up" in proc.stdout  # progress lines
    for name in PLOTS:  # the plot command redraws a federated run's figures
        (run_dir / name).unlink()
    assert plot.main([str(run_dir)]) == 0 and all((run_dir / name).is_file() for name in PLOTS)
    before = (run_dir / "metrics.jsonl").read_text()
    again = subprocess.run([sys.executable, "-m", "fedmaestro", *JOB, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a federated run (checkpoint.pt); continue it with resume=true" \
        in again.stderr and "Traceback" not in again.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # a new run never overwrites a finished one
    assert "global (full rank)" in proc.stdout  # the summary table
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["startup_s"] > 0


def test_a_simulation_whose_clients_all_diverge_ends_with_one_error_naming_the_fix(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedmaestro", *JOB, "train.lr=1e6", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error: round 1: the training of every client that answered diverged (3 of 3 sampled; training loss is " \
           "NaN or infinite); lower train.lr (now 1e+06) or set train.grad_clip" in proc.stderr, proc.stderr[-3000:]
    # each client answers that it diverged: no client traceback, one line per dropped reply
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert (proc.stdout + proc.stderr).count("dropped the reply of client") == 3
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text()  # no round ended


def test_ctrl_c_stops_a_simulation_within_seconds_and_a_resume_goes_on_from_its_checkpoint(tmp_path, local_run):
    run_dir = tmp_path / "run"
    job = [a for a in JOB if not a.startswith("fl.rounds=")]
    proc = subprocess.Popen([sys.executable, "-m", "fedmaestro", *job, "fl.rounds=200", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # Ctrl-C reaches the terminal's whole process group: so here
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.1)
    interrupted = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.time() - interrupted < 30, err[-3000:]  # not the 600 s round timeout
    assert f"continue with the same command + resume=true hydra.run.dir={run_dir}" in err
    assert "Traceback" not in err  # the workers' deaths that Ctrl-C itself causes are not logged as errors
    done = len(records(run_dir))
    assert 1 <= done < 200
    resumed = subprocess.run([sys.executable, "-m", "fedmaestro", *job, f"fl.rounds={done + 1}", "resume=true",
                              f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rs = records(run_dir)
    assert [r["round"] for r in rs] == list(range(1, done + 2))
    assert timeless(rs[:2]) == timeless(local_run)[:len(rs[:2])]


def _superlinks(flwr_home: Path) -> list[int]:
    """Pids of the SuperLink(s) that the flwr CLI started for this FLWR_HOME (its database path is in argv)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"flower-superlink" in a for a in argv) and any(str(flwr_home).encode() in a for a in argv):
                pids.append(int(proc.name))
    return pids


def test_flwr_run_in_a_local_superlink(tmp_path, local_run):
    """``flwr run .`` as a user would type it: the CLI starts a local SuperLink in simulation mode (flwr 1.41
    does that itself for the default ``local`` connection), the run config carries the Hydra overrides and
    the federation config the number of SuperNodes. FLWR_HOME and the SuperLink's ports are this test's own,
    and dependency installation is off (the app runs in this environment)."""
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.fail(f"flower-superlink is not installed next to {sys.executable}")
    flwr_home, run_dir = tmp_path / "flwr_home", tmp_path / "run"
    env = dict(os.environ, FLWR_HOME=str(flwr_home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1")
    overrides = " ".join(JOB + [f"hydra.run.dir={run_dir}"])
    cmd = [str(BIN / "flwr"), "run", str(ROOT), "--stream", "--run-config", f'overrides="{overrides}"',
           "--federation-config", "num-supernodes=4"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        out = proc.stdout[-4000:] + proc.stderr[-4000:]
        assert proc.returncode == 0, out
        deadline = time.time() + 60  # the stream can end a moment before the ServerApp's last files are written
        while not (run_dir / "summary.json").is_file() and time.time() < deadline:
            time.sleep(0.5)
        assert (run_dir / "summary.json").is_file(), out
        check_run(run_dir, local_run)
    finally:
        for pid in _superlinks(flwr_home):  # the CLI leaves its SuperLink running, detached: stop ours
            os.kill(pid, signal.SIGTERM)
