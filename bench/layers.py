"""LoD layer speed against the dense torch layer, single thread (issue: core, "Speed").

Forward + backward (the input requires grad, as inside a network) of LoDLinear(512, 512) on a
batch of 256 and LoDConv2d(64, 64, 3, padding=1) on 32 images of 32x32, at active rank p * full
for p in {1, 0.5, 0.25, 0.125}. Prints the time ratio to the dense layer, the MAC ratio, and the
target (time ratio <= 1.25 x MAC ratio + 0.05), PASS or FAIL per row. The dense layer and the LoD
layer are timed in alternating blocks, each in its steady state, and each ratio is taken within a
pair of blocks (robust to load changes on a shared machine); medians are reported. Then the HGL penalty + its backward as a share of a LeNet-5
training step (target < 5%). Exit status 1 if a target is missed.

    python bench/layers.py [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from fedmaestro import lod
from fedmaestro.footprint import measure
from fedmaestro.models import build

from bench_args import at_least_one


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    """Seconds of one forward + backward, gradients cleared first (set to None, as a trainer does)."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    layer(x).backward(grad_out)
    return time.perf_counter() - start


def time_ratio(dense: nn.Module, layer: nn.Module, x: torch.Tensor, repeats: int,
               block: int = 4) -> tuple[float, float, float]:
    """(median time ratio layer / dense, median dense s, median layer s).

    The two layers are timed in alternating blocks (dense x block, layer x block, layer x block,
    dense x block, ...); the first run of a block only warms the caches and is not timed, so each
    layer is measured in its steady state, as in a loop of one layer. A ratio is taken between
    the block medians of one pair of blocks, so a change of load on the (shared) machine during
    the run hits both alike; the reported ratio is the median over ``repeats`` pairs.
    """
    grad_out = torch.randn_like(dense(x))

    def block_median(module: nn.Module) -> float:
        _fwd_bwd(module, x, grad_out)
        return statistics.median(_fwd_bwd(module, x, grad_out) for _ in range(block))

    ratios, dense_times, layer_times = [], [], []
    for i in range(repeats):
        if i % 2:
            t_layer = block_median(layer)
            t_dense = block_median(dense)
        else:
            t_dense = block_median(dense)
            t_layer = block_median(layer)
        ratios.append(t_layer / t_dense)
        dense_times.append(t_dense)
        layer_times.append(t_layer)
    return statistics.median(ratios), statistics.median(dense_times), statistics.median(layer_times)


def bench_layer(title: str, dense: nn.Module, x: torch.Tensor, repeats: int) -> bool:
    factorized = lod.factorize(nn.Sequential(copy.deepcopy(dense)))[0]
    input_shape = tuple(x.shape[1:])
    dense_macs = measure(dense, input_shape).macs
    print(f"\n{title}: {dense_macs / 1e6:.1f} MMACs per sample (dense), {repeats} pairs of blocks")
    print(f"{'p':>6} {'rank':>5} {'dense ms':>9} {'LoD ms':>8} {'time ratio':>11} {'MAC ratio':>10} {'target':>8}  result")
    all_ok = True
    for p in (1.0, 0.5, 0.25, 0.125):
        b = max(1, round(p * factorized.rank))
        factorized.active_rank = b
        ratio, t_dense, t_layer = time_ratio(dense, factorized, x, repeats)
        mac_ratio = measure(factorized, input_shape).macs / dense_macs
        target = 1.25 * mac_ratio + 0.05
        ok = ratio <= target
        all_ok &= ok
        print(f"{p:>6} {b:>5} {t_dense * 1e3:>9.2f} {t_layer * 1e3:>8.2f} {ratio:>11.3f} {mac_ratio:>10.3f} "
              f"{target:>8.3f}  {'PASS' if ok else 'FAIL'}")
    return all_ok


def hgl_share(repeats: int) -> float:
    """HGL penalty + backward as a share of a LeNet-5 training step (batch 64)."""
    model = lod.factorize(build("lenet"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step(with_hgl: bool) -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if with_hgl:
            loss = loss + 1e-4 * lod.hgl_penalty(model)
        loss.backward()
        opt.step()

    def hgl_only() -> None:
        lod.hgl_penalty(model).backward()

    def median_time(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    step_time = median_time(lambda: step(True))
    hgl_time = median_time(hgl_only)
    print(f"\nLeNet-5 training step (batch 64, factorized, HGL in the loss): {step_time * 1e3:.2f} ms; "
          f"HGL penalty + backward: {hgl_time * 1e3:.3f} ms")
    return hgl_time / step_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=at_least_one, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ok = bench_layer("LoDLinear(512, 512), batch 256", nn.Linear(512, 512),
                     torch.randn(256, 512, requires_grad=True), args.repeats)
    ok &= bench_layer("LoDConv2d(64, 64, 3, padding=1), 32 x 64 x 32 x 32", nn.Conv2d(64, 64, 3, padding=1),
                      torch.randn(32, 64, 32, 32, requires_grad=True), max(3, args.repeats // 5))
    share = hgl_share(args.repeats * 3)
    print(f"HGL share of the step: {100 * share:.2f}% (target < 5%)  {'PASS' if share < 0.05 else 'FAIL'}")
    ok &= share < 0.05
    print(f"\nall targets: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
