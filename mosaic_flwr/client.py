"""The ClientApp's work: train this client's model, or evaluate the global model, on local data.

``client_app/app.py`` routes Flower messages here. The run configuration comes
with every message (the server resolved and validated it), so every node trains
with the same settings; the node's own ``node_config`` says which partition it
holds (or where its own data lie), which model it trains, and may override the
device and thread count (:mod:`mosaic_flwr.node`). A client trains the global
model, a width slice of it, or its own architecture
(:mod:`mosaic_flwr.client_models`). A strategy that needs more than local
training says so in the message's ``task`` record
(:class:`~mosaic_flwr.records.TrainTask`): a scaled learning rate, other epochs,
and the method parts to run around local training (:func:`client_parts`: a
local objective for FedGen or FedCOG, label counts, Mosaic's prototypes, a
trained generator), each in its method's module. Only model weights, label
counts, prototypes (k-means centres), a linear probe head, generator weights
and aggregate metrics leave the client.
"""

from __future__ import annotations

import functools
import time
from logging import INFO
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore import log

from .baselines.ditto import DittoClient
from .baselines.fedcog import FedCOGObjective
from .baselines.fedgen import FedGenObjective
from .baselines.fedlgd import FedLGDClient
from .baselines.spectral import SpectralClient
from .client_models import client_model_spec, global_model_spec, initial_seed
from .client_part import ClientPart, ClientWork, TrainingData, train_settings
from .config import RunConfig
from .data import BatchTransform, client_indices, dataset_spec, load_data
from .faults import InjectedFault, injected_fault
from .kd.upload import GeneratorUpload
from .models import Classifier, ModelSpec
from .mosaic.client import FinetuneAnchor, MosaicStatistics
from .node import NodeSettings
from .node_state import restore_state, save_state, state_folder
from .records import (CLIENT_RECORD, GLOBAL_MODEL_RECORD, GROUP_MODEL_PREFIX, STATS_RECORD,
                      TrainTask, label_counts_record)
from .submodels import extract_submodel, submodel_indices
from .training import evaluate, select_device, train

#: Keys the strategy and the ServerApp add to the run config in every message.
TRANSPORT_KEYS = ("server-round", "run-folder")


def config_from_message(msg: Message) -> RunConfig:
    """The run config the server sent with this message, as the server validated it.

    Messages carry the core keys only, so the method sections hold defaults
    here: a method's client part reads its settings from the ``task`` record.
    """
    record = msg.content.config_records["config"]
    return RunConfig.from_mapping({k: v for k, v in record.items() if k not in TRANSPORT_KEYS},
                                  validate=False)


@functools.lru_cache(maxsize=16)
def local_data(config: RunConfig, partition_id: int, node_data_path: str, device: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's training images and labels on its device, copied there once per process
    (a Ray actor serves many clients over many rounds; uint8 images stay compact).

    ``node_data_path``: the node's own data set (all of its training split);
    otherwise partition ``partition_id`` of the run's data set. Callers must not
    modify the tensors in place.
    """
    if node_data_path:
        data = load_data(config, node_data_path)
        images, labels = data.train_images, data.train_labels
    else:
        data = load_data(config)
        idx = client_indices(config, partition_id)
        images, labels = data.train_images[idx], data.train_labels[idx]
    return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)


def round_seed(config: RunConfig, pid: int, server_round: int) -> int:
    """A distinct, reproducible seed for each (run seed, client, round)."""
    return (config.seed * 1_000_003 + pid * 10_007 + server_round) % (2**63)


class LocalSetup:  # pylint: disable=too-many-instance-attributes
    """Everything one client needs for one message: config, data, device, model.

    For training (``task`` given) ``model`` is this client's own model
    (:meth:`own_model`); for evaluation it is the received global model.
    """

    def __init__(self, msg: Message, context: Context, task: TrainTask | None = None) -> None:
        self.context = context
        config = config_from_message(msg)
        self.node = NodeSettings.from_node_config(context.node_config, config)
        self.config = self.node.apply(config)
        self.partition_id = self.node.partition_id
        sent = msg.content.config_records["config"]
        self.server_round = int(sent.get("server-round", 0))
        self.state_folder = state_folder(self.config, str(sent.get("run-folder", "")),
                                         self.node.state_dir, self.partition_id)
        torch.set_num_threads(self.config.num_threads)
        self.device = select_device(self.config.device)
        self.spec = dataset_spec(self.config, self.node.data_path or None)
        self.images, self.labels = local_data(self.config, self.partition_id,
                                              self.node.data_path, str(self.device))
        self.transform = BatchTransform(self.spec, self.device)
        self.global_spec = global_model_spec(self.config)
        self.model_spec = (ModelSpec.parse(self.node.model) if self.node.model
                           else client_model_spec(self.config, self.partition_id))
        received = msg.content.array_records["arrays"].to_torch_state_dict()
        if task is None:
            self.model: Classifier = self.global_spec.build(self.spec)
            self.model.load_state_dict(received)
        else:
            group = msg.content.array_records.get(GROUP_MODEL_PREFIX + str(self.model_spec))
            self.model = self.own_model(received, task, group)
        self.seed = round_seed(self.config, self.partition_id, self.server_round)

    @property
    def is_global(self) -> bool:
        """True when this client trains the global model itself."""
        return self.model_spec == self.global_spec

    def own_model(self, received: dict[str, torch.Tensor], task: TrainTask,
                  group: ArrayRecord | None = None) -> Classifier:
        """This client's model, starting from what the server sent.

        The received arrays are loaded when they are this model; a width
        sub-model is cut from them when the task slices; any other model starts
        from its group's average when the server sent it along (``group``: the
        server has not heard from this node yet), else from an initialisation
        seeded by the run seed and the model's name (so the clients of one
        group start alike), and from then on the server sends the group's
        average.
        """
        sent = ModelSpec.parse(task.arrays_model) if task.arrays_model else self.global_spec
        own = self.model_spec
        model = own.build(self.spec, seed=initial_seed(self.config, own))
        if own == sent:
            model.load_state_dict(received)
        elif group is not None:
            model.load_state_dict(group.to_torch_state_dict())
        elif task.slicing and own.holds_slice_of(sent):
            indices = submodel_indices({k: tuple(v.shape) for k, v in received.items()},
                                       {k: tuple(v.shape) for k, v in model.state_dict().items()},
                                       task.slicing, self.server_round, model.flatten_units)
            model.load_state_dict(extract_submodel(received, indices))
        return model

    def global_model(self, msg: Message) -> Classifier:
        """The global model as received (a copy when this client trains another model)."""
        if self.is_global:
            return self.model
        records = msg.content.array_records
        arrays = records.get(GLOBAL_MODEL_RECORD) or records["arrays"]
        model = self.global_spec.build(self.spec, seed=0)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model

    def reply(self, msg: Message, metrics: dict, with_model: bool,
              extra: dict[str, ArrayRecord] | None = None) -> Message:
        """A reply with the (trained) model if asked, extra records, the metrics and the sender."""
        content = RecordDict({"metrics": MetricRecord(metrics),
                              CLIENT_RECORD: ConfigRecord({"partition-id": self.partition_id,
                                                           "model": str(self.model_spec)})})
        if with_model:
            content["arrays"] = ArrayRecord(self.model.to("cpu").state_dict())
        for name, record in (extra or {}).items():
            content[name] = record
        self.node.log({"message": msg.metadata.message_type, "server-round": self.server_round,
                       "run-id": msg.metadata.run_id, **metrics})
        return Message(content, reply_to=msg)


class LabelCounts(ClientPart):
    """Before training: add the label counts to the reply (FedFTG's and DENSE's teachers)."""

    def before_training(self, work: ClientWork) -> None:
        setup = work.setup
        work.extra[STATS_RECORD] = label_counts_record(setup.labels, setup.spec.num_classes)


#: Local objectives beyond cross-entropy, by the name a task gives (``TrainTask.objective``).
OBJECTIVES: dict[str, Callable[[], ClientPart]] = {
    "fedgen": FedGenObjective,
    "fedcog": FedCOGObjective,
    "fedlgd": FedLGDClient,
    "spectral": SpectralClient,
    "ditto": DittoClient,
    "mosaic-anchor": FinetuneAnchor,
}


def client_parts(task: TrainTask) -> list[ClientPart]:
    """The method parts a round's task asks for, in the order they run (new for each message)."""
    parts: list[ClientPart] = []
    if task.upload_stats:
        parts.append(MosaicStatistics())
    elif task.upload_counts:
        parts.append(LabelCounts())
    if task.objective:
        if task.objective not in OBJECTIVES:
            raise ValueError(f"unknown local objective {task.objective!r}; "
                             f"known: {', '.join(OBJECTIVES)}")
        parts.append(OBJECTIVES[task.objective]())
    if task.upload_generator:
        parts.append(GeneratorUpload())
    return parts


def handle_train(msg: Message, context: Context) -> Message:
    """Train this client's model locally, with the method parts its task asks for.

    Every method goes through the same steps: each part's ``before_training``
    (on the received model: Mosaic's prototypes, FedCOG's synthesis), local
    training (with the regulariser a part returned), each part's
    ``after_training`` (on the trained model: Mosaic's probe head, a generator),
    and one reply. See :mod:`mosaic_flwr.client_part`.
    """
    start = time.monotonic()
    task = TrainTask.from_message(msg)
    setup = LocalSetup(msg, context, task)
    if setup.state_folder is not None:
        restored = restore_state(setup.state_folder, setup.server_round, context.state)
        if restored is not None:
            log(INFO, "partition %d: node state of round %d restored from %s",
                setup.partition_id, restored, setup.state_folder)
    torch.manual_seed(setup.seed)
    work = ClientWork(msg, context, task, setup, torch.Generator().manual_seed(setup.seed))
    # Config, data (loaded and partitioned on a process's first message), model.
    work.metrics["setup-seconds"] = time.monotonic() - start
    config = setup.config
    fault = injected_fault(config.seed, setup.partition_id, setup.server_round, config.fault_rate,
                           tuple(config.fault_kinds.split(",")))
    if fault == "timeout":
        time.sleep(config.round_timeout + 1)
    if fault in ("raise", "timeout"):
        raise InjectedFault(f"fault-rate={config.fault_rate}: partition {setup.partition_id} "
                            f"fails round {setup.server_round} on purpose ({fault})")
    parts = client_parts(task)
    regularisers = [r for part in parts if (r := part.before_training(work)) is not None]
    data = work.train_data or TrainingData(setup.images, setup.labels, setup.transform)
    start = time.monotonic()
    result = train(setup.model, data.images, data.labels, data.transform,
                   train_settings(setup.config, task), setup.device, work.rng,
                   regularisers[0] if regularisers else None)
    work.metrics["train-seconds"] = time.monotonic() - start
    for part in parts:
        part.after_training(work)
    if setup.state_folder is not None:
        save_state(setup.state_folder, setup.server_round, context.state,
                   keep=config.checkpoint_keep + 1)
    work.metrics.update({"num-examples": result.num_examples, "train-loss": result.loss,
                         "train-accuracy": result.accuracy})
    if fault == "nan":
        with torch.no_grad():
            for value in setup.model.state_dict().values():
                if value.is_floating_point():
                    value.fill_(float("nan"))
    return setup.reply(msg, work.metrics, with_model=True, extra=work.extra)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this client's own (label-skewed) data."""
    setup = LocalSetup(msg, context)
    loss, accuracy = evaluate(setup.model, setup.images, setup.labels, setup.transform,
                              setup.device, amp=setup.config.amp)
    return setup.reply(msg, {"num-examples": len(setup.labels), "local-loss": loss,
                             "local-accuracy": accuracy}, with_model=False)
