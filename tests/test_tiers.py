"""fedmaestro.tiers: budgets, budget solving, tier assignment, client sampling and fault draws (pure, seeded)."""

import numpy as np
import pytest

from fedmaestro import tiers
from fedmaestro.config import DevicesConfig, StrategyConfig, TierConfig


# --- caps ----------------------------------------------------------------------------------------------
def test_fraction_caps_is_ceil_of_p_times_rank():
    ranks = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84, "fc3": 10, "empty": 0}
    assert tiers.fraction_caps(ranks, 0.25) == {"conv1": 2, "conv2": 4, "fc1": 30, "fc2": 21, "fc3": 3, "empty": 0}
    assert tiers.fraction_caps(ranks, 1.0) == ranks
    assert tiers.fraction_caps({"a": 10}, 0.3) == {"a": 3}  # 0.3 * 10 = 3.0000000000000004 in floating point
    assert tiers.fraction_caps({"a": 3}, 0.01) == {"a": 1}  # at least one rank component
    with pytest.raises(ValueError, match=r"p=0 must be in \(0, 1\]"):
        tiers.fraction_caps(ranks, 0)


def test_solve_caps_finds_the_largest_budget_under_the_limit():
    # cost = 10 + 2 a + 3 b; full (4, 4) costs 30.
    cost = tiers.CostModel(10.0, {"a": 2.0, "b": 3.0})
    ranks = {"a": 4, "b": 4}
    assert tiers.solve_caps(ranks, 1.0, [(cost, 30.0)]) == ({"a": 4, "b": 4}, 1.0)
    # p = 0.5 -> (2, 2) costs 20 <= 20; p = 0.75 -> (3, 3) costs 25 > 20
    assert tiers.solve_caps(ranks, 1.0, [(cost, 20.0)]) == ({"a": 2, "b": 2}, 0.5)
    assert tiers.solve_caps(ranks, 1.0, [(cost, 24.9)]) == ({"a": 2, "b": 2}, 0.5)
    assert tiers.solve_caps(ranks, 0.25, [(cost, 30.0)]) == ({"a": 1, "b": 1}, 0.25)  # the fraction binds first
    with pytest.raises(ValueError, match=r"costs 15 against a limit of 12"):
        tiers.solve_caps(ranks, 1.0, [(cost, 12.0)])


def test_solve_caps_with_unequal_ranks_and_two_limits():
    # ranks a=2, b=8: the distinct sub-models change at p in {1/8, 2/8, ..., 1} and {1/2, 1}
    macs = tiers.CostModel(0.0, {"a": 10.0, "b": 1.0})
    params = tiers.CostModel(0.0, {"a": 1.0, "b": 1.0})
    ranks = {"a": 2, "b": 8}
    # macs limit 17: p=0.5 -> (1, 4) = 14; p=0.625 -> (2, 5) = 25; so p = 0.5
    assert tiers.solve_caps(ranks, 1.0, [(macs, 17.0)]) == ({"a": 1, "b": 4}, 0.5)
    # adding params <= 4: p=0.375 -> (1, 3) = 4 fits, p=0.5 -> 5 does not
    assert tiers.solve_caps(ranks, 1.0, [(macs, 17.0), (params, 4.0)]) == ({"a": 1, "b": 3}, 0.375)
    # without limits, solve_caps is fraction_caps
    assert tiers.solve_caps(ranks, 0.5) == ({"a": 1, "b": 4}, 0.5)


def test_solved_caps_are_the_largest_feasible_by_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(50):
        ranks = {f"l{i}": int(r) for i, r in enumerate(rng.integers(1, 12, size=4))}
        cost = tiers.CostModel(float(rng.integers(0, 50)), {k: float(rng.integers(1, 20)) for k in ranks})
        limit = float(rng.integers(int(cost({k: 1 for k in ranks})), int(cost(ranks)) + 1))
        caps, p = tiers.solve_caps(ranks, 1.0, [(cost, limit)])
        grid = [q for q in np.linspace(0.001, 1.0, 2000) if cost(tiers.fraction_caps(ranks, q)) <= limit]
        best = tiers.fraction_caps(ranks, max(grid))
        assert cost(caps) <= limit and sum(caps.values()) >= sum(best.values())


# --- assignment, sampling, faults ---------------------------------------------------------------------
def test_assign_follows_shares_by_largest_remainder_and_is_seeded():
    a = tiers.assign(20, [0.334, 0.333, 0.333], seed=0)
    assert np.bincount(a).tolist() == [7, 7, 6]
    assert np.bincount(tiers.assign(20, [0.2] * 5, seed=0)).tolist() == [4] * 5
    # shares need not sum to 1: 2.5 and 7.5 tie on the remainder, the earlier tier gets it
    assert np.bincount(tiers.assign(10, [1, 3], seed=0)).tolist() == [3, 7]
    assert np.bincount(tiers.assign(20, [0.35, 0.65], seed=0)).tolist() == [7, 13]  # 0.35 * 20 is 6.999... in floats
    assert tiers.assign(20, [0.334, 0.333, 0.333], seed=0) == a
    assert tiers.assign(20, [0.334, 0.333, 0.333], seed=1) != a
    with pytest.raises(ValueError, match="positive"):
        tiers.assign(20, [0.5, 0.0], seed=0)


def test_sample_clients_is_seeded_by_seed_and_round_only():
    s = tiers.sample_clients(20, 10, seed=0, rnd=1)
    assert s == sorted(set(s)) and len(s) == 10 and all(0 <= p < 20 for p in s)
    assert tiers.sample_clients(20, 10, seed=0, rnd=1) == s
    assert tiers.sample_clients(20, 10, seed=0, rnd=2) != s
    assert tiers.sample_clients(20, 10, seed=1, rnd=1) != s
    assert tiers.sample_clients(5, 5, seed=0, rnd=1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"k=0 must be in \[1, num_clients=5\]"):
        tiers.sample_clients(5, 0, seed=0, rnd=1)


def test_draw_faults_probabilities_and_exclusivity():
    pids = list(range(4000))
    none = tiers.draw_faults(pids, {}, {}, seed=0, rnd=1)
    assert none == {}
    everyone = tiers.draw_faults(pids[:50], {p: 1.0 for p in pids}, {}, seed=0, rnd=1)
    assert set(everyone.values()) == {"dropout"} and len(everyone) == 50
    mixed = tiers.draw_faults(pids, {p: 0.2 for p in pids}, {p: 0.1 for p in pids}, seed=0, rnd=1)
    counts = {k: sum(v == k for v in mixed.values()) for k in ("dropout", "straggler")}
    # binomial(4000, 0.2): sd 25.3, (4000, 0.1): sd 19; 4 sd bounds fail with probability ~1e-4 (and the seed is fixed)
    assert abs(counts["dropout"] - 800) < 4 * 25.3 and abs(counts["straggler"] - 400) < 4 * 19
    assert tiers.draw_faults(pids, {p: 0.2 for p in pids}, {p: 0.1 for p in pids}, seed=0, rnd=1) == mixed
    assert tiers.draw_faults(pids, {p: 0.2 for p in pids}, {p: 0.1 for p in pids}, seed=0, rnd=2) != mixed
    with pytest.raises(ValueError, match="> 1"):
        tiers.draw_faults([0], {0: 0.7}, {0: 0.5}, seed=0, rnd=1)


def test_a_clients_fault_does_not_depend_on_which_other_clients_were_sampled():
    pids = list(range(200))
    p_drop, p_late = {p: 0.3 for p in pids}, {p: 0.3 for p in pids}
    everyone = tiers.draw_faults(pids, p_drop, p_late, seed=0, rnd=1)
    assert tiers.draw_faults(pids[::-1], p_drop, p_late, seed=0, rnd=1) == everyone
    for pid in (0, 7, 199):
        assert tiers.draw_faults([pid], p_drop, p_late, seed=0, rnd=1).get(pid) == everyone.get(pid)
    assert tiers.draw_faults(pids[100:], p_drop, p_late, seed=0, rnd=1) == {p: f for p, f in everyone.items() if p >= 100}


def test_derive_seed_depends_on_every_key():
    assert tiers.derive_seed(0, 1, 2) == tiers.derive_seed(0, 1, 2)
    assert len({tiers.derive_seed(0, 1, 2), tiers.derive_seed(0, 2, 1), tiers.derive_seed(1, 1, 2)}) == 3
    assert 0 <= tiers.derive_seed(2**40, -1) < 2**63
    assert tiers.client_seed(0, 1, 3) != tiers.client_seed(0, 2, 3)


# --- config checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: TierConfig(name="tiny", budget=0.0), r"devices.tiers\[tiny\].budget=0.0 is invalid"),
    (lambda: TierConfig(dropout=0.7, straggler=0.5), r"dropout \+ straggler"),
    (lambda: TierConfig(max_macs=0.0), r"devices.tiers\[full\].max_macs=0.0 is invalid"),
    (lambda: DevicesConfig(tiers=[TierConfig(name="a"), TierConfig(name="a")]), "tier names must be unique"),
    (lambda: DevicesConfig(tiers=[]), "give at least one tier"),
    (lambda: StrategyConfig(round_timeout=0), "strategy.round_timeout=0 is invalid"),
    (lambda: StrategyConfig(name="fedavg"), r"strategy.name='fedavg' is not allowed"),
])
def test_bad_device_and_strategy_configs_fail_naming_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fraction_caps_rounds_up_past_floating_point_noise_only():
    # 0.55 * 100 is 55.000000000000007 in floating point: 55 columns, not 56; 0.551 * 100 needs 56
    assert 0.55 * 100 > 55
    assert tiers.fraction_caps({"a": 100, "b": 0, "c": 3}, 0.55) == {"a": 55, "b": 0, "c": 2}
    assert tiers.fraction_caps({"a": 100}, 0.551) == {"a": 56}
