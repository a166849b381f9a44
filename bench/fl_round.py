"""Seconds per round of the real federated simulation against the compute floor (issue 4, acceptance).

One run measures both:

1. the simulation: ``strategies.simulation.run`` (Flower's simulation engine on Ray, exactly what
   ``python -m fedmaestro`` runs), with start-up (Ray, workers, data, the first query) reported apart
   from the rounds; steady state = the mean of rounds 2..N (round 1 also warms every worker up);
2. the floor: the same job replayed in this one process over the in-process grid (``LocalGrid``),
   which gives the same clients the same arrays in every round (the records are compared: they must
   be identical); the floor of a round is the sum of its clients' training seconds (``local.train``,
   one after another, ``fl.client_cpus`` torch threads) divided by the number of clients that can train
   side by side: min(floor(CPUs / fl.client_cpus), CPUs // threads per client, fl.clients_per_round),
   CPUs as Ray counts them (a container's CPU quota included). The replay runs after the simulation, on
   a machine whose speed may have drifted: where its clients trained slower than the simulation's own
   (side by side, they cannot be faster alone), the floor is the simulation's clients' seconds instead,
   so that a slow replay never flatters the ratio. A round's seconds run from the previous round's
   record to its own, so they include writing the records and the checkpoint.

The ratio sim / floor is the overhead of everything that is not client compute: the server's work
between rounds (aggregation, shrinking, evaluation of the global model at every tier), messaging and
polling, serialization, and idle workers at the end of a round. Target: <= 1.3.

    python bench/fl_round.py +experiment=fl_maestro            # the `make run` job, 10 rounds
    python bench/fl_round.py model.factorize=false devices=homogeneous   # the dense FedAvg reference
    python bench/fl_round.py fl.rounds=20 --json out.json

Exit status 1 if the ratio exceeds the target or the records differ, 2 on bad overrides.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.3


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timeless(rs: list[dict]) -> list[dict]:
    from strategies.records import TIME_KEYS

    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rs]


def machine_cpus() -> int:
    """The CPUs Ray's workers get: those this process may use, and no more than Ray counts (a container's
    CPU quota, where Ray can tell)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        from ray._private.utils import get_num_cpus  # what ray.init() counts when it is given no num_cpus
    except ImportError:
        return cpus
    return max(1, min(cpus, int(get_num_cpus())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default job: conf/config.yaml, fl.rounds=10)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    launched = time.perf_counter()
    from strategies.server_app import compose

    overrides = ["fl.rounds=10"] + list(args.overrides)
    work = Path(tempfile.mkdtemp(prefix="fl_round_"))
    try:  # the two runs' records and checkpoints are compared, not kept; a bad override leaves nothing either
        try:
            cfg, _ = compose(overrides + ["progress=false", f"hydra.run.dir={work / 'sim'}"])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return measure(args, cfg, overrides, work, launched)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, cfg, overrides: list[str], work: Path, launched: float) -> int:
    from clients import client_app
    from strategies.local_grid import LocalGrid
    from strategies.maestro import MaestroStrategy
    from strategies.simulation import num_workers
    from strategies.simulation import run as run_simulation

    cpus = machine_cpus()
    threads = max(1, int(cfg.fl.client_cpus))  # torch threads per client
    # clients that can train side by side: Ray's slots, the cores their threads fill, the clients of a round
    workers = max(1, min(num_workers(cfg, cpus), cpus // threads, cfg.fl.clients_per_round))

    # 1. the simulation
    run_simulation(cfg, work / "sim", launched_at=launched)
    sim = records(work / "sim")
    summary = json.loads((work / "sim" / "summary.json").read_text())
    steady = [r["timing"] for r in sim[1:]] or [r["timing"] for r in sim]

    # 2. the floor: the same clients' training back to back in this process
    # evaluated between rounds: an evaluation beside the in-process clients would slow their training, the floor
    replay_cfg = copy.deepcopy(cfg)
    replay_cfg.strategy.overlap_eval = False
    replay = MaestroStrategy(replay_cfg, work / "replay", show_progress=False)
    replay.start(LocalGrid(client_app.app, cfg.fl.num_clients))
    floor_recs = records(work / "replay")
    same = timeless(floor_recs) == timeless(sim)
    floor_steady = [r["timing"] for r in floor_recs[1:]] or [r["timing"] for r in floor_recs]

    sim_round = statistics.mean(t["round_s"] for t in steady)
    sim_train = statistics.mean(t["train_s"] for t in steady)
    sim_eval = statistics.mean(t["eval_s"] for t in steady)
    sim_client = statistics.mean(t["client_train_s"] for t in steady)
    replayed = statistics.mean(t["client_train_s"] for t in floor_steady)
    compute = min(replayed, sim_client)  # a replay slower than the simulation's own clients: the machine drifted
    floor = compute / workers
    out = {
        "overrides": overrides, "cpus": cpus, "workers": workers, "rounds": len(sim),
        "startup_s": summary["startup_s"], "sim_round_s": sim_round, "floor_round_s": floor,
        "ratio": sim_round / floor,
        "breakdown": {
            "sim_train_phase_s": sim_train, "sim_server_eval_s": sim_eval,
            "sim_client_train_s_sum": sim_client, "replay_client_train_s_sum": replayed,
            "replay_server_eval_s": statistics.mean(t["eval_s"] for t in floor_steady),
            "sim_tail_s": sim_train - sim_client / workers,
        },
        "records_identical": same,
    }
    print(f"job: {' '.join(overrides)}   ({cpus} CPUs, {workers} parallel workers, {len(sim)} rounds)")
    print(f"start-up                         {summary['startup_s']:7.2f} s  (Ray, workers, data, first query)")
    overlap = "overlapped with the next round's training" if cfg.strategy.overlap_eval else "between rounds"
    print(f"simulation, steady s/round       {sim_round:7.2f} s  (train phase {sim_train:.2f}; server eval {sim_eval:.2f}, "
          f"{overlap})")
    source = ("back to back" if compute == replayed else
              f"inside the sim: the replay's back to back, {replayed:.2f} s, ran slower")
    print(f"floor s/round                    {floor:7.2f} s  (clients' training {compute:.2f} s {source} / {workers})")
    print(f"ratio                            {sim_round / floor:7.2f} x  (target <= {TARGET})")
    print(f"clients' training inside the sim {sim_client:7.2f} s summed ({sim_client / replayed:.2f}x their time alone)")
    print(f"round's tail and messaging       {sim_train - sim_client / workers:7.2f} s  (train phase minus the clients' "
          f"training inside the sim / {workers}: workers idle at the round's end, messages, polling, "
          f"aggregation and shrinking)")
    print(f"records of sim and replay identical: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if out["ratio"] <= TARGET and same else 1


if __name__ == "__main__":
    sys.exit(main())
