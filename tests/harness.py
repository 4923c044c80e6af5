"""Whole runs in the test process: the real strategy, the real client handlers, no Ray.

:class:`InlineGrid` is a Flower ``Grid`` that hands each message to the
ClientApp's handlers, called in this process; node ``i`` (ids 1..N) holds
partition ``i - 1``. Replies are real Flower Messages built by the real
handlers, so strategies see what they would see under ``flwr run``, minus Ray
and the network.

:func:`run_inline` runs one whole experiment on such a grid the way the
ServerApp does (:func:`mosaic_flwr.server.run_server`): the config comes from
run-config keys through :meth:`RunConfig.from_mapping`, the seeds are set as the
ServerApp sets them, instructions carry :func:`mosaic_flwr.server.message_config`
and the global model is scored on the test split after every round. So a small
config run here gives the per-round accuracies ``flwr run`` gives.

:data:`TINY` holds one tiny configuration (run-config keys) per registered
strategy; the ``tiny_run`` fixture (conftest.py) runs each once per session.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore.task_identity import TaskIdentity

from mosaic_flwr.client import handle_evaluate, handle_train
from mosaic_flwr.config import RunConfig
from mosaic_flwr.faults import InjectedFault
from mosaic_flwr.records import CLIENT_RECORD
from mosaic_flwr.server import CentralEvaluator, message_config, run_server
from mosaic_flwr.strategies import build_strategy

Handler = Callable[[Message, Context], Message]

#: The five classes of the generated folder, each a colour (imagefolder sorts them).
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200),
           "owl": (200, 200, 40), "yak": (40, 200, 200)}


def write_imagefolder(root, size=24, per_class=(12, 4), mode="RGB", sizes=None):
    """train/<class>/*.png and test/<class>/*.png: each class a noisy colour."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                side = sizes[i % len(sizes)] if sizes else size
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (side, side, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(folder / f"{i}.png")
    return root


#: What every tiny run shares: 4 label-skewed clients, 1 local epoch.
BASE: dict[str, Any] = {"partitioner": "dirichlet", "dirichlet-alpha": 0.3, "num-clients": 4,
                        "min-clients": 2, "num-server-rounds": 2, "local-epochs": 1}

#: A short, cheap Mosaic schedule: warm-up round 1, distillation in round 2,
#: fine-tuning round 3 (learning rate x 0.1), with small generators and meta model.
#: The trust checks and the fine-tuning anchor are off: the paper's algorithm, so the
#: distillation round always distils (their own tests turn them on:
#: ``tests/test_mosaic_trust.py``, ``tests/test_mosaic_strategy.py``).
MOSAIC: dict[str, Any] = {
    "strategy": "mosaic", "num-server-rounds": 3, "mosaic-warmup-rounds": 1,
    "mosaic-finetune-rounds": 1, "mosaic-finetune-lr-scale": 0.1,
    "mosaic-generator-steps": 4, "mosaic-generator-width": 8, "mosaic-generator-latent-dim": 8,
    "mosaic-meta-epochs": 3, "mosaic-meta-dim": 20, "mosaic-meta-heads": 2,
    "mosaic-distill-steps": 5, "mosaic-samples-per-generator": 8,
    "mosaic-prototypes-per-class": 3, "mosaic-trust": False,
    "mosaic-finetune-anchor": 0.0}

#: Width groups for HeteroFL / FedRolex: two full-width clients, a half and a quarter.
WIDTHS = "0-1:cnn@1,2:cnn@0.5,3:cnn@0.25"

#: One tiny configuration per registered strategy, with small server-side budgets.
TINY: dict[str, dict[str, Any]] = {
    "fedavg": {**BASE, "strategy": "fedavg"},
    "fedprox": {**BASE, "strategy": "fedprox", "proximal-mu": 0.1},
    "mosaic": {**BASE, **MOSAIC},
    "fedgen": {**BASE, "strategy": "fedgen", "fedgen-generator-steps": 20, "fedgen-alpha": 1.0,
               "fedgen-decay": 0.98},
    "fedftg": {**BASE, "strategy": "fedftg", "fedftg-iterations": 3, "fedftg-latent-dim": 8,
               "fedftg-generator-width": 8},
    # A fresh student learns nothing from 2 epochs of 16 synthetic images (it stays at
    # chance); the averaged one-shot models are DENSE's other documented start.
    "dense": {**BASE, "strategy": "dense", "num-server-rounds": 3, "dense-epochs": 2,
              "dense-student-init": "average",
              "dense-generator-steps": 3, "dense-synthesis-batch-size": 16,
              "dense-latent-dim": 8, "dense-generator-width": 8},
    "feddf": {**BASE, "strategy": "feddf", "feddf-steps": 10, "feddf-generator-steps": 4,
              "feddf-generator-width": 8, "feddf-generator-latent-dim": 8},
    "fedcog": {**BASE, "strategy": "fedcog", "num-server-rounds": 3, "fedcog-start-round": 3,
               "fedcog-generation-steps": 5, "fedcog-num-samples": 32},
    # Gradient matching after rounds 1 and 3, refinement before round 3, anchor in round 2.
    "fedlgd": {**BASE, "strategy": "fedlgd", "num-server-rounds": 3, "fedlgd-server-gap": 2,
               "fedlgd-client-gap": 2, "fedlgd-images-per-class": 10,
               "fedlgd-warmup-steps": 20, "fedlgd-client-steps": 5, "fedlgd-server-steps": 10},
    "spectral-codistillation": {**BASE, "strategy": "spectral-codistillation",
                                "num-server-rounds": 3},
    "ditto": {**BASE, "strategy": "ditto", "num-server-rounds": 3},
    "heterofl": {**BASE, "strategy": "heterofl", "client-models": WIDTHS},
    "fedrolex": {**BASE, "strategy": "fedrolex", "client-models": WIDTHS},
}


class SimulatedCrash(BaseException):
    """The whole run stops at once (a BaseException, so no ``except Exception`` in the
    ServerApp records it: as after kill -9, the run folder holds what was written)."""


class InlineGrid(Grid):
    """Sends each message to a handler called in this process, one node after another.

    ``crash_at=(round, n)`` makes the grid raise :class:`SimulatedCrash` instead of
    sending the ``n``-th message (counted from 1) of that round: the whole run
    stops there, as if its processes were killed.
    """

    def __init__(self, num_nodes: int, override_config: dict[str, Any] | None = None,
                 train: Handler = handle_train, evaluate: Handler = handle_evaluate,
                 first_node_id: int = 1, crash_at: tuple[int, int] | None = None) -> None:
        self.num_nodes = num_nodes
        self.crash_at = crash_at
        self._sent_in_round: dict[int, int] = {}
        self.handlers = {"train": train, "evaluate": evaluate}
        self._run = SimpleNamespace(override_config=dict(override_config or {}))
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        # One context per node for the whole run, as a SuperNode keeps it (node state).
        # A restarted simulation numbers its nodes anew (first_node_id).
        self.node_ids = range(first_node_id, first_node_id + num_nodes)
        self.contexts = {node: Context(run_id=1, node_id=node,
                                       node_config={"partition-id": i,
                                                    "num-partitions": num_nodes},
                                       state=RecordDict(), run_config={})
                         for i, node in enumerate(self.node_ids)}
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
        return self.node_ids

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
            rnd = server_round(msg)
            self._sent_in_round[rnd] = self._sent_in_round.get(rnd, 0) + 1
            if self.crash_at == (rnd, self._sent_in_round[rnd]):
                raise SimulatedCrash(f"crashed in round {rnd}")
            context = self.contexts[msg.metadata.dst_node_id]
            handler = self.handlers[msg.metadata.message_type.split(".")[0]]
            self.sent.append(msg)
            try:
                replies.append(handler(msg, context))
            except InjectedFault as fault:  # as Flower does with a ClientApp that raises
                replies.append(Message(error=Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                                   str(fault)), reply_to=msg))
        self.replies.extend(replies)
        return replies


def server_round(msg: Message) -> int:
    """The round an instruction was sent in."""
    return int(msg.content.config_records["config"]["server-round"])


def partition_id(reply: Message) -> int:
    """The partition a reply's client holds."""
    return int(reply.content.config_records[CLIENT_RECORD]["partition-id"])


@dataclass
class InlineRun:
    """One finished in-process run and everything it sent and received."""

    overrides: dict[str, Any]
    config: RunConfig
    strategy: Strategy
    grid: InlineGrid
    result: Result
    #: Test accuracy of the global model before round 1 (index 0) and after each round.
    accuracies: list[float]

    @property
    def round_stats(self) -> dict[int, dict[str, float]]:
        """The strategy's per-round statistics (what a metrics.jsonl line holds)."""
        return self.strategy.round_stats  # type: ignore[attr-defined]

    def exchanges(self, message_type: str = "train") -> list[tuple[Message, Message]]:
        """(instruction, reply) pairs of one message type, in the order they were sent."""
        # InlineGrid answers each message in turn: sent[i] is answered by replies[i].
        return [(msg, reply) for msg, reply in zip(self.grid.sent, self.grid.replies)
                if msg.metadata.message_type == message_type]

    def sent_in_round(self, rnd: int, message_type: str = "train") -> list[Message]:
        """The instructions of one round, by destination node."""
        return sorted((msg for msg, _ in self.exchanges(message_type) if server_round(msg) == rnd),
                      key=lambda msg: msg.metadata.dst_node_id)

    def replies_in_round(self, rnd: int, message_type: str = "train") -> list[Message]:
        """The replies to one round's instructions, in partition-id order (the order
        strategies average them in)."""
        return sorted((reply for msg, reply in self.exchanges(message_type)
                       if server_round(msg) == rnd), key=partition_id)

    def reply_models(self) -> dict[int, str]:
        """The model each partition says it trained: {partition id: "cnn@1", ...}."""
        return {partition_id(m): str(m.content.config_records[CLIENT_RECORD]["model"])
                for _, m in self.exchanges("train")}


def run_inline(overrides: dict[str, Any], node_models: dict[int, str] | None = None,
               train: Handler = handle_train, evaluate: Handler = handle_evaluate) -> InlineRun:
    """Run the experiment that these run-config keys describe, in this process.

    ``node_models`` sets some nodes' ``--node-config model`` ({node id: "resnet8"});
    ``train``/``evaluate`` replace the ClientApp's handlers (e.g. a faulty client).
    Exceptions of the strategy (a run that stops) propagate.
    """
    config = RunConfig.from_mapping(overrides)
    grid = InlineGrid(config.num_clients, overrides, train=train, evaluate=evaluate)
    for node, model in (node_models or {}).items():
        grid.contexts[node].node_config["model"] = model
    # As run_server: seed Flower's node sampling and the global model's initial weights.
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    evaluator = CentralEvaluator(config)
    initial = ArrayRecord(evaluator.model.state_dict())
    strategy = build_strategy(config, score_fn=evaluator.score)
    accuracies: list[float] = []

    def evaluate_fn(_: int, arrays: ArrayRecord) -> MetricRecord:
        loss, accuracy = evaluator(arrays)
        accuracies.append(accuracy)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(grid=grid, initial_arrays=initial,
                            num_rounds=config.num_server_rounds,
                            train_config=message_config(config),
                            evaluate_config=message_config(config), evaluate_fn=evaluate_fn)
    return InlineRun(dict(overrides), config, strategy, grid, result, accuracies)


def serve_inline(overrides: dict[str, Any], **grid_options: Any) -> dict[str, Any]:
    """Run :func:`mosaic_flwr.server.run_server` itself, the ServerApp's whole work
    (run folder, metrics, checkpoints, resuming), on an :class:`InlineGrid`; returns the
    summary. ``overrides`` must name an absolute ``output-dir``; ``grid_options`` go
    to the grid (``first_node_id``, ``crash_at``)."""
    config = RunConfig.from_mapping(overrides, validate=False)  # the ServerApp validates
    grid = InlineGrid(config.num_clients, overrides, **grid_options)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**RunConfig().to_mapping(), **overrides})
    return run_server(grid, context)
