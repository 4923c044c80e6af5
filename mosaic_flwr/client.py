"""The ClientApp's work: train or evaluate the received global model on local data.

``client_app/app.py`` routes Flower messages here. The run configuration comes
with every message (the server resolved and validated it), so every node trains
with the same settings; the node's own ``node_config`` says which partition it
holds. Only model weights and aggregate metrics leave the client.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from .config import RunConfig
from .data import BatchTransform, client_indices, load_dataset
from .models import Classifier, build_model
from .strategies import CLIENT_RECORD
from .training import TrainSettings, evaluate, select_device, train

#: Keys the strategy adds to the run config in every message.
TRANSPORT_KEYS = ("server-round",)


def config_from_message(msg: Message) -> RunConfig:
    """The run config the server sent with this message."""
    record = msg.content.config_records["config"]
    return RunConfig.from_mapping({k: v for k, v in record.items() if k not in TRANSPORT_KEYS})


def partition_id(context: Context, config: RunConfig) -> int:
    """This node's partition, checked against the run's number of clients."""
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("node_config has no 'partition-id'; start the SuperNode with "
                         "--node-config \"partition-id=N num-partitions=M\"")
    pid = int(node["partition-id"])
    num = int(node.get("num-partitions", config.num_clients))
    if num != config.num_clients:
        raise ValueError(f"node_config num-partitions={num} but the run has "
                         f"num-clients={config.num_clients}; make them equal")
    if not 0 <= pid < config.num_clients:
        raise ValueError(f"partition-id={pid} is outside 0..{config.num_clients - 1}")
    return pid


def round_seed(config: RunConfig, pid: int, server_round: int) -> int:
    """A distinct, reproducible seed for each (run seed, client, round)."""
    return (config.seed * 1_000_003 + pid * 10_007 + server_round) % (2**63)


class LocalSetup:
    """Everything one client needs for one message: config, data, device, model."""

    def __init__(self, msg: Message, context: Context) -> None:
        self.config = config_from_message(msg)
        self.partition_id = partition_id(context, self.config)
        self.server_round = int(msg.content.config_records["config"].get("server-round", 0))
        torch.set_num_threads(self.config.num_threads)
        self.device = select_device(self.config.device)
        data = load_dataset(self.config.dataset, self.config.data_path)
        idx = client_indices(self.config, self.partition_id)
        self.images = torch.from_numpy(data.train_images[idx])
        self.labels = torch.from_numpy(data.train_labels[idx])
        self.transform = BatchTransform(data.spec, self.device)
        self.model: Classifier = build_model(self.config.model, data.spec, self.config.model_width)
        self.model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        self.seed = round_seed(self.config, self.partition_id, self.server_round)

    def reply(self, msg: Message, metrics: dict, with_model: bool) -> Message:
        """A reply with the (trained) model if asked, the metrics and who sent it."""
        content = RecordDict({"metrics": MetricRecord(metrics),
                              CLIENT_RECORD: ConfigRecord({"partition-id": self.partition_id})})
        if with_model:
            content["arrays"] = ArrayRecord(self.model.to("cpu").state_dict())
        return Message(content, reply_to=msg)


def train_settings(config: RunConfig) -> TrainSettings:
    """Local-training settings; the proximal term is on only for FedProx."""
    return TrainSettings(
        epochs=config.local_epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, momentum=config.momentum,
        weight_decay=config.weight_decay,
        proximal_mu=config.proximal_mu if config.strategy == "fedprox" else 0.0,
        augment=config.augment, amp=config.amp)


def handle_train(msg: Message, context: Context) -> Message:
    """Train the global model locally; reply with weights and training metrics."""
    setup = LocalSetup(msg, context)
    torch.manual_seed(setup.seed)
    generator = torch.Generator().manual_seed(setup.seed)
    result = train(setup.model, setup.images, setup.labels, setup.transform,
                   train_settings(setup.config), setup.device, generator)
    return setup.reply(msg, {"num-examples": result.num_examples, "train-loss": result.loss,
                             "train-accuracy": result.accuracy}, with_model=True)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this client's own (label-skewed) data."""
    setup = LocalSetup(msg, context)
    loss, accuracy = evaluate(setup.model, setup.images, setup.labels, setup.transform,
                              setup.device, amp=setup.config.amp)
    return setup.reply(msg, {"num-examples": len(setup.labels), "local-loss": loss,
                             "local-accuracy": accuracy}, with_model=False)
