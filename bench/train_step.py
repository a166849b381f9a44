"""Training-step time as the model shrinks, against its MACs (issue: centralized, acceptance).

For every model and every fraction p (1, 0.75, 0.5, 0.25, 0.125) the factorized model is cut to
ceil(p r_i) columns in every layer (what progressive shrinking does to it) and a real training step
is timed: ``train.train_epoch`` over a fixed set of random batches, with the ``per_layer`` rank
sampler, lambda * HGL in the loss and SGD with momentum, exactly as in a centralized run. The MACs
are the exact forward MACs of the sub-models that those steps sampled (``train.RankCost``). Ratios
are to the full-rank factorized step (p = 1); the target is

    time ratio <= 1.3 x MAC ratio + 0.1

(the 0.1 leaves room for what does not shrink with the ranks: pooling, activations, the loss, the
optimizer's per-tensor overhead). The dense (non-factorized) step is timed too, for reference.
The passes of a model go round-robin over its fractions (a drift of the machine's speed reaches every p alike),
each pass samples the same sub-models (the sampler is seeded anew), and the median pass counts.

    python bench/train_step.py [--models lenet resnet18] [--threads 1] [--repeats 7]

Exit status 1 if a model misses the target at some p.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from fedmaestro import lod
from fedmaestro.config import Config, DatasetConfig, ModelConfig, TrainConfig
from fedmaestro.train import RankCost, build_model, make_optimizer, task_for, train_epoch

from bench_args import at_least_one

SETUPS = {  # model -> (data set it is trained on, input shape, batch size)
    "lenet": ("fashion_mnist", [1, 28, 28], 64),
    "resnet18": ("cifar10", [3, 32, 32], 32),
    "vgg19": ("cifar10", [3, 32, 32], 32),
}
FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125)


def make_config(name: str, factorize: bool) -> Config:
    dataset, shape, batch = SETUPS[name]
    return Config(mode="centralized", device="cpu", progress=False,
                  model=ModelConfig(name=name, factorize=factorize),
                  dataset=DatasetConfig(name=dataset, input_shape=shape, num_classes=10),
                  train=TrainConfig(batch_size=batch, lr=0.01, momentum=0.9, lambda_gl=1e-4, sampler="per_layer"))


class Setup:
    """One model cut to a fraction of its ranks, with its optimizer, ready to time a pass over the batches."""

    def __init__(self, cfg: Config, fraction: float | None, batches: list):
        torch.manual_seed(0)
        self.model = build_model(cfg)
        if fraction is not None:
            lod.truncate(self.model, {n: max(1, math.ceil(fraction * layer.rank)) for n, layer in lod.layers(self.model)})
        self.factorized = bool(lod.layers(self.model))
        self.train = cfg.train if self.factorized else TrainConfig(**{**vars(cfg.train), "lambda_gl": 0.0})
        self.optimizer = make_optimizer(self.model, self.train)
        self.cost = RankCost(self.model, (torch.zeros(1, *cfg.dataset.input_shape),))
        self.task, self.batches = task_for(cfg.dataset.name), batches
        self.times, self.examples = [], 0
        self.run(batches[:2], timed=False)  # warm-up

    def run(self, batches: list, timed: bool = True) -> None:
        # the same seed every pass: every pass trains the same sub-models, whose MACs are counted
        sampler = lod.RankSampler(self.model, "per_layer", seed=0) if self.factorized else None
        stats = train_epoch(self.model, batches, self.optimizer, self.train, self.task, torch.device("cpu"),
                            sampler=sampler, cost=self.cost if timed else None)
        if timed:
            self.times.append(stats["seconds"] / stats["steps"])
            self.examples += stats["num_examples"]

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)

    @property
    def macs(self) -> float:
        return self.cost.macs / self.examples

    @property
    def total_rank(self) -> int:
        return sum(layer.rank for _, layer in lod.layers(self.model))


def bench(name: str, repeats: int, steps: int) -> bool:
    dataset, shape, batch = SETUPS[name]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(steps)]
    setups = {"dense": Setup(make_config(name, False), None, batches)}
    setups.update({p: Setup(make_config(name, True), p, batches) for p in FRACTIONS})
    for _ in range(repeats):  # round-robin: a drift of the machine's speed reaches every fraction alike
        for setup in setups.values():
            setup.run(batches)
    dense = setups["dense"]
    print(f"\n{name} ({dataset}-shaped random data, batch {batch}, {torch.get_num_threads()} thread(s)): "
          f"dense step {dense.step_s * 1e3:.2f} ms, {dense.macs / 1e6:.3f} MMACs/example")
    print(f"{'p':>6} {'rank':>6} {'MMACs/ex':>9} {'step ms':>8} {'x dense':>8} {'MAC ratio':>10} "
          f"{'time ratio':>11} {'target':>7}  ok")
    full = setups[FRACTIONS[0]]
    all_ok = True
    for p in FRACTIONS:
        t, macs = setups[p].step_s, setups[p].macs
        mac_ratio, time_ratio = macs / full.macs, t / full.step_s
        target = 1.3 * mac_ratio + 0.1
        ok = time_ratio <= target
        all_ok &= ok
        print(f"{p:>6.3f} {setups[p].total_rank:>6d} {macs / 1e6:>9.3f} {t * 1e3:>8.2f} {t / dense.step_s:>8.2f} "
              f"{mac_ratio:>10.3f} {time_ratio:>11.3f} {target:>7.3f}  {'yes' if ok else 'NO'}")
    print(rank_independent_share([setups[p].macs / full.macs for p in FRACTIONS], [setups[p].step_s for p in FRACTIONS]))
    return all_ok


def rank_independent_share(mac_ratios: list[float], steps_s: list[float]) -> str:
    """Least-squares fit step = F + D m over the fractions (m: MAC ratio), and what the target asks of it.

    F + D m <= (1.3 m + 0.1)(F + D) holds at m < 0.69 exactly when F / D <= (0.3 m + 0.1) / (0.9 - 1.3 m):
    the rank-independent time (pooling, activations, the loss, the optimizer, per-op overhead) may be
    at most that share of the rank-proportional time at full rank."""
    n = len(mac_ratios)
    mean_m, mean_t = sum(mac_ratios) / n, sum(steps_s) / n
    d = (sum((m - mean_m) * (t - mean_t) for m, t in zip(mac_ratios, steps_s))
         / max(sum((m - mean_m) ** 2 for m in mac_ratios), 1e-12))
    f = mean_t - d * mean_m
    m = min(mac_ratios)
    allowed = (0.3 * m + 0.1) / (0.9 - 1.3 * m) if m < 0.69 else math.inf
    measured = f / d if d > 0 else math.inf
    return (f"fit: step = F + D x MAC ratio, F = {f * 1e3:.2f} ms (rank-independent), D = {d * 1e3:.2f} ms; "
            f"the target at MAC ratio {m:.3f} needs F/D <= {allowed:.2f}, measured {measured:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet18"], choices=sorted(SETUPS))
    parser.add_argument("--threads", type=at_least_one, default=1)
    parser.add_argument("--repeats", type=at_least_one, default=7, help="timed passes over the batches; the median is kept")
    parser.add_argument("--steps", type=at_least_one, default=10, help="batches per timed pass")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {name: bench(name, args.repeats, args.steps) for name in args.models}
    print("\n" + ", ".join(f"{n}: {'target met' if ok else 'TARGET MISSED'}" for n, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
