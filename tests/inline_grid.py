"""A Flower Grid that runs the ClientApp's handlers in the test process.

Node ``i`` (ids 1..N) holds partition ``i - 1``. Replies are real Flower
Messages built by the real handlers, so strategies and ``run_server`` see what
they would see under ``flwr run``, minus Ray and the network. Used by tests
that need many rounds of the real strategy in seconds.
"""

from __future__ import annotations

import copy

from types import SimpleNamespace
from typing import Any, Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from mosaic_flwr.client import handle_evaluate, handle_train

Handler = Callable[[Message, Context], Message]


class InlineGrid(Grid):
    """Sends each message to a handler called in this process, one node after another."""

    def __init__(self, num_nodes: int, override_config: dict[str, Any] | None = None,
                 train: Handler = handle_train, evaluate: Handler = handle_evaluate) -> None:
        self.num_nodes = num_nodes
        self.handlers = {"train": train, "evaluate": evaluate}
        self._run = SimpleNamespace(override_config=dict(override_config or {}))
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        # One context per node for the whole run, as a SuperNode keeps it (node state).
        self.contexts = {node: Context(run_id=1, node_id=node,
                                       node_config={"partition-id": node - 1,
                                                    "num-partitions": num_nodes},
                                       state=RecordDict(), run_config={})
                         for node in range(1, num_nodes + 1)}
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    @property
    def run(self):  # type: ignore[override]
        return self._run

    def set_run(self, run) -> None:  # type: ignore[override]
        self._run = run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[override]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.num_nodes + 1)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InlineGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InlineGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            # The real Grid serialises each message when it is sent; copy so later
            # changes to the shared records (e.g. "server-round") do not show here.
            msg = copy.deepcopy(msg)
            context = self.contexts[msg.metadata.dst_node_id]
            handler = self.handlers[msg.metadata.message_type.split(".")[0]]
            self.sent.append(msg)
            replies.append(handler(msg, context))
        self.replies.extend(replies)
        return replies
