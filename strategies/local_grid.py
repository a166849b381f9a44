"""An in-process Grid: every message runs the ClientApp right here, one after another.

No Ray, no SuperLink: the strategy and the clients share one process. Used by the fast tests (the
real simulation engine is tested separately) and for debugging a ClientApp with a plain debugger.
Each node has its own Context (``partition-id`` = its index), kept across messages as Flower's
engines keep it. A ClientApp that raises gives an error reply, as in Flower. A reply that arrives
after the timeout (a client told to straggle sleeps past it) is dropped, as a late reply would be.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedmaestro import protocol as P

__all__ = ["LocalGrid"]

CLIENT_APP_RAISED = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def _set_task_identity() -> None:
    """Messages take their run and source ids from Flower's process-wide TaskIdentity, which Flower's own
    runtimes set; here the server is this process (run 1, the SuperLink's node id 1)."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("run_id", "task_id", "node_id"):
        try:
            getattr(TaskIdentity, key)
        except RuntimeError:
            setattr(TaskIdentity, key, 1)


class LocalGrid(Grid):
    def __init__(self, client_app, num_nodes: int, first_node_id: int = 1000, step: int = 7):
        """Node ``i`` (partition id i) gets node id ``first_node_id + step * i``: ids unlike partition ids, in
        another order where ``step`` < 0."""
        _set_task_identity()
        self.client_app = client_app
        self.nodes = {first_node_id + step * i: i for i in range(num_nodes)}
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={P.PARTITION_ID: pid,
                                                                            P.NUM_PARTITIONS: num_nodes},
                                       state=RecordDict(), run_config={}) for node, pid in self.nodes.items()}
        self._pending: dict[str, Message] = {}
        self.messages_seen: list[Message] = []
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self._pending[msg.metadata.message_id] = msg
            self.messages_seen.append(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def _handle(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            return self.client_app(msg, context)
        except Exception as e:  # noqa: BLE001  (a client that raises answers with an error, as in Flower)
            reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            return Message(Error(code=CLIENT_APP_RAISED, reason=reason), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in list(message_ids):
            msg = self._pending.pop(mid, None)
            if msg is not None:
                reply = self._handle(msg)
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        end = None if timeout is None else time.time() + timeout
        out = []
        for mid in self.push_messages(messages):
            for reply in self.pull_messages([mid]):
                if end is None or time.time() <= end:
                    out.append(reply)
        return out
