"""Federated mode, in one process: MaestroStrategy + the real ClientApp over an in-process Grid (LocalGrid).

The real simulation engine (Ray), ``python -m fedmaestro`` and ``flwr run`` are exercised in
test_federated_sim.py; here every protocol rule is checked quickly and exactly: per-node prefixes and
byte counts, seeding by partition id, validation of bad replies, faults, shrinking, resume, baselines.

The runs are tiny (1,200 training examples over 4-6 clients, 500 test examples, 1-3 rounds): a few
seconds each; the ResNet-18 ones are marked slow.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.clientapp import ClientApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from clients import client_app as real_client
from clients import local
from fedmaestro import checkpoint, data, lod, nested, tiers
from fedmaestro import protocol as P
from fedmaestro.config import to_dict, with_defaults
from fedmaestro.train import evaluate
from strategies import server_app
from strategies.local_grid import LocalGrid
from strategies.maestro import MaestroStrategy, _payload_bytes
from strategies.records import TIME_KEYS
from strategies.server_app import compose

TINY = ["data.subset=1200", "data.test_subset=500", "fl.num_clients=4", "fl.clients_per_round=3", "fl.rounds=2",
        "train.batch_size=32", "progress=false"]


def make_cfg(tmp_path, *overrides, name="run"):
    cfg, _ = compose(TINY + list(overrides) + [f"hydra.run.dir={tmp_path / name}"])
    return cfg, tmp_path / name


def run(cfg, run_dir, app=None, **grid_kw) -> tuple[MaestroStrategy, LocalGrid]:
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    grid = LocalGrid(app or real_client.app, cfg.fl.num_clients, **grid_kw)
    strategy.start(grid)
    return strategy, grid


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timeless(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rs]


def train_messages(grid: LocalGrid, rnd: int):
    return [m for m in grid.messages_seen if m.metadata.message_type == "train" and
            m.content.config_records[P.CONFIG][P.ROUND] == rnd]


# --- messages, prefixes, bytes ------------------------------------------------------------------------------
def test_each_node_gets_its_own_record_with_its_tier_prefix_and_bytes_are_exact(tmp_path, monkeypatch):
    cfg, run_dir = make_cfg(tmp_path, "devices=three_tiers", "fl.rounds=1", "fl.clients_per_round=4")
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    initial = strategy.global_model.arrays()
    grid = LocalGrid(real_client.app, cfg.fl.num_clients)
    train_config = ConfigRecord({"note": "kept"})
    tails_trained_with = {}
    real_train = local.train

    def train(cfg, pid, arrays, **kw):
        tails_trained_with[pid] = kw["hgl_tails"]
        return real_train(cfg, pid, arrays, **kw)
    monkeypatch.setattr(local, "train", train)
    strategy.start(grid, train_config=train_config)
    assert dict(train_config) == {"note": "kept"}  # the caller's config is never changed
    msgs = train_messages(grid, 1)
    assert len(msgs) == 4 and len({id(m.content) for m in msgs}) == 4
    assert len({id(m.content.array_records[P.ARRAYS]) for m in msgs}) == 4
    ranks = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84, "fc3": 10}
    budgets = [t.budget for t in cfg.devices.tiers]
    down = 0
    for m in msgs:
        node_pid = grid.nodes[m.metadata.dst_node_id]
        caps = tiers.fraction_caps(ranks, budgets[strategy.tier_of[node_pid]])
        c = m.content.config_records[P.CONFIG]
        assert list(c[P.CAPS]) == list(caps.values()) and c["note"] == "kept"
        # the HGL groups extend over the global components beyond the caps: their squared norms go with the caps
        beyond = nested.beyond_caps_sq(initial, caps, strategy.global_model.layout)
        assert list(c[P.HGL_TAILS]) == [sq for layer in caps for sq in beyond[layer]]
        assert tails_trained_with[node_pid] == beyond
        assert (min(beyond["fc1"]) > 0) == (caps != ranks)  # only the large tier holds every component
        arrays = {k: v.numpy() for k, v in m.content.array_records[P.ARRAYS].items()}
        for layer, k in caps.items():
            assert arrays[f"{layer}.u"].shape[0] == k and arrays[f"{layer}.v"].shape[0] == k
        assert arrays["fc1.bias"].shape == (120,)  # arrays without a rank axis go whole
        down += nested.num_bytes(arrays)
    r = records(run_dir)[0]
    assert r["bytes_down"] == down
    # up: every valid reply has exactly the shapes it was sent, so up == down here
    assert r["bytes_up"] == down and r["clients"]["valid"] == [0, 1, 2, 3]
    # a 0.25 tier's caps: ceil(0.25 * (6, 16, 120, 84, 10)) = (2, 4, 30, 21, 3)
    assert tiers.fraction_caps(ranks, 0.25) == {"conv1": 2, "conv2": 4, "fc1": 30, "fc2": 21, "fc3": 3}
    assert set(r["tiers"]) == {"small", "medium", "large"}
    for t in r["tiers"].values():
        assert {"accuracy", "params", "macs"} <= set(t)
    assert r["tiers"]["small"]["params"] < r["tiers"]["medium"]["params"] < r["tiers"]["large"]["params"]


def test_runs_repeat_exactly_and_ignore_flower_node_ids(tmp_path):
    cfg, a = make_cfg(tmp_path, name="a")
    run(cfg, a)
    cfg, b = make_cfg(tmp_path, name="b")
    # other node ids, sorted the other way round (partition 0 has the largest): sampling and every message are
    # keyed by partition id, never by node ids or their order
    run(cfg, b, first_node_id=5_000_003, step=-11)
    ra, rb = records(a), records(b)
    assert len(ra) == 2 and timeless(ra) == timeless(rb)
    assert ra[0]["clients"]["sampled"] == tiers.sample_clients(4, 3, cfg.seed, 1)
    cfg, c = make_cfg(tmp_path, "seed=1", name="c")
    run(cfg, c)
    assert timeless(records(c)) != timeless(ra)  # the seed matters


class FirstInFirstOutGrid(LocalGrid):
    """A LocalGrid whose clients answer one per pull, in the order they were pushed (a simulation engine's queue),
    and which notes the partition ids of the train messages in push order and the most of them unanswered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pushed: list[int] = []
        self.most_unanswered = 0

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        self.pushed += [self.nodes[m.metadata.dst_node_id] for m in messages if m.metadata.message_type == "train"]
        unanswered = [m for m in self._pending.values() if m.metadata.message_type == "train"]
        self.most_unanswered = max(self.most_unanswered, len(unanswered))
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        first = next((mid for mid in self._pending if mid in wanted), None)
        return super().pull_messages([first]) if first is not None else []


def test_the_simulation_dispatches_the_longest_clients_first_a_window_at_a_time_and_records_do_not_change(tmp_path):
    class Noting(MaestroStrategy):
        def _send_longest_first(self, grid, messages, deadline):
            pids = [self.sent[m.metadata.dst_node_id].partition_id for m in messages]
            self.expected.append({p: self.expected_seconds(p) for p in pids})
            self.known.append(dict(self.seconds_of))
            return super()._send_longest_first(grid, messages, deadline)

    cfg, plain = make_cfg(tmp_path, "fl.rounds=3", name="plain")
    run(cfg, plain)
    cfg, windowed = make_cfg(tmp_path, "fl.rounds=3", name="windowed")
    strategy = Noting(cfg, windowed, show_progress=False)
    strategy.expected, strategy.known, strategy.dispatch_window = [], [], 2
    grid = FirstInFirstOutGrid(real_client.app, cfg.fl.num_clients)
    strategy.start(grid)
    assert timeless(records(windowed)) == timeless(records(plain))  # the order changes no record
    assert grid.most_unanswered == 2  # never more than the window
    order = [sorted(e, key=lambda p: (-e[p], p)) for e in strategy.expected]
    assert grid.pushed == [p for o in order for p in o]  # longest expected training first, every round
    first, later = strategy.expected[0], strategy.expected[-1]
    # round 1 knows no client's seconds: its examples (the same rate for all); later rounds, the seconds measured
    assert len({first[p] / strategy.examples_of[p] for p in first}) == 1
    measured = [p for p in later if p in strategy.known[-1]]
    assert measured and all(later[p] == strategy.known[-1][p] for p in measured)


class RefusingGrid(FirstInFirstOutGrid):
    """Refuses the train messages to some partitions (a store the link state refuses: no message id comes back),
    and, with ``answers=False``, never answers a train message."""

    def __init__(self, *args, refused=(), answers=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused, self.answers = set(refused), answers

    def push_messages(self, messages):
        return super().push_messages([m for m in messages if m.metadata.message_type != "train"
                                      or self.nodes[m.metadata.dst_node_id] not in self.refused])

    def pull_messages(self, message_ids):
        if not self.answers:
            message_ids = [i for i in message_ids if self._pending[i].metadata.message_type != "train"]
        return super().pull_messages(message_ids)


def _round_one_messages(tmp_path, grid):
    cfg, run_dir = make_cfg(tmp_path, "fl.num_clients=6", "fl.clients_per_round=6")
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    strategy.dispatch_window = 2
    arrays = ArrayRecord({k: Array(v) for k, v in strategy.global_model.arrays().items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    return strategy, messages


def test_messages_the_grid_refuses_do_not_hold_back_the_rest_of_the_round(tmp_path):
    grid = RefusingGrid(real_client.app, 6)
    strategy, messages = _round_one_messages(tmp_path, grid)
    longest_first = sorted(range(6), key=lambda p: (-strategy.expected_seconds(p), p))
    grid.refused = set(longest_first[:4])  # the first two windows
    replies = strategy._send_longest_first(grid, messages, time.time() + 60)
    assert grid.pushed == longest_first[4:] and len(replies) == 2  # the windows refused, the others still go


def test_messages_the_deadline_kept_from_being_sent_are_not_counted_as_sent(tmp_path):
    grid = RefusingGrid(real_client.app, 6, answers=False)
    strategy, messages = _round_one_messages(tmp_path, grid)
    sent_bytes = strategy.bytes_down
    per_message = [_payload_bytes(m.content.array_records[P.ARRAYS]) for m in messages]
    assert sum(per_message) == sent_bytes
    replies = strategy._send_longest_first(grid, messages, time.time() + 0.3)
    assert replies == [] and len(grid.pushed) == 2  # the window: nothing answered, nothing more went out
    pushed = {strategy.node_of[p] for p in grid.pushed}
    assert strategy.bytes_down == sum(b for m, b in zip(messages, per_message) if m.metadata.dst_node_id in pushed)


def test_the_server_keeps_a_small_test_sets_batches_and_scores_the_same_either_way(tmp_path, monkeypatch):
    from strategies import global_model

    cfg, run_dir = make_cfg(tmp_path)
    kept = MaestroStrategy(cfg, run_dir, show_progress=False).global_model
    assert all(isinstance(shard, list) for shard in kept.test_shards)  # (made on first use)
    monkeypatch.setattr(global_model, "EVAL_KEPT_BYTES", 1000)  # too small for 500 images: read on every pass
    read = MaestroStrategy(cfg, tmp_path / "read", show_progress=False).global_model
    assert all(isinstance(shard, data.BatchLoader) for shard in read.test_shards)
    caps = [None, {name: 1 for name in kept.layout.layers}]
    assert kept.evaluate_many(caps) == read.evaluate_many(caps) == kept.evaluate_many(caps)


def test_the_simulation_counts_the_clients_ray_trains_side_by_side():
    from fedmaestro.config import Config
    from strategies.simulation import num_workers

    cfg = Config()
    cfg.fl.client_cpus = 1.0
    assert num_workers(cfg, cpus=2) == 2 and num_workers(cfg, cpus=1) == 1
    cfg.fl.client_cpus = 0.5
    assert num_workers(cfg, cpus=3) == 6
    cfg.fl.client_gpus = 0.5  # at most two on one GPU
    assert num_workers(cfg, cpus=8, gpus=1) == 2


def test_federated_evaluation_runs_every_n_rounds_and_in_the_last_one(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=3", "fl.federated_eval_every=2", "data.local_test_fraction=0.2",
                            "devices=homogeneous")
    run(cfg, run_dir)
    assert ["fed_accuracy" in r for r in records(run_dir)] == [False, True, True]  # round 3: the last
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["fed_accuracy"] == records(run_dir)[-1]["fed_accuracy"]


@pytest.mark.parametrize("devices", ["three_tiers", "three_tiers_macs"])  # budgets 0.25 / 0.5 / 1, or all 1 with caps
def test_a_tier_without_clients_is_warned_of_and_worst_where_no_client_holds_the_whole_model(tmp_path, caplog, devices):
    cfg, run_dir = make_cfg(tmp_path, "fl.num_clients=2", "fl.clients_per_round=2", f"devices={devices}")
    with caplog.at_level(logging.WARNING, logger="fedmaestro.strategy"):
        strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
        strategy.summary()
    empty = [t.name for i, t in enumerate(cfg.devices.tiers) if i not in strategy.tier_of]
    assert len(empty) == 1
    message = next(m for m in caplog.messages if "get no client" in m)
    assert message.startswith(f"tiers {empty} get no client of fl.num_clients=2")
    assert ("no client holds the whole model" in message) == (empty == ["large"])


@pytest.mark.parametrize("devices, warned", [("three_tiers", True), ("homogeneous", False)])
def test_a_dense_model_with_tier_budgets_is_warned_of_at_start_up(tmp_path, caplog, devices, warned):
    cfg, run_dir = make_cfg(tmp_path, "model.factorize=false", f"devices={devices}")
    with caplog.at_level(logging.WARNING, logger="fedmaestro.strategy"):
        MaestroStrategy(cfg, run_dir, show_progress=False).summary()
    assert any("every tier of devices=three_tiers trains the whole model (budgets do not apply)" in m
               for m in caplog.messages) == warned


# --- validation and faults ----------------------------------------------------------------------------------
def real_app(*replaced: str) -> ClientApp:
    """A ClientApp with the real client's query / train / evaluate, except the ``replaced`` ones, which the test
    registers itself."""
    app = ClientApp()
    for kind in ("query", "train", "evaluate"):
        if kind not in replaced:
            getattr(app, kind)()(getattr(real_client, kind))
    return app


def faulty_app(behaviour: dict[int, str], captured: dict | None = None) -> ClientApp:
    """The real ClientApp, with the replies of some partition ids corrupted."""
    app = real_app("train")

    @app.train()
    def train(message, context):
        pid = int(context.node_config[P.PARTITION_ID])
        kind = behaviour.get(pid)
        if kind == "raise":
            raise RuntimeError("client exploded")
        reply = real_client.train(message, context)
        arrays = {k: v.numpy().copy() for k, v in reply.content.array_records[P.ARRAYS].items()}
        metrics = dict(reply.content.metric_records[P.METRICS])
        if kind == "nan":
            arrays["fc2.u"][0, 0] = np.nan
        elif kind == "shape":
            arrays["fc1.u"] = arrays["fc1.u"][:-1]
        elif kind == "extra":
            arrays["intruder"] = np.zeros(1, np.float32)
        elif kind == "missing":
            arrays.pop("fc3.bias")
        elif kind == "pid":
            metrics[P.PARTITION_ID] = pid + 100
        elif kind == "dtype":
            arrays["conv1.bias"] = arrays["conv1.bias"].astype(np.float64)
        elif kind == "list":
            metrics[P.TRAIN_LOSS] = [1.0]
        elif kind == "fraction":
            metrics[P.PARTITION_ID] = pid + 0.5
        elif kind == "seconds":
            metrics[P.TRAIN_SECONDS] = -1.0
        elif kind == "nanloss":
            metrics[P.TRAIN_LOSS] = float("nan")
        elif kind == "weight":
            metrics[P.NUM_EXAMPLES] = metrics[P.NUM_EXAMPLES] * 1000
        elif kind == "scored":
            metrics[P.NUM_SCORED] = 2.5
        elif kind == "infinite":  # int(inf) raised OverflowError and ended the run
            metrics[P.NUM_SCORED] = float("inf")
        if captured is not None and kind is None:
            captured[pid] = (arrays, metrics[P.NUM_EXAMPLES])
        out = real_client._reply(message, metrics, arrays)
        if kind == "undecodable":  # 40 bytes that claim a serialization numpy cannot read
            out.content.array_records[P.ARRAYS]["fc3.bias"] = Array(dtype="float32", shape=(10,), stype="torch",
                                                                     data=bytes(40))
        return out

    return app


def test_invalid_replies_are_dropped_logged_and_left_out_of_the_aggregate(tmp_path, caplog):
    expected = [("raise", "client exploded"), ("nan", "fc2.u has 1 non-finite values"), ("shape", "fc1.u has shape"),
                ("extra", "unexpected arrays ['intruder']"), ("missing", "missing arrays ['fc3.bias']"),
                ("pid", "partition-id 105"), ("dtype", "conv1.bias has dtype float64, expected float32"),
                ("undecodable", "arrays do not decode"), ("list", "finite numbers, got train-loss=[1.0]"),
                ("fraction", "whole numbers >= 0, got partition-id=9.5"),
                ("seconds", "train-seconds=-1.0 must be >= 0"), ("weight", "but the client announced"),
                ("nanloss", "finite numbers, got train-loss=nan"),
                ("scored", "num-scored=2.5 is not a whole number >= 0"),
                ("infinite", "num-scored=inf is not a whole number >= 0")]  # client i replies with fault expected[i]
    n = len(expected) + 1  # the last client answers correctly
    cfg, run_dir = make_cfg(tmp_path, f"fl.num_clients={n}", f"fl.clients_per_round={n}", "fl.rounds=1",
                            "devices=three_tiers", "strategy.shrink_every=0")
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    before = strategy.global_model.arrays()
    captured = {}
    with caplog.at_level(logging.WARNING, logger="fedmaestro.strategy"):
        strategy.start(LocalGrid(faulty_app({i: kind for i, (kind, _) in enumerate(expected)}, captured), n))
    r = records(run_dir)[0]
    dropped = r["clients"]["dropped"]
    assert r["clients"]["valid"] == [n - 1] and sorted(map(int, dropped)) == list(range(n - 1))
    for i, (kind, reason) in enumerate(expected):
        assert reason in dropped[str(i)], kind
    assert sum("dropped the reply of client" in m for m in caplog.messages) == n - 1
    # the global model is the aggregate of the one valid reply, exactly
    arrays, weight = captured[n - 1]
    aggregate = nested.aggregate(before, [(arrays, weight)], strategy.global_model.layout.axes)
    after = strategy.global_model.arrays()
    for name in aggregate:
        np.testing.assert_array_equal(after[name], aggregate[name])


def _as_if_tokens(reply, context, seen: dict, *keys: str):
    """The reply with num-scored as if client pid's examples held pid + 1 tokens each (classification scores one
    prediction per example: checked); ``seen[pid]``: (that num-scored, the reply's metrics ``keys``)."""
    m = reply.content.metric_records[P.METRICS]
    pid = int(context.node_config[P.PARTITION_ID])
    assert m[P.NUM_SCORED] == m[P.NUM_EXAMPLES]  # classification (and one local epoch, for a train reply)
    m[P.NUM_SCORED] = m[P.NUM_EXAMPLES] * (pid + 1)
    seen[pid] = (m[P.NUM_SCORED], *(m[k] for k in keys))
    return reply


def test_federated_evaluation_weights_by_the_predictions_each_client_scored(tmp_path):
    """Per token for translation: a client's num-scored (its target tokens) weighs its accuracy and loss, not its
    sentence count; classification scores one prediction per example, so both weights agree."""
    app = real_app("evaluate")
    seen = {}

    @app.evaluate()
    def evaluate(message, context):
        return _as_if_tokens(real_client.evaluate(message, context), context, seen, P.ACCURACY, P.LOSS)

    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1", "fl.federated_eval_every=1", "data.local_test_fraction=0.2")
    run(cfg, run_dir, app)
    total = sum(k for k, _, _ in seen.values())
    r = records(run_dir)[0]
    assert len(seen) == 4 and len({k for k, _, _ in seen.values()}) == 4
    assert r["fed_accuracy"] == pytest.approx(sum(k * a for k, a, _ in seen.values()) / total, rel=1e-12)
    assert r["fed_loss"] == pytest.approx(sum(k * loss for k, _, loss in seen.values()) / total, rel=1e-12)


def test_a_dense_runs_figures_have_no_rank_plot(tmp_path):
    from fedmaestro.plots import plot_federated

    record = {"round": 1, "accuracy": 0.5, "loss": 1.0, "bytes_down": 10, "bytes_up": 10, "total_rank": 0, "ranks": {},
              "params_rel": 1.0, "tiers": {}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({**record, "round": 2}) + "\n")
    written = {p.name for p in plot_federated(tmp_path)}
    assert written == {"plot_accuracy_round.png", "plot_accuracy_mb.png"}  # no flat "total rank = 0" line


def test_the_training_loss_weights_each_client_by_the_predictions_its_loss_averages(tmp_path):
    """As the federated evaluation: per token for translation (num-scored in the train reply), not per sentence;
    in classification num-scored is the examples trained on."""
    app = real_app("train")
    seen = {}

    @app.train()
    def train(message, context):
        return _as_if_tokens(real_client.train(message, context), context, seen, P.TRAIN_LOSS)

    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1", "fl.clients_per_round=4")
    run(cfg, run_dir, app)
    total = sum(k for k, _ in seen.values())
    assert len(seen) == 4 and len({k for k, _ in seen.values()}) == 4
    assert records(run_dir)[0]["train_loss"] == pytest.approx(sum(k * loss for k, loss in seen.values()) / total,
                                                              rel=1e-12)


@pytest.mark.parametrize("diverging", [{0, 1, 2, 3}, {0}])
def test_a_round_where_every_client_diverges_stops_the_run_and_one_that_some_do_goes_on(tmp_path, diverging):
    app = real_app("train")

    @app.train()
    def train(message, context):
        if int(context.node_config[P.PARTITION_ID]) in diverging:
            raise FloatingPointError("training loss is nan; lower train.lr or set train.grad_clip")
        return real_client.train(message, context)

    cfg, run_dir = make_cfg(tmp_path, "fl.clients_per_round=4", "train.lr=0.05")
    if len(diverging) == 4:
        with pytest.raises(FloatingPointError, match=r"round 1: the training of every client that answered diverged "
                                                     r"\(4 of 4 sampled; training loss is NaN or infinite\); lower "
                                                     r"train.lr \(now 0.05\) or set train.grad_clip"):
            run(cfg, run_dir, app)
    else:  # a client that diverges is one dropped reply, as any other failure
        run(cfg, run_dir, app)
        assert [sorted(r["clients"]["valid"]) for r in records(run_dir)] == [[1, 2, 3]] * 2


def test_invalid_evaluation_replies_are_dropped_and_logged(tmp_path, caplog):
    app = real_app("evaluate")
    faults = {0: ("accuracy", 7.0, "accuracy=7.0 is not in [0, 1]"),
              1: ("num-examples", 10**6, "but the client announced"),
              2: ("loss", float("nan"), "must all be finite numbers"),
              3: (None, None, "no 'metrics' MetricRecord in it")}  # client 4 answers correctly
    healthy = {}

    @app.evaluate()
    def evaluate(message, context):
        reply = real_client.evaluate(message, context)
        pid = int(context.node_config[P.PARTITION_ID])
        if pid in faults:
            key, value, _ = faults[pid]
            if key is None:
                del reply.content.metric_records[P.METRICS]
            else:
                reply.content.metric_records[P.METRICS][key] = value
        else:
            healthy[pid] = reply.content.metric_records[P.METRICS][P.ACCURACY]
        return reply

    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1", "fl.federated_eval_every=1", "data.local_test_fraction=0.2",
                            "fl.num_clients=5")
    with caplog.at_level(logging.WARNING, logger="fedmaestro.strategy"):
        run(cfg, run_dir, app)
    for pid, (_, _, reason) in faults.items():
        assert any(f"dropped the evaluation reply of client {pid}: " in m and reason in m for m in caplog.messages), reason
    assert records(run_dir)[0]["fed_accuracy"] == healthy[4]  # client 4's reply alone


def test_a_node_that_is_not_this_projects_client_fails_at_start_up_with_the_fix(tmp_path):
    app = ClientApp()

    @app.query()
    def query(message, context):
        return real_client._reply(message, {"hello": 1})

    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1")
    with pytest.raises(RuntimeError, match=r"answered the start-up query without the whole numbers "
                                           r"\['partition-id', 'num-examples', 'num-test'\].*clients.client_app:app"):
        run(cfg, run_dir, app)


def test_too_few_nodes_are_reported_while_waiting_and_then_refused_with_the_fix(tmp_path, caplog):
    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1", "strategy.connect_timeout=1")
    with caplog.at_level(logging.WARNING, logger="fedmaestro.strategy"), \
            pytest.raises(TimeoutError, match=r"the federation has 3 nodes after 1 s but fl.num_clients=4.*"
                                              r"num-supernodes=4.*strategy.connect_timeout=1"):
        MaestroStrategy(cfg, run_dir, show_progress=False).start(LocalGrid(real_client.app, 3))
    waiting = [m for m in caplog.messages if m.startswith("waiting for the federation's nodes")]
    assert len(waiting) == 1 and "3 of fl.num_clients=4 connected" in waiting[0] and "num-supernodes=4" in waiting[0]


def test_the_server_evaluates_every_eval_every_rounds_and_the_last_round_of_the_run(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=3", "strategy.eval_every=2")
    run(cfg, run_dir)
    assert ["accuracy" in r for r in records(run_dir)] == [False, True, True]
    assert all("params" in r and "tiers" in r for r in records(run_dir))  # footprints every round
    cfg, short = make_cfg(tmp_path, "fl.rounds=3", "strategy.eval_every=2", name="short")
    MaestroStrategy(cfg, short, show_progress=False).start(LocalGrid(real_client.app, 4), num_rounds=1)
    assert "accuracy" in records(short)[0]  # the run's last round, although fl.rounds says 3
    with pytest.raises(ValueError, match="evaluate_fn is not used"):
        MaestroStrategy(cfg, short, show_progress=False).start(LocalGrid(real_client.app, 4), evaluate_fn=print)


def test_a_client_refuses_a_fault_the_protocol_does_not_know(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1")
    _, grid = run(cfg, run_dir)
    message = train_messages(grid, 1)[0]
    message.content.config_records[P.CONFIG][P.FAULT] = "meteor"
    with pytest.raises(ValueError, match="unknown fault 'meteor'"):
        real_client.train(message, grid.contexts[message.metadata.dst_node_id])


def test_bytes_up_are_counted_from_array_metadata_even_when_the_arrays_do_not_decode():
    record = ArrayRecord({"a": Array(np.zeros((3, 4), np.float32)), "b": Array(np.zeros(5, np.float64)),
                          "c": Array(dtype="float32", shape=(10,), stype="torch", data=bytes(40))})
    assert _payload_bytes(record) == 3 * 4 * 4 + 5 * 8 + 10 * 4  # payload only, no serialization headers
    liar = ArrayRecord({"huge": Array(dtype="float32", shape=(10**9,), stype="torch", data=bytes(1)),
                        "negative": Array(dtype="float32", shape=(-1, 10), stype="torch", data=bytes(8))})
    assert _payload_bytes(liar) == 1  # never more than came, never negative


def test_a_round_without_valid_replies_leaves_the_model_unchanged(tmp_path, caplog):
    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1")
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    before = strategy.global_model.arrays()
    with caplog.at_level(logging.WARNING, logger="fedmaestro.strategy"), \
            pytest.raises(RuntimeError, match=r"no round of the 1 got a valid reply \(every reply was dropped, e.g. "
                                              r"client \d's: .*client exploded\): the model is the initial one"):
        strategy.start(LocalGrid(faulty_app({p: "raise" for p in range(4)}), 4))
    after = strategy.global_model.arrays()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert any("no valid reply" in m and "left unchanged" in m for m in caplog.messages)
    r = records(run_dir)[0]  # the run's records, checkpoint and model are written before the error
    assert r["clients"]["valid"] == [] and "train_loss" not in r and not r["shrunk"]
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "model.pt").is_file()

    class Silent(LocalGrid):  # no reply ever comes before the round's timeout
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                return []
            return super().send_and_receive(messages, timeout=timeout)

    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=2", name="silent")
    with pytest.raises(TimeoutError, match=r"no client answered any of the 2 rounds before the round's timeout "
                                           r"\(strategy.round_timeout=600 s; .*\): the model is the initial one"):
        MaestroStrategy(cfg, run_dir, show_progress=False).start(Silent(real_client.app, 4))
    assert len(records(run_dir)) == 2


def test_dropouts_and_stragglers_miss_the_deadline_and_the_round_goes_on(tmp_path, caplog):
    devices = ("devices.tiers=[{name: ok, share: 0.5, budget: 1.0}, "
               "{name: flaky, share: 0.5, budget: 0.5, dropout: 0.5, straggler: 0.5}]")
    cfg, run_dir = make_cfg(tmp_path, devices, "fl.rounds=1", "fl.clients_per_round=4", "strategy.round_timeout=2.0")
    with caplog.at_level(logging.WARNING, logger="fedmaestro.strategy"):
        strategy, grid = run(cfg, run_dir)
    r = records(run_dir)[0]
    flaky = sorted(p for p in range(4) if strategy.tier_of[p] == 1)
    assert r["clients"]["late"] == flaky and sorted(map(int, r["clients"]["faults"])) == flaky
    assert set(r["clients"]["faults"].values()) <= {"dropout", "straggler"}
    assert r["clients"]["valid"] == [p for p in range(4) if p not in flaky] and r["clients"]["dropped"] == {}
    assert any(f"no answer before the round's timeout from clients {flaky} (injected faults: "
               f"{r['clients']['faults']})" in m for m in caplog.messages)
    # the start says that a faulty round waits for the timeout
    assert any("inject faults: a round with a drop-out or a straggler waits strategy.round_timeout=2s" in m
               for m in caplog.messages)
    # the faulty clients were sent their messages (bytes down) after the healthy ones
    order = [grid.nodes[m.metadata.dst_node_id] for m in train_messages(grid, 1)]
    assert order[-len(flaky):] == flaky
    assert r["timing"]["train_s"] >= 2.0  # the server waited until the deadline


def test_flowers_own_start_waiting_past_the_deadline_still_drops_stragglers(tmp_path):
    from flwr.serverapp.strategy import Strategy

    from strategies.maestro import _to_record

    devices = "devices.tiers=[{name: ok, share: 0.5, budget: 1.0}, {name: flaky, share: 0.5, budget: 0.5, straggler: 1.0}]"
    cfg, run_dir = make_cfg(tmp_path, devices, "fl.rounds=1", "fl.clients_per_round=4", "strategy.round_timeout=1.0")
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    grid = LocalGrid(real_client.app, 4)
    Strategy.start(strategy, grid, _to_record(strategy.global_model.arrays()), num_rounds=1, timeout=30)
    flaky = sorted(p for p in range(4) if strategy.tier_of[p] == 1)
    assert flaky and strategy.round_info["valid"] == [p for p in range(4) if p not in flaky]
    assert sorted(int(p) for p in strategy.round_info["dropped"]) == flaky
    assert all("told to fail this round (straggler)" in why for why in strategy.round_info["dropped"].values())


def test_flowers_own_start_cuts_the_global_model_to_what_its_tiers_hold(tmp_path):
    from flwr.serverapp.strategy import Strategy

    from strategies.maestro import _to_record

    cfg, run_dir = make_cfg(tmp_path, "devices=three_tiers_macs", "fl.rounds=1")
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    uncut = strategy.global_model.ranks()  # (MaestroStrategy.start cuts before round 1; Flower's start does not)
    held = strategy.global_model.held_ranks(cfg.devices.tiers)  # the budget-1.0 tier's MAC cap holds less
    assert sum(held.values()) < sum(uncut.values())
    Strategy.start(strategy, LocalGrid(real_client.app, 4), _to_record(strategy.global_model.arrays()), num_rounds=1,
                   timeout=30)
    assert all(strategy.global_model.ranks()[n] <= held[n] for n in held)


# --- shrinking, resume, baselines, budgets --------------------------------------------------------------------
def test_shrinking_cuts_the_global_model_and_the_next_caps_follow(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "devices=three_tiers", "train.eps_ps=0.5", "fl.clients_per_round=4")
    _, grid = run(cfg, run_dir)
    r1, r2 = records(run_dir)
    assert r1["shrunk"] and r1["total_rank"] < 236
    budgets = [t.budget for t in cfg.devices.tiers]
    strategy_tiers = tiers.assign(4, [t.share for t in cfg.devices.tiers], cfg.seed)
    for m in train_messages(grid, 2):
        pid = grid.nodes[m.metadata.dst_node_id]
        assert list(m.content.config_records[P.CONFIG][P.CAPS]) == \
            list(tiers.fraction_caps(r1["ranks"], budgets[strategy_tiers[pid]]).values())
    assert r2["params"] < 66_274


def test_resume_gives_the_uninterrupted_run(tmp_path):
    cfg, full = make_cfg(tmp_path, "fl.rounds=3", "train.eps_ps=0.3", name="full")
    run(cfg, full)
    cfg, part = make_cfg(tmp_path, "fl.rounds=2", "train.eps_ps=0.3", name="part")
    interrupted, _ = run(cfg, part)
    cfg, part = make_cfg(tmp_path, "fl.rounds=3", "train.eps_ps=0.3", "resume=true", name="part")
    resumed = MaestroStrategy(cfg, part, show_progress=False)
    assert resumed.resume() == 2 and resumed.seconds_of == interrupted.seconds_of != {}  # the dispatch order's too
    run(cfg, part)
    assert timeless(records(part)) == timeless(records(full))
    assert records(full)[-1]["total_rank"] < 236  # shrinking happened, and was resumed through
    cfg, part = make_cfg(tmp_path, "fl.rounds=3", "train.eps_ps=0.3", "resume=true", "seed=5", name="part")
    with pytest.raises(ValueError, match=r"seed: 0 -> 5"):
        run(cfg, part)


def test_lambda_is_sent_until_the_global_model_reaches_the_params_target(tmp_path):
    lasso = ["devices=homogeneous", "train.lambda_gl=0.2", "train.eps_ps=0.05"]
    cfg, stop_dir = make_cfg(tmp_path, *lasso, "fl.rounds=3", "train.lambda_stop_params=0.6", name="stop")
    _, grid = run(cfg, stop_dir)
    sent = [{m.content.config_records[P.CONFIG][P.LAMBDA] for m in train_messages(grid, rnd)} for rnd in (1, 2, 3)]
    stop = records(stop_dir)
    assert sent == [{0.2}, {0.2}, {0.0}] and [r["lambda_gl"] for r in stop] == [0.2, 0.2, 0.0]
    assert stop[0]["params_rel"] > 0.6 >= stop[1]["params_rel"]
    cfg, on_dir = make_cfg(tmp_path, *lasso, "fl.rounds=3", name="on")
    run(cfg, on_dir)
    on = records(on_dir)
    assert [r["lambda_gl"] for r in on] == [0.2] * 3 and timeless(on)[:2] == timeless(stop)[:2]
    assert on[-1]["params"] < stop[-1]["params"]
    finetune = [*lasso, "train.lambda_stop_params=0.6", "train.finetune_after_stop=true"]
    cfg, ft_dir = make_cfg(tmp_path, *finetune, "fl.rounds=3", name="finetune")
    _, grid = run(cfg, ft_dir)
    sent = [{m.content.config_records[P.CONFIG][P.SAMPLER] for m in train_messages(grid, rnd)} for rnd in (1, 2, 3)]
    ft = records(ft_dir)
    assert sent == [{"per_layer"}, {"per_layer"}, {"fixed"}] and [r["sampler"] for r in ft] == [m for (m,) in sent]
    assert [r["sampler"] for r in stop] == ["per_layer"] * 3
    assert timeless(ft)[:2] == timeless(stop)[:2] and ft[2]["loss"] != stop[2]["loss"]
    cfg, cut_dir = make_cfg(tmp_path, *finetune, "fl.rounds=2", name="cut")
    run(cfg, cut_dir)
    cfg, cut_dir = make_cfg(tmp_path, *finetune, "fl.rounds=3", "resume=true", name="cut")
    run(cfg, cut_dir)  # resumed at the stop: the fine-tuning is derived from the model alone
    assert timeless(records(cut_dir)) == timeless(ft)


def test_lambda_is_sent_after_the_warm_up_rounds_and_a_resumed_run_agrees(tmp_path):
    lasso = ["devices=homogeneous", "train.lambda_gl=0.2", "train.eps_ps=0.05", "train.lambda_warmup=1"]
    cfg, warm_dir = make_cfg(tmp_path, *lasso, "fl.rounds=3", name="warm")
    _, grid = run(cfg, warm_dir)
    sent = [{(m.content.config_records[P.CONFIG][P.LAMBDA], m.content.config_records[P.CONFIG][P.SAMPLER])
             for m in train_messages(grid, rnd)} for rnd in (1, 2, 3)]
    warm = records(warm_dir)
    assert sent == [{(0.0, "per_layer")}, {(0.2, "per_layer")}, {(0.2, "per_layer")}]
    assert [r["lambda_gl"] for r in warm] == [0.0, 0.2, 0.2]
    cfg, plain_dir = make_cfg(tmp_path, "devices=homogeneous", "train.lambda_gl=0", "train.eps_ps=0.05", "fl.rounds=1",
                              name="plain")
    run(cfg, plain_dir)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "lambda_gl"} for r in timeless(rs)]  # noqa: E731
    assert strip(warm[:1]) == strip(records(plain_dir))  # round 1 trained as without the lasso
    assert warm[-1]["params"] < warm[0]["params"]
    cfg, cut_dir = make_cfg(tmp_path, *lasso, "fl.rounds=2", name="cut")
    run(cfg, cut_dir)
    cfg, cut_dir = make_cfg(tmp_path, *lasso, "fl.rounds=3", "resume=true", name="cut")
    run(cfg, cut_dir)  # resumed after the warm-up: the lasso goes on in round 3, as in one run
    assert timeless(records(cut_dir)) == timeless(warm)
    with pytest.raises(ValueError, match=r"train.lambda_warmup=2 is invalid: leaves no round with the lasso "
                                         r"\(fl.rounds=2\)"):
        make_cfg(tmp_path, *lasso[:3], "train.lambda_warmup=2", name="long")


def test_server_evaluation_side_by_side_does_not_depend_on_the_cores(tmp_path, monkeypatch):
    cfg, _ = make_cfg(tmp_path, "devices=three_tiers", "train.eps_ps=0.3")
    gm = MaestroStrategy(cfg, None, show_progress=False).global_model
    gm.shrink(0.3)  # ranks below full, so the tiers cut the model
    caps = [None] + [gm.tier_caps(t) for t in cfg.devices.tiers]
    torch.set_num_threads(2)
    side_by_side = gm.evaluate_many(caps)
    torch.set_num_threads(1)
    monkeypatch.setattr("strategies.global_model.os.cpu_count", lambda: 1)
    assert side_by_side == [gm.evaluate(c) for c in caps]
    params = [row["params"] for row in side_by_side]  # each row measured its own model
    assert params[0] == params[3] > params[2] > params[1]  # full = large (budget 1.0) > medium > small
    test_set = gm.test_loader.dataset
    model = gm.sub_model(caps[1])
    whole = evaluate(model, data.BatchLoader(test_set, 1000, shuffle=False), gm.task, gm.device)
    assert side_by_side[1]["accuracy"] == whole["accuracy"]  # shards add up to the whole test set
    assert side_by_side[1]["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_dense_fedavg_is_the_example_weighted_mean(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "model.factorize=false", "devices=homogeneous", "fl.rounds=1")
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    assert all(axis is None for axis in strategy.global_model.layout.axes.values())
    captured = {}
    strategy.start(LocalGrid(faulty_app({}, captured), 4))
    total = sum(w for _, w in captured.values())
    after = strategy.global_model.arrays()
    for name in after:  # the same float64 sum, in partition-id order, cast to float32
        mean = sum(w * captured[p][0][name].astype(np.float64) for p, (_, w) in sorted(captured.items())) / total
        np.testing.assert_array_equal(after[name], mean.astype(np.float32))
    r = records(run_dir)[0]
    assert r["params"] == r["params_deployed"] == 44_426 and r["total_rank"] == 0
    assert "  dense      params  44,426" in strategy.runlog.progress_line(r)  # its round line: no "rank 0"
    table = strategy.runlog.table(strategy.runlog.summary())
    assert {cell for c in table.columns if c.header == "rank" for cell in c._cells} == {"dense"}
    assert r["lambda_gl"] == 0.0 and cfg.train.lambda_gl > 0  # no lasso on a dense model, whatever the config says


def test_mac_budget_is_solved_into_caps(tmp_path):
    devices = "devices.tiers=[{name: tiny, share: 0.5, max_macs: 0.3}, {name: full, share: 0.5}]"
    cfg, run_dir = make_cfg(tmp_path, devices, "fl.rounds=1")
    strategy, grid = run(cfg, run_dir)
    r = records(run_dir)[0]
    dense_macs = strategy.global_model.dense.macs
    tiny = r["tiers"]["tiny"]
    assert tiny["macs"] <= 0.3 * dense_macs < r["tiers"]["full"]["macs"]
    caps = strategy.global_model.tier_caps(cfg.devices.tiers[0])
    assert strategy.global_model.costs["macs"](caps) == tiny["macs"]  # the cost model is exact
    bigger = tiers.fraction_caps(strategy.global_model.ranks(), 1.0)
    assert strategy.global_model.costs["macs"](bigger) > 0.3 * dense_macs


def test_columns_no_tier_holds_are_cut_so_that_shrinking_goes_on(tmp_path):
    # the full-rank factorized LeNet costs 1.21x the dense MACs: a 1.0x cap cannot hold it, and the columns
    # above every tier's caps, never trained, would block shrinking (their tail norms never fall)
    cfg, run_dir = make_cfg(tmp_path, "devices=three_tiers_macs", "fl.clients_per_round=4", "train.lambda_gl=2.0",
                            "train.hgl_mode=proximal", "train.eps_ps=0.01")
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    full = strategy.global_model.ranks()
    strategy.start(LocalGrid(real_client.app, cfg.fl.num_clients))
    rs = records(run_dir)
    dense_macs = strategy.global_model.dense.macs
    for r in rs:  # the largest tier holds the whole global model, within its cap
        assert r["tiers"]["large"]["macs"] == r["macs"] <= dense_macs
    assert sum(rs[-1]["ranks"].values()) < sum(rs[0]["ranks"].values()) < sum(full.values())


def test_the_largest_budget_must_be_one():
    with pytest.raises(ValueError, match=r"devices.tiers.budget=\[0.25, 0.5\] is invalid: the largest budget must be "
                                         r"1.0.*divide them by 0.5"):
        compose(TINY + ["devices.tiers=[{name: s, share: 0.5, budget: 0.25}, {name: m, share: 0.5, budget: 0.5}]"])


def test_centralized_only_training_keys_are_named_when_set_in_federated_mode(tmp_path, caplog):
    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1", "train.epochs=5", "train.milestones=[3]", "train.threads=2",
                            "train.num_workers=2")
    with caplog.at_level(logging.WARNING, logger="fedmaestro.strategy"):
        run(cfg, run_dir)
    assert any("train.epochs=5 is not used by the federated mode; set fl.rounds and fl.local_epochs" in m
               for m in caplog.messages)
    assert any("train.threads=2 is not used by the federated mode; set fl.client_cpus" in m for m in caplog.messages)
    assert any("train.num_workers=2 is not used by the federated mode" in m for m in caplog.messages)
    assert any("train.milestones [3] >= fl.rounds=1 (in federated mode they count rounds)" in m for m in caplog.messages)


def test_a_tiers_budget_is_a_share_of_the_model_the_budget_one_tiers_hold(tmp_path):
    # b's MAC cap holds fewer columns than half the uncut ranks; the model is cut to b's, and a holds half of those
    cfg, run_dir = make_cfg(tmp_path, "devices.tiers=[{name: a, share: 0.5, budget: 0.5}, "
                                      "{name: b, share: 0.5, budget: 1.0, max_macs: 0.3}]")
    gm = MaestroStrategy(cfg, run_dir, show_progress=False).global_model
    a_uncut, b_uncut = (gm.tier_caps(t) for t in cfg.devices.tiers)
    assert any(a_uncut[n] > b_uncut[n] for n in a_uncut)  # against the uncut ranks, a would get more than b
    assert gm.cut_to_tiers(cfg.devices.tiers) and gm.ranks() == b_uncut
    a, b = (gm.tier_caps(t) for t in cfg.devices.tiers)
    assert b == gm.ranks() and a == {n: math.ceil(0.5 * r) for n, r in gm.ranks().items()}
    assert not gm.cut_to_tiers(cfg.devices.tiers)  # a fixed point: cutting again takes nothing


@pytest.mark.parametrize("keep, given", [(True, False), (False, False), (True, True)])
def test_a_fresh_model_cut_by_a_budget_keeps_each_layers_initial_norm(tmp_path, keep, given):
    # a parameter cap on the only tier cuts the global model before round 1: a fresh initialization keeps each
    # cut layer's Frobenius norm (where strategy.keep_init_norm); arrays the caller gives are cut as they are
    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1", "devices=homogeneous", "devices.tiers.0.max_params=0.4",
                            f"strategy.keep_init_norm={str(keep).lower()}")
    uncut = MaestroStrategy(cfg, run_dir, show_progress=False).global_model.arrays()  # the same seed, the same init
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    grid = LocalGrid(real_client.app, cfg.fl.num_clients)
    strategy.start(grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in uncut.items()}) if given else None)
    sent = {k: v.numpy() for k, v in train_messages(grid, 1)[0].content.array_records[P.ARRAYS].items()}
    norm = lambda u, v: np.linalg.norm(u.reshape(len(u), -1).T.astype(np.float64) @ v.reshape(len(v), -1))
    cut = [n for n in strategy.global_model.ranks() if sent[f"{n}.u"].shape[0] < uncut[f"{n}.u"].shape[0]]
    assert "fc1" in cut
    for name in cut:
        full_u, full_v, u, v = uncut[f"{name}.u"], uncut[f"{name}.v"], sent[f"{name}.u"], sent[f"{name}.v"]
        rank = len(u)
        scale = np.sqrt(norm(full_u, full_v) / norm(full_u[:rank], full_v[:rank])) if keep and not given else 1.0
        assert scale == 1.0 or scale > 1.05  # (the truncated SVD of a random init loses part of its norm)
        np.testing.assert_allclose(u, full_u[:rank] * scale, rtol=1e-5, atol=1e-7)  # U and V scaled alike
        np.testing.assert_allclose(v, full_v[:rank] * scale, rtol=1e-5, atol=1e-7)
        if scale > 1.0:
            assert norm(u, v) == pytest.approx(norm(full_u, full_v), rel=1e-5)


def test_a_federated_run_from_before_keep_init_norm_reads_as_cut_plainly_and_resumes():
    # its initial model was cut without keeping the norm; a resume never scales, so it goes on under either value
    stored = to_dict(compose(TINY)[0])
    del stored["strategy"]["keep_init_norm"]
    now = to_dict(compose(TINY)[0])
    assert with_defaults(stored)["strategy"]["keep_init_norm"] is False
    assert checkpoint.config_diff(stored, now) == ["strategy.keep_init_norm: False -> True"]
    checkpoint.check_resumable(stored, now, checkpoint.resume_ignored("federated", "fashion_mnist"))


def test_the_server_sends_the_scheduled_learning_rate(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=3", "train.lr=0.01", "train.milestones=[2]", "train.gamma=0.1")
    _, grid = run(cfg, run_dir)
    lrs = [sorted({m.content.config_records[P.CONFIG][P.LR] for m in train_messages(grid, rnd)}) for rnd in (1, 2, 3)]
    assert lrs == [[0.01], [0.01], [pytest.approx(0.001)]]  # decayed after round 2, as after epoch 2 centralized


def test_impossible_budget_fails_before_any_round(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "devices.tiers=[{name: nano, share: 1.0, max_params: 0.001}]")
    with pytest.raises(ValueError, match="tier 'nano': solve_caps: no sub-model fits"):
        MaestroStrategy(cfg, run_dir, show_progress=False)


def test_federated_evaluation_on_local_test_splits(tmp_path):
    app = real_app("evaluate")
    answers = {}

    @app.evaluate()
    def evaluate(message, context):
        reply = real_client.evaluate(message, context)
        m = reply.content.metric_records[P.METRICS]
        answers[int(context.node_config[P.PARTITION_ID])] = (m[P.NUM_EXAMPLES], m[P.ACCURACY], m[P.LOSS])
        return reply

    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1", "fl.federated_eval_every=1", "data.local_test_fraction=0.2")
    run(cfg, run_dir, app)
    r = records(run_dir)[0]
    sizes = [n for n, _, _ in answers.values()]
    assert len(answers) >= 2 and len(set(sizes)) > 1  # unequal local test splits: a plain mean would differ
    total = sum(sizes)
    assert r["fed_accuracy"] == pytest.approx(sum(n * a for n, a, _ in answers.values()) / total, rel=1e-12)
    assert r["fed_loss"] == pytest.approx(sum(n * loss for n, _, loss in answers.values()) / total, rel=1e-12)
    assert r["fed_accuracy"] != pytest.approx(np.mean([a for _, a, _ in answers.values()]), rel=1e-9)


def test_client_training_repeats_for_a_seed_and_round(tmp_path):
    cfg, _ = make_cfg(tmp_path, "devices=three_tiers")
    strategy = MaestroStrategy(cfg, None, show_progress=False)
    glob = strategy.global_model.arrays()
    caps = tiers.fraction_caps(strategy.global_model.ranks(), 0.5)
    part = nested.prefix(glob, caps, strategy.global_model.layout)
    kw = dict(caps=caps, lr=0.01, lambda_gl=1e-3, local_epochs=1, sampler="per_layer", seed=0)
    a, ma = local.train(cfg, 1, part, rnd=1, **kw)
    b, mb = local.train(cfg, 1, part, rnd=1, **kw)
    c, _ = local.train(cfg, 1, part, rnd=2, **kw)
    assert all(np.array_equal(a[k], b[k]) for k in a) and ma["loss"] == mb["loss"]
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in part.items()}


def test_query_needs_a_partition_id(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1")
    grid = LocalGrid(real_client.app, 4)
    for context in grid.contexts.values():
        context.node_config.pop(P.PARTITION_ID)
    with pytest.raises(RuntimeError, match=r"clients failed to start:\n  node 1000: ValueError: this node has no "
                                           r"'partition-id' in its node config; start the SuperNode with --node-config"):
        MaestroStrategy(cfg, run_dir, show_progress=False).start(grid)


# --- presets: every federated experiment file composes and runs a round ----------------------------------------
@pytest.mark.parametrize("preset, factorized, sampler, shrinks", [
    ("fl_maestro", True, "per_layer", True), ("fl_fedavg", False, "none", False),
    ("fl_fjord", True, "across_layers", False), ("fl_heterofl", True, "fixed", False)])
def test_every_federated_preset_runs(tmp_path, preset, factorized, sampler, shrinks):
    cfg, run_dir = make_cfg(tmp_path, f"+experiment={preset}", "fl.rounds=1", "train.eps_ps=0.3")
    assert cfg.model.factorize is factorized and cfg.train.sampler == sampler
    assert cfg.devices.name == "three_tiers" and cfg.fl.num_clients == 4  # the preset overrides the method only
    full = sum(MaestroStrategy(cfg, None, show_progress=False).global_model.ranks().values())
    assert full == (226 if factorized else 0)  # 236 ranks in the five layers; the classifier (fc3) stays dense
    run(cfg, run_dir)
    r = records(run_dir)[0]
    assert r["shrunk"] is shrinks  # eps 0.3 cuts at once whenever shrinking is on
    assert (r["total_rank"] < full) is shrinks if factorized else r["total_rank"] == 0
    assert r["sampler"] == (sampler if factorized else None)  # what ran; a dense model samples no ranks
    assert len(r["clients"]["valid"]) == 3 and set(r["tiers"]) == {"small", "medium", "large"}


@pytest.mark.parametrize("devices", ["three_tiers_faulty", "three_tiers_macs", "five_tiers", "homogeneous"])
def test_every_device_preset_solves_its_caps(tmp_path, devices):
    cfg, run_dir = make_cfg(tmp_path, f"devices={devices}")
    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    caps = strategy.caps_of_tiers()
    sizes = [sum(c.values()) for c in caps]
    assert sizes == sorted(sizes) and 0 < sizes[0] and sizes[-1] <= 236  # tiers ordered small to large
    for tier, c in zip(cfg.devices.tiers, caps):
        if tier.max_macs:
            assert strategy.global_model.costs["macs"](c) <= tier.max_macs * strategy.global_model.dense.macs


def test_the_simulation_grid_is_polled_more_often_than_flowers_default(monkeypatch):
    """The in-memory grid sleeps pull_interval between looks for replies: at Flower's 0.1 s a round's end
    is seen up to 0.1 s late. serve() lowers it to IN_MEMORY_POLL_S before the strategy starts. The simulation
    adapter's ServerApp (make_app) has the strategy keep one more message in flight than Ray has workers;
    ``flwr run``'s (whose workers its federation config sets) sends all at once."""
    from fedmaestro.config import Config
    from strategies.simulation import num_workers

    grid = InMemoryGrid.__new__(InMemoryGrid)  # no link state needed: only the attribute is read
    grid.pull_interval = 0.1
    seen = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            pass

        def start(self, g):
            seen.append((g.pull_interval, self.dispatch_window))

    monkeypatch.setattr(server_app, "MaestroStrategy", Recorder)
    server_app.serve(grid, Config(), None)
    assert seen == [(server_app.IN_MEMORY_POLL_S, None)] and server_app.IN_MEMORY_POLL_S < 0.1
    calls = []
    monkeypatch.setattr(server_app, "serve", lambda *args, **kwargs: calls.append(kwargs))
    server_app.make_app(Config(), None)._main(grid, None)
    assert calls == [{"dispatch_window": num_workers(Config()) + 1}]


class UntouchedGrid:
    """A grid the ServerApp must not use: any attribute read fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the ServerApp used the grid ({name}) before its preflight passed")


def flwr_run_main(tmp_path, *overrides, name="run"):
    """The ServerApp that ``flwr run .`` loads, given the run config's Hydra overrides."""
    context = SimpleNamespace(run_config={server_app.OVERRIDES_KEY: " ".join(
        TINY + list(overrides) + [f"hydra.run.dir={tmp_path / name}"])})
    return server_app.app._main(UntouchedGrid(), context)


def test_the_flwr_run_serverapp_writes_the_runs_log_as_python_m_fedmaestro_does(tmp_path):
    context = SimpleNamespace(run_config={server_app.OVERRIDES_KEY: " ".join(
        TINY + ["fl.rounds=1", f"hydra.run.dir={tmp_path / 'run'}"])})
    server_app.app._main(LocalGrid(real_client.app, 4), context)
    text = (tmp_path / "run" / "fedmaestro.log").read_text()
    assert "][fedmaestro.run_log][INFO] - MaestroStrategy: 1 rounds" in text  # the start-up summary
    assert "][fedmaestro.run_log][INFO] - round   1/1  acc " in text  # progress=false: off the console, in the log
    assert "federated run: 1 round," in text and "global (full rank)" in text  # what echo printed: the summary table
    assert not logging.getLogger("fedmaestro").handlers  # the handler goes with the run


def test_the_flwr_run_serverapp_fails_on_a_bad_partition_before_any_client_is_asked(tmp_path):
    # without the preflight every client's reply would be an error, dropped, round after round
    with pytest.raises(ValueError, match="partition: 4 partitions of at least min_partition_size=100000"):
        flwr_run_main(tmp_path, "partition.min_partition_size=100000")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("train.epoch=1", r"config: unknown keys \(not in the schema, fedmaestro/config.py\): train.epoch \(did you mean "
                      r"train.epochs\?\)"),
    ("devices=three_tier", r"Could not find 'devices/three_tier'\nAvailable options in 'devices':\n\tfive_tiers")])
def test_flwr_run_overrides_hydra_cannot_compose_are_refused_as_the_command_line_words_them(override, message):
    with pytest.raises(ValueError, match=message):
        compose([override])


def test_under_flwr_run_a_server_without_the_training_set_warns_and_leaves_the_partitions_to_the_clients(
        tmp_path, caplog):
    cfg, run_dir = make_cfg(tmp_path, "dataset=mnist", f"data.root={tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="mnist: train files not found"):  # python -m fedmaestro: an error
        server_app.preflight(cfg, run_dir)
    with caplog.at_level(logging.WARNING, logger="strategies.server_app"):
        assert server_app.preflight(cfg, run_dir, server_has_data=False) == 0
    assert "preflight: the server has no copy of the clients' training set (mnist: train files not found" in caplog.text


def test_the_flwr_run_serverapp_stops_at_once_when_the_resumed_run_has_done_every_round(tmp_path, caplog):
    cfg, run_dir = make_cfg(tmp_path, "devices=homogeneous", "fl.rounds=1")
    run(cfg, run_dir)
    with caplog.at_level(logging.WARNING, logger="strategies.server_app"):
        flwr_run_main(tmp_path, "devices=homogeneous", "fl.rounds=1", "resume=true")
    assert "the run has done all fl.rounds=1 rounds" in caplog.text
    with pytest.raises(ValueError, match="train.lr"):  # a resume with another config: refused, before any round
        flwr_run_main(tmp_path, "devices=homogeneous", "fl.rounds=2", "resume=true", "train.lr=0.5")


def test_a_resume_of_a_run_interrupted_after_its_last_checkpoint_writes_its_model_and_summary(tmp_path, caplog):
    cfg, run_dir = make_cfg(tmp_path, "devices=homogeneous", "fl.rounds=1")
    run(cfg, run_dir)
    model = torch.load(run_dir / "model.pt", weights_only=True)
    for name in ("model.pt", "summary.json", "plot_accuracy_round.png"):  # what the end of the run writes
        (run_dir / name).unlink()
    with caplog.at_level(logging.WARNING, logger="strategies.server_app"):
        flwr_run_main(tmp_path, "devices=homogeneous", "fl.rounds=1", "resume=true")
    assert "the run has done all fl.rounds=1 rounds" in caplog.text
    again = torch.load(run_dir / "model.pt", weights_only=True)
    assert again["ranks"] == model["ranks"] and all(torch.equal(again["model"][k], v) for k, v in model["model"].items())
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 1
    assert (run_dir / "plot_accuracy_round.png").is_file()


def test_a_resume_from_a_checkpoint_that_does_not_exist_is_refused_not_started_afresh(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "resume=true", f"checkpoint={tmp_path / 'typo'}")
    with pytest.raises(FileNotFoundError, match=rf"resume: checkpoint={tmp_path / 'typo'} does not exist; give "
                                                r"checkpoint= the directory of the run to continue"):
        server_app.preflight(cfg, run_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # the strategy itself, however it is started
        MaestroStrategy(cfg, run_dir, show_progress=False).resume()
    cfg.resume = False  # flwr run: checkpoint= alone is refused as python -m fedmaestro refuses it
    with pytest.raises(ValueError, match=r"is read only with resume=true"):
        server_app.preflight(cfg, run_dir)


def test_progress_false_drops_the_round_lines_but_keeps_the_start_up_line_and_summary(tmp_path):
    from fedmaestro.console import console

    for progress in ("true", "false"):
        cfg, run_dir = make_cfg(tmp_path, "devices=homogeneous", "fl.rounds=1", f"progress={progress}", name=progress)
        with console.capture() as out:
            MaestroStrategy(cfg, run_dir).start(LocalGrid(real_client.app, cfg.fl.num_clients))
        text = out.get()
        assert "start-up" in text and "global (full rank)" in text
        assert ("round   1/1" in text) == (progress == "true")


@pytest.mark.slow
@pytest.mark.parametrize("devices", ["three_tiers", "three_tiers_macs"])
def test_batchnorm_statistics_are_kept_per_tier_and_each_tier_is_evaluated_with_its_own(tmp_path, devices):
    """ResNet-18: each client re-estimates its BatchNorm statistics at its caps after training; the server pools
    them per tier, the global model keeps those of the tier that holds it whole (with MAC caps every tier has
    budget 1.0, but only the large one holds the model), and each tier's cut is evaluated with its own, on the
    server and on the clients."""
    cfg, run_dir = make_cfg(tmp_path, "model=resnet18", f"devices={devices}", "fl.rounds=1", "fl.clients_per_round=4",
                            "data.subset=240", "data.test_subset=64", "fl.federated_eval_every=1")
    strategy, grid = run(cfg, run_dir)
    gm = strategy.global_model
    assert strategy.full_tiers == [2]
    pid_of = {node: pid for pid, node in strategy.node_of.items()}
    sent_to_small = [m for m in grid.messages_seen if m.metadata.message_type == "evaluate"
                     and strategy.tier_of[pid_of[m.metadata.dst_node_id]] == 0]
    assert sent_to_small and all(
        np.array_equal(sent_to_small[0].content.array_records[P.ARRAYS][n].numpy(), a)
        for n, a in gm.batchnorm_stats["0"].items())
    assert len(records(run_dir)[-1]["clients"]["valid"]) == 4  # num_batches_tracked (0-d) keeps its shape
    assert gm.batchnorm and set(gm.batchnorm_stats) == {"0", "1", "2", "full"}  # every tier answered
    name = gm.batchnorm[-1]
    own = {n: a for n, a in gm.arrays().items() if n in gm.batchnorm_stats["full"]}
    assert all(np.array_equal(own[n], a) for n, a in gm.batchnorm_stats["full"].items())
    assert all(np.array_equal(gm.batchnorm_stats["2"][n], a) for n, a in gm.batchnorm_stats["full"].items())
    assert not np.allclose(gm.batchnorm_stats["0"][f"{name}.running_var"],
                           gm.batchnorm_stats["2"][f"{name}.running_var"])  # other ranks, other statistics
    small = gm.tier_caps(cfg.devices.tiers[0])
    record = records(run_dir)[-1]
    with_own = gm.evaluate_many([small], [gm.tier_batchnorm(0)])[0]
    assert record["tiers"]["small"]["loss"] == pytest.approx(with_own["loss"], rel=1e-6)
    assert gm.evaluate_many([small])[0]["loss"] != pytest.approx(with_own["loss"], rel=1e-6)
    again, _ = run(*make_cfg(tmp_path, "model=resnet18", f"devices={devices}", "fl.rounds=1", "fl.clients_per_round=4",
                             "data.subset=240", "data.test_subset=64", "fl.federated_eval_every=1", "resume=true",
                             name="run"))
    assert again.global_model.batchnorm_stats.keys() == gm.batchnorm_stats.keys()  # kept by the checkpoint


def test_zero_dimensional_arrays_keep_their_shape_on_the_wire():
    from strategies.maestro import _record_arrays, _to_record

    arrays = {"bn.num_batches_tracked": np.array(7, dtype=np.int64), "w": np.ones((2, 3), np.float32).T}
    back = _record_arrays(_to_record(arrays))
    assert {n: a.shape for n, a in back.items()} == {"bn.num_batches_tracked": (), "w": (3, 2)}
    assert nested.check_arrays(back, {n: a.shape for n, a in arrays.items()}) == []


# --- round bookkeeping, checked against the replies themselves (a mutation audit found these unpinned) ------
class DuplicatingGrid(LocalGrid):
    """Returns the first train reply of every exchange twice, as a flaky transport might."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if replies and replies[0].metadata.message_type == "train":
            replies.append(replies[0])
        return replies


def test_round_metrics_bytes_and_summary_follow_the_replies(tmp_path):
    # dirichlet partitions (unequal sizes), three tiers, federated evaluation every round, a duplicated reply
    cfg, run_dir = make_cfg(tmp_path, "devices=three_tiers", "fl.federated_eval_every=1", "fl.clients_per_round=4")
    replies = {}
    app = real_app("train")

    @app.train()
    def train(message, context):
        reply = real_client.train(message, context)
        m = reply.content.metric_records[P.METRICS]
        replies.setdefault(int(message.content.config_records[P.CONFIG][P.ROUND]), []).append(
            (int(m[P.PARTITION_ID]), float(m[P.TRAIN_LOSS]), int(m[P.NUM_EXAMPLES])))
        return reply

    strategy = MaestroStrategy(cfg, run_dir, show_progress=False)
    grid = DuplicatingGrid(app, cfg.fl.num_clients)
    strategy.start(grid)
    rs = records(run_dir)
    down = 0
    for r in rs:
        got = sorted(replies[r["round"]])
        assert len({n for _, _, n in got}) > 1  # unequal weights: a plain mean would differ
        assert r["train_loss"] == pytest.approx(sum(n * loss for _, loss, n in got) / sum(n for _, _, n in got))
        first = min(got)[0]  # the duplicated reply (first in partition order) is dropped, the original kept
        assert r["clients"]["valid"] == [p for p, _, _ in got] and list(r["clients"]["dropped"]) == [f"{first} (again)"]
        assert sum(r["clients"]["per_tier"].values()) == len(r["clients"]["valid"])
        assert "fed_accuracy" in r
    for m in grid.messages_seen:  # bytes_down: every train and every evaluation message
        for record in m.content.array_records.values():
            down += nested.num_bytes({k: v.numpy() for k, v in record.items()})
    assert {m.metadata.message_type for m in grid.messages_seen} >= {"train", "evaluate"}
    assert rs[-1]["bytes_down"] == down
    wall = 0.0
    for r in rs:
        wall += r["timing"]["round_s"]
        assert r["wall_s"] == pytest.approx(wall, abs=2e-3)  # both rounded in the record
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy"] == rs[-1]["accuracy"] and summary["rounds"] == len(rs)
    assert summary["mb_down"] == rs[-1]["bytes_down"] / 1e6 and summary["mb_up"] == rs[-1]["bytes_up"] / 1e6
    assert summary["steady_round_s"] == pytest.approx(sum(r["timing"]["round_s"] for r in rs[1:]) / (len(rs) - 1), abs=1e-3)


def test_shrinking_every_second_round_shrinks_in_round_two(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "devices=homogeneous", "strategy.shrink_every=2", "train.eps_ps=0.3")
    run(cfg, run_dir)
    assert [r["shrunk"] for r in records(run_dir)] == [False, True]


def test_a_parameter_budget_is_solved_into_caps_and_params_rel_counts_the_deployed_model(tmp_path):
    devices = "devices.tiers=[{name: tiny, share: 0.5, max_params: 0.3}, {name: full, share: 0.5}]"
    cfg, run_dir = make_cfg(tmp_path, devices, "fl.rounds=1", "strategy.shrink_every=0")
    strategy, _ = run(cfg, run_dir)
    gm = strategy.global_model
    caps = gm.tier_caps(cfg.devices.tiers[0])
    assert gm.costs["params"](caps) <= 0.3 * gm.dense.params  # 0.3 x 44,426 parameters
    assert gm.costs["params"](tiers.fraction_caps(gm.ranks(), 1.0)) > 0.3 * gm.dense.params
    r = records(run_dir)[0]
    assert r["params"] == 66_274 > r["params_deployed"] == 44_426 == gm.dense.params  # full rank: cheaper dense
    assert r["params_rel"] == 1.0 and r["tiers"]["tiny"]["params_rel"] <= 0.3
    # the lasso's stop rule reads the deployed size too (1.0x at full rank, where the factors held are 1.49x): a
    # 0.99x target is met once fc1 is cut to rank 60, whose factors (22,560) cost less than its dense weight (30,720)
    cfg, _ = make_cfg(tmp_path, "devices=homogeneous", "train.lambda_gl=0.1", "train.lambda_stop_params=0.99",
                      name="stop")
    strategy = MaestroStrategy(cfg, None, show_progress=False)
    assert strategy.round_training(1) == (0.1, cfg.train.sampler)  # 1.0x: above 0.99x, the lasso is on
    lod.truncate(strategy.global_model.model, {"fc1": 60})
    assert strategy.global_model.footprint(strategy.global_model.model)["params_rel"] < 0.99
    assert strategy.round_training(1) == (0.0, cfg.train.sampler)


def test_local_training_reads_the_rounds_batch_order_and_reports_the_prediction_mean_loss(tmp_path, monkeypatch):
    cfg, _ = make_cfg(tmp_path, "devices=homogeneous")
    strategy = MaestroStrategy(cfg, None, show_progress=False)
    glob = strategy.global_model.arrays()
    caps = strategy.global_model.ranks()
    epochs_set, calls = [], []
    monkeypatch.setattr(data.BatchLoader, "set_epoch", lambda self, e: epochs_set.append(e))

    def fake_epoch(model, loader, *args, **kwargs):  # per epoch: mean loss 2.0 and 3.0, over 300 and 100 predictions
        calls.append(1)  # (as many as examples in classification; target tokens in translation)
        first = len(calls) == 1
        return {"loss": 2.0 if first else 3.0, "num_examples": 30, "predictions": 300 if first else 100, "steps": 10}

    monkeypatch.setattr(local, "train_epoch", fake_epoch)
    _, m = local.train(cfg, 1, glob, rnd=3, caps=caps, lr=0.01, lambda_gl=0.0, local_epochs=2, sampler="per_layer",
                       seed=0)
    assert epochs_set == [4, 5]  # round 3 of 2 local epochs: the run's 5th and 6th passes over the partition
    assert m["loss"] == pytest.approx((2.0 * 300 + 3.0 * 100) / 400) and m["steps"] == 20 and m["scored"] == 400


def test_client_data_of_another_seed_is_partitioned_anew_in_the_same_process(tmp_path):
    cfg, _ = make_cfg(tmp_path)
    cfg1, _ = make_cfg(tmp_path, "seed=1")
    a, b = local.client_data(cfg).splits, local.client_data(cfg1).splits
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, b))


def test_a_tiers_batchnorm_statistics_pool_all_of_its_replies_and_the_model_keeps_only_whole_ones(tmp_path):
    cfg, _ = make_cfg(tmp_path, "model=resnet18", "dataset=cifar10", "devices=three_tiers")
    gm = MaestroStrategy(cfg, None, show_progress=False).global_model
    rng = np.random.default_rng(0)
    base = gm.arrays()
    replies = []
    for weight in (100.0, 300.0):
        arrays = dict(base)
        for name in gm.batchnorm:
            arrays[f"{name}.running_mean"] = rng.normal(size=base[f"{name}.running_mean"].shape).astype(np.float32)
            arrays[f"{name}.running_var"] = rng.uniform(0.5, 2, size=base[f"{name}.running_var"].shape).astype(np.float32)
        replies.append((arrays, weight))
    # a round where only the small tier answers: the aggregation's mean gave the model the small sub-models'
    # statistics; it keeps its own, and a tier that has not answered is evaluated with those
    nested.load_batchnorm(gm.model, nested.pool_batchnorm(replies, gm.batchnorm))
    gm.pool_batchnorm({0: replies}, full_tiers=[2], before=base)
    own = gm.arrays()
    assert all(np.array_equal(own[f"{n}.{s}"], base[f"{n}.{s}"]) for n in gm.batchnorm
               for s in ("running_mean", "running_var"))
    assert "full" not in gm.batchnorm_stats and gm.tier_batchnorm(1) is None
    gm.pool_batchnorm({0: replies, 2: replies[1:]}, full_tiers=[2], before=base)
    expected = nested.pool_batchnorm(replies, gm.batchnorm)
    assert gm.batchnorm and all(np.array_equal(gm.batchnorm_stats["0"][k], expected[k]) for k in expected)
    only_large = nested.pool_batchnorm(replies[1:], gm.batchnorm)  # the model keeps the full tier's
    assert all(np.array_equal(gm.batchnorm_stats["full"][k], only_large[k]) for k in only_large)


def test_the_workers_end_of_run_warning_is_not_shown():
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    try:
        flwr_logger.warning("Manually terminating %s", "ClientAppActor")  # what every worker logs at the end
        flwr_logger.warning("something else")
    finally:
        flwr_logger.removeHandler(handler)
    assert seen == ["something else"]


class FailingGrid(LocalGrid):
    """Raises in the exchange of round ``fail_round``'s training, as an interruption would."""

    def __init__(self, *args, fail_round: int, **kw):
        super().__init__(*args, **kw)
        self.fail_round = fail_round

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" and m.content.config_records[P.CONFIG][P.ROUND] == self.fail_round
               for m in messages):
            raise KeyboardInterrupt
        return super().send_and_receive(messages, timeout=timeout)


def test_evaluating_while_the_next_round_trains_changes_no_record_and_an_interruption_keeps_the_last_round(tmp_path):
    shrinking = ["fl.rounds=3", "train.eps_ps=0.3"]
    cfg, between = make_cfg(tmp_path, *shrinking, name="between")
    assert not cfg.strategy.overlap_eval  # the default
    run(cfg, between)
    cfg, overlapped = make_cfg(tmp_path, *shrinking, "strategy.overlap_eval=true", name="overlapped")
    run(cfg, overlapped)
    assert timeless(records(overlapped)) == timeless(records(between))
    assert len({r["total_rank"] for r in records(between)}) > 1  # the model the next round changed was evaluated
    ckpt_a, ckpt_b = (checkpoint.load(d / "checkpoint.pt") for d in (between, overlapped))
    assert all(torch.equal(ckpt_a["model"][k], ckpt_b["model"][k]) for k in ckpt_a["model"])
    assert timeless(ckpt_a["records"]) == timeless(ckpt_b["records"])

    # round 3 is interrupted while round 2 is being evaluated: round 2's record and checkpoint are written
    cfg, cut = make_cfg(tmp_path, *shrinking, "strategy.overlap_eval=true", name="cut")
    with pytest.raises(KeyboardInterrupt):
        MaestroStrategy(cfg, cut, show_progress=False).start(FailingGrid(real_client.app, 4, fail_round=3))
    assert timeless(records(cut)) == timeless(records(between))[:2]
    assert checkpoint.load(cut / "checkpoint.pt")["round"] == 2
    cfg, cut = make_cfg(tmp_path, *shrinking, "resume=true", name="cut")  # resumed with the other setting
    run(cfg, cut)
    assert timeless(records(cut)) == timeless(records(between))


def test_client_resources_no_machine_can_give_are_refused_before_ray_starts(tmp_path, caplog):
    from strategies.simulation import backend_config, check_resources
    cfg, _ = make_cfg(tmp_path, "fl.client_cpus=2", "fl.client_gpus=0.25")
    assert backend_config(cfg)["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    check_resources(cfg, cpus=2, gpus=1)  # fits: 1 client at a time on the CPUs, 4 on the GPU
    with pytest.raises(ValueError, match=r"fl.client_cpus=2: this machine has 1 CPU\(s\), so no client could start; "
                                         r"set fl.client_cpus=1 or less"):
        check_resources(cfg, cpus=1, gpus=1)
    with pytest.raises(ValueError, match=r"fl.client_gpus=0.25: this machine has no CUDA device.*set fl.client_gpus=0"):
        check_resources(cfg, cpus=2, gpus=0)
    cfg, _ = make_cfg(tmp_path, "fl.client_gpus=2")
    with pytest.raises(ValueError, match=r"fl.client_gpus=2: this machine has 1 CUDA device\(s\).*fl.client_gpus=1 or less"):
        check_resources(cfg, cpus=2, gpus=1)
    cfg, _ = make_cfg(tmp_path, "fl.client_gpus=0.5", "device=cpu")
    with caplog.at_level(logging.WARNING, logger="fedmaestro.simulation"):
        check_resources(cfg, cpus=2, gpus=1)
    assert any("device=cpu trains them on the CPU" in m for m in caplog.messages)


def test_strategy_eval_tiers_false_evaluates_the_full_model_only(tmp_path):
    cfg, run_dir = make_cfg(tmp_path, "devices=three_tiers", "fl.rounds=1", "strategy.eval_tiers=false")
    run(cfg, run_dir)
    (rec,) = records(run_dir)
    assert "tiers" not in rec and 0 <= rec["accuracy"] <= 1 and rec["total_rank"] > 0


def test_fl_local_epochs_reaches_the_clients_through_the_train_message(tmp_path):
    steps = {}
    for epochs in (1, 2):
        replies = []

        def app(msg, context):
            reply = real_client.app(msg, context)
            if msg.metadata.message_type == "train":
                replies.append(reply)
            return reply

        cfg, run_dir = make_cfg(tmp_path, "fl.rounds=1", f"fl.local_epochs={epochs}", name=f"e{epochs}")
        _, grid = run(cfg, run_dir, app=app)
        assert {int(m.content.config_records[P.CONFIG][P.LOCAL_EPOCHS]) for m in train_messages(grid, 1)} == {epochs}
        steps[epochs] = {int(r.content.metric_records[P.METRICS][P.PARTITION_ID]):
                         int(r.content.metric_records[P.METRICS][P.STEPS]) for r in replies}
    assert steps[1] and steps[2] == {pid: 2 * s for pid, s in steps[1].items()}


def test_a_federated_transformer_takes_its_vocabulary_size_from_the_data_set(tmp_path):
    from test_data import make_multi30k
    make_multi30k(tmp_path / "data" / "multi30k")
    vocab = data.load("multi30k", tmp_path / "data", train=True).vocab
    cfg, run_dir = compose(["model=transformer", "dataset=multi30k", f"data.root={tmp_path / 'data'}",
                            "+model.kwargs={d_model: 16, heads: 2, ffn: 32, layers: 1}", "partition=iid",
                            "fl.num_clients=2", "fl.clients_per_round=2", "fl.rounds=1", "train.batch_size=2",
                            "data.local_test_fraction=0", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"])
    strategy, grid = run(cfg, tmp_path / "run")
    assert strategy.cfg.model.kwargs["vocab_size"] == len(vocab) < 9521  # the data's, not the paper's 9,521
    sent = json.loads(str(grid.messages_seen[0].content.config_records[P.CONFIG][P.RUN_CONFIG]))
    assert sent["model"]["kwargs"]["vocab_size"] == len(vocab)  # the clients build the same model
    assert sent["dataset"]["vocabulary"] == vocab.fingerprint  # ... and check that their data means the same words
    (rec,) = records(tmp_path / "run")
    assert rec["clients"]["valid"] == [0, 1] and rec["params"] == strategy.global_model.footprint(
        strategy.global_model.model)["params"]
    gm = strategy.global_model  # perplexity, the paper's Transformer metric, over the whole test set's tokens
    whole = evaluate(gm.model, data.BatchLoader(gm.test_loader.dataset, 2, shuffle=False), gm.task, gm.device)
    assert rec["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)


def test_a_client_whose_data_copy_has_another_vocabulary_refuses_to_train(tmp_path):
    """Under Flower's deployment engine every client reads its own copy of the data: one whose vocabulary maps the
    server's token ids to other words raises (its reply is dropped and logged) instead of training on them."""
    from test_centralized import multi30k_copies
    ours, other = multi30k_copies(tmp_path)
    cfg, _ = compose(["model=transformer", "dataset=multi30k", f"data.root={ours}", "partition=iid",
                      "fl.num_clients=2", "fl.clients_per_round=2", "progress=false",
                      f"hydra.run.dir={tmp_path / 'run'}"])
    server_cfg = MaestroStrategy(cfg, tmp_path / "run", show_progress=False).cfg
    assert local.client_data(server_cfg).splits  # the server's own copy: fine
    elsewhere = copy.deepcopy(server_cfg)
    elsewhere.data.root = str(other)
    with pytest.raises(ValueError, match=rf"under data.root={other} have another vocabulary .* than the one the "
                                         rf"model was built on \(fingerprint {server_cfg.dataset.vocabulary}"):
        local.client_data(elsewhere)
