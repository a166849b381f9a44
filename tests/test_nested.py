"""fedmaestro.nested: rank axes, prefixes, validation and column-wise aggregation, against hand-computed values.

Prepare / execute / assert, with small integer-valued arrays so every expected value is exact; the
one tolerance (float32 round trip of values like 2.75) is exact too, so comparisons use ==.
"""

import numpy as np
import pytest
import torch
from torch import nn

from fedmaestro import lod, nested


def _u(rows):  # a (rank, 2) factor whose row j is rows[j]
    return np.array(rows, dtype=np.float32)


# --- aggregate ----------------------------------------------------------------------------------------
def test_aggregate_columns_weighted_over_the_replies_that_hold_them():
    # Prepare: global u has rank 4; client A (weight 1) holds 2 rank components, client B (weight 3) holds 3.
    current = {"l.u": _u([[100, 100], [100, 100], [100, 100], [100, 100]]), "l.bias": np.array([0.0, 0.0], np.float32)}
    a = {"l.u": _u([[1, 2], [3, 4]]), "l.bias": np.array([1.0, 5.0], np.float32)}
    b = {"l.u": _u([[5, 6], [7, 8], [9, 10]]), "l.bias": np.array([3.0, 1.0], np.float32)}
    axes = {"l.u": 0, "l.bias": None}
    # Execute
    out = nested.aggregate(current, [(a, 1.0), (b, 3.0)], axes)
    # Assert: component 0: (1*[1,2] + 3*[5,6]) / 4 = [4, 5]; component 1: (1*[3,4] + 3*[7,8]) / 4 = [6, 7];
    # component 2: only B holds it -> [9, 10]; component 3: nobody -> keeps the global [100, 100].
    assert out["l.u"].tolist() == [[4, 5], [6, 7], [9, 10], [100, 100]]
    # no rank axis: weighted mean of all: (1*[1,5] + 3*[3,1]) / 4 = [2.5, 2]
    assert out["l.bias"].tolist() == [2.5, 2.0]
    assert out["l.u"].dtype == np.float32 and out["l.bias"].dtype == np.float32


def test_aggregate_rank_axis_other_than_zero():
    current = {"w": np.full((2, 3), 9.0)}
    out = nested.aggregate(current, [({"w": np.array([[1.0], [2.0]])}, 1.0), ({"w": np.array([[3.0, 4.0], [5.0, 6.0]])}, 1.0)],
                           {"w": 1})
    assert out["w"].tolist() == [[2.0, 4.0, 9.0], [3.5, 6.0, 9.0]]


def test_aggregate_of_identical_replies_returns_them():
    rng = np.random.default_rng(0)
    current = {"u": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    reply = {"u": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    out = nested.aggregate(current, [(reply, 2.0), (reply, 7.0), (reply, 1.0)], {"u": 0, "b": None})
    for k in reply:  # float64 mean of equal float32 values cast back to float32 is exact
        np.testing.assert_array_equal(out[k], reply[k])


def test_aggregate_integer_counters_stay_integers():
    current = {"bn.num_batches_tracked": np.array(0, dtype=np.int64)}
    out = nested.aggregate(current, [({"bn.num_batches_tracked": np.array(10, np.int64)}, 1.0),
                                     ({"bn.num_batches_tracked": np.array(13, np.int64)}, 1.0)],
                           {"bn.num_batches_tracked": None})
    assert out["bn.num_batches_tracked"].dtype == np.int64 and int(out["bn.num_batches_tracked"]) == 12  # rint(11.5)


def test_aggregate_without_replies_copies_current():
    current = {"u": np.ones((2, 2), np.float32)}
    out = nested.aggregate(current, [], {"u": 0})
    assert out["u"].tolist() == [[1, 1], [1, 1]] and out["u"] is not current["u"]


@pytest.mark.parametrize("reply, weight, match", [
    ({"u": np.zeros((5, 2))}, 1.0, r"u has shape \(5, 2\), expected \(4, 2\)"),  # longer than the global rank
    ({"u": np.zeros((2, 3))}, 1.0, r"u has shape \(2, 3\), expected \(2, 2\)"),  # trailing axis differs
    ({}, 1.0, r"missing arrays \['u'\]"),
    ({"u": np.zeros((2, 2)), "x": np.zeros(1)}, 1.0, r"unexpected arrays \['x'\]"),
    ({"u": np.zeros((2, 2))}, 0.0, "weights sum to 0"),
    ({"u": np.zeros((2, 2))}, float("nan"), "finite"),
    ({"u": np.zeros((2, 2))}, -1.0, ">= 0"),
])
def test_aggregate_rejects_replies_that_do_not_fit(reply, weight, match):
    with pytest.raises(ValueError, match=match):
        nested.aggregate({"u": np.zeros((4, 2))}, [(reply, weight)], {"u": 0})


def test_aggregate_needs_an_axis_entry_for_every_array():
    with pytest.raises(ValueError, match=r"rank_axes has no entry for \['b'\]"):
        nested.aggregate({"u": np.zeros((2, 2)), "b": np.zeros(2)}, [], {"u": 0})


# --- rank axes and layouts --------------------------------------------------------------------------
class _Holder(nn.Module):
    """A plain module with parameters named like an LoD layer's factors (keys ``extra.u``, ``extra.v``)."""

    def __init__(self):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(3, 5))
        self.v = nn.Parameter(torch.zeros(3, 4))


class _Named(nn.Module):
    """A dense Linear named ``u``, a module holding parameters ``u`` / ``v`` and a BatchNorm beside an LoD layer:
    names must not decide rank axes."""

    def __init__(self):
        super().__init__()
        self.u = nn.Linear(4, 3)
        self.fc = nn.Linear(3, 5)
        self.bn = nn.BatchNorm1d(5)
        self.extra = _Holder()


def test_rank_axes_find_lod_layers_by_type_not_by_name():
    model = lod.factorize(_Named(), skip=["u"])
    axes = nested.Layout.of(model).axes
    assert axes["fc.u"] == 0 and axes["fc.v"] == 0
    assert axes["u.weight"] is None and axes["u.bias"] is None and axes["fc.bias"] is None
    assert axes["bn.running_mean"] is None and axes["bn.num_batches_tracked"] is None
    assert axes["extra.u"] is None and axes["extra.v"] is None  # named like factors, not an LoD layer's
    assert list(axes) == list(model.state_dict())  # every array, in state-dict order
    assert nested.Layout.of(model).layers == {"fc": ("fc.u", "fc.v")}


def test_prefix_cuts_lod_layers_only():
    model = lod.factorize(_Named(), skip=["u"])
    layout = nested.Layout.of(model)
    state = nested.state_arrays(model)
    out = nested.prefix(state, {"fc": 2}, layout)
    assert out["fc.u"].shape == (2, 5) and out["fc.v"].shape == (2, 3)
    np.testing.assert_array_equal(out["fc.u"], state["fc.u"][:2])
    assert out["u.weight"] is state["u.weight"] and out["bn.running_var"] is state["bn.running_var"]
    assert layout.shapes(state, {"fc": 2})["fc.v"] == (2, 3)
    assert layout.ranks(out) == {"fc": 2}
    with pytest.raises(ValueError, match=r"cap 4 for fc is outside \[0, 3\]"):
        nested.prefix(state, {"fc": 4}, layout)
    with pytest.raises(ValueError, match=r"not LoD layers"):
        nested.prefix(state, {"u": 1}, layout)


def test_beyond_caps_sq_is_the_squared_norm_of_the_components_a_client_does_not_hold():
    model = lod.factorize(_Named(), skip=["u"])
    layout = nested.Layout.of(model)
    state = {name: np.array(a, copy=True) for name, a in nested.state_arrays(model).items()}
    state["fc.u"] = np.array([[1.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0], [3.0, 0, 0, 0, 4.0]], dtype=np.float32)
    state["fc.v"] = np.array([[1.0, 1.0, 1.0], [0, 0, 2.0], [0, 0, 0]], dtype=np.float32)
    assert nested.beyond_caps_sq(state, {"fc": 1}, layout) == {"fc": (4.0 + 9.0 + 16.0, 4.0)}
    assert nested.beyond_caps_sq(state, {"fc": 2}, layout) == {"fc": (25.0, 0.0)}
    assert nested.beyond_caps_sq(state, {"fc": 3}, layout) == {"fc": (0.0, 0.0)}  # holds it all
    assert nested.beyond_caps_sq(state, {}, layout) == {}


def test_load_arrays_resizes_lod_layers_to_the_prefix():
    torch.manual_seed(0)
    model = lod.factorize(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)))
    layout = nested.Layout.of(model)
    part = nested.prefix(nested.state_arrays(model), {"0": 2, "2": 1}, layout)
    clone = lod.factorize(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)))
    nested.load_arrays(clone, part)
    assert {n: layer.rank for n, layer in lod.layers(clone)} == {"0": 2, "2": 1}
    x = torch.randn(5, 6)
    lod.truncate(model, {"0": 2, "2": 1})
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)  # same arrays, same function


def test_aggregated_prefixes_train_the_columns_they_hold():
    """End to end on torch layers: two clients at different caps, the global model takes the weighted mean."""
    torch.manual_seed(1)
    model = lod.factorize(nn.Sequential(nn.Linear(8, 6)))
    layout = nested.Layout.of(model)
    glob = nested.state_arrays(model)
    small = {k: v + 1.0 for k, v in nested.prefix(glob, {"0": 2}, layout).items()}
    full = {k: v - 1.0 for k, v in glob.items()}
    out = nested.aggregate(glob, [(small, 1.0), (full, 1.0)], layout.axes)
    np.testing.assert_allclose(out["0.u"][:2], glob["0.u"][:2], atol=1e-6)  # (+1 and -1) / 2 cancel
    np.testing.assert_allclose(out["0.u"][2:], glob["0.u"][2:] - 1.0, atol=1e-6)  # only the full client
    np.testing.assert_allclose(out["0.bias"], glob["0.bias"], atol=1e-6)


# --- check_arrays and byte counts -------------------------------------------------------------------
def test_check_arrays_names_every_problem():
    expected = {"a": (2, 2), "b": (3,), "c": (1,)}
    arrays = {"a": np.array([[1.0, np.nan], [np.inf, 0.0]], np.float32), "b": np.zeros(4, np.float32),
              "c": np.zeros(1, np.float64), "d": np.zeros(1)}
    problems = nested.check_arrays(arrays, expected, {"c": np.dtype(np.float32)})
    assert "unexpected arrays ['d']" in problems
    assert "a has 2 non-finite values" in problems
    assert "b has shape (4,), expected (3,)" in problems
    assert "c has dtype float64, expected float32" in problems
    assert nested.check_arrays({"a": np.zeros((2, 2))}, {"a": (2, 2)}) == []
    assert nested.check_arrays({}, {"a": (2, 2)}) == ["missing arrays ['a']"]


def test_num_bytes_is_elements_times_itemsize():
    assert nested.num_bytes({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.int64)}) == 3 * 4 * 4 + 5 * 8


def test_batchnorm_statistics_pool_by_the_law_of_total_variance():
    a = {"bn.running_mean": np.array([0.0, 1.0], np.float32), "bn.running_var": np.array([1.0, 2.0], np.float32)}
    b = {"bn.running_mean": np.array([2.0, 1.0], np.float32), "bn.running_var": np.array([1.0, 4.0], np.float32)}
    pooled = nested.pool_batchnorm([(a, 1.0), (b, 3.0)], ["bn"])
    # channel 0: mean (0 + 3 * 2) / 4 = 1.5, var (1 * (1 + 0) + 3 * (1 + 4)) / 4 - 1.5^2 = 1.75
    # channel 1: equal means, so the variances simply average: (2 + 3 * 4) / 4 = 3.5
    np.testing.assert_allclose(pooled["bn.running_mean"], [1.5, 1.0])
    np.testing.assert_allclose(pooled["bn.running_var"], [1.75, 3.5])
    assert pooled["bn.running_var"].dtype == np.float32 and set(pooled) == {"bn.running_mean", "bn.running_var"}
    # the statistics of the union of the data: group a = 1 point per unit of weight, ...
    x = np.concatenate([np.array([-1.0, 1.0]), 2 + np.array([-1.0, 1.0] * 3)])  # means 0 / 2, variances 1 / 1
    assert (x.mean(), x.var()) == pytest.approx((1.5, 1.75))


def test_aggregate_rounds_flags_and_counters_and_a_tie_of_flags_sets_them():
    replies = [({"flag": np.array([True, True]), "count": np.array(3)}, 1.0),
               ({"flag": np.array([False, True]), "count": np.array(4)}, 1.0)]
    out = nested.aggregate({"flag": np.array([False, False]), "count": np.array(0)}, replies, {"flag": None, "count": None})
    assert out["flag"].tolist() == [True, True] and out["flag"].dtype == np.bool_  # mean 0.5: a tie sets the flag
    assert out["count"] == 4 and out["count"].dtype == np.array(0).dtype  # 3.5 rounds half to even


def test_pooled_batchnorm_variance_is_never_negative_from_rounding():
    # equal means, zero variances: the law of total variance gives 0, which float64 computes here as -5.6e-17
    m = np.float32(0.4793158769607544)
    replies = [({"bn.running_mean": np.array([m], np.float32), "bn.running_var": np.zeros(1, np.float32)}, float(c))
               for c in (3, 5, 7)]
    assert nested.pool_batchnorm(replies, ["bn"])["bn.running_var"].tolist() == [0.0]
