"""What a federated run writes: metrics.jsonl, a progress line per round, the summary table, the model.

Files in the run directory: ``config.json`` (the resolved config), ``metrics.jsonl`` (one record per
round, DESIGN.md's schema plus ``bytes_down``/``bytes_up`` (cumulative), ``tiers`` and ``clients``),
``checkpoint.pt`` (written by the strategy), ``model.pt`` (the final global model and the config that
rebuilds it: ``fedmaestro.centralized.load_model`` reads it), ``summary.json`` and the plots.

Everything time-dependent in a record sits under ``wall_s`` (cumulative seconds of the rounds, start-up
excluded) and ``timing`` (this round's seconds), so two runs with one seed have identical records apart
from those two keys.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table
from rich.text import Text

from fedmaestro import checkpoint
from fedmaestro.config import Config, to_dict
from fedmaestro.console import echo, log_only

__all__ = ["RunLog", "TIME_KEYS"]

TIME_KEYS = ("wall_s", "timing")


class RunLog:
    def __init__(self, cfg: Config, run_dir: Path | None, show_progress: bool = True, launched_at: float | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.show = show_progress  # the start-up line and the summary table
        self.show_rounds = show_progress and cfg.progress  # progress=false: no line per round
        self.records: list[dict] = []
        self.wall = 0.0
        self.launched_at = time.perf_counter() if launched_at is None else launched_at
        self.startup_s: float | None = None
        self.round_seconds: list[float] = []  # rounds run by this process (not those of a resumed checkpoint)
        self.num_rounds = cfg.fl.rounds

    @property
    def metrics_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "metrics.jsonl"

    def state_dict(self) -> dict:
        return {"records": self.records, "wall": self.wall}

    def load_state_dict(self, state: dict) -> None:
        self.records, self.wall = list(state["records"]), float(state["wall"])

    def begin(self, num_rounds: int) -> None:
        """Before the first round: the config file, and metrics.jsonl holding exactly the records so far."""
        self.num_rounds = num_rounds
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        with self.metrics_path.open("w") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")

    def started(self) -> None:
        """The clients answered the query: start-up (the engine, the nodes, their data) ends here."""
        self.startup_s = time.perf_counter() - self.launched_at
        if self.show:
            echo(f"start-up {self.startup_s:.1f} s (engine, nodes, data); "
                          f"{self.cfg.fl.num_clients} clients, {self.cfg.fl.clients_per_round} per round")

    def add(self, record: dict, timing: dict) -> dict:
        self.wall += timing["round_s"]
        self.round_seconds.append(timing["round_s"])
        record["wall_s"] = round(self.wall, 3)
        record["timing"] = {k: round(v, 4) for k, v in timing.items()}
        self.records.append(record)
        if self.metrics_path is not None:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.show_rounds:
            echo(self.progress_line(record))
        elif self.show:  # progress=false: the console stays quiet, the run's log keeps the round
            log_only(Text.from_markup(self.progress_line(record)).plain)
        return record

    def progress_line(self, r: dict) -> str:
        mb = (r["bytes_down"] + r["bytes_up"]) / 1e6
        acc = f"acc {r['accuracy']:.4f}  loss {r['loss']:.4f}" if "accuracy" in r else "acc   -     loss   -   "
        clients = r["clients"]
        ok = f"{len(clients['valid'])}/{len(clients['sampled'])} replies"
        if len(clients["valid"]) < len(clients["sampled"]):
            ok = f"[yellow]{ok}[/yellow]"
        if not clients["valid"]:
            ok += " [bold yellow](no valid reply: model unchanged)[/bold yellow]"
        tiers = "  ".join(f"{name} {t['accuracy']:.3f}" for name, t in r.get("tiers", {}).items() if "accuracy" in t)
        rank = f"rank {r['total_rank']:>4}" if r["ranks"] else "dense    "
        return (f"round {r['round']:>3}/{self.num_rounds}  {acc}  {rank}  "
                f"params {r['params_deployed']:>7,} ({r['params_rel']:.2f}x)  MB {mb:7.2f}  {ok}  "
                f"{r['timing']['round_s']:.1f} s" + (f"  | {tiers}" if tiers and len(r["tiers"]) > 1 else ""))

    def summary(self) -> dict:
        """Final figures (also written to summary.json)."""
        last = self.records[-1] if self.records else {}
        steady = self.round_seconds[1:] or self.round_seconds
        return {
            "rounds": len(self.records), "accuracy": last.get("accuracy"), "loss": last.get("loss"),
            "params": last.get("params"), "params_deployed": last.get("params_deployed"),
            "params_rel": last.get("params_rel"), "macs": last.get("macs"), "macs_deployed": last.get("macs_deployed"),
            "macs_rel": last.get("macs_rel"), "total_rank": last.get("total_rank"),
            "mb_down": last.get("bytes_down", 0) / 1e6, "mb_up": last.get("bytes_up", 0) / 1e6,
            "wall_s": self.wall, "startup_s": self.startup_s,
            "steady_round_s": sum(steady) / len(steady) if steady else None,
            "tiers": last.get("tiers", {}),
            **{k: last[k] for k in ("fed_accuracy", "fed_loss") if k in last},  # federated evaluation's, if on
        }

    def finish(self, global_model) -> dict:
        s = self.summary()
        if self.run_dir is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(s, indent=2))
            checkpoint.save(self.run_dir / "model.pt", {"config": to_dict(self.cfg),
                                                        "model": global_model.model.state_dict(),
                                                        "ranks": global_model.ranks()})
            try:
                from fedmaestro.plots import plot_federated
                plot_federated(self.run_dir)
            except Exception as e:  # noqa: BLE001  (plots are a convenience: a failure must not lose the run)
                echo(f"plots not written: {e}", style="yellow", markup=False)
        if self.show:
            echo(self.table(s))
        return s

    def table(self, s: dict) -> Table:
        table = Table(title=f"federated run: {s['rounds']} round{'s' if s['rounds'] != 1 else ''}, {s['mb_down'] + s['mb_up']:.2f} MB "
                            f"({s['mb_down']:.2f} down + {s['mb_up']:.2f} up), {s['wall_s']:.1f} s "
                            f"+ {s['startup_s'] or 0:.1f} s start-up")
        for col in ("model", "accuracy", "loss", "params (deployed)", "x dense", "MACs (deployed)", "x dense", "rank"):
            table.add_column(col, justify="left" if col == "model" else "right")

        factorized = bool(self.records and self.records[-1]["ranks"])

        def row(name, r):
            acc = r.get("accuracy")
            table.add_row(name, "-" if acc is None else f"{acc:.4f}",
                          "-" if r.get("loss") is None else f"{r['loss']:.4f}", f"{r.get('params_deployed', 0):,}",
                          f"{r.get('params_rel', 0):.3f}", f"{r.get('macs_deployed', 0):,}", f"{r.get('macs_rel', 0):.3f}",
                          str(r.get("total_rank", r.get("rank", "-"))) if factorized else "dense")

        row("global (full rank)", s)
        for name, t in s["tiers"].items():
            row(f"tier {name}", t)
        return table
