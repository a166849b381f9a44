"""LoD layer speed against the dense torch layer, single thread (issue: core, "Speed").

Forward + backward (the input requires grad, as inside a network) of LoDLinear(512, 512) on a
batch of 256 and LoDConv2d(64, 64, 3, padding=1) on 32 images of 32x32, at active rank p * full
for p in {1, 0.5, 0.25, 0.125}. Prints the time ratio to the dense layer, the MAC ratio, and the
target (time ratio <= 1.25 x MAC ratio + 0.05). Then the HGL penalty + its backward as a share of
a LeNet-5 training step (target < 5%).

    python bench/layers.py [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fedmaestro import lod
from fedmaestro.footprint import measure
from fedmaestro.models import build


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward + backward."""
    grad_out = torch.randn_like(layer(x))
    for _ in range(3):  # warm-up
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_out)
    times = []
    for _ in range(repeats):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        start = time.perf_counter()
        layer(x).backward(grad_out)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_layer(title: str, dense: nn.Module, x: torch.Tensor, repeats: int) -> bool:
    factorized = lod.factorize(nn.Sequential(dense_copy(dense)))[0]
    input_shape = tuple(x.shape[1:])
    dense_time = time_fwd_bwd(dense, x, repeats)
    dense_macs = measure(dense, input_shape).macs
    print(f"\n{title}: dense {dense_time * 1e3:.2f} ms, {dense_macs / 1e6:.1f} MMACs per sample")
    print(f"{'p':>6} {'rank':>5} {'time ratio':>11} {'MAC ratio':>10} {'target':>8}  ok")
    all_ok = True
    for p in (1.0, 0.5, 0.25, 0.125):
        b = max(1, round(p * factorized.rank))
        factorized.active_rank = b
        t = time_fwd_bwd(factorized, x, repeats)
        mac_ratio = measure(factorized, input_shape).macs / dense_macs
        target = 1.25 * mac_ratio + 0.05
        ok = t / dense_time <= target
        all_ok &= ok
        print(f"{p:>6} {b:>5} {t / dense_time:>11.3f} {mac_ratio:>10.3f} {target:>8.3f}  {'yes' if ok else 'NO'}")
    return all_ok


def dense_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


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
    return hgl_time / step_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ok = bench_layer("LoDLinear(512, 512), batch 256", nn.Linear(512, 512),
                     torch.randn(256, 512, requires_grad=True), args.repeats)
    ok &= bench_layer("LoDConv2d(64, 64, 3, padding=1), 32 x 64 x 32 x 32", nn.Conv2d(64, 64, 3, padding=1),
                      torch.randn(32, 64, 32, 32, requires_grad=True), max(5, args.repeats // 3))
    share = hgl_share(args.repeats * 3)
    print(f"\nHGL penalty + backward: {100 * share:.2f}% of a LeNet-5 training step (target < 5%): "
          f"{'yes' if share < 0.05 else 'NO'}")
    print(f"\nall layer targets met: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
