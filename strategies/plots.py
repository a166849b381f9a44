"""Plots of a federated run, from its metrics.jsonl: accuracy vs round, accuracy vs cumulative MB, total rank
vs round, and per-tier accuracy (files ``plot_*.png`` in the run directory)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_federated"]


def plot_federated(run_dir: str | Path) -> list[Path]:
    from fedmaestro.plots import _save, plt, read_records

    run_dir = Path(run_dir)
    records = read_records(run_dir)
    evaluated = [r for r in records if "accuracy" in r]
    tier_names = list(records[-1].get("tiers", {})) if records else []
    written = []

    def save(fig, name):
        written.append(_save(fig, run_dir / name))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["round"] for r in evaluated], [r["accuracy"] for r in evaluated], marker="o", label="global, full rank")
    for name in tier_names:
        pts = [(r["round"], r["tiers"][name]["accuracy"]) for r in evaluated if "accuracy" in r["tiers"].get(name, {})]
        if pts and len(tier_names) > 1:
            ax.plot(*zip(*pts), linestyle="--", label=f"tier {name}")
    ax.set(xlabel="round", ylabel="test accuracy", title="accuracy vs round")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "plot_accuracy_round.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([(r["bytes_down"] + r["bytes_up"]) / 1e6 for r in evaluated], [r["accuracy"] for r in evaluated], marker="o")
    ax.set(xlabel="cumulative MB (down + up)", ylabel="test accuracy", title="accuracy vs communication")
    ax.grid(alpha=0.3)
    save(fig, "plot_accuracy_mb.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["round"] for r in records], [r["total_rank"] for r in records], marker="o")
    ax.set(xlabel="round", ylabel="total rank (sum over LoD layers)", title="total rank vs round")
    ax.grid(alpha=0.3)
    save(fig, "plot_rank_round.png")

    if tier_names and evaluated:
        last = evaluated[-1]
        fig, ax = plt.subplots(figsize=(6, 4))
        names = ["full"] + tier_names
        accs = [last["accuracy"]] + [last["tiers"][n].get("accuracy", float("nan")) for n in tier_names]
        params = [last["params_rel"]] + [last["tiers"][n]["params_rel"] for n in tier_names]
        bars = ax.bar(names, accs, color="tab:blue")
        for bar, p in zip(bars, params):
            ax.annotate(f"{p:.2f}x params", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set(ylabel="test accuracy", title=f"per-tier accuracy after round {last['round']}",
               ylim=(0, min(1.0, max(accs) * 1.15 if accs else 1.0)))
        save(fig, "plot_tiers.png")
    return written
