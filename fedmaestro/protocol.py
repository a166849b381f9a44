"""The federated protocol's names, defined once: record keys, config keys, metric names, faults.

The server (strategies/) and the clients (clients/) both import these; neither spells a key as a bare
string. Flower's own conventions are kept where they exist (``num-examples`` is the weight key of
Flower's strategies, ``partition-id`` the node-config key of its simulation engine).

Messages (one per node, built per node):

* query (once per run, every node): config ``RUN_CONFIG`` = the resolved run config as JSON. The
  client keeps it in its node Context and replies metrics ``PARTITION_ID``, ``NUM_EXAMPLES``
  (local training examples) and ``NUM_TEST``.
* train: arrays ``ARRAYS`` = the node's prefix of the global model; config ``ROUND``, ``CAPS`` (one
  int per LoD layer, in module order), ``HGL_TAILS`` (two floats per LoD layer, in module order: the
  squared norms of the global u's and v's components beyond the node's cap, which its HGL groups extend
  over), ``LR``, ``LOCAL_EPOCHS``, ``LAMBDA``, ``SAMPLER``, ``SEED``, ``FAULT`` and ``DEADLINE``.
  Reply: arrays ``ARRAYS`` (same names and shapes as sent), metrics ``NUM_EXAMPLES``, ``TRAIN_LOSS``,
  ``PARTITION_ID``, ``TRAIN_SECONDS``, ``STEPS``, and optionally ``NUM_SCORED`` (the predictions the loss
  averages over: target tokens for translation).
* evaluate: arrays ``ARRAYS``, config ``ROUND``; reply metrics ``NUM_EXAMPLES`` (local test
  examples), ``ACCURACY``, ``LOSS``, ``PARTITION_ID``, and optionally ``NUM_SCORED``.
"""

from __future__ import annotations

# record keys inside a message's RecordDict
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATE = "fedmaestro"  # the ConfigRecord a client keeps in its node Context.state

# config keys (server -> client)
RUN_CONFIG = "run-config"
ROUND = "server-round"
CAPS = "caps"
HGL_TAILS = "hgl-tails"
LR = "lr"
LOCAL_EPOCHS = "local-epochs"
LAMBDA = "lambda-gl"
SAMPLER = "sampler"
SEED = "seed"
FAULT = "fault"
DEADLINE = "deadline"

# metric names (client -> server)
PARTITION_ID = "partition-id"  # also the node_config key of Flower's simulation engine
NUM_PARTITIONS = "num-partitions"
NUM_EXAMPLES = "num-examples"
NUM_TEST = "num-test"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
STEPS = "steps"
ACCURACY = "accuracy"
LOSS = "loss"
# in an evaluation reply, optional: the predictions accuracy and loss average over (target tokens for
# translation, examples otherwise); where every reply gives it, it weights the federated means. In a train
# reply, the same for the training loss
NUM_SCORED = "num-scored"

TRAIN_REPLY_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, PARTITION_ID, TRAIN_SECONDS, STEPS)
EVAL_REPLY_METRICS = (NUM_EXAMPLES, ACCURACY, LOSS, PARTITION_ID)
QUERY_REPLY_METRICS = (PARTITION_ID, NUM_EXAMPLES, NUM_TEST)

# injected faults (FAULT): a dropout never trains and answers after the deadline; a straggler trains and
# answers after the deadline. In both cases the server has moved on.
NO_FAULT = ""
DROPOUT = "dropout"
STRAGGLER = "straggler"
FAULTS = (NO_FAULT, DROPOUT, STRAGGLER)
LATE_MARGIN_S = 0.25  # a faulty client answers this long after the deadline
