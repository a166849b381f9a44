"""LoD on linear maps (Sec. 4, App. C, E.1, E.2): four small seeded experiments and their plots.

``python -m fedmaestro mode=theory`` runs them and writes theory_svd.png, theory_pca.png,
theory_order.png, theory_adaptivity.png and theory.json into the run directory.

Every experiment trains one bias-free ``lod.LoDLinear`` with plain SGD on objective (3),
E_x E_b ||U_{:b} V_{:b}^T x - A x||^2, b drawn by ``lod.RankSampler`` (``per_layer``: with one
layer, b runs through a fresh permutation of 1..r every r steps, i.e. the uniform D of Theorem C.1).
Fresh samples every step (the expectation over x, not a fixed data set). By Theorem C.1 the
optimum is PCA of Sigma~ V~^T x in the basis of U~:

* ``svd_recovery``       x uniform on the unit ball: the rank-k prefix is A's best rank-k approximation.
* ``pca_recovery``       A = I, data on 3 directions: per-rank singular value estimates 1, 1, 1, 0, ...
* ``order_recovery``     data stretched so A's 3rd singular direction carries the most output energy:
                         LoD orders its components by the data, truncated SVD by A alone.
* ``rank_adaptivity``    A = I with HGL and progressive shrinking; one data direction removed
                         half way: the rank goes 6 -> 3 -> 2.

The functions are pure (seeded; the global torch RNG is left as it was) and return the curves and
the final numbers as numpy arrays in small dataclasses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import lod
from .config import Config, TheoryConfig

__all__ = [
    "Trace", "SVDResult", "PCAResult", "OrderResult", "AdaptivityResult", "train_lod", "uniform_ball",
    "random_low_rank", "singular_value_estimates", "svd_recovery", "pca_recovery", "order_recovery", "rank_adaptivity",
    "plot_svd", "plot_pca", "plot_order", "plot_adaptivity", "summary", "run",
]

PCA_STD = (1.5, 1.2, 0.9)  # std of the data along its 3 directions (distinct: the PCA order is defined)
ORDER_SIGMA = (2.0, 1.5, 1.0)  # A's singular values in the ordering experiment
GAP_RATIO = 0.7  # random A: neighbouring singular values at least 30% apart (see random_low_rank)
ORDER_ENERGY = (1.0, 1.5, 2.0)  # std of sigma_i v~_i^T x: the 3rd singular direction matters most


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

@dataclass
class Trace:
    """Recorded points of a run: ``steps`` (T,) and one probe value per point (``values``)."""

    steps: list[int] = field(default_factory=list)
    values: list = field(default_factory=list)
    cuts: list[dict] = field(default_factory=list)  # progressive shrinks: step, old/new rank, importance cut


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent seeded streams per purpose (problem, data) so changing one leaves the others."""
    return torch.Generator().manual_seed(seed * 1009 + stream)


def _new_layer(n_in: int, n_out: int, seed: int) -> lod.LoDLinear:
    """A bias-free LoDLinear at nn.Linear's default init (then SVD), without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return lod.LoDLinear(n_in, n_out, bias=False)


def uniform_ball(num: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(num, dim) samples uniform on the unit ball: a uniform direction times radius U^(1/dim)."""
    direction = torch.randn(num, dim, generator=generator)
    direction = direction / direction.norm(dim=1, keepdim=True)
    radius = torch.rand(num, 1, generator=generator) ** (1.0 / dim)
    return direction * radius


def _random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q * torch.sign(torch.diagonal(r))  # (rows, cols), Haar-distributed


def _sgd_step(layer, sampler, optimizer, x, y, lambda_gl: float, hgl_mode: str) -> float:
    # Kept in its own function so the autograd graph is freed on return: lod.shrink swaps the
    # parameters' storage for a smaller one, which fails in the next backward while any tensor
    # of the old graph is still alive.
    sampler.step()
    loss = (layer(x) - y).square().sum(dim=1).mean()  # ||U_{:b} V_{:b}^T x - y||^2, mean over the batch
    if layer.rank == 0:  # shrunk away (no bias): nothing left to train, the map is 0
        return float(loss)
    if lambda_gl > 0 and hgl_mode == "subgradient":
        loss = loss + lambda_gl * lod.hgl_penalty(layer)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if lambda_gl > 0 and hgl_mode == "proximal":
        lod.hgl_proximal_step(layer, optimizer.param_groups[0]["lr"] * lambda_gl)
    return float(loss.detach())


def train_lod(layer: lod.LoDLinear, inputs: torch.Tensor, target: torch.Tensor, *, lr: float, seed: int,
              probe: Callable[[lod.LoDLinear], object], log_every: int = 10, lambda_gl: float = 0.0,
              hgl_mode: str = "subgradient", eps_ps: float | None = None, shrink_every: int = 50) -> Trace:
    """Plain SGD on objective (3): y = x A^T with ``target`` = A (m, n), ``inputs`` (steps, batch, n).

    ``probe(layer)`` runs under no_grad at step 0, every ``log_every`` steps and at the end.
    ``eps_ps`` not None: progressive shrinking (``lod.shrink``) every ``shrink_every`` steps.
    """
    assert inputs.ndim == 3 and inputs.shape[2] == layer.in_features, \
        f"inputs must be (steps, batch, {layer.in_features}), got {tuple(inputs.shape)}"
    assert target.shape == (layer.out_features, layer.in_features), \
        f"target must be ({layer.out_features}, {layer.in_features}), got {tuple(target.shape)}"
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    sampler = lod.RankSampler(layer, "per_layer", seed=seed)
    trace = Trace()

    def record(step: int) -> None:
        with torch.no_grad():
            trace.steps.append(step)
            trace.values.append(probe(layer))

    record(0)
    steps = inputs.shape[0]
    for t in range(steps):
        x = inputs[t]  # (B, n)
        _sgd_step(layer, sampler, optimizer, x, x @ target.T, lambda_gl, hgl_mode)
        if eps_ps is not None and (t + 1) % shrink_every == 0 and layer.rank > 0:
            before, imp = layer.rank, lod.importance(layer)
            lod.shrink(layer, eps_ps, optimizer)
            if layer.rank < before:
                trace.cuts.append({"step": t + 1, "from": before, "to": layer.rank,
                                   "importance": float(imp[layer.rank])})
        if (t + 1) % log_every == 0 or t + 1 == steps:
            record(t + 1)
    layer.active_rank = None
    return trace


def singular_value_estimates(layer: lod.LoDLinear, support: torch.Tensor | None = None) -> np.ndarray:
    """(layer.max_rank,) ||u_b|| ||P v_b|| per rank component b, 0 past the layer's rank.

    ``support`` (n, d) orthonormal: P projects V onto the span of the data. The loss never sees
    the part of V orthogonal to the data (its gradient x r^T lies in that span), so without HGL
    that part keeps its initial value; only the restriction to the data is identified (App. C).
    None: P = I, the plain product of the column norms (shrinking looks at the tails' norms instead).
    """
    u, v = (f.detach() for f in layer.factors())  # (m, r), (n, r)
    if support is not None:
        v = support @ (support.T @ v)
    est = np.zeros(layer.max_rank)
    est[:layer.rank] = (u.norm(dim=0) * v.norm(dim=0)).double().numpy()
    return est


def _unit_columns(c: torch.Tensor) -> torch.Tensor:
    return c / c.norm(dim=0, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# (a) Fig. 2a: uniform data on the unit ball -> truncated SVD
# ---------------------------------------------------------------------------------------------

@dataclass
class SVDResult:
    steps: np.ndarray  # (T,)
    distance: np.ndarray  # (T, r): ||U_{:k} V_{:k}^T - A_k||_F / ||A_k||_F, k = 1..r
    singular_values: np.ndarray  # (r,) of A

    @property
    def final(self) -> np.ndarray:
        return self.distance[-1]


def random_low_rank(m: int, n: int, rank: int, generator: torch.Generator, max_ratio: float = GAP_RATIO):
    """A = G1 G2 with Gaussian G1 (m, rank), G2 (rank, n), redrawn until sigma_{k+1} / sigma_k <= max_ratio.

    Theorem C.1 needs distinct singular values, and SGD tells u~_k from u~_{k+1} apart at a rate
    that scales with their gap: a plain Gaussian draw with sigma_2 / sigma_1 = 0.91 left the rank-1
    prefix a mixture of u~_1 and u~_2 after 2500 steps (relative distance 1.29) while every k >= 2
    had converged (< 0.012); over 12 seeds, ratios <= 0.7 gave distances <= 0.035 for every k.
    """
    for _ in range(1000):
        a = torch.randn(m, rank, generator=generator) @ torch.randn(rank, n, generator=generator)  # (m, n)
        sing = torch.linalg.svdvals(a)[:rank]
        if bool((sing[1:] / sing[:-1] <= max_ratio).all()):
            return a
    raise RuntimeError(f"random_low_rank: no draw with singular value ratios <= {max_ratio} in 1000 tries")


def svd_recovery(tc: TheoryConfig, seed: int = 0, shape: tuple[int, int] = (9, 6), true_rank: int = 3) -> SVDResult:
    """A random (m x n) rank-3 A (``random_low_rank``), x uniform on the unit ball of R^n."""
    m, n = shape
    a = random_low_rank(m, n, true_rank, _generator(seed, 0))
    left, sing, right_t = torch.linalg.svd(a, full_matrices=False)
    best = [(left[:, :k] * sing[:k]) @ right_t[:k] for k in range(1, min(m, n) + 1)]  # A_k, Eckart-Young
    inputs = uniform_ball(tc.steps * tc.batch_size, n, _generator(seed, 1)).view(tc.steps, tc.batch_size, n)

    def probe(layer):
        return [float((layer.dense_weight(k) - a_k).norm() / a_k.norm()) for k, a_k in enumerate(best, 1)]

    trace = train_lod(_new_layer(n, m, seed), inputs, a, lr=tc.lr, seed=seed, probe=probe, log_every=tc.log_every)
    return SVDResult(np.array(trace.steps), np.array(trace.values), sing.numpy())


# ---------------------------------------------------------------------------------------------
# (b) Fig. 2b: identity map on data with 3 directions -> PCA
# ---------------------------------------------------------------------------------------------

def _pca_problem(tc: TheoryConfig, seed: int, dim: int, remove_at: int | None = None):
    """Data x = B diag(PCA_STD) g, g ~ N(0, I_3), B (dim, 3) random orthonormal; optionally the
    last (weakest) direction projected out from step ``remove_at`` on."""
    basis = _random_orthonormal(dim, len(PCA_STD), _generator(seed, 0))  # (n, 3)
    g = torch.randn(tc.steps, tc.batch_size, len(PCA_STD), generator=_generator(seed, 1))
    g = g * torch.tensor(PCA_STD)
    if remove_at is not None:
        g[remove_at:, :, -1] = 0.0  # == x - b_3 b_3^T x: the projection that removes direction 3
    return basis, g @ basis.T  # (steps, B, n)


@dataclass
class PCAResult:
    steps: np.ndarray  # (T,)
    estimates: np.ndarray  # (T, r): ||u_b|| ||P v_b||, P = projection on the data's span
    alignment: np.ndarray  # (T, 3): |cos(u_b, b-th principal direction)|, b = 1..3
    raw_final: np.ndarray  # (r,): ||u_b|| ||v_b|| at the end (off-data parts of V included)
    data_std: np.ndarray  # (3,)

    @property
    def final(self) -> np.ndarray:
        return self.estimates[-1]


def pca_recovery(tc: TheoryConfig, seed: int = 0, dim: int = 6) -> PCAResult:
    basis, inputs = _pca_problem(tc, seed, dim)
    layer = _new_layer(dim, dim, seed)

    def probe(layer):
        u = layer.factors()[0][:, :basis.shape[1]]
        return singular_value_estimates(layer, basis), (_unit_columns(u) * basis).sum(0).abs().tolist()

    trace = train_lod(layer, inputs, torch.eye(dim), lr=tc.lr, seed=seed, probe=probe, log_every=tc.log_every)
    return PCAResult(np.array(trace.steps), np.array([e for e, _ in trace.values]),
                     np.array([c for _, c in trace.values]), singular_value_estimates(layer), np.array(PCA_STD))


# ---------------------------------------------------------------------------------------------
# (c) Fig. 6 / App. E.1: the data decide the order, SVD does not
# ---------------------------------------------------------------------------------------------

@dataclass
class OrderResult:
    steps: np.ndarray  # (T,)
    alignment: np.ndarray  # (T, 3): |cos(u_b, u~_{4-b})|: learned component b vs A's (4-b)-th
    cosines: np.ndarray  # (3, 3) final |cos(u_b, u~_j)|, rows b (learned), columns j (A's SVD)
    lod_loss: np.ndarray  # (r,) E||(U_{:k} V_{:k}^T - A) x||^2, k = 1..r, exact (from the covariance)
    svd_loss: np.ndarray  # (r,) the same for truncated SVD A_k
    optimal_loss: np.ndarray  # (r,) the minimum over rank-k maps: PCA of Sigma~ V~^T x (Theorem C.1)
    singular_values: np.ndarray  # (3,) of A
    energy: np.ndarray  # (3,) std of sigma_j v~_j^T x


def order_recovery(tc: TheoryConfig, seed: int = 0, shape: tuple[int, int] = (9, 6)) -> OrderResult:
    """A = U~ diag(ORDER_SIGMA) V~^T (random orthonormal U~, V~), x = V~ diag(c) g, g ~ N(0, I_n),
    c_j = ORDER_ENERGY_j / sigma_j on A's row space (1 on its null space): the output energy along
    u~_j is ORDER_ENERGY_j, increasing in j, the reverse of the singular values' order."""
    m, n = shape
    k = len(ORDER_SIGMA)
    gen = _generator(seed, 0)
    u_t, v_full = _random_orthonormal(m, k, gen), _random_orthonormal(n, n, gen)  # (m, 3), (n, n)
    sigma, energy = torch.tensor(ORDER_SIGMA), torch.tensor(ORDER_ENERGY)
    a = (u_t * sigma) @ v_full[:, :k].T  # (m, n)
    scale = torch.ones(n)
    scale[:k] = energy / sigma
    g = torch.randn(tc.steps, tc.batch_size, n, generator=_generator(seed, 1))
    inputs = (g * scale) @ v_full.T
    cov = (v_full * scale.square()) @ v_full.T  # E[x x^T], (n, n)

    def data_loss(w: torch.Tensor) -> float:
        d = w - a
        return float(torch.trace(d @ cov @ d.T))

    def probe(layer):
        u = _unit_columns(layer.factors()[0][:, :k])
        return (u_t.T @ u).abs().T.numpy()  # (3, 3): rows learned b, columns u~_j

    layer = _new_layer(n, m, seed)
    trace = train_lod(layer, inputs, a, lr=tc.lr, seed=seed, probe=probe, log_every=tc.log_every)
    cos = np.stack(trace.values)  # (T, 3, 3)
    rank = layer.rank
    with torch.no_grad():
        lod_loss = [data_loss(layer.dense_weight(b)) for b in range(1, rank + 1)]
    v_t = v_full[:, :k]  # A's right singular vectors; slicing past k keeps all 3: A_b = A for b >= 3
    svd_loss = [data_loss((u_t[:, :b] * sigma[:b]) @ v_t[:, :b].T) for b in range(1, rank + 1)]
    var = np.sort(energy.square().numpy())[::-1]
    optimal = [float(var[b:].sum()) for b in range(1, rank + 1)]
    return OrderResult(np.array(trace.steps), cos[:, [0, 1, 2], [2, 1, 0]], cos[-1], np.array(lod_loss),
                       np.array(svd_loss), np.array(optimal), sigma.numpy(), energy.numpy())


# ---------------------------------------------------------------------------------------------
# (d) Fig. 7 / App. E.2: HGL + shrinking follow the data's dimension
# ---------------------------------------------------------------------------------------------

@dataclass
class AdaptivityResult:
    steps: np.ndarray  # (T,)
    estimates: np.ndarray  # (T, r): ||u_b|| ||v_b|| (0 once cut)
    ranks: np.ndarray  # (T,) layer.rank
    remove_at: int
    rank_before_removal: int  # layer.rank after the last shrink before the removal
    final_rank: int
    cuts: list[dict]  # every shrink: step, from, to, importance of the cut tail
    hgl_mode: str
    eps_ps: float


def rank_adaptivity(tc: TheoryConfig, seed: int = 0, dim: int = 6, hgl_mode: str | None = None,
                    eps_ps: float | None = None, remove: bool = True) -> AdaptivityResult:
    """The PCA setup with HGL (``tc.lambda_gl``) and shrinking every ``tc.shrink_every`` steps;
    direction 3 of 3 is projected out of the data at step ``tc.steps // 2`` (``remove=False``:
    never, the control run)."""
    hgl_mode = tc.hgl_mode if hgl_mode is None else hgl_mode
    eps_ps = tc.eps_ps if eps_ps is None else eps_ps
    remove_at = tc.steps // 2
    _, inputs = _pca_problem(tc, seed, dim, remove_at=remove_at if remove else None)
    layer = _new_layer(dim, dim, seed)
    trace = train_lod(layer, inputs, torch.eye(dim), lr=tc.lr, seed=seed, log_every=tc.log_every,
                      probe=lambda layer: (singular_value_estimates(layer), layer.rank),
                      lambda_gl=tc.lambda_gl, hgl_mode=hgl_mode, eps_ps=eps_ps, shrink_every=tc.shrink_every)
    steps = np.array(trace.steps)
    ranks = np.array([r for _, r in trace.values])
    cuts_before = [cut for cut in trace.cuts if cut["step"] <= remove_at]  # not the log: it may skip remove_at
    before = cuts_before[-1]["to"] if cuts_before else dim
    return AdaptivityResult(steps, np.array([e for e, _ in trace.values]), ranks, remove_at, int(before),
                            layer.rank, trace.cuts, hgl_mode, eps_ps)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot, no global backend switch; PNG through Agg)
# ---------------------------------------------------------------------------------------------

def _figure(ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4.0), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _rank_label(k: int, r: int) -> str:
    return f"k={k} (p={k / r:.2f})"


def plot_svd(res: SVDResult, path: Path) -> None:
    fig, (ax,) = _figure()
    r = res.distance.shape[1]
    for k in range(r):
        ax.semilogy(res.steps, res.distance[:, k], label=_rank_label(k + 1, r))
    ax.set(xlabel="SGD step", ylabel=r"$\|U_{:k}V_{:k}^\top - A_k\|_F \,/\, \|A_k\|_F$",
           title="LoD recovers truncated SVD (x uniform on the unit ball)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_pca(res: PCAResult, path: Path) -> None:
    fig, (ax,) = _figure()
    r = res.estimates.shape[1]
    for k in range(r):
        ax.plot(res.steps, res.estimates[:, k], label=_rank_label(k + 1, r))
    for level in (0.0, 1.0):
        ax.axhline(level, color="grey", lw=0.8, ls="--")
    stds = ", ".join(f"{s:g}" for s in res.data_std)
    ax.set(xlabel="SGD step", ylabel=r"$\|u_k\|\,\|P v_k\|$ (on the data)",
           title=f"LoD on x -> x recovers PCA (data std {stds})")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_order(res: OrderResult, path: Path) -> None:
    fig, (ax, bx) = _figure(2)
    for b in range(3):
        ax.plot(res.steps, res.alignment[:, b], label=rf"$|\cos(u_{b + 1}, \tilde u_{3 - b})|$")
    ax.set(xlabel="SGD step", ylabel="alignment", ylim=(0, 1.05),
           title="Learned component b vs A's singular direction 4-b")
    ax.legend(fontsize=8)
    ks = np.arange(1, 4)
    width = 0.27
    bx.bar(ks - width, res.svd_loss[:3], width, label="truncated SVD")
    bx.bar(ks, res.lod_loss[:3], width, label="LoD (learned)")
    bx.bar(ks + width, res.optimal_loss[:3], width, label="optimum (PCA, Thm. C.1)")
    bx.set(xlabel="rank k", ylabel=r"$E\|(W_k - A)x\|^2$", xticks=ks, title="Error on the data at rank k")
    bx.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_adaptivity(res: AdaptivityResult, path: Path) -> None:
    fig, (ax,) = _figure()
    r = res.estimates.shape[1]
    for k in range(r):
        ax.plot(res.steps, res.estimates[:, k], label=_rank_label(k + 1, r))
    ax.axvline(res.remove_at, color="black", lw=0.8, ls=":", label="direction removed")
    ax.set(xlabel="SGD step", ylabel=r"$\|u_k\|\,\|v_k\|$",
           title=f"Rank follows the data (HGL {res.hgl_mode}, eps={res.eps_ps:g})")
    rx = ax.twinx()
    rx.step(res.steps, res.ranks, where="post", color="black", lw=1.5, label="layer rank (right)")
    rx.set(ylabel="layer rank", ylim=(0, r + 0.5))
    handles = ax.get_legend_handles_labels()[0] + rx.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------

def _rounded(values, digits: int = 4) -> list:
    return [round(float(v), digits) if math.isfinite(v) else None for v in np.ravel(values)]


def summary(svd: SVDResult, pca: PCAResult, order: OrderResult, adapt: AdaptivityResult) -> dict:
    """The final numbers of the four experiments (what theory.json holds)."""
    return {
        "svd": {"relative_distance_per_k": _rounded(svd.final), "initial_distance_per_k": _rounded(svd.distance[0]),
                "singular_values": _rounded(svd.singular_values)},
        "pca": {"estimates_on_data": _rounded(pca.final), "raw_estimates": _rounded(pca.raw_final),
                "alignment_to_principal_directions": _rounded(pca.alignment[-1])},
        "order": {"alignment_u_b_to_u_tilde_4_minus_b": _rounded(order.alignment[-1]),
                  "cosines_learned_vs_svd": [_rounded(row) for row in order.cosines],
                  "data_loss_lod": _rounded(order.lod_loss), "data_loss_truncated_svd": _rounded(order.svd_loss),
                  "data_loss_optimal": _rounded(order.optimal_loss)},
        "adaptivity": {"rank_before_removal": adapt.rank_before_removal, "final_rank": adapt.final_rank,
                       "remove_at": adapt.remove_at, "final_estimates": _rounded(adapt.estimates[-1]),
                       "cuts": adapt.cuts, "hgl_mode": adapt.hgl_mode, "eps_ps": adapt.eps_ps},
    }


def run(cfg: Config, run_dir: Path) -> dict:
    """Run the four experiments with ``cfg.theory`` and ``cfg.seed``; write the plots and theory.json."""
    from rich.table import Table

    from .console import echo

    torch.set_num_threads(1)  # 6 x 9 matrices: threads only add overhead
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc, seed = cfg.theory, cfg.seed
    svd, pca = svd_recovery(tc, seed), pca_recovery(tc, seed)
    order, adapt = order_recovery(tc, seed), rank_adaptivity(tc, seed)
    plot_svd(svd, run_dir / "theory_svd.png")
    plot_pca(pca, run_dir / "theory_pca.png")
    plot_order(order, run_dir / "theory_order.png")
    plot_adaptivity(adapt, run_dir / "theory_adaptivity.png")
    result = {"config": asdict(tc), "seed": seed, **summary(svd, pca, order, adapt)}
    (run_dir / "theory.json").write_text(json.dumps(result, indent=2))

    def fmt(values) -> str:
        return " ".join(f"{v:.3g}" for v in values)

    table = Table(title=f"LoD on linear maps ({tc.steps} SGD steps, seed {seed})")
    table.add_column("experiment")
    table.add_column("final numbers")
    table.add_row("(a) SVD, Fig. 2a", f"||W_k - A_k|| / ||A_k||, k=1..{len(svd.final)}: {fmt(svd.final)}")
    table.add_row("(b) PCA, Fig. 2b", f"singular value estimates on the data: {fmt(pca.final)}")
    table.add_row("(c) order, Fig. 6", f"|cos(u_1, u~_3)| = {order.alignment[-1, 0]:.3f}; data loss k=1..3 "
                  f"LoD {fmt(order.lod_loss[:3])} vs SVD {fmt(order.svd_loss[:3])}")
    table.add_row("(d) adaptivity, Fig. 7", f"rank {adapt.rank_before_removal} before the removal at step "
                  f"{adapt.remove_at}, {adapt.final_rank} at the end")
    echo(table)
    diverged = [name for name, values in (("(a) SVD", svd.final), ("(b) PCA", pca.final),
                                          ("(c) order", np.concatenate([order.lod_loss, order.svd_loss])))
                if not np.all(np.isfinite(np.asarray(values, dtype=float)))]
    if diverged:  # SGD blew up: the curves end in NaN (theory.json writes them as null)
        echo(f"theory: SGD diverged in {', '.join(diverged)} (non-finite numbers above); lower theory.lr (now "
             f"{tc.lr:g}) or raise theory.batch_size", style="yellow", markup=False)
    echo(f"plots and theory.json in {run_dir}", markup=False)
    return result
