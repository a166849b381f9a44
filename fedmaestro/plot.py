"""``python -m fedmaestro.plot <dir> [<dir> ...] [--out DIR]``: figures of finished runs, as PNG files.

* a deploy run (holds ``deploy_curve.csv``): ``deploy.png`` (Fig. 11);
* a centralized run (holds ``metrics.jsonl``): ``training.png``, ``total_rank.png``,
  ``ranks_per_layer.png`` (Fig. 4);
* a federated run (``metrics.jsonl`` of rounds): its ``plot_*.png`` again;
* anything else, e.g. a ``--multirun`` directory of a lambda sweep (plus, as further arguments, the
  dense run or other sweeps to compare): every run below the directories together, as
  ``sweep_accuracy.png`` (Fig. 12), ``sweep_total_rank.png`` (Fig. 8), ``sweep_ranks.png`` (Fig. 9)
  and Table 11 as ``sweep.md`` / ``sweep.csv``, written into ``--out`` (default: the first directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .plots import (deploy_targets, find_runs, plot_centralized, plot_deploy, plot_federated, plot_sweep, read_curve,
                    read_records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmaestro.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run, multirun or deploy directories")
    parser.add_argument("--out", type=Path, default=None, help="where sweep figures go (default: the first dir)")
    args = parser.parse_args(argv)
    try:
        return _plot(parser, args)
    except (ValueError, FileNotFoundError) as e:  # a damaged record or curve file: one line, not a traceback
        from .__main__ import is_user_error

        if not is_user_error(e):  # raised inside a library: a bug, with its traceback
            raise
        parser.exit(2, f"error: {e}\n")


def _plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    files = [d for d in args.dirs if d.is_file()]
    if files:
        parser.error(f"not a directory: {', '.join(map(str, files))}; give the run's directory "
                     f"({', '.join(str(f.parent) for f in files)})")
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    written: list[Path] = []
    sweep_dirs = []
    for d in args.dirs:
        if (d / "deploy_curve.csv").is_file():
            rows = read_curve(d / "deploy_curve.csv")
            curves: dict[str, list[dict]] = {}
            for row in rows:
                curves.setdefault(str(row["method"]), []).append(row)
            config = d / "config.json"  # the run's deploy targets, drawn as the run drew them
            settings = json.loads(config.read_text()).get("deploy", {}) if config.is_file() else {}
            written.append(plot_deploy(curves, d / "deploy.png", targets=deploy_targets(settings)))
        elif (d / "metrics.jsonl").is_file() and len(args.dirs) == 1:
            records = read_records(d)
            if not records:
                parser.error(f"{d / 'metrics.jsonl'} holds no complete record (the run stopped before its first "
                             f"epoch or round ended)")
            written += plot_federated(d) if "round" in records[0] else plot_centralized(d)
        else:
            sweep_dirs.append(d)
    if sweep_dirs:
        reported: list[str] = []  # the jobs left out and the runs unfinished: printed, and noted in sweep.md

        def report(line: str) -> None:
            print(line)
            reported.append(line)

        runs = find_runs(*sweep_dirs, report=report)
        if not runs:
            why = ("every job below left no record (see above)" if reported else
                   "mode=theory draws its figures when it runs; a lambda search's runs are its lambda_* directories")
            parser.error(f"no runs (metrics.jsonl + config.json) below {', '.join(map(str, sweep_dirs))} ({why})")
        out = args.out or sweep_dirs[0]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file, or a place no directory can be made
            parser.error(f"--out {out}: cannot be the directory of the sweep's figures ({e.strerror}); give a "
                         f"directory that exists or can be made")
        written += plot_sweep(runs, out, notes=[line for line in reported if line.startswith("left out")])
        written += [out / "sweep.md", out / "sweep.csv"]
        print((out / "sweep.md").read_text())
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
