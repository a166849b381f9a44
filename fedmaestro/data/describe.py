"""Show a federated partition: per-client sizes and label histograms, printed and plotted.

    python -m fedmaestro.data.describe dataset=fashion_mnist partition=dirichlet partition.alpha=0.1 \\
        fl.num_clients=20 seed=0 [data.root=...] [data.subset=N] [--plot FILE.png | --no-plot]

The overrides are those of the main command (Hydra, the same ``conf/`` tree and checks), so what is
shown is exactly the split that ``python -m fedmaestro`` with the same overrides trains on: the
training split partitioned with ``data.partition``, each client's part split into local train and
local test with ``data.split_clients`` (``data.local_test_fraction``). The central test set is not
partitioned. The plot (PNG) goes to ``outputs/describe/`` unless ``--plot`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .partition import partition, split_clients
from .registry import labels as dataset_labels
from .registry import check_num_classes, load, subset

__all__ = ["ClientSummary", "summarize", "describe", "print_summary", "plot_summary", "main"]

MAX_CLASS_COLUMNS = 10  # more classes than this: the table lists each client's largest classes instead
NO_CLASSES = ("synthetic", "multi30k")  # regression / translation: every example has label 0


@dataclass
class ClientSummary:
    client: int
    size: int
    local_train: int
    local_test: int
    histogram: np.ndarray  # (num_classes,) examples per class in the client's partition


def summarize(labels: np.ndarray, partitions: list[np.ndarray], splits, num_classes: int | None = None
              ) -> list[ClientSummary]:
    """One row per client: partition size, local train/test sizes and label histogram."""
    labels = np.asarray(labels)
    k = num_classes or (int(labels.max()) + 1 if labels.size else 0)
    return [ClientSummary(i, ix.size, tr.size, te.size, np.bincount(labels[ix], minlength=k))
            for i, (ix, (tr, te)) in enumerate(zip(partitions, splits))]


def describe(cfg) -> tuple[list[ClientSummary], dict]:
    """Partition the configured data set as the federated mode does; (rows, facts about the run)."""
    train = load(cfg.dataset.name, cfg.data.root, train=True)
    check_num_classes(train, cfg.dataset.num_classes)  # the federated run refuses such a config: so does its preview
    if cfg.data.subset:
        train = subset(train, cfg.data.subset)
    labels = dataset_labels(train)
    p = cfg.partition
    params = dict(alpha=p.alpha, min_partition_size=p.min_partition_size,
                  classes_per_partition=p.classes_per_partition, class_assignment=p.class_assignment,
                  shards_per_partition=p.shards_per_partition)
    parts = partition(labels, p.scheme, cfg.fl.num_clients, cfg.seed, **params)
    splits = split_clients(parts, cfg.data.local_test_fraction, cfg.seed)
    shown = {"alpha": p.alpha, "min_partition_size": p.min_partition_size} if p.scheme == "dirichlet" else \
        {"classes_per_partition": p.classes_per_partition} if p.scheme == "pathological" else \
        {"shards_per_partition": p.shards_per_partition} if p.scheme == "shard" else {}
    facts = {"dataset": cfg.dataset.name, "scheme": p.scheme, "params": shown, "clients": cfg.fl.num_clients,
             "seed": cfg.seed, "examples": len(labels), "local_test_fraction": cfg.data.local_test_fraction,
             "has_classes": cfg.dataset.name not in NO_CLASSES}
    return summarize(labels, parts, splits), facts


def print_summary(rows: list[ClientSummary], facts: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: do not cut the table at 80 columns
            console = Console(width=max(100, 8 * (6 + MAX_CLASS_COLUMNS)))
    params = ", ".join(f"{k}={v}" for k, v in facts["params"].items())
    title = (f"{facts['dataset']}: {facts['scheme']}{f' ({params})' if params else ''}, {facts['clients']} clients, "
             f"seed {facts['seed']}")
    k = rows[0].histogram.size if rows else 0
    table = Table(title=title)
    for col in ("client", "size", "train", "test", "classes"):
        table.add_column(col, justify="right")
    has_classes = facts.get("has_classes", True)
    per_class = has_classes and 0 < k <= MAX_CLASS_COLUMNS
    if per_class:
        for c in range(k):
            table.add_column(str(c), justify="right")
    elif has_classes:
        table.add_column("largest classes (class:count)")
    for r in rows:
        cells = [str(r.client), str(r.size), str(r.local_train), str(r.local_test), str(int((r.histogram > 0).sum()))]
        if per_class:
            cells += [str(int(v)) for v in r.histogram]
        elif has_classes:
            top = np.argsort(-r.histogram, kind="stable")[:5]
            cells.append(" ".join(f"{c}:{int(r.histogram[c])}" for c in top if r.histogram[c] > 0))
        table.add_row(*cells)
    console.print(table)
    sizes = np.array([r.size for r in rows])
    present = np.array([(r.histogram > 0).sum() for r in rows])
    classes = f"classes per client mean {present.mean():.1f} of {k}" if has_classes else "no classes (sizes only)"
    console.print(f"{sizes.sum()} of {facts['examples']} training examples assigned; sizes min {sizes.min()}, "
                  f"median {int(np.median(sizes))}, max {sizes.max()}; {classes}; local test fraction "
                  f"{facts['local_test_fraction']}; the central test set is separate.")


def plot_summary(rows: list[ClientSummary], facts: dict, path: str | Path) -> Path:
    """Two panels: local train/test sizes per client, and each client's label histogram (stacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clients = np.arange(len(rows))
    hist = np.stack([r.histogram for r in rows])  # (clients, classes)
    fig, (ax_size, ax_hist) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.25 * len(rows) + 1.5)), sharey=True)
    ax_size.barh(clients, [r.local_train for r in rows], label="local train")
    ax_size.barh(clients, [r.local_test for r in rows], left=[r.local_train for r in rows], label="local test")
    ax_size.set_xlabel("examples")
    ax_size.set_ylabel("client")
    ax_size.legend(loc="lower right")
    cmap = plt.get_cmap("tab10" if hist.shape[1] <= 10 else "tab20")
    left = np.zeros(len(rows))
    for c in range(hist.shape[1]):
        ax_hist.barh(clients, hist[:, c], left=left, color=cmap(c % cmap.N),
                     label=str(c) if hist.shape[1] <= 20 else None)
        left += hist[:, c]
    ax_hist.set_xlabel("examples per class")
    if hist.shape[1] <= 20:
        ax_hist.legend(title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    if len(rows) <= 40:
        ax_size.set_yticks(clients)
    ax_size.invert_yaxis()
    params = ", ".join(f"{k}={v}" for k, v in facts["params"].items())
    fig.suptitle(f"{facts['dataset']}: {facts['scheme']}{f' ({params})' if params else ''}, "
                 f"{facts['clients']} clients, seed {facts['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compose(overrides: list[str]):
    """The validated Config of the main command's conf/ tree with ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ..__main__ import CONF_DIR
    from ..config import resolve

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    if not any(o.lstrip("+~").startswith("fl.clients_per_round") for o in overrides):
        # irrelevant here, but checked against fl.num_clients: do not make `fl.num_clients=5` fail on it
        cfg.fl.clients_per_round = min(cfg.fl.clients_per_round, cfg.fl.num_clients)
    return resolve(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmaestro.data.describe", description=__doc__.split("\n")[0],
        epilog="overrides: dataset=<name> partition=<iid|dirichlet|pathological|shard> partition.alpha=<a> "
               "fl.num_clients=<n> seed=<s> data.root=<dir> data.subset=<n> data.local_test_fraction=<f>")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m fedmaestro")
    parser.add_argument("--plot", type=Path, default=None, help="PNG file (default: outputs/describe/...)")
    parser.add_argument("--no-plot", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.plot is not None and not args.no_plot and (args.plot.suffix.lower() != ".png" or args.plot.is_dir()):
        parser.error(f"--plot {args.plot}: give the PNG file to write (a name ending in .png), e.g. "
                     f"--plot {args.plot / 'partitions.png' if args.plot.is_dir() else args.plot.with_suffix('.png')}")
    from hydra.errors import HydraException

    from ..__main__ import composition_error

    try:
        cfg = compose(args.overrides)
        rows, facts = describe(cfg)
    except (ValueError, FileNotFoundError, HydraException) as e:
        print(f"error: {composition_error(e) if isinstance(e, HydraException) else e}", file=sys.stderr)
        return 2
    print_summary(rows, facts)
    if not args.no_plot:
        params = "".join(f"-{k}{v}" for k, v in facts["params"].items())  # alpha=0.1 and 0.5 get two files
        path = args.plot or Path("outputs/describe") / (
            f"{facts['dataset']}-{facts['scheme']}{params}-{facts['clients']}clients-seed{facts['seed']}.png")
        try:
            print(f"plot: {plot_summary(rows, facts, path)}")
        except OSError as e:  # a parent that is a file, or a place no directory can be made
            print(f"error: --plot {path}: cannot be written ({e.strerror}); give a .png file in a directory that "
                  f"exists or can be made", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
