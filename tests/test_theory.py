"""The theory of LoD on linear maps (Theorem C.1, Fig. 2a, 2b, 6, 7) as assertions.

Each claim test runs one seeded experiment of fedmaestro.theory at the default TheoryConfig
(2500 plain-SGD steps, lr 0.05, batch 64): about 1-2.5 s each on one CPU thread.

Where the tolerances come from: SGD with a constant step size on fresh samples ends in a noise
ball, not at the optimum. Over seeds 0-9 (0-11 for (a)) the worst final values were: (a) relative
distance 0.035 (k=1..6); (b) |estimate - target| 0.014, alignment 0.998; (c) alignment 0.998,
|cos(u_1, u~_1 or u~_2)| 0.050, LoD data loss 0.45% above the optimum; (d) rank 3 before and 2
after in every seed, kept estimates within 0.027 of 1 (HGL shrinks them a little). Every bound
below leaves at least 1.4x (mostly 3x or more) room over those, and stays far from the value at
initialization or from what the wrong answer (truncated SVD's order, an unreduced rank) gives.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmaestro import lod, theory
from fedmaestro.config import TheoryConfig

ROOT = Path(__file__).resolve().parents[1]
PNGS = ("theory_svd.png", "theory_pca.png", "theory_order.png", "theory_adaptivity.png")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tc() -> TheoryConfig:
    return TheoryConfig()


def test_svd_recovery_matches_best_rank_k_for_every_k(tc):
    # Fig. 2a: x uniform on the unit ball -> the rank-k prefix is A's best rank-k approximation.
    res = theory.svd_recovery(tc, seed=0)
    assert res.distance.shape[1] == 6 and np.count_nonzero(res.singular_values > 1e-4) == 3
    # Initialization: a random rank-6 product, about as far from A_k as A_k is from 0.
    assert res.distance[0].min() > 0.5, f"initial distances {res.distance[0]}"
    # Trained: within 5% of ||A_k|| for every k (worst seen over 12 seeds: 3.5%).
    assert res.final.max() < 0.05, f"||U_:k V_:k^T - A_k|| / ||A_k||, k=1..6: {res.final}"


def test_pca_recovery_singular_value_estimates(tc):
    # Fig. 2b: A = I, data on 3 directions -> estimates 1, 1, 1, 0, 0, 0 and the principal directions in order.
    res = theory.pca_recovery(tc, seed=0)
    target = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert np.abs(res.final - target).max() < 0.05, f"estimates on the data {res.final}"
    assert res.alignment[-1].min() > 0.99, f"|cos(u_b, principal direction b)| {res.alignment[-1]}"
    # V's part orthogonal to the data gets no gradient, so the raw product of the column norms does
    # not reach the target: that is why the estimate is taken on the data (App. C).
    assert np.abs(res.raw_final - target).max() > 0.1, f"raw estimates {res.raw_final}"


def test_order_recovery_lod_follows_the_data_svd_does_not(tc):
    # Fig. 6 / App. E.1: the data make A's 3rd singular direction the most important one.
    res = theory.order_recovery(tc, seed=0)
    # Learned component b is A's singular direction 4-b: u_1 ~ u~_3 (the data's order) ...
    assert res.alignment[-1].min() > 0.99, f"|cos(u_b, u~_(4-b))|, b=1..3: {res.alignment[-1]}"
    # ... and not A's first (which truncated SVD's first component is, by definition).
    assert res.cosines[0, 0] < 0.1, f"|cos(u_1, u~_1)| = {res.cosines[0, 0]}"
    # On the data, LoD's rank-k error is the PCA optimum of Theorem C.1 (within 2%: noise ball),
    # truncated SVD's is much larger: 6.25 vs 3.25 at k=1, 4 vs 1 at k=2 (exact).
    k12 = slice(0, 2)
    np.testing.assert_allclose(res.lod_loss[k12], res.optimal_loss[k12], rtol=0.02)
    assert res.lod_loss[2] < 0.01, f"rank-3 error {res.lod_loss[2]} (output energy 7.25)"
    assert (res.svd_loss[k12] > 1.5 * res.lod_loss[k12]).all(), \
        f"truncated SVD {res.svd_loss[k12]} vs LoD {res.lod_loss[k12]}"


@pytest.mark.parametrize("hgl_mode, eps_ps", [("subgradient", None), ("proximal", 0.0)])
def test_rank_adaptivity_drops_rank_when_a_direction_is_removed(tc, hgl_mode, eps_ps):
    # Fig. 7 / App. E.2. subgradient (the paper's loss term, the default) at the default eps 1e-4;
    # proximal at eps = 0, which only a tail of exact zeros passes.
    res = theory.rank_adaptivity(tc, seed=0, hgl_mode=hgl_mode, eps_ps=eps_ps)
    assert res.ranks[0] == 6
    assert res.rank_before_removal == 3, f"ranks {res.ranks.tolist()}"
    assert res.final_rank == 2, f"ranks {res.ranks.tolist()}"
    assert all(c["step"] > res.remove_at for c in res.cuts if c["to"] == 2), res.cuts
    # The two directions left keep estimates near 1 (HGL's shrinkage: worst 0.027 over seeds).
    assert np.abs(res.estimates[-1, :2] - 1.0).max() < 0.1, f"final estimates {res.estimates[-1]}"


def test_rank_before_removal_does_not_depend_on_the_logging_grid():
    # Logged every 2000 steps, the only point before the removal (step 1250) is step 0, at rank 6: the rank
    # at the removal comes from the cuts, not from the log.
    res = theory.rank_adaptivity(TheoryConfig(log_every=2000), seed=0)
    assert res.ranks[0] == 6 and res.rank_before_removal == 3, res.cuts


def test_rank_adaptivity_control_keeps_rank_3_without_the_removal(tc):
    # Without the removal the same HGL keeps 3 directions: the drop above is caused by the data.
    res = theory.rank_adaptivity(tc, seed=0, remove=False)
    assert res.final_rank == 3, f"ranks {res.ranks.tolist()}"


def test_uniform_ball_moments():
    # x uniform on the unit ball of R^n: ||x|| <= 1, E[x x^T] = I / (n + 2), E||x||^2 = n / (n + 2).
    n, num = 6, 200_000
    x = theory.uniform_ball(num, n, torch.Generator().manual_seed(0)).double()
    assert x.norm(dim=1).max() <= 1.0 + 1e-6
    cov = x.T @ x / num
    # Entries of the sample covariance have std sqrt(E[x_i^4] - E[x_i^2]^2) / sqrt(num) = sqrt(3/80 - 1/64) / sqrt(num)
    # ~ 3.3e-4 on the diagonal (2.5e-4 off it), and ||x||^2's mean has 4.3e-4: 2e-3 is 5-8 of them, and a radius
    # drawn as U^(1/5) or U^(1/7) instead of U^(1/6) (diagonal 0.119 or 0.130, not 0.125) is caught
    np.testing.assert_allclose(cov.numpy(), np.eye(n) / (n + 2), atol=2e-3)
    assert (x.norm(dim=1) ** 2).mean().item() == pytest.approx(n / (n + 2), abs=2e-3)


def test_train_lod_shrinks_while_training(tc):
    # Shrinking mid-run swaps the parameters' storage; training must go on with the optimizer.
    layer = lod.LoDLinear(4, 4, bias=False)
    with torch.no_grad():
        layer.u[2:] = 0  # a zero tail: cut at the first shrink, whatever eps
        layer.v[2:] = 0
    inputs = torch.randn(20, 8, 4, generator=torch.Generator().manual_seed(0))
    trace = theory.train_lod(layer, inputs, torch.eye(4), lr=0.01, seed=0, probe=lambda m: m.rank, log_every=5,
                             eps_ps=0.0, shrink_every=5)
    assert trace.values == [4, 2, 2, 2, 2]
    assert trace.cuts == [{"step": 5, "from": 4, "to": 2, "importance": 0.0}]


def test_a_layer_shrunk_to_rank_0_ends_its_run_at_rank_0_without_failing():
    # a threshold above every importance cuts the whole layer at the first shrink; the steps after have nothing to
    # train (no bias: the loss has no gradient) and no importance to compute (a RuntimeError each, before)
    layer = lod.LoDLinear(4, 4, bias=False)
    inputs = torch.randn(20, 8, 4, generator=torch.Generator().manual_seed(0))
    trace = theory.train_lod(layer, inputs, torch.eye(4), lr=0.01, seed=0, probe=lambda m: m.rank, log_every=5,
                             eps_ps=1e9, shrink_every=5)
    assert trace.values == [4, 0, 0, 0, 0] and [(c["from"], c["to"]) for c in trace.cuts] == [(4, 0)]


def test_theory_config_rejects_bad_values():
    with pytest.raises(ValueError, match="theory.hgl_mode"):
        TheoryConfig(hgl_mode="lasso")
    with pytest.raises(ValueError, match="theory.steps"):
        TheoryConfig(steps=0)


def test_cli_theory_mode_writes_the_plots(tmp_path):
    # Wiring only (the claims are tested above): a short run through the real command line.
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmaestro", "mode=theory", f"hydra.run.dir={run_dir}", "theory.steps=200",
           "theory.shrink_every=20", "train.threads=2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in PNGS:
        path = run_dir / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    result = json.loads((run_dir / "theory.json").read_text())
    assert set(result) >= {"svd", "pca", "order", "adaptivity", "config", "seed"}
    assert len(result["svd"]["relative_distance_per_k"]) == 6
    assert result["config"]["steps"] == 200
    assert "LoD on linear maps" in done.stdout
    assert "device and train.threads are not used" in done.stdout  # train.threads=2: named, not silently ignored


def test_a_diverged_theory_run_says_so(tmp_path, capsys):
    from fedmaestro.config import Config

    cfg = Config(mode="theory", theory=TheoryConfig(steps=20, lr=100.0, shrink_every=10))
    result = theory.run(cfg, tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert None in result["svd"]["relative_distance_per_k"]  # non-finite numbers, written as null
    assert "SGD diverged in (a) SVD" in out and "lower theory.lr (now 100)" in out
    theory.run(Config(mode="theory", theory=TheoryConfig(steps=20, shrink_every=10)), tmp_path / "ok")
    assert "SGD diverged" not in capsys.readouterr().out
