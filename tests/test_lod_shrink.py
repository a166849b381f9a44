"""HGL (penalty, gradient, proximal step), importance, physical shrinking with optimizer state,
truncation, merging back to dense, and checkpoints at shrunk ranks.

Tolerances: float64 comparisons with an independent formula use 1e-10 (sums of < 100 terms of
size O(1): rounding is ~1e-14). "Exact" claims (training after a shrink equals training a model
built small) are checked bitwise with ``torch.equal``: the same float32 operations in the same order.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmaestro import lod

TOL = dict(rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net(seed=0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.ReLU(),
                          nn.Linear(6, 3))
    return lod.factorize(model.to(dtype))


def _naive_hgl(model: nn.Module) -> torch.Tensor:
    """sum_i sum_{b=1..r_i} ||U_{:,b:}||_F + ||V_{:,b:}||_F, straight from the definition.

    A group that is exactly zero adds 0 and is left out of the sum, so autograd gives it the
    subgradient 0 (the norm has no derivative there; 0 is the choice HGL documents).
    """
    total = torch.zeros((), dtype=torch.float64)
    for _, layer in lod.layers(model):
        u, v = layer.factors()  # (out, r), (fan_in, r)
        for b in range(layer.rank):
            for group in (u[:, b:], v[:, b:]):
                if group.any():
                    total = total + torch.linalg.norm(group)
    return total


# --- HGL penalty ---------------------------------------------------------------------------------

def test_hgl_penalty_on_a_hand_example():
    layer = lod.LoDLinear(2, 2, bias=False).double()
    with torch.no_grad():
        layer.u.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # U columns (3, 0) and (0, 4)
        layer.v.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))  # V columns (0, 1) and (0, 0)
    model = nn.Sequential(layer)
    # U: ||(3, 4)|| + ||4|| = 5 + 4; V: ||1|| + 0 = 1
    assert lod.hgl_penalty(model).item() == pytest.approx(10.0, abs=1e-12)


@pytest.mark.parametrize("zero_tail", [False, True])
def test_hgl_penalty_and_gradient_equal_the_naive_formula_and_its_autograd(zero_tail):
    model = _net(dtype=torch.float64)
    lod.truncate(model, {"3": 4})  # ranks differ across layers: 4, 4, 3
    if zero_tail:
        with torch.no_grad():
            model[5].v[1:] = 0  # groups that are exactly zero: subgradient 0, never NaN
    params = [p for _, l in lod.layers(model) for p in (l.u, l.v)]
    fast = lod.hgl_penalty(model)
    naive = _naive_hgl(model)
    torch.testing.assert_close(fast, naive, **TOL)
    fast_grads = torch.autograd.grad(fast, params)
    naive_grads = torch.autograd.grad(naive, params)
    for got, want in zip(fast_grads, naive_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL)
    if zero_tail:
        assert not fast_grads[-1][1:].any()


def test_hgl_penalty_with_tails_on_a_hand_example():
    layer = lod.LoDLinear(2, 2, bias=False).double()
    with torch.no_grad():
        layer.u.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        layer.v.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    model = nn.Sequential(layer)
    # beyond the two columns: 11 more in U's squared norm, 8 in V's. U: sqrt(25 + 11) + sqrt(16 + 11);
    # V: sqrt(1 + 8) + sqrt(0 + 8)
    want = 6.0 + 27 ** 0.5 + 3.0 + 8 ** 0.5
    assert lod.hgl_penalty(model, {"0": (11.0, 8.0)}).item() == pytest.approx(want, abs=1e-12)


def test_hgl_penalty_of_a_prefix_with_tails_has_the_global_penalty_gradient():
    # a client holding the first 3 of 5 columns, told the squared norms of the other 2, trains with the gradient of
    # the global model's penalty (every group over all 5 columns) with respect to the columns it holds
    torch.manual_seed(0)
    glob = nn.Sequential(lod.LoDLinear(6, 4, bias=False).double())
    u, v = glob[0].u.detach(), glob[0].v.detach()
    with torch.no_grad():
        v[1] = 0  # a zero column inside the prefix: its groups still have the tail's norm
    client = nn.Sequential(lod.LoDLinear(6, 4, bias=False).double())
    lod.truncate(client, {"0": 3})
    with torch.no_grad():
        client[0].u.copy_(u[:3])
        client[0].v.copy_(v[:3])
    tails = {"0": (float(u[3:].square().sum()), float(v[3:].square().sum()))}
    got = lod.hgl_penalty(client, tails)
    params = [glob[0].u, glob[0].v]
    want_value = sum(torch.linalg.norm(f[b:]) for f in params for b in range(3))  # the groups starting in the prefix
    torch.testing.assert_close(got, want_value, **TOL)
    want = torch.autograd.grad(_naive_hgl(glob), params)
    for g, w in zip(torch.autograd.grad(got, [client[0].u, client[0].v]), want):
        torch.testing.assert_close(g, w[:3], **TOL)
    # without the tails the prefix's last columns form groups of their own, which push harder
    alone = torch.autograd.grad(lod.hgl_penalty(client), [client[0].u])[0]
    assert alone[2].norm() > want[0][2].norm()


def test_hgl_penalty_refuses_bad_tails():
    model = _net()
    with pytest.raises(ValueError, match=r"not LoD layers.*\['0', '3', '5'\]"):
        lod.hgl_penalty(model, {"fc9": (1.0, 1.0)})
    with pytest.raises(ValueError, match="finite squared norms >= 0"):
        lod.hgl_penalty(model, {"3": (-1.0, 0.0)})


def test_hgl_penalty_of_a_model_without_lod_layers_is_zero():
    assert lod.hgl_penalty(nn.Linear(3, 2)).item() == 0.0


# --- HGL proximal step -----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: lod.LoDLinear(2, 2, bias=False),
                                  lambda: lod.LoDConv2d(1, 2, (1, 2), bias=False)],  # V (rank, 1, 1, 2): 4-D rows
                         ids=["linear", "conv"])
def test_proximal_step_on_a_hand_example(make):
    """Rows (columns of U) c1 = (3, 0), c2 = (0, 1/2), threshold 1.

    Smallest group first: ||c2|| = 1/2 <= 1 -> c2 = 0 (an exact zero). Then G1 = (c1, 0):
    ||G1|| = 3 -> scaled by 1 - 1/3: c1 = (2, 0).
    """
    layer = make().double()
    with torch.no_grad():
        layer.u.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
        layer.v.copy_(torch.tensor([[0.0, 6.0], [8.0, 0.0]]).view(layer.v.shape))
    lod.hgl_proximal_step(nn.Sequential(layer), 1.0)
    assert layer.u.tolist() == [[2.0, 0.0], [0.0, 0.0]]
    # V: c2 = (8, 0) -> (7, 0); G1 = ((0, 6), (7, 0)), norm sqrt(85) -> both scaled by 1 - 1/sqrt(85)
    s = 1 - 1 / math.sqrt(85)
    torch.testing.assert_close(layer.v.reshape(2, 2), torch.tensor([[0.0, 6 * s], [7 * s, 0.0]], dtype=torch.float64),
                               **TOL)


def test_proximal_step_is_the_exact_prox():
    """prox(x) minimises t * HGL(z) + ||z - x||^2 / 2: no perturbation of the result does better."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    layer = lod.LoDLinear(5, 4, bias=False).double()
    model = nn.Sequential(layer)
    t = 0.6
    x = (layer.u.detach().clone(), layer.v.detach().clone())
    lod.hgl_proximal_step(model, t)

    def objective(u, v):
        probe = lod.LoDLinear(5, 4, bias=False).double()
        with torch.no_grad():
            probe.u.copy_(u)
            probe.v.copy_(v)
        return (t * lod.hgl_penalty(nn.Sequential(probe)) + ((u - x[0]) ** 2).sum() / 2
                + ((v - x[1]) ** 2).sum() / 2).item()

    best = objective(layer.u.detach(), layer.v.detach())
    for _ in range(200):
        du = 1e-3 * torch.randn(layer.u.shape, generator=gen, dtype=torch.float64)
        dv = 1e-3 * torch.randn(layer.v.shape, generator=gen, dtype=torch.float64)
        assert objective(layer.u.detach() + du, layer.v.detach() + dv) >= best - 1e-12


def test_proximal_step_gives_exact_zeros_and_zero_threshold_is_a_no_op():
    model = _net(dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    lod.hgl_proximal_step(model, 0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    threshold = 1.01 * model[5].u[-1].norm().item()  # the last group of U in layer 5 falls below it
    lod.hgl_proximal_step(model, threshold)
    assert not model[5].u[-1].any()  # an exact zero, which the subgradient form never produces
    for _, layer in lod.layers(model):
        for factor in (layer.u, layer.v):
            zero = (factor.reshape(layer.rank, -1) == 0).all(1)
            # nested groups: once a row is zero, every later row is zero too
            assert torch.equal(zero, zero.cummax(0).values)


# --- importance and shrinking ------------------------------------------------------------------------

def _hand_layer() -> lod.LoDLinear:
    layer = lod.LoDLinear(3, 2, bias=True).double()
    with torch.no_grad():
        layer.u.copy_(torch.tensor([[2.0, 0.0], [0.0, 1e-3]]))  # U columns (2, 0), (0, 1e-3)
        layer.v.copy_(torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 1e-3]]))  # V columns (1, 2, 2), (0, 0, 1e-3)
    return layer


def test_importance_on_a_hand_example():
    imp = lod.importance(_hand_layer())
    # b = 1: ||U|| ||V|| = sqrt(4 + 1e-6) sqrt(9 + 1e-6); b = 2: 1e-3 * 1e-3
    torch.testing.assert_close(imp, torch.tensor([math.sqrt(4 + 1e-6) * math.sqrt(9 + 1e-6), 1e-6],
                                                 dtype=torch.float64), **TOL)


def test_importance_of_a_conv_layer_counts_every_kernel_position():
    layer = lod.LoDConv2d(1, 2, (1, 2), bias=False).double()  # V rows are (1, 1, 2) kernels
    with torch.no_grad():
        layer.u.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        layer.v.copy_(torch.tensor([[1.0, 2.0], [0.0, 3.0]]).view(layer.v.shape))
    # b = 1: ||U|| ||V|| = sqrt(1 + 4) sqrt(1 + 4 + 9); b = 2: 2 * 3
    torch.testing.assert_close(lod.importance(layer), torch.tensor([math.sqrt(5) * math.sqrt(14), 6.0],
                                                                   dtype=torch.float64), **TOL)
    assert lod.shrink(nn.Sequential(layer), 6.0) == {"0": 1}  # importance 6 <= eps: cut to b - 1 = 1


def test_shrink_cuts_at_the_first_importance_below_eps():
    torch.manual_seed(0)
    model = nn.Sequential(_hand_layer(), nn.ReLU(), lod.LoDLinear(2, 2).double())
    x = torch.randn(4, 3, dtype=torch.float64)
    assert lod.shrink(model, 1e-7) == {"0": 2, "2": 2}  # 1e-6 > eps: nothing cut
    model[0].active_rank = 1
    at_rank_one = model(x)
    model[0].active_rank = None
    assert lod.shrink(model, 2e-6) == {"0": 1, "2": 2}  # importance 1e-6 <= eps: r = b - 1
    assert model[0].u.shape == (1, 2) and model[0].v.shape == (1, 3)
    assert torch.equal(model(x), at_rank_one)
    with torch.no_grad():
        model[2].u.zero_()
    assert lod.shrink(model, 0.0) == {"0": 1, "2": 0}  # all-zero layer: rank 0, still runs
    assert model(x).shape == (4, 2)


def test_shrink_compares_importance_with_eps_in_float64():
    # float16 factors whose tail columns are 1e-5: importance 8e-10 > 0, which float16 rounds to 0
    layer = lod.LoDLinear(4, 4, bias=False).half()
    with torch.no_grad():
        layer.u[2:] = layer.v[2:] = 1e-5
    assert lod.shrink(nn.Sequential(layer), 0.0) == {"0": 4}
    assert lod.shrink(nn.Sequential(layer), 1e-9) == {"0": 2}


def test_shrinking_a_zero_tail_changes_no_output():
    model = _net(dtype=torch.float64)
    with torch.no_grad():
        model[3].u[3:] = 0  # U's columns 4.. of the middle linear are zero
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    before = model(x)
    ranks = lod.shrink(model, 0.0)
    assert ranks == {"0": 4, "3": 3, "5": 3}
    torch.testing.assert_close(model(x), before, **TOL)


def _train(model, opt, batches, sampler_ranks=None):
    for i, (x, y) in enumerate(batches):
        if sampler_ranks is not None:
            for (_, layer), b in zip(lod.layers(model), sampler_ranks[i]):
                layer.active_rank = b
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + 1e-3 * lod.hgl_penalty(model)
        loss.backward()
        opt.step()
    return loss


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
], ids=["sgd-momentum", "adam", "adamw-amsgrad"])
def test_training_after_shrink_equals_training_a_model_built_small(make_opt):
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 2, 5, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(6)]
    model = _net(seed=2)
    opt = make_opt(model.parameters())
    loss = _train(model, opt, batches[:3], sampler_ranks=[(2, None, 1), (None, 3, None), (4, 1, 2)])
    cut = {"0": 2, "3": 3, "5": 1}
    before = {name: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
              for name, p in model.named_parameters()}
    lod.truncate(model, cut, opt)  # `loss` (last step's graph) is still alive here on purpose
    # every tensor of the optimizer state is the old one cut to the kept columns (rows 0 .. r-1 of a factor)
    for name, p in model.named_parameters():
        layer, kind = name.rsplit(".", 1)
        state = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}
        assert set(state) == set(before[name]) and state, name
        for key, value in state.items():
            old = before[name][key]
            want = old[:cut[layer]] if kind in ("u", "v") and old.ndim else old
            assert value.shape == (p.shape if old.ndim else old.shape) and torch.equal(value, want), (name, key)

    # the reference: a model built at the small ranks from the sliced weights and sliced state
    small = _net(seed=3)
    lod.truncate(small, cut)
    small.load_state_dict(model.state_dict())
    small_opt = make_opt(small.parameters())
    small_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [p.shape for p in small.parameters()] == [p.shape for p in model.parameters()]

    _train(model, opt, batches[3:], sampler_ranks=[(1, 2, None), (None, None, None), (2, 3, 1)])
    _train(small, small_opt, batches[3:], sampler_ranks=[(1, 2, None), (None, None, None), (2, 3, 1)])
    for (name, a), b in zip(model.state_dict().items(), small.state_dict().values()):
        assert torch.equal(a, b), name
    del loss


def test_backward_works_after_shrink_while_the_previous_graph_is_alive():
    """Regression: a live `loss` kept autograd's accumulator of the old shape -> "invalid gradient"."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for _, layer in lod.layers(model):
            layer.u[2:] = 0
    graph_alive = F.cross_entropy(model(x), y)  # a graph built before the shrink, never freed
    assert lod.shrink(model, 0.0, opt) == {"0": 2, "3": 2, "5": 2}
    opt.zero_grad()
    new_loss = F.cross_entropy(model(x), y) + lod.hgl_penalty(model)
    new_loss.backward()
    opt.step()
    assert all(p.grad.shape == p.shape for p in model.parameters())
    del loss, graph_alive  # both stayed alive through the shrink and the new backward


def test_shrink_slices_existing_gradients():
    model = _net()
    F.cross_entropy(model(torch.randn(4, 2, 5, 5)), torch.tensor([0, 1, 2, 0])).backward()
    full_grad = model[3].u.grad.clone()
    lod.truncate(model, {"3": 2})
    assert torch.equal(model[3].u.grad, full_grad[:2])


# --- truncate, to_dense, checkpoints --------------------------------------------------------------

def test_truncate_equals_the_active_rank_and_refuses_bad_requests():
    model = _net(dtype=torch.float64)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    model[0].active_rank, model[3].active_rank = 2, 1
    expected = model(x)
    model[0].active_rank = model[3].active_rank = None
    lod.truncate(model, {"0": 2, "3": 1})
    assert [l.rank for _, l in lod.layers(model)] == [2, 1, 3]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"truncate: \['fc'\] are not LoD layers.*\['0', '3', '5'\]"):
        lod.truncate(model, {"fc": 1})
    with pytest.raises(ValueError, match=r"truncate: 3 has rank 1; cannot cut it to 2"):
        lod.truncate(model, {"3": 2})


def test_truncate_resets_an_active_rank_above_the_new_rank():
    layer = lod.LoDLinear(4, 4)
    layer.active_rank = 3
    lod.truncate(nn.Sequential(layer), {"0": 2})
    assert layer.active_rank is None and layer.rank == 2


def test_to_dense_refuses_a_model_with_active_ranks():
    model = lod.factorize(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)))
    lod.layers(model)[0][1].active_rank = 2
    with pytest.raises(ValueError, match=r"active ranks are set on 0 \(2 of 4\).*lod.truncate"):
        lod.to_dense(model)
    lod.layers(model)[0][1].active_rank = None
    lod.to_dense(model)
    assert isinstance(model[0], nn.Linear)


def test_to_dense_merges_exactly_where_r_m_plus_n_is_at_least_m_n():
    """App. D.4: keep the factors only where they are cheaper than the dense weight."""
    torch.manual_seed(0)
    model = lod.factorize(nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Conv2d(10, 4, 3, padding=1),
                                        nn.Conv2d(4, 6, 3, padding=1)).double())
    # 0: r = 5, 5 * 20 = 100 >= 100 -> dense; 1: r = 4, 80 < 100 -> LoD
    # 2: fan_in 90, out 4: r = 3, 3 * 94 = 282 < 360 -> LoD; 3: fan_in 36, out 6: r = 5, 5 * 42 = 210 < 216 -> LoD
    lod.truncate(model, {"0": 5, "1": 4, "2": 3, "3": 5})
    x = torch.randn(2, 10, dtype=torch.float64)
    linear_out = nn.Sequential(model[0], model[1])(x)
    lod.to_dense(model)
    assert type(model[0]) is nn.Linear and isinstance(model[1], lod.LoDLinear)
    assert isinstance(model[2], lod.LoDConv2d) and isinstance(model[3], lod.LoDConv2d)
    torch.testing.assert_close(nn.Sequential(model[0], model[1])(x), linear_out, **TOL)
    # at r = 6 the last conv costs 6 * 42 = 252 >= 216: merged, same function, stride and padding kept
    model = lod.factorize(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)).double())
    img = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    before = model(img)
    lod.to_dense(model)
    assert type(model[0]) is nn.Conv2d and model[0].stride == (2, 2) and model[0].padding == (1, 1)
    torch.testing.assert_close(model(img), before, **TOL)


def test_a_checkpoint_saved_after_shrinking_reloads_into_a_model_of_those_ranks():
    model = _net()
    lod.truncate(model, {"0": 2, "3": 3, "5": 1})
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _net(seed=7)  # full ranks 4, 6, 3
    fresh.load_state_dict(torch.load(buffer))
    assert [l.rank for _, l in lod.layers(fresh)] == [2, 3, 1]
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(fresh(x), model(x))
    fresh(x).sum().backward()  # the reloaded factors train
    assert fresh[3].u.grad.shape == (3, 6)


def test_a_checkpoint_with_a_rank_above_the_layer_maximum_is_refused():
    state = lod.LoDLinear(8, 8).state_dict()  # rank 8
    with pytest.raises(ValueError, match=r"u: a checkpoint rank of 8 exceeds min\(out, fan_in\) = 4"):
        lod.LoDLinear(4, 8).load_state_dict(state)
