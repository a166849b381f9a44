"""LoD layers and kernels against hand-computed values and explicit rank-b products.

Tolerances: float64 throughout where values are compared with an independent formula, so a
mismatch of more than ~1e-10 relative is a bug, not rounding (every product here sums fewer than
10^3 terms of size O(1): rounding stays below 1e-13). float32 only where a test needs bitwise
equality (the same operations in the same order) and then compares with ``torch.equal``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from fedmaestro import lod
from fedmaestro.lod import kernels
from fedmaestro.lod.layers import svd_factors

TOL = dict(rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _explicit_weight(layer: lod.LoDLayer, b: int) -> torch.Tensor:
    """sum_{j < b} U[:, j] V[:, j]^T, column by column (independent of dense_weight's matmul)."""
    u, v = layer.factors()  # (out, rank), (fan_in, rank)
    w = torch.zeros(layer.out_dim, layer.fan_in, dtype=u.dtype)
    for j in range(b):
        w += torch.outer(u[:, j], v[:, j])
    return w.reshape(layer.out_dim, *layer.v_shape_tail)


# --- forward at active rank b = the explicit rank-b product -------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("b", [1, 3, 5])
def test_linear_forward_at_rank_b_is_the_rank_b_product(bias, b):
    layer = lod.LoDLinear(7, 5, bias=bias).double()
    x = _randn(4, 3, 7, seed=1)  # extra leading axis: (..., in)
    layer.active_rank = b
    expected = x @ _explicit_weight(layer, b).T + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, **TOL)
    assert layer(x).shape == (4, 3, 5)


CONV_CASES = [  # (in, out, kernel, stride, padding, dilation, input size)
    (3, 6, 3, 1, 1, 1, (9, 9)),      # the usual 3x3 'same' conv
    (3, 6, 3, 2, 1, 1, (9, 8)),      # stride 2, odd/even sizes
    (2, 5, (3, 2), (1, 2), (2, 0), 1, (7, 6)),  # rectangular kernel, per-axis stride/padding
    (4, 6, 3, 1, 2, 2, (8, 8)),      # dilation 2
    (4, 3, 3, 1, 0, 1, (6, 6)),      # no padding
    (3, 4, 3, 1, "same", 1, (7, 5)),  # string padding (symmetric)
    (3, 4, 2, 1, "same", 1, (5, 5)),  # 'same' with an even kernel: asymmetric, the plain path
    (3, 4, 3, 1, "valid", 1, (5, 5)),
    (18, 5, 3, 1, 1, 1, (6, 6)),     # many input channels: the kn2row path for small b
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forward_at_rank_b_is_the_rank_b_conv(case, bias):
    cin, cout, k, stride, padding, dilation, size = case
    layer = lod.LoDConv2d(cin, cout, k, stride, padding, dilation, bias=bias).double()
    x = _randn(2, cin, *size, seed=2)
    for b in sorted({1, 2, layer.rank}):
        layer.active_rank = b
        expected = F.conv2d(x, _explicit_weight(layer, b), layer.bias, stride, padding, dilation)
        torch.testing.assert_close(layer(x), expected, **TOL)


@pytest.mark.parametrize("case", CONV_CASES)
def test_factorized_conv_at_full_rank_is_the_dense_conv(case):
    cin, cout, k, stride, padding, dilation, size = case
    torch.manual_seed(3)
    dense = nn.Conv2d(cin, cout, k, stride, padding, dilation).double()
    model = lod.factorize(nn.Sequential(dense))
    assert isinstance(model[0], lod.LoDConv2d) and model[0].rank == min(cout, cin * dense.weight[0].numel() // cin)
    x = _randn(2, cin, *size, seed=4)
    torch.testing.assert_close(model(x), dense(x), **TOL)


def test_factorized_linear_at_full_rank_is_the_dense_linear_and_factors_are_balanced():
    torch.manual_seed(5)
    dense = nn.Linear(9, 4).double()
    layer = lod.factorize(nn.Sequential(dense))[0]
    x = _randn(3, 9, seed=6)
    torch.testing.assert_close(layer(x), dense(x), **TOL)
    u, v = layer.factors()
    sing = torch.linalg.svdvals(dense.weight)
    # U = U~ sqrt(S), V = V~ sqrt(S): U^T U = V^T V = diag(S)
    torch.testing.assert_close(u.T @ u, torch.diag(sing), **TOL)
    torch.testing.assert_close(v.T @ v, torch.diag(sing), **TOL)


@pytest.mark.parametrize("shape", [(4, 9), (9, 4), (5, 5)])
def test_svd_factors_wide_and_tall_give_the_truncated_svd(shape):
    """The wide case runs LAPACK on W^T (faster); both must give W's own balanced SVD factors."""
    w = _randn(*shape, seed=7)
    left, sing, right_t = torch.linalg.svd(w, full_matrices=False)
    for rank in range(1, min(shape) + 1):
        u, v = svd_factors(w, rank)  # (rank, out), (rank, fan_in)
        assert u.shape == (rank, shape[0]) and v.shape == (rank, shape[1])
        best = left[:, :rank] @ torch.diag(sing[:rank]) @ right_t[:rank]
        torch.testing.assert_close(u.T @ v, best, **TOL)
        torch.testing.assert_close(u @ u.T, torch.diag(sing[:rank]), **TOL)
        torch.testing.assert_close(v @ v.T, torch.diag(sing[:rank]), **TOL)


@pytest.mark.parametrize("dense", [nn.Linear(8, 6), nn.Conv2d(2, 5, 3, padding=1)])
def test_active_rank_b_is_the_truncated_svd_right_after_factorize(dense):
    dense = dense.double()
    w2 = dense.weight.detach().reshape(dense.weight.shape[0], -1)
    left, sing, right_t = torch.linalg.svd(w2, full_matrices=False)
    layer = lod.factorize(nn.Sequential(dense))[0]
    for b in range(layer.rank + 1):
        best = (left[:, :b] * sing[:b]) @ right_t[:b]  # Eckart-Young: the best rank-b approximation
        torch.testing.assert_close(layer.dense_weight(b).reshape_as(w2), best, **TOL)
        layer.active_rank = b
        torch.testing.assert_close(layer.dense_weight().reshape_as(w2), best, **TOL)


def test_forward_at_rank_b_never_reads_columns_beyond_b():
    """Real rank-b cost: NaN in columns >= b cannot reach the output or the gradients."""
    for layer, x in [(lod.LoDLinear(6, 5), _randn(3, 6, seed=8, dtype=torch.float32)),
                     (lod.LoDConv2d(3, 6, 3, padding=1), _randn(2, 3, 5, 5, seed=9, dtype=torch.float32))]:
        with torch.no_grad():
            layer.u[2:] = float("nan")
            layer.v[2:] = float("nan")
        layer.active_rank = 2
        x.requires_grad_(True)
        layer(x).square().sum().backward()
        assert torch.isfinite(x.grad).all()
        assert torch.isfinite(layer.u.grad[:2]).all() and torch.isfinite(layer.v.grad[:2]).all()
        assert torch.equal(layer.u.grad[2:], torch.zeros_like(layer.u.grad[2:]))
        assert torch.equal(layer.v.grad[2:], torch.zeros_like(layer.v.grad[2:]))


# --- rank 0 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_rank_zero_returns_the_bias_with_the_output_shape(bias):
    linear = lod.LoDLinear(4, 3, bias=bias)
    linear.active_rank = 0
    out = linear(torch.randn(2, 5, 4))
    assert out.shape == (2, 5, 3)
    assert torch.equal(out, (linear.bias if bias else torch.zeros(3)).expand(2, 5, 3))
    conv = lod.LoDConv2d(2, 3, 3, stride=2, padding=1, bias=bias)
    conv.active_rank = 0
    out = conv(torch.randn(2, 2, 7, 6))
    assert out.shape == (2, 3, 4, 3)  # floor((7 + 2 - 3) / 2) + 1 = 4, floor((6 + 2 - 3) / 2) + 1 = 3
    expected = conv.bias[:, None, None] if bias else torch.zeros(3, 1, 1)
    assert torch.equal(out, expected.expand(2, 3, 4, 3))
    conv_same = lod.LoDConv2d(2, 3, 3, padding="same", bias=bias)
    conv_same.active_rank = 0
    assert conv_same(torch.randn(1, 2, 5, 4)).shape == (1, 3, 5, 4)


def test_a_layer_truncated_to_rank_zero_still_runs_and_trains_its_bias():
    model = lod.factorize(nn.Sequential(nn.Linear(4, 3)))
    lod.truncate(model, {"0": 0})
    assert model[0].u.shape == (0, 3) and model[0].v.shape == (0, 4)
    out = model(torch.randn(2, 4))
    torch.testing.assert_close(out, model[0].bias.expand(2, 3), rtol=0, atol=0)
    out.sum().backward()
    assert torch.equal(model[0].bias.grad, torch.full((3,), 2.0))


def test_norm_keeping_scale_by_hand():
    assert lod.norm_keeping_scale(4.0, 1.0) == 2.0  # U and V each x2: U V^T x4
    assert lod.norm_keeping_scale(3.0, 3.0) == 1.0
    assert lod.norm_keeping_scale(2.0, 0.0) == 1.0  # nothing left to scale
    with pytest.raises(ValueError, match="norms must be >= 0"):
        lod.norm_keeping_scale(-1.0, 1.0)


def test_a_norm_keeping_cut_keeps_the_frobenius_norm_and_the_direction():
    # W = diag(3, 2, 1) on 3 x 4: the rank-1 cut keeps 3 of ||W||_F = sqrt(14); kept, it is sqrt(14) e1 e1^T
    weight = torch.zeros(3, 4)
    weight[0, 0], weight[1, 1], weight[2, 2] = 3.0, 2.0, 1.0
    plain, kept = (lod.factorize(nn.Sequential(nn.Linear(4, 3))) for _ in range(2))
    for model in (plain, kept):
        model[0].u.data, model[0].v.data = svd_factors(weight, 3)
        model[0].bias.data.fill_(0.5)
    lod.truncate(plain, {"0": 1})
    lod.truncate(kept, {"0": 1}, keep_norm=True)
    expected = torch.zeros(3, 4)
    expected[0, 0] = 3.0
    torch.testing.assert_close(plain[0].dense_weight(), expected)
    expected[0, 0] = 14.0 ** 0.5
    torch.testing.assert_close(kept[0].dense_weight(), expected)
    scale = (14.0 ** 0.5 / 3.0) ** 0.5
    torch.testing.assert_close(kept[0].u, plain[0].u * scale)  # U and V alike: the factors stay balanced
    torch.testing.assert_close(kept[0].v, plain[0].v * scale)
    assert torch.equal(kept[0].bias, torch.full((3,), 0.5))
    untouched = lod.factorize(nn.Sequential(nn.Linear(4, 3)))
    before = untouched[0].u.detach().clone()
    lod.truncate(untouched, {"0": 3}, keep_norm=True)  # no rank falls: nothing scaled
    assert torch.equal(untouched[0].u, before)


# --- fused kernels: gradients equal the plain composition's ---------------------------------------

def _factor_inputs(rank, out, fan_shape, seed):
    u = _randn(rank, out, seed=seed).requires_grad_(True)
    v = _randn(rank, *fan_shape, seed=seed + 1).requires_grad_(True)
    bias = _randn(out, seed=seed + 2).requires_grad_(True)
    return u, v, bias


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_prefix_linear_gradcheck_and_equals_the_reference(b, with_bias):
    u, v, bias = _factor_inputs(4, 3, (5,), seed=10)
    bias = bias if with_bias else None
    x = _randn(2, 3, 5, seed=13).requires_grad_(True)
    assert gradcheck(lambda *a: kernels.prefix_linear(*a, b), (x, u, v, bias))
    inputs = [t for t in (x, u, v, bias) if t is not None]
    g_out = _randn(2, 3, 3, seed=14)
    fused = torch.autograd.grad(kernels.prefix_linear(x, u, v, bias, b), inputs, g_out)
    plain = torch.autograd.grad(kernels.reference_linear(x, u, v, bias, b), inputs, g_out)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, **TOL)
    gu, gv = fused[1], fused[2]
    assert gu.shape == u.shape and gv.shape == v.shape
    assert not gu[b:].any() and not gv[b:].any()  # rows >= b: exactly zero


CONV_KERNEL_CASES = [  # (in, rank, b, kernel, stride, padding, dilation, size, expect kn2row)
    (9, 3, 2, (3, 3), (1, 1), (1, 1), (1, 1), (5, 4), True),    # 9 b = 18 <= 4.5 in
    (9, 3, 2, (3, 3), (1, 1), (0, 0), (1, 1), (5, 5), True),    # no padding
    (8, 3, 1, (3, 2), (1, 1), (2, 0), (2, 1), (6, 5), True),    # dilation, padding <= d (k - 1)
    (4, 3, 3, (3, 3), (1, 1), (1, 1), (1, 1), (5, 4), False),   # 9 b = 27 > 4.5 in = 18: direct conv
    (4, 3, 2, (3, 3), (2, 2), (1, 1), (1, 1), (6, 5), False),   # stride 2: direct conv
    (9, 3, 1, (3, 3), (1, 1), (3, 3), (1, 1), (4, 4), False),   # padding > k - 1: direct conv
]


@pytest.mark.parametrize("case", CONV_KERNEL_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_prefix_conv2d_gradcheck_and_equals_the_reference(case, with_bias, monkeypatch):
    cin, rank, b, k, stride, padding, dilation, size, kn2row = case
    u, v, bias = _factor_inputs(rank, 4, (cin, *k), seed=20)
    bias = bias if with_bias else None
    x = _randn(2, cin, *size, seed=23).requires_grad_(True)
    assert kernels.KN2ROW_MAX_STACKED == 4.5  # the cases below are chosen around this threshold
    monkeypatch.setattr(kernels, "KN2ROW_MIN_PIXELS", 1)  # gradcheck needs tiny images; the rule is tested apart
    assert kernels.use_kn2row(x, v, b, stride, padding, dilation) == kn2row  # the path under test
    assert gradcheck(lambda *a: kernels.prefix_conv2d(*a, b, stride, padding, dilation), (x, u, v, bias))
    inputs = [t for t in (x, u, v, bias) if t is not None]
    y = kernels.prefix_conv2d(x, u, v, bias, b, stride, padding, dilation)
    y_ref = kernels.reference_conv2d(x, u, v, bias, b, stride, padding, dilation)
    torch.testing.assert_close(y, y_ref, **TOL)
    g_out = _randn(*y.shape, seed=24)
    fused = torch.autograd.grad(y, inputs, g_out)
    plain = torch.autograd.grad(y_ref, inputs, g_out)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, **TOL)
    assert not fused[1][b:].any() and not fused[2][b:].any()


def test_prefix_conv2d_trains_on_an_empty_batch():
    u, v, bias = (t.requires_grad_(True) for t in _factor_inputs(3, 4, (2, 3, 3), seed=30))
    x = torch.zeros(0, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    y = kernels.prefix_conv2d(x, u, v, bias, 2, (1, 1), (1, 1), (1, 1))
    assert y.shape == (0, 4, 9, 9)
    y.sum().backward()
    assert not u.grad.any() and not v.grad.any() and not bias.grad.any()


def test_same_padding_with_a_stride_is_refused_as_nn_conv2d_does():
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1 .*give the padding as numbers"):
        lod.LoDConv2d(4, 4, 3, stride=2, padding="same")


@pytest.mark.parametrize("b", [4, 3, 2, 1])
def test_prefix_conv2d_without_autograd_merges_the_kernel_only_where_cheaper(b, monkeypatch):
    # in 2, out 4, 3 x 3: merged when b (4 + 18) >= 72, i.e. b >= 3.3 -> b = 4; b = 3: 66 < 72, factored
    merged = b * (4 + 18) >= 4 * 18
    u, v, bias = _factor_inputs(4, 4, (2, 3, 3), seed=40)
    x = _randn(2, 2, 7, 6, seed=41)
    y_ref = kernels.reference_conv2d(x, u, v, bias, b, (1, 1), (1, 1), (1, 1))
    calls = []
    monkeypatch.setattr(kernels._PrefixConv2d, "apply", lambda *a: calls.append(1) or kernels.reference_conv2d(
        a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]))
    with torch.no_grad():
        y = kernels.prefix_conv2d(x, u, v, bias, b, (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(y, y_ref, **TOL)
    assert bool(calls) == (not merged)
    with torch.enable_grad():  # with autograd: always the factored kernel
        kernels.prefix_conv2d(x, u.requires_grad_(), v, bias, b, (1, 1), (1, 1), (1, 1))
    assert len(calls) == 1 + (not merged)


def test_kn2row_only_on_large_output_feature_maps():
    v = torch.zeros(16, 64, 3, 3)  # 9 b <= 4.5 in for b <= 32
    for size, expected in ((32, True), (30, False), (16, False), (4, False)):  # 'same' padding: output = input
        x = torch.zeros(1, 64, size, size)
        assert kernels.use_kn2row(x, v, 16, (1, 1), (1, 1), (1, 1)) is expected, size
    x = torch.zeros(1, 64, 34, 34)  # no padding: 32 x 32 outputs
    assert kernels.use_kn2row(x, v, 16, (1, 1), (0, 0), (1, 1)) and not kernels.use_kn2row(x, v, 16, (2, 2), (0, 0),
                                                                                          (1, 1))


def test_kn2row_chunks_of_a_large_batch_agree_with_one_chunk(monkeypatch):
    """Many images split into chunks (buffer reuse) give the same values as one chunk."""
    monkeypatch.setattr(kernels, "KN2ROW_MIN_PIXELS", 1)  # 5 x 5 images through kn2row
    u, v, bias = _factor_inputs(3, 4, (9, 3, 3), seed=30)
    x = _randn(7, 9, 5, 5, seed=33).requires_grad_(True)
    args = (2, (1, 1), (1, 1), (1, 1))
    y_one = kernels.prefix_conv2d(x, u, v, bias, *args)
    grads_one = torch.autograd.grad(y_one.square().sum(), (x, u, v, bias))
    image_bytes = 2 * 9 * 25 * x.element_size()
    monkeypatch.setattr(kernels, "KN2ROW_CHUNK_BYTES", 3 * image_bytes)  # chunks of 3, 3, 1 images
    assert kernels._chunks(7, image_bytes)[1] == [(0, 3), (3, 6), (6, 7)]
    y_chunked = kernels.prefix_conv2d(x, u, v, bias, *args)
    grads_chunked = torch.autograd.grad(y_chunked.square().sum(), (x, u, v, bias))
    torch.testing.assert_close(y_chunked, y_one, **TOL)
    for got, want in zip(grads_chunked, grads_one):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("layer_and_x", [
    (lambda: lod.LoDLinear(6, 4), (3, 6)),
    (lambda: lod.LoDConv2d(9, 4, 3, padding=1), (2, 9, 5, 5)),
])
def test_layer_gradients_rows_beyond_the_active_rank_are_zero(layer_and_x):
    make, shape = layer_and_x
    layer = make().double()
    layer.active_rank = 2
    x = _randn(*shape, seed=40).requires_grad_(True)
    layer(x).square().sum().backward()
    assert layer.u.grad.shape == layer.u.shape and layer.v.grad.shape == layer.v.shape
    assert not layer.u.grad[2:].any() and not layer.v.grad[2:].any()
    assert layer.u.grad[:2].abs().sum() > 0 and layer.v.grad[:2].abs().sum() > 0


# --- bad input: clear ValueErrors -----------------------------------------------------------------

def test_rank_above_min_dimension_is_refused():
    with pytest.raises(ValueError, match=r"LoDLinear: rank must be in \[0, min\(out, fan_in\)\] = \[0, 4\].*rank=5"):
        lod.LoDLinear(6, 4, rank=5)
    with pytest.raises(ValueError, match=r"LoDConv2d: .*\[0, 18\].*rank=19"):
        lod.LoDConv2d(2, 20, 3, rank=19)  # fan_in = 2 * 3 * 3 = 18
    with pytest.raises(ValueError, match="rank"):
        lod.LoDLinear(6, 4, rank=-1)


def test_active_rank_above_rank_is_refused():
    layer = lod.LoDLinear(6, 4, rank=3)
    with pytest.raises(ValueError, match=r"active_rank must be None or in \[0, rank\] = \[0, 3\], got 4"):
        layer.active_rank = 4
    with pytest.raises(ValueError, match="got -1"):
        layer.active_rank = -1
    layer.active_rank = 3
    assert layer.active_rank == 3


def test_factorize_refuses_a_model_with_nothing_to_factorize_and_unknown_skip_names():
    with pytest.raises(ValueError, match="nothing to factorize"):
        lod.factorize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"skip names \['head', '1.0'\] match no module"):
        lod.factorize(model, skip=["head", "0", "1.0"])
    with pytest.raises(ValueError, match="nothing to factorize"):
        lod.factorize(model, skip=["0", "2"])
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2]))  # refused calls change nothing


def test_grouped_conv_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 8, 3, groups=2)))
    with pytest.raises(ValueError, match=r"factorize: 1\.1 is a grouped conv \(groups=2\).*skip"):
        lod.factorize(model)
    model = lod.factorize(model, skip=["1.1"])  # the advertised fix works
    assert isinstance(model[0], lod.LoDConv2d) and type(model[1][1]) is nn.Conv2d


def test_factorize_skip_covers_submodules_and_layers_lists_module_order():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    lod.factorize(model, skip=["1"])
    assert [n for n, _ in lod.layers(model)] == ["0", "2"]
    assert type(model[1][0]) is nn.Linear and type(model[1][1]) is nn.Linear


# --- samplers ---------------------------------------------------------------------------------------

def _sampler_model(ranks=(3, 2, 4)):
    model = nn.Sequential(*[lod.LoDLinear(5, 5, rank=r) for r in ranks])
    return model, lod.layers(model)


def _drawn(named_layers) -> list[tuple[str, int]]:
    return [(n, l.active_rank) for n, l in named_layers if l.active_rank is not None]


def test_per_layer_draws_every_pair_exactly_once_per_cycle_reshuffled_and_seeded():
    model, named = _sampler_model()
    total = 3 + 2 + 4
    all_pairs = {(n, b) for n, l in named for b in range(1, l.rank + 1)}
    sampler = lod.RankSampler(model, "per_layer", seed=1)
    cycles = []
    for _ in range(4):
        cycle = []
        for _ in range(total):
            sampler.step()
            drawn = _drawn(named)
            assert len(drawn) == 1  # one layer sampled, the others at full rank (None)
            cycle.append(drawn[0])
        assert sorted(cycle) == sorted(all_pairs)  # without replacement: each pair once
        cycles.append(cycle)
    assert len({tuple(c) for c in cycles}) > 1  # reshuffled each cycle (4 equal orders: p = 1/9!^3)
    again = lod.RankSampler(model, "per_layer", seed=1)
    replay = []
    for _ in range(4 * total):
        again.step()
        replay.append(_drawn(named)[0])
    assert replay == [p for c in cycles for p in c]  # seeded: same seed, same draws
    other = lod.RankSampler(model, "per_layer", seed=2)
    different = []
    for _ in range(total):
        other.step()
        different.append(_drawn(named)[0])
    assert different != cycles[0]


def test_per_layer_respects_caps_and_keeps_other_layers_at_their_caps():
    model, named = _sampler_model()  # ranks 3, 2, 4
    sampler = lod.RankSampler(model, "per_layer", caps={"0": 2, "2": 1}, seed=0)
    # One step = every layer at its cap (None where the cap is the rank), one pair (layer, b) set.
    base = {"0": 2, "1": None, "2": 1}
    pairs = [("0", 1), ("0", 2), ("1", 1), ("1", 2), ("2", 1)]  # all b <= cap: sum of caps = 5
    expected = sorted(tuple(-1 if r is None else r for r in {**base, n: b}.values()) for n, b in pairs)
    for _ in range(3):
        cycle = []
        for _ in range(len(pairs)):
            sampler.step()
            cycle.append(tuple(-1 if l.active_rank is None else l.active_rank for _, l in named))
        assert sorted(cycle) == expected


def test_per_layer_drops_pairs_above_a_rank_that_shrank_mid_cycle():
    model, named = _sampler_model((3, 2))
    sampler = lod.RankSampler(model, "per_layer", seed=0)
    sampler.step()
    lod.truncate(model, {"0": 1})
    seen = []
    for _ in range(20):
        sampler.step()
        seen.append(_drawn(named)[0])
    assert all(not (n == "0" and b > 1) for n, b in seen)
    assert set(seen) == {("0", 1), ("1", 1), ("1", 2)}


def test_across_layers_draws_every_layer_within_its_cap():
    model, named = _sampler_model()
    caps = {"2": 2}
    sampler = lod.RankSampler(model, "across_layers", caps=caps, seed=0)
    seen = {n: set() for n, _ in named}
    for _ in range(200):
        sampler.step()
        for n, l in named:
            assert l.active_rank is not None and 1 <= l.active_rank <= caps.get(n, l.rank)
            seen[n].add(l.active_rank)
    assert seen == {"0": {1, 2, 3}, "1": {1, 2}, "2": {1, 2}}
    # uniform over 1..cap for every layer, independently: 6,000 draws, each frequency within 5 sigma of 1/cap
    sampler = lod.RankSampler(model, "across_layers", seed=1)
    draws, counts = 6000, {n: np.zeros(l.rank + 1) for n, l in named}
    joint = np.zeros((named[0][1].rank + 1, named[1][1].rank + 1))
    for _ in range(draws):
        sampler.step()
        for n, l in named:
            counts[n][l.active_rank] += 1
        joint[named[0][1].active_rank, named[1][1].active_rank] += 1
    for n, l in named:
        p = 1 / l.rank
        assert np.all(np.abs(counts[n][1:] / draws - p) < 5 * np.sqrt(p * (1 - p) / draws)), (n, counts[n])
    q = 1 / (named[0][1].rank * named[1][1].rank)  # independent layers: every pair equally often
    assert np.all(np.abs(joint[1:, 1:] / draws - q) < 5 * np.sqrt(q * (1 - q) / draws)), joint


@pytest.mark.parametrize("mode", ["fixed", "none"])
def test_fixed_and_none_sit_at_the_caps(mode):
    model, named = _sampler_model()
    sampler = lod.RankSampler(model, mode, caps={"1": 1, "2": 9})  # a cap above the rank is the rank
    for _ in range(3):
        sampler.step()
        assert [l.active_rank for _, l in named] == [None, 1, None]
    plain = lod.RankSampler(model, mode)
    plain.step()
    assert [l.active_rank for _, l in named] == [None, None, None]


def test_sampler_refuses_unknown_modes_and_cap_names():
    model, _ = _sampler_model()
    with pytest.raises(ValueError, match=r"unknown mode 'random'.*per_layer"):
        lod.RankSampler(model, "random")
    with pytest.raises(ValueError, match=r"caps name \['fc'\]"):
        lod.RankSampler(model, "per_layer", caps={"fc": 1})


def test_sampler_state_dict_resumes_the_same_draws():
    model, named = _sampler_model()
    sampler = lod.RankSampler(model, "per_layer", seed=3)
    for _ in range(4):
        sampler.step()
    state = sampler.state_dict()
    expected = []
    for _ in range(12):
        sampler.step()
        expected.append(_drawn(named)[0])
    resumed = lod.RankSampler(model, "per_layer", seed=99)
    resumed.load_state_dict(state)
    got = []
    for _ in range(12):
        resumed.step()
        got.append(_drawn(named)[0])
    assert got == expected


def test_full_rank_context_restores_the_active_ranks():
    model, named = _sampler_model()
    named[1][1].active_rank = 1
    with lod.full_rank(model):
        assert [l.active_rank for _, l in named] == [None, None, None]
    assert [l.active_rank for _, l in named] == [None, 1, None]
