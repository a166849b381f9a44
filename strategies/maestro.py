"""MaestroStrategy: per-client rank budgets, nested column-wise aggregation, server-side shrinking.

A ``flwr.serverapp.strategy.Strategy``. One round (``start`` runs them; Flower's own ``Strategy.start``
can drive the four hooks too, without checkpoints, faults' ordering or records):

1. ``configure_train``: the round's clients are a seeded sample of partition ids (``tiers``), never of
   Flower's random node ids; each gets its own message, built for it: the prefix of every LoD layer
   allowed by its tier's caps ``k_i = ceil(p r_i)`` of the current ranks (or solved from a MAC/param
   cap), every other array whole, and the round's config. Bytes are counted exactly.
2. replies are awaited until the round's deadline (``strategy.round_timeout``); clients told to fail
   (``devices.tiers[].dropout`` / ``straggler``) answer only after it. In the simulation the messages go
   out longest expected training first, one more than the engine has workers at a time
   (``_send_longest_first``), so that no worker idles at the end of a round while another trains.
3. ``aggregate_train``: every reply is validated (an error, missing or extra arrays, missing metrics, a shape
   other than what was sent, a wrong dtype, a non-finite value, arrays that do not decode, metrics that
   are not finite numbers, a partition id other than the node's, a num-examples other than the one the
   client announced when the run started, a second reply, a reply of a client told to fail: dropped and
   logged; the bytes of every reply received count, a late one's never arrive); the
   valid ones are aggregated column by column (``nested.aggregate``, sorted by partition id so that
   float sums repeat exactly); every ``shrink_every`` rounds the global model is shrunk. No valid reply:
   the model is left unchanged, with a warning.
4. evaluation: the global model on the central test set at full rank and at every tier's caps (params
   and MACs of each), on copies taken after aggregation: between rounds, or with
   ``strategy.overlap_eval`` while the next round's clients train (the record and checkpoint of a round
   are written when its evaluation ends, before the next round's aggregation); federated evaluation on
   the clients' local test splits every ``fl.federated_eval_every`` rounds.

Every round appends a record to ``metrics.jsonl`` and writes a checkpoint; ``resume=true`` continues
from it. Clients hold no state between rounds, so a resumed run ends exactly where an uninterrupted
one does.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedmaestro import checkpoint, data, nested, tiers
from fedmaestro.centralized import needs_data_facts, with_data_facts
from fedmaestro import protocol as P
from fedmaestro.config import Config, TrainConfig, to_dict
from fedmaestro.console import echo
from fedmaestro.train import divergence_fix, lasso_schedule, lr_factor

from .global_model import GlobalModel
from .records import RunLog

__all__ = ["MaestroStrategy", "Sent"]

log = logging.getLogger("fedmaestro.strategy")


@dataclass
class Sent:
    """What one node was sent in one round, to check its reply against."""

    partition_id: int
    tier: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    fault: str = P.NO_FAULT


DIVERGED = "training loss is"  # in the error of a client whose training diverged (train.train_epoch's message)
WAIT_NOTICE_S = 10.0  # a start-up that waits this long for nodes says how many connected


def _record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _payload_bytes(record: ArrayRecord) -> int:
    """Elements x item size of every array in ``record``, from the arrays' metadata, and never more than
    the bytes that came (a reply may claim a shape its data does not have). Nothing is decoded, so a
    reply whose arrays do not decode is counted too."""
    total = 0
    for array in record.values():
        try:
            claimed = math.prod(array.shape) * np.dtype(array.dtype).itemsize
        except TypeError:  # a dtype numpy does not know
            claimed = len(array.data)
        total += max(0, min(claimed, len(array.data)))
    return total


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(nested.contiguous(a)) for name, a in arrays.items()})


def _whole_count(value) -> bool:
    """A whole number >= 0 (a count, an id); inf and NaN are not (int(inf) raises)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 and value == int(value)


class MaestroStrategy(Strategy):
    """Maestro's federated strategy; every baseline (FedAvg, FjORD-like, HeteroFL-like) is a config of it."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, *, test_set=None, show_progress: bool = True,
                 launched_at: float | None = None):
        self.cfg = copy.deepcopy(cfg)  # never the caller's object
        self._config: dict | None = None  # to_dict(self.cfg), see _config_dict
        if needs_data_facts(self.cfg):
            # the vocabulary's fingerprint and size come from the data set, as in centralized mode; the clients get
            # them with the run config, build the same embedding and refuse a data copy with another vocabulary
            if test_set is None:
                test_set = data.load(self.cfg.dataset.name, root=self.cfg.data.root, train=False)
            self.cfg = with_data_facts(self.cfg, test_set)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.global_model = GlobalModel(self.cfg, test_set)
        tier_cfgs = self.cfg.devices.tiers
        self.tier_of = tiers.assign(self.cfg.fl.num_clients, [t.share for t in tier_cfgs], self.cfg.seed)
        self.dropout = {pid: tier_cfgs[t].dropout for pid, t in enumerate(self.tier_of)}
        self.straggler = {pid: tier_cfgs[t].straggler for pid, t in enumerate(self.tier_of)}
        self.node_of: dict[int, int] = {}  # partition id -> Flower node id (learned in identify)
        self.examples_of: dict[int, float] = {}  # partition id -> training examples it announced (identify)
        self.seconds_of: dict[int, float] = {}  # partition id -> its last reply's training seconds (dispatch order)
        # messages pushed and unanswered at a time, longest expected training first (_send_longest_first); None:
        # all at once. The simulation sets it (its workers take the messages first in, first out)
        self.dispatch_window: int | None = None
        self.tests_of: dict[int, int] = {}  # partition id -> local test examples it announced (identify)
        self.sent: dict[int, Sent] = {}  # node id -> what it was sent this round
        self.current: dict[str, np.ndarray] = {}  # the global arrays the round's messages were cut from
        self.dtypes: dict[str, np.dtype] = {}
        self.bytes_down = self.bytes_up = 0
        self.round_info: dict = {}
        self.runlog = RunLog(self.cfg, self.run_dir, show_progress=show_progress, launched_at=launched_at)
        self.full_tiers: list[int] = []  # the tiers whose caps held the whole global model in this round
        if self.global_model.factorized:  # a budget that cannot be met fails now, before any work
            self.global_model.held_ranks(tier_cfgs)

    # ------------------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        """A start-up line: on the console (and in the run's log) as the round lines are, where the run shows them."""
        if self.runlog.show:
            echo(text, markup=False)
        else:
            log.info("%s", text)

    def summary(self) -> None:
        c = self.cfg
        defaults = TrainConfig()
        for key, instead in (("epochs", "set fl.rounds and fl.local_epochs"), ("eval_every", "set strategy.eval_every"),
                             ("threads", "set fl.client_cpus"),
                             ("num_workers", "each client reads its partition in its own process")):
            if getattr(c.train, key) != getattr(defaults, key):
                log.warning("train.%s=%r is not used by the federated mode; %s", key, getattr(c.train, key), instead)
        late = [m for m in c.train.milestones if m >= c.fl.rounds]
        if late:
            log.warning("train.milestones %s >= fl.rounds=%d (in federated mode they count rounds): those LR decays "
                        "never happen in this run", late, c.fl.rounds)
        counts = np.bincount(self.tier_of, minlength=len(c.devices.tiers))
        if not self.global_model.factorized:
            self._say(f"MaestroStrategy: {c.fl.rounds} rounds, {c.fl.clients_per_round} of {c.fl.num_clients} clients "
                      f"per round, {c.fl.local_epochs} local epoch(s), a dense model (model.factorize=false): no rank "
                      f"sampling, lasso or shrinking")
            if any(t.budget < 1 or t.max_macs or t.max_params for t in c.devices.tiers):
                log.warning("model.factorize=false: a dense model has no ranks to cut, so every tier of devices=%s "
                            "trains the whole model (budgets do not apply)", c.devices.name)
        else:
            shrinks = c.train.shrink and c.strategy.shrink_every > 0
            warmup = (f" from round {c.train.lambda_warmup + 1}" if c.train.lambda_warmup else "")
            stop = ("" if c.train.lambda_stop_params is None else
                    f" until the params fall to {c.train.lambda_stop_params:g}x dense"
                    + (", then fine-tuning without rank sampling" if c.train.finetune_after_stop else ""))
            shrinking = (f"shrink every {c.strategy.shrink_every} round(s) (eps {c.train.eps_ps:g})" if shrinks else
                         "no shrinking")
            self._say(f"MaestroStrategy: {c.fl.rounds} rounds, {c.fl.clients_per_round} of {c.fl.num_clients} clients "
                      f"per round, {c.fl.local_epochs} local epoch(s), sampler {c.train.sampler}, lambda "
                      f"{c.train.lambda_gl:g}{warmup}{stop}, {shrinking}")
        for t, n in zip(c.devices.tiers, counts):
            self._say(f"  tier {t.name}: {n} client{'' if n == 1 else 's'}, budget {t.budget:g}"
                      + (f", max_macs {t.max_macs}" if t.max_macs else "")
                      + (f", max_params {t.max_params}" if t.max_params else "")
                      + (f", drop-out {t.dropout:g}, straggler {t.straggler:g}" if t.dropout or t.straggler else ""))
        empty = [t.name for t, n in zip(c.devices.tiers, counts) if n == 0]
        if empty:
            held = self.global_model.held_ranks(c.devices.tiers) if self.global_model.factorized else None
            whole = held is None or any(n and self.global_model.tier_caps(t) == held
                                        for t, n in zip(c.devices.tiers, counts))
            log.warning("tiers %s get no client of fl.num_clients=%d (shares %s)%s; raise fl.num_clients or those "
                        "tiers' shares", empty, c.fl.num_clients, [t.share for t in c.devices.tiers],
                        "" if whole else ": no client holds the whole model, so the columns above the other tiers' "
                        "caps are never trained, and the full-rank model is not what any device runs")
        if any(t.dropout or t.straggler for t in c.devices.tiers):
            log.warning("devices %s inject faults: a round with a drop-out or a straggler waits "
                        "strategy.round_timeout=%gs for it; set it a little above a healthy round's length",
                        c.devices.name, c.strategy.round_timeout)

    # --- identity --------------------------------------------------------------------------------
    def identify(self, grid: Grid) -> dict[int, int]:
        """Send the run config to every node and learn its partition id: {partition id: node id}."""
        n, timeout = self.cfg.fl.num_clients, self.cfg.strategy.connect_timeout
        start = time.time()
        deadline, notice = start + timeout, start + min(WAIT_NOTICE_S, timeout / 2)
        while len(nodes := sorted(grid.get_node_ids())) < n and time.time() < deadline:
            if notice is not None and time.time() >= notice:
                log.warning("waiting for the federation's nodes: %d of fl.num_clients=%d connected after %.0f s; "
                            "giving up after strategy.connect_timeout=%.0f s (a simulation needs num-supernodes=%d)",
                            len(nodes), n, time.time() - start, timeout, n)
                notice = None
            time.sleep(0.2)
        if len(nodes) != n:
            raise TimeoutError(f"the federation has {len(nodes)} nodes after {timeout:.0f} s but fl.num_clients={n}; "
                               f"run as many SuperNodes as clients (simulation: num-supernodes={n}), or wait longer "
                               f"for them (strategy.connect_timeout={timeout:g})")
        payload = json.dumps(to_dict(self.cfg), sort_keys=True)
        messages = [Message(RecordDict({P.CONFIG: ConfigRecord({P.RUN_CONFIG: payload})}), dst_node_id=node,
                            message_type=MessageType.QUERY) for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=max(deadline - time.time(), 1.0)))
        errors = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]
        if errors:
            raise RuntimeError("clients failed to start:\n  " + "\n  ".join(errors[:5]))
        node_of, examples_of, tests_of = {}, {}, {}
        for m in replies:
            metrics = m.content.metric_records.get(P.METRICS)
            counts = [metrics.get(k) if metrics is not None else None for k in P.QUERY_REPLY_METRICS]
            if not all(isinstance(v, (int, float)) and v >= 0 and v == int(v) for v in counts):
                raise RuntimeError(
                    f"node {m.metadata.src_node_id} answered the start-up query without the whole numbers "
                    f"{list(P.QUERY_REPLY_METRICS)} in its {P.METRICS!r} MetricRecord (got "
                    f"{dict(metrics) if metrics is not None else 'no such record'}): the nodes must run this "
                    f"project's ClientApp (clients.client_app:app)")
            pid, examples, tests = (int(v) for v in counts)
            if pid in node_of:
                raise RuntimeError(f"two nodes ({node_of[pid]}, {m.metadata.src_node_id}) claim partition-id {pid}")
            node_of[pid], examples_of[pid], tests_of[pid] = m.metadata.src_node_id, examples, tests
        if sorted(node_of) != list(range(n)) and len(node_of) == n:  # every node answered, with other ids
            raise ValueError(f"the nodes' partition ids are {sorted(node_of)}, not 0..{n - 1} (fl.num_clients={n}): "
                             f"start the SuperNodes with partition-id 0..{n - 1} and num-partitions={n}")
        if sorted(node_of) != list(range(n)):
            missing = sorted(set(range(n)) - set(node_of))
            raise TimeoutError(f"partition ids must be 0..{n - 1} (fl.num_clients={n}); got {sorted(node_of)}, "
                               f"missing {missing[:10]}: nodes that did not answer the start-up query within "
                               f"strategy.connect_timeout={timeout:g} s (raise it), or nodes of another federation")
        self.node_of, self.examples_of, self.tests_of = node_of, examples_of, tests_of
        return node_of

    # --- train -------------------------------------------------------------------------------------
    def _cut_to_tiers(self, when: str, initialized: bool = False) -> bool:
        """Cut the global model to the ranks its budget-1.0 tiers hold; True if it was cut. ``initialized``: the
        model is the run's fresh initialization (not a checkpoint's or the caller's arrays), whose cut layers
        keep their Frobenius norm where ``strategy.keep_init_norm``."""
        before = self.global_model.ranks()
        keep_norm = initialized and self.cfg.strategy.keep_init_norm
        cut = self.global_model.cut_to_tiers(self.cfg.devices.tiers, keep_norm=keep_norm)
        if cut:
            log.info("%s: the global model was cut to the ranks its tiers of budget 1.0 hold, %s -> %s (columns "
                     "above every tier's caps would never be trained)%s", when, before, self.global_model.ranks(),
                     "; the cut layers' factors were scaled to keep their initial norm (strategy.keep_init_norm)"
                     if keep_norm else "")
        return cut

    def caps_of_tiers(self) -> list[dict[str, int]]:
        """Every tier's caps at the global model's current ranks (empty dicts for a dense model)."""
        return [self.global_model.tier_caps(t) for t in self.cfg.devices.tiers]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        c = self.cfg
        if not self.node_of:
            self.identify(grid)
        self.current = _record_arrays(arrays)
        self.dtypes = {name: a.dtype for name, a in self.current.items()}
        layout = self.global_model.layout
        self.global_model.load(self.current)  # the caps follow the ranks of the arrays given
        if self._cut_to_tiers(f"before round {server_round}"):  # (arrays from Flower's own Strategy.start: uncut)
            self.current = self.global_model.arrays()
        pids = tiers.sample_clients(c.fl.num_clients, c.fl.clients_per_round, c.seed, server_round)
        faults = tiers.draw_faults(pids, self.dropout, self.straggler, c.seed, server_round)
        tier_caps = self.caps_of_tiers()
        tier_beyond = [nested.beyond_caps_sq(self.current, caps, layout) for caps in tier_caps]  # once a tier
        lam, sampler = self.round_training(server_round)
        lr = float(c.train.lr * lr_factor(c.train, server_round - 1))  # train.milestones etc. count rounds
        deadline = time.time() + c.strategy.round_timeout
        self.sent, messages = {}, []
        for pid in sorted(pids, key=lambda p: (p in faults, p)):  # healthy first: see _exchange
            tier = self.tier_of[pid]
            caps = tier_caps[tier]
            part = nested.prefix(self.current, caps, layout)
            fault = faults.get(pid, P.NO_FAULT)
            record = ConfigRecord(dict(config))  # a copy per node: the caller's config is never changed
            record.update({P.ROUND: server_round, P.CAPS: [int(caps[n]) for n in layout.layers],
                           P.HGL_TAILS: [sq for n in layout.layers for sq in tier_beyond[tier][n]],
                           P.LR: lr, P.LOCAL_EPOCHS: int(c.fl.local_epochs),
                           P.LAMBDA: lam, P.SAMPLER: sampler, P.SEED: int(c.seed),
                           P.FAULT: fault, P.DEADLINE: float(deadline)})
            node = self.node_of[pid]
            messages.append(Message(RecordDict({P.ARRAYS: _to_record(part), P.CONFIG: record}), dst_node_id=node,
                                    message_type=MessageType.TRAIN, group_id=str(server_round)))
            self.sent[node] = Sent(pid, tier, {n: tuple(a.shape) for n, a in part.items()}, fault)
            self.bytes_down += nested.num_bytes(part)
        ranks = self.global_model.ranks()
        self.full_tiers = [i for i, caps in enumerate(tier_caps) if caps == ranks]  # they hold the whole model
        self.round_info = {"sampled": sorted(pids), "faults": {str(p): f for p, f in sorted(faults.items())},
                           "deadline": deadline, "lambda_gl": lam,
                           "sampler": sampler if layout.layers else None}  # a dense model samples no ranks
        return messages

    def round_training(self, server_round: int) -> tuple[float, str]:
        """(HGL strength, rank sampler) sent in round ``server_round``: ``train.lambda_gl`` (0 in the first
        ``train.lambda_warmup`` rounds) and ``train.sampler`` until the global model's deployed params fall to
        ``train.lambda_stop_params`` x dense, then lambda 0 (and sampler ``fixed`` with ``train.finetune_after_stop``);
        derived from the round and the model alone, so a resumed run agrees."""
        t, gm = self.cfg.train, self.global_model
        if not gm.factorized:  # a dense model: no groups for the lasso, no ranks to sample
            return 0.0, t.sampler
        params_rel = None if t.lambda_stop_params is None else gm.footprint(gm.model)["params_rel"]
        lam, sampler = lasso_schedule(t, params_rel, server_round - 1)
        return float(lam), sampler

    def _check_train_reply(self, msg: Message) -> tuple[Sent, dict, float, dict] | str:
        """(what was sent, arrays, weight, metrics) of a valid reply, or why it is invalid."""
        if msg.has_error():
            return f"error: {msg.error.reason[:300]}"
        sent = self.sent.get(msg.metadata.src_node_id)
        if sent is None:
            return f"a reply from node {msg.metadata.src_node_id}, which was not sent a message this round"
        if sent.fault != P.NO_FAULT:  # reaches here only where the grid waited past the deadline (Flower's start)
            return f"the client was told to fail this round ({sent.fault}): it answers after the round's deadline"
        content = msg.content
        if P.METRICS not in content.metric_records or P.ARRAYS not in content.array_records:
            return f"the reply lacks its {P.METRICS!r} MetricRecord or {P.ARRAYS!r} ArrayRecord"
        metrics = content.metric_records[P.METRICS]
        missing = [k for k in P.TRAIN_REPLY_METRICS if k not in metrics]
        if missing:
            return f"metrics {missing} are missing"
        not_numbers = [f"{k}={metrics[k]!r}" for k in P.TRAIN_REPLY_METRICS
                       if isinstance(metrics[k], list) or not math.isfinite(metrics[k])]
        if not_numbers:
            return f"metrics must be finite numbers, got {', '.join(not_numbers)}"
        not_counts = [f"{k}={metrics[k]!r}" for k in (P.PARTITION_ID, P.STEPS) if not _whole_count(metrics[k])]
        if not_counts:
            return f"metrics must be whole numbers >= 0, got {', '.join(not_counts)}"
        if int(metrics[P.PARTITION_ID]) != sent.partition_id:
            return f"partition-id {metrics[P.PARTITION_ID]} but node {msg.metadata.src_node_id} is {sent.partition_id}"
        weight = metrics[P.NUM_EXAMPLES]
        if weight <= 0:
            return f"num-examples={weight!r} must be a positive number"
        if weight != self.examples_of.get(sent.partition_id, weight):  # the aggregation weight is not the client's to choose
            return (f"num-examples={weight!r}, but the client announced {self.examples_of[sent.partition_id]} "
                    f"training examples when the run started")
        if metrics[P.TRAIN_SECONDS] < 0:
            return f"train-seconds={metrics[P.TRAIN_SECONDS]!r} must be >= 0"
        if P.NUM_SCORED in metrics and not _whole_count(metrics[P.NUM_SCORED]):
            return f"{P.NUM_SCORED}={metrics[P.NUM_SCORED]!r} is not a whole number >= 0"
        try:
            arrays = _record_arrays(content.array_records[P.ARRAYS])
        except Exception as e:  # noqa: BLE001  (an array that does not decode is the client's fault)
            return f"arrays do not decode: {e}"
        problems = nested.check_arrays(arrays, sent.shapes, self.dtypes)
        if problems:
            return "; ".join(problems)
        return sent, arrays, float(weight), dict(metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        replies = list(replies)
        valid, dropped, seen = [], {}, set()
        for msg in replies:
            if msg.has_content():
                self.bytes_up += sum(_payload_bytes(r) for r in msg.content.array_records.values())
            node = msg.metadata.src_node_id
            again = node in seen
            out = "a second reply from the same node" if again else self._check_train_reply(msg)
            seen.add(node)
            if isinstance(out, str):
                pid = self.sent[node].partition_id if node in self.sent else f"node {node}"
                dropped[f"{pid} (again)" if again else str(pid)] = out
                log.warning("round %d: dropped the reply of client %s: %s", server_round, pid, out)
            else:
                valid.append(out)
        late = sorted(s.partition_id for node, s in self.sent.items() if node not in seen)
        if late:
            injected = {p: f for p, f in self.round_info.get("faults", {}).items() if int(p) in late}
            log.warning("round %d: no answer before the round's timeout from clients %s%s", server_round, late,
                        f" (injected faults: {injected})" if injected else "")
        valid.sort(key=lambda v: v[0].partition_id)
        info = self.round_info
        info.update({"valid": [v[0].partition_id for v in valid], "dropped": dropped, "late": late})
        tier_names = [t.name for t in self.cfg.devices.tiers]
        info["per_tier"] = {name: sum(1 for v in valid if v[0].tier == i) for i, name in enumerate(tier_names)}
        diverged = [m for m in replies if m.has_error() and DIVERGED in m.error.reason]
        if not valid and diverged and len(diverged) == len(replies):
            raise FloatingPointError(
                f"round {server_round}: the training of every client that answered diverged ({len(diverged)} of "
                f"{len(self.sent)} sampled; {DIVERGED} NaN or infinite); {divergence_fix(self.cfg.train)}")
        if not valid:
            log.warning("round %d: no valid reply (sampled %s); the global model is left unchanged",
                        server_round, info["sampled"])
            info["shrunk"] = False
            return None, MetricRecord({"valid-replies": 0})
        weights = [w for _, _, w, _ in valid]
        self.seconds_of.update({sent.partition_id: float(m[P.TRAIN_SECONDS]) for sent, _, _, m in valid})
        merged = nested.aggregate(self.current, [(arrays, w) for _, arrays, w, _ in valid], self.global_model.layout.axes)
        self.global_model.load(merged)
        by_tier: dict[int, list] = {}
        for sent, arrays, w, _ in valid:
            by_tier.setdefault(sent.tier, []).append((arrays, w))
        self.global_model.pool_batchnorm(by_tier, self.full_tiers, before=self.current)
        c = self.cfg
        shrink_now = (self.global_model.factorized and c.train.shrink
                      and c.strategy.shrink_every > 0 and server_round % c.strategy.shrink_every == 0)
        info["shrunk"] = bool(shrink_now and self.global_model.shrink(c.train.eps_ps))
        if info["shrunk"]:  # the caps fall with the ranks, and may now leave columns to no tier
            self._cut_to_tiers(f"after round {server_round}")
        # the training loss weighted by the predictions each client's loss averages (target tokens for
        # translation), where every reply says; else by the examples
        scored = [m.get(P.NUM_SCORED) for _, _, _, m in valid]
        loss_weights = [float(k) for k in scored] if all(k is not None for k in scored) else weights
        metrics = MetricRecord({
            "valid-replies": len(valid),
            P.TRAIN_LOSS: sum(w * m[P.TRAIN_LOSS] for w, (_, _, _, m) in zip(loss_weights, valid))
            / max(sum(loss_weights), 1e-12),
            P.TRAIN_SECONDS: sum(m[P.TRAIN_SECONDS] for _, _, _, m in valid),
        })
        return _to_record(self.global_model.arrays()), metrics

    # --- federated evaluation ------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        every = self.cfg.fl.federated_eval_every
        if not every or (server_round % every and server_round != self.runlog.num_rounds):
            return []  # every ``every`` rounds and in the last one, as the server's own evaluation
        current = _record_arrays(arrays)
        layout = self.global_model.layout
        tier_caps = self.caps_of_tiers()
        self.sent, messages = {}, []
        for pid, node in sorted(self.node_of.items()):
            tier = self.tier_of[pid]
            part = nested.prefix(current, tier_caps[tier], layout)
            part.update(self.global_model.tier_batchnorm(tier) or {})  # the tier's own BatchNorm statistics
            record = ConfigRecord(dict(config))
            record[P.ROUND] = server_round
            messages.append(Message(RecordDict({P.ARRAYS: _to_record(part), P.CONFIG: record}), dst_node_id=node,
                                    message_type=MessageType.EVALUATE, group_id=str(server_round)))
            self.sent[node] = Sent(pid, tier)
            self.bytes_down += nested.num_bytes(part)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows, answered = [], set()
        for msg in replies:
            sent = self.sent.get(msg.metadata.src_node_id)
            if msg.has_error() or sent is None or P.METRICS not in msg.content.metric_records:
                reason = (msg.error.reason[:300] if msg.has_error() else "not a reply to this round's evaluation"
                          if sent is None else f"no {P.METRICS!r} MetricRecord in it")
                who = f"node {msg.metadata.src_node_id}" if sent is None else f"client {sent.partition_id}"
                log.warning("round %d: dropped the evaluation reply of %s: %s", server_round, who, reason)
                continue
            m = msg.content.metric_records[P.METRICS]
            values = [m.get(k) for k in P.EVAL_REPLY_METRICS]
            problem = None
            if any(v is None or isinstance(v, list) or not math.isfinite(v) for v in values):
                problem = f"metrics {list(P.EVAL_REPLY_METRICS)} must all be finite numbers"
            elif m[P.PARTITION_ID] != sent.partition_id:  # 2.5 is not client 2
                problem = f"partition-id {m[P.PARTITION_ID]} but node {msg.metadata.src_node_id} is {sent.partition_id}"
            elif m[P.NUM_EXAMPLES] != self.tests_of.get(sent.partition_id, m[P.NUM_EXAMPLES]):
                problem = (f"num-examples={m[P.NUM_EXAMPLES]!r}, but the client announced "
                           f"{self.tests_of[sent.partition_id]} test examples when the run started")
            elif not 0.0 <= m[P.ACCURACY] <= 1.0:
                problem = f"accuracy={m[P.ACCURACY]!r} is not in [0, 1]"
            elif P.NUM_SCORED in m and not _whole_count(m[P.NUM_SCORED]):
                problem = f"{P.NUM_SCORED}={m[P.NUM_SCORED]!r} is not a whole number >= 0"
            elif sent.partition_id in answered:
                problem = "a second reply from the same node"
            if problem is not None:
                log.warning("round %d: dropped the evaluation reply of client %d: %s (metrics %s)", server_round,
                            sent.partition_id, problem, dict(m))
                continue
            answered.add(sent.partition_id)
            if m[P.NUM_EXAMPLES] > 0:
                rows.append((float(m[P.NUM_EXAMPLES]), m.get(P.NUM_SCORED), float(m[P.ACCURACY]), float(m[P.LOSS])))
        if not rows:
            return None
        # weighted by the predictions each client scored (target tokens for translation), where all say
        weights = [float(k) for _, k, _, _ in rows] if all(k is not None for _, k, _, _ in rows) else \
            [n for n, _, _, _ in rows]
        total = sum(weights)
        if total == 0:
            return None
        return MetricRecord({P.ACCURACY: sum(w * a for w, (_, _, a, _) in zip(weights, rows)) / total,
                             P.LOSS: sum(w * loss for w, (_, _, _, loss) in zip(weights, rows)) / total,
                             "clients": len(rows)})

    # --- the run -------------------------------------------------------------------------------------
    def expected_seconds(self, pid: int) -> float:
        """A client's expected training time, for the order of dispatch: its last measured train seconds; else its
        examples at the median seconds per example of its tier's measured clients (of all tiers; else 1)."""
        if pid in self.seconds_of:
            return self.seconds_of[pid]
        rates = {p: s / max(self.examples_of.get(p, 1), 1) for p, s in self.seconds_of.items()}
        mine = [r for p, r in rates.items() if self.tier_of[p] == self.tier_of[pid]] or list(rates.values()) or [1.0]
        return statistics.median(mine) * self.examples_of.get(pid, 1)

    def _send_longest_first(self, grid: Grid, messages: list[Message], deadline: float) -> list[Message]:
        """Send ``messages`` longest expected training first, ``dispatch_window`` of them pushed and unanswered at
        a time, and collect the replies that arrive before ``deadline``.

        Flower's simulation engine queues the messages pushed since its last sweep in the order its nodes were
        registered (partition-id order), and its W workers take them first in, first out: a round whose
        longest clients come last ends with one worker training them while the others idle. With W + 1
        messages in flight, a worker that finishes finds the next one queued, and the longest go first (LPT
        scheduling). The order changes no record where every client answers in time (the aggregation sorts the
        replies by partition id); where the deadline cuts a round, the clients still waiting to be sent are the
        late ones (the shortest), not the last partition ids, and what they were never sent is not counted."""
        order = sorted(messages, key=lambda m: (-self.expected_seconds(self.sent[m.metadata.dst_node_id].partition_id),
                                                self.sent[m.metadata.dst_node_id].partition_id))
        in_flight: set[str] = set()
        replies: list[Message] = []
        while time.time() < deadline:
            while order and len(in_flight) < self.dispatch_window:  # (a message the grid refuses frees its slot)
                free = self.dispatch_window - len(in_flight)
                in_flight.update(grid.push_messages(order[:free]))
                order = order[free:]
            if not in_flight:
                break
            got = list(grid.pull_messages(in_flight))
            replies += got
            in_flight.difference_update(m.metadata.reply_to_message_id for m in got)
            if not got:
                time.sleep(getattr(grid, "pull_interval", 0.01))
        for msg in order:  # never sent: the round's deadline came first; they count as late, their bytes never went
            self.bytes_down -= sum(_payload_bytes(r) for r in msg.content.array_records.values())
        return replies

    def _exchange(self, grid: Grid, messages: list[Message], deadline: float) -> list[Message]:
        """Send the round's messages and collect the replies that arrive before ``deadline``.

        Clients told to fail sleep until after the deadline. In a simulation W workers serve all the
        nodes, so a sleeping client would hold a worker that healthy clients need: the healthy ones
        go first, the faulty ones after, and the server waits until the deadline for them as it would
        for real devices.
        """
        healthy = [m for m in messages if self.sent[m.metadata.dst_node_id].fault == P.NO_FAULT]
        faulty = [m for m in messages if self.sent[m.metadata.dst_node_id].fault != P.NO_FAULT]
        if self.dispatch_window and healthy:
            replies = self._send_longest_first(grid, healthy, deadline)
        else:
            replies = list(grid.send_and_receive(healthy, timeout=max(deadline - time.time(), 0.001))) if healthy else []
        if faulty:
            replies += list(grid.send_and_receive(faulty, timeout=max(deadline - time.time(), 0.001)))
        return replies

    def _config_dict(self) -> dict:
        """``to_dict(self.cfg)`` (an OmegaConf round trip of ~20 ms), made again only when ``start`` has changed
        the one setting that may change during a run, ``strategy.round_timeout``."""
        if self._config is None or self._config["strategy"]["round_timeout"] != self.cfg.strategy.round_timeout:
            self._config = to_dict(self.cfg)
        return copy.deepcopy(self._config)

    def model_state(self, rnd: int) -> dict:
        """The checkpoint without its records (``RunLog.state_dict``): the config, the round, the model, the
        byte counts."""
        batchnorm = {key: {name: torch.from_numpy(a) for name, a in stats.items()}
                     for key, stats in self.global_model.batchnorm_stats.items()}
        return {"config": self._config_dict(), "round": rnd, "model": self.global_model.model.state_dict(),
                "batchnorm_stats": batchnorm, "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                "train_seconds": dict(self.seconds_of)}  # the dispatch order's measurements

    def load_state_dict(self, state: dict) -> int:
        checkpoint.check_resumable(state["config"], to_dict(self.cfg),
                                   checkpoint.resume_ignored("federated", self.cfg.dataset.name))
        self.global_model.model.load_state_dict(state["model"])
        self.global_model.batchnorm_stats = {key: {name: t.numpy() for name, t in stats.items()}
                                             for key, stats in state.get("batchnorm_stats", {}).items()}
        self.bytes_down, self.bytes_up = int(state["bytes_down"]), int(state["bytes_up"])
        self.seconds_of = {int(p): float(s) for p, s in state.get("train_seconds", {}).items()}
        self.runlog.load_state_dict(state)
        return int(state["round"])

    def resume(self) -> int:
        """Load ``checkpoint`` (or the run dir's checkpoint.pt); the round to continue after (0: none)."""
        path = checkpoint.resume_path(self.cfg.checkpoint, self.run_dir)
        if path is None or not path.is_file():
            if self.cfg.checkpoint:
                raise FileNotFoundError(checkpoint.missing_resume_source(path, self.run_dir))
            log.warning("resume=true but %s does not exist: starting from round 0", path)
            return 0
        rnd = self.load_state_dict(checkpoint.load(path))
        log.info("resumed from %s after round %d", path, rnd)
        return rnd

    def evaluation(self, rnd: int, last: bool = False, detached: bool = False) -> Callable[[], dict]:
        """The record's evaluation part: the global model at full rank and at every tier's caps (accuracy and
        loss every ``strategy.eval_every`` rounds and in the ``last`` round, the footprints every round).

        In two parts: this cuts the global model now, the function it returns scores the cuts; ``detached``:
        on copies, so that it may run while the next round changes the model."""
        c, gm = self.cfg, self.global_model
        evaluated = rnd % c.strategy.eval_every == 0 or last
        ranks = gm.ranks()
        tier_caps = list(zip(c.devices.tiers, self.caps_of_tiers())) if c.strategy.eval_tiers else []
        # the full model, then every tier that cuts it (a tier at full rank has the full model's numbers), each
        # with its own BatchNorm statistics
        cuts = [(i, caps) for i, (_, caps) in enumerate(tier_caps) if caps != ranks]
        models = gm.snapshot([None] + [caps for _, caps in cuts], [None] + [gm.tier_batchnorm(i) for i, _ in cuts],
                             detached)

        def scored() -> dict:
            rows = gm.score(models, accuracy=evaluated)
            full, out = rows[0], dict(rows[0])
            out.update({"ranks": ranks, "total_rank": int(sum(ranks.values()))})
            if tier_caps:
                tiers_out, cut = {}, iter(rows[1:])
                for tier, caps in tier_caps:
                    row = dict(full) if caps == ranks else next(cut)
                    row["rank"] = int(sum(caps.values()))
                    tiers_out[tier.name] = row
                out["tiers"] = tiers_out
            return out

        return scored

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Run (or resume) ``num_rounds`` (default ``fl.rounds``) rounds; records, checkpoints, progress."""
        c = self.cfg
        if evaluate_fn is not None:
            raise ValueError("MaestroStrategy.start: evaluate_fn is not used; the strategy evaluates the global model "
                             "on the central test set itself (at full rank and at every tier: strategy.eval_every, "
                             "strategy.eval_tiers). Leave evaluate_fn out.")
        num_rounds = c.fl.rounds if num_rounds is None else num_rounds
        if timeout is not None and timeout != c.strategy.round_timeout:
            self.cfg.strategy.round_timeout = float(timeout)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        done = self.resume() if c.resume else 0
        if initial_arrays is not None:
            if done:
                log.warning("resumed after round %d: initial_arrays are not used (the checkpoint's model goes on)", done)
            else:
                self.global_model.load(_record_arrays(initial_arrays))
        self._cut_to_tiers("before round 1" if not done else f"after round {done}",
                           initialized=not done and initial_arrays is None)
        self.summary()
        self.runlog.begin(num_rounds)
        self.identify(grid)
        self.runlog.started()
        result = Result()
        arrays = _to_record(self.global_model.arrays())
        # when the previous round's record was taken: its checkpoint and record count in this one
        previous: float | None = None
        pending: Future | None = None  # the previous round's evaluation, record and checkpoint

        def close(rnd: int, record: dict, scored: Callable[[], dict], state: dict, timing: dict) -> None:
            nonlocal previous
            t2 = time.perf_counter()
            record = {"round": rnd, **scored(), **record}
            t3 = time.perf_counter()
            # round_s: from the previous round's record to this one's (its checkpoint and records written in
            # between), so that the rounds' seconds add up to the wall time; the first round from its start
            self.runlog.add(record, {"round_s": t3 - (timing["t0"] if previous is None else previous),
                                     "train_s": timing["train_s"], "eval_s": t3 - t2,
                                     "client_train_s": timing["client_train_s"]})
            previous = t3
            if self.run_dir is not None:
                checkpoint.save(self.run_dir / "checkpoint.pt", {**state, **self.runlog.state_dict()})
            result.evaluate_metrics_serverapp[rnd] = MetricRecord(
                {k: float(record[k]) for k in ("accuracy", "loss") if k in record})

        # an exception in a round waits (the executor's exit) for the previous round's record and checkpoint
        with ThreadPoolExecutor(1, "fedmaestro-round-eval") as evaluator:
            for rnd in range(done + 1, num_rounds + 1):
                t0 = time.perf_counter()
                messages = list(self.configure_train(rnd, arrays, train_config, grid))
                replies = self._exchange(grid, messages, self.round_info["deadline"])
                if pending is not None:  # the previous round is recorded before this one changes the model
                    pending.result()
                    pending = None
                new_arrays, train_metrics = self.aggregate_train(rnd, replies)
                if new_arrays is not None:
                    arrays = new_arrays
                t1 = time.perf_counter()
                record = {}
                fed = self._federated_eval(grid, rnd, arrays, evaluate_config)
                if fed is not None:
                    record.update({"fed_accuracy": fed[P.ACCURACY], "fed_loss": fed[P.LOSS]})
                    result.evaluate_metrics_clientapp[rnd] = fed
                if train_metrics["valid-replies"]:  # (aggregate_train always counts them)
                    record["train_loss"] = train_metrics[P.TRAIN_LOSS]
                    result.train_metrics_clientapp[rnd] = train_metrics
                info = self.round_info
                record.update({
                    "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                    "clients": {k: info[k] for k in ("sampled", "valid", "dropped", "late", "faults", "per_tier")},
                    "shrunk": info["shrunk"], "lambda_gl": info["lambda_gl"], "sampler": info["sampler"],
                })
                client_s = train_metrics.get(P.TRAIN_SECONDS, 0.0)
                # overlapped, what the next round changes is copied now: the model's cuts and the checkpoint's state
                overlap = c.strategy.overlap_eval and rnd < num_rounds
                state = self.model_state(rnd)
                job = (rnd, record, self.evaluation(rnd, last=rnd == num_rounds, detached=overlap),
                       copy.deepcopy(state) if overlap else state,
                       {"t0": t0, "train_s": t1 - t0, "client_train_s": client_s})
                if overlap:
                    pending = evaluator.submit(close, *job)
                else:
                    close(*job)
                result.arrays = arrays
        self.runlog.finish(self.global_model)
        self.refuse_untrained(num_rounds)
        return result

    def refuse_untrained(self, num_rounds: int) -> None:
        """A run in which no round got a valid reply ends with an error (its records and model are written): the
        model it leaves is the initial one, which a run that exits 0 would pass off as trained."""
        records = self.runlog.records
        if not records or any(r["clients"]["valid"] for r in records):
            return
        dropped = {pid: why for r in records for pid, why in r["clients"]["dropped"].items()}
        faults = ", ".join(f"{t.name}: dropout {t.dropout:g}, straggler {t.straggler:g}" for t in self.cfg.devices.tiers)
        if not dropped:
            raise TimeoutError(f"no client answered any of the {num_rounds} rounds before the round's timeout "
                               f"(strategy.round_timeout={self.cfg.strategy.round_timeout:g} s; {faults}): the model "
                               f"is the initial one. Raise strategy.round_timeout or lower the tiers' fault "
                               f"probabilities")
        pid, why = next(iter(dropped.items()))
        raise RuntimeError(f"no round of the {num_rounds} got a valid reply (every reply was dropped, e.g. client "
                           f"{pid}'s: {why.splitlines()[0]}): the model is the initial one; the warnings above "
                           f"say why each was dropped")

    def _federated_eval(self, grid: Grid, rnd: int, arrays: ArrayRecord, config: ConfigRecord) -> MetricRecord | None:
        messages = list(self.configure_evaluate(rnd, arrays, config, grid))
        if not messages:
            return None
        replies = grid.send_and_receive(messages, timeout=self.cfg.strategy.round_timeout)
        return self.aggregate_evaluate(rnd, replies)
