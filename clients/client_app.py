"""The Flower ClientApp: local LoD training under a rank budget, and local evaluation.

``app`` answers three message types (keys: ``fedmaestro.protocol``):

* query: keeps the run config (JSON) in the node's Context, loads the data once for this worker
  process, and replies its partition id and local data sizes;
* train: loads the prefix arrays it was sent into a model at its caps, trains E local epochs with
  LoD sampling bounded by the caps and HGL with the server's lambda (``clients.local.train``), and
  replies its arrays and metrics;
* evaluate: the arrays it was sent, on its local test split.

Faults are injected here, on the server's instruction: a ``dropout`` (the device is gone) and a
``straggler`` (its update would come too late) do no work and answer only after the round's deadline,
when the server has moved on.

The module is importable (``clients.client_app:app``): Ray pickles the app by reference, so no data
set or model travels with a message; both live in per-process caches (``clients.local``).
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedmaestro import lod
from fedmaestro import protocol as P
from fedmaestro.config import Config

from . import local

app = ClientApp()


class _NotTheWorkersEnd(logging.Filter):
    """Drops Flower's WARNING that a simulation worker is "manually terminating": every simulation ends so, and
    Ray forwards the line of every worker to the console after the run's summary."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Manually terminating")


logging.getLogger("flwr").addFilter(_NotTheWorkersEnd())

_THREADS: dict[str, int] = {}


def _set_threads(cfg: Config) -> None:
    """One torch thread per CPU a client was given (once per process): 2 clients x 2 threads on 2 cores
    would over-subscribe them."""
    n = max(1, int(cfg.fl.client_cpus))
    if _THREADS.get("n") != n:
        torch.set_num_threads(n)
        _THREADS["n"] = n


def partition_id(context: Context) -> int:
    value = context.node_config.get(P.PARTITION_ID)
    if value is None:
        raise ValueError(f"this node has no {P.PARTITION_ID!r} in its node config; start the SuperNode with "
                         f"--node-config \"{P.PARTITION_ID}=<i> {P.NUM_PARTITIONS}=<fl.num_clients>\"")
    return int(value)


def run_config(context: Context) -> tuple[Config, str]:
    state = context.state.config_records.get(P.STATE)
    if state is None or P.RUN_CONFIG not in state:
        raise RuntimeError("this node has not received the run config: the server sends it in a query message "
                           "before the first round (MaestroStrategy.identify)")
    payload = str(state[P.RUN_CONFIG])
    return local.config_from_json(payload), payload


def _arrays(message: Message) -> dict:
    return {name: array.numpy() for name, array in message.content.array_records[P.ARRAYS].items()}


def _reply(message: Message, metrics: dict, arrays: dict | None = None) -> Message:
    content = RecordDict({P.METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[P.ARRAYS] = ArrayRecord({name: Array(a) for name, a in arrays.items()})
    return Message(content, reply_to=message)


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.time()
    if delay > 0:
        time.sleep(delay)


@app.query()
def query(message: Message, context: Context) -> Message:
    payload = str(message.content.config_records[P.CONFIG][P.RUN_CONFIG])
    cfg = local.config_from_json(payload)  # a bad config fails here, on the first message
    context.state[P.STATE] = ConfigRecord({P.RUN_CONFIG: payload})
    pid = partition_id(context)
    splits = local.client_data(cfg).splits  # loads the data set once for this worker process
    train_idx, test_idx = splits[pid] if 0 <= pid < len(splits) else ((), ())  # the server rejects a bad id
    return _reply(message, {P.PARTITION_ID: pid, P.NUM_EXAMPLES: len(train_idx), P.NUM_TEST: len(test_idx)})


@app.train()
def train(message: Message, context: Context) -> Message:
    cfg, _ = run_config(context)
    _set_threads(cfg)
    pid = partition_id(context)
    c = message.content.config_records[P.CONFIG]
    fault, deadline = str(c[P.FAULT]), float(c[P.DEADLINE])
    if fault not in P.FAULTS:
        raise ValueError(f"unknown fault {fault!r} in the train message; the protocol knows {list(P.FAULTS)}")
    if fault in (P.DROPOUT, P.STRAGGLER):
        # dropout: the device is gone; straggler: its update would come after the deadline, when the server
        # has moved on. Either way the server hears nothing before the deadline, and the worker (which serves
        # other clients too in a simulation) spends no time on training that nothing would use
        _sleep_until(deadline + P.LATE_MARGIN_S)
        return _reply(message, {P.PARTITION_ID: pid})
    arrays = _arrays(message)
    names = [name for name, _ in lod.layers(local.template(cfg))]
    caps_list = [int(k) for k in c[P.CAPS]]
    if len(caps_list) != len(names):
        raise ValueError(f"got {len(caps_list)} caps for a model with {len(names)} LoD layers {names}")
    beyond = [float(x) for x in c[P.HGL_TAILS]]
    if len(beyond) != 2 * len(names):
        raise ValueError(f"got {len(beyond)} HGL tails for a model with {len(names)} LoD layers {names} (2 a layer)")
    hgl_tails = {name: (beyond[2 * i], beyond[2 * i + 1]) for i, name in enumerate(names)}
    try:
        out, m = local.train(cfg, pid, arrays, rnd=int(c[P.ROUND]), caps=dict(zip(names, caps_list)),
                             hgl_tails=hgl_tails, lr=float(c[P.LR]), lambda_gl=float(c[P.LAMBDA]),
                             local_epochs=int(c[P.LOCAL_EPOCHS]), sampler=str(c[P.SAMPLER]), seed=int(c[P.SEED]))
    except FloatingPointError as e:  # diverged: an answer the server reads (and drops), not a crash with a traceback
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"FloatingPointError: {e}"),
                       reply_to=message)
    return _reply(message, {P.NUM_EXAMPLES: m["num_examples"], P.TRAIN_LOSS: m["loss"], P.PARTITION_ID: pid,
                            P.TRAIN_SECONDS: m["seconds"], P.STEPS: m["steps"], P.NUM_SCORED: m["scored"]}, out)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    cfg, _ = run_config(context)
    _set_threads(cfg)
    pid = partition_id(context)
    m = local.evaluate_local(cfg, pid, _arrays(message))
    return _reply(message, {P.NUM_EXAMPLES: m["num_examples"], P.ACCURACY: m["accuracy"], P.LOSS: m["loss"],
                            P.PARTITION_ID: pid, P.NUM_SCORED: m["scored"]})
