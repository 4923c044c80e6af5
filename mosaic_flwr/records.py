"""What travels in Flower messages besides the model: record names and the train task.

A strategy that needs more than local training from a client says so in a
``task`` ConfigRecord next to the usual ``arrays`` and ``config`` records; the
client reads it with :meth:`TrainTask.from_message` and answers with extra
records named here. A message without a ``task`` record asks for plain local
training, so FedAvg-style strategies need nothing from this module.

Reply records:

- ``arrays`` (ArrayRecord): the trained classifier;
- ``metrics`` (MetricRecord): ``num-examples`` and training metrics;
- ``client`` (ConfigRecord): the sender's ``partition-id`` and ``model``
  (``name@width``, the architecture of its ``arrays``);
- ``generator`` (ArrayRecord): the client's image generator, when asked;
- ``stats`` (ArrayRecord): ``label-counts`` (per class), and whatever else a
  method's client part adds (Mosaic's prototypes and probe head, named in
  :mod:`mosaic_flwr.mosaic.client`).

An instruction may carry a ``generator`` ArrayRecord too: the server's generator
that a client's local objective uses (FedGen); and a ``global-model``
ArrayRecord when ``arrays`` holds the client's own architecture, not the global
model, but the task needs the global model (Mosaic's prototypes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

CLIENT_RECORD = "client"
TASK_RECORD = "task"
GENERATOR_RECORD = "generator"
STATS_RECORD = "stats"
LABEL_COUNTS = "label-counts"
GLOBAL_MODEL_RECORD = "global-model"
#: Prefix of the records that carry a client-model group's latest average to a node
#: the server has not heard from yet (``group-model:resnet8``): new, or its id is new
#: after a restart. The node trains from the one of its own model.
GROUP_MODEL_PREFIX = "group-model:"

#: Prefix of the task keys that carry the strategy's client-side settings.
SETTING_PREFIX = "setting."


@dataclass(frozen=True)
class TrainTask:
    """What the server asks of a client in one training round.

    Attributes
    ----------
    phase : str
        Name of the strategy's phase (for logs and metrics), e.g. ``"warmup"``.
    learning_rate_scale : float
        Multiplies the client's learning rate (Mosaic's fine-tuning rounds).
    local_epochs : int
        Epochs of local training; 0 means the run config's ``local-epochs``.
    local_steps : int
        SGD steps of local training instead of epochs; 0 means the run config's
        ``local-steps`` unless ``local_epochs`` is set.
    objective : str
        The local training objective: ``""`` (cross-entropy, plus FedProx's
        term under FedProx), ``"fedgen"`` or ``"fedcog"``; see
        :data:`mosaic_flwr.client.OBJECTIVES`.
    upload_counts : bool
        Also send the label counts (a ``stats`` record with ``label-counts``).
    upload_stats : bool
        Also send label counts and per-class feature prototypes.
    upload_generator : bool
        Also train an image generator on the local data and send it.
    keep_model : bool
        Keep the trained model in the node's state for the next round
        (FedCOG's previous local model); it never leaves the node.
    arrays_model : str
        The architecture (``name@width``) of the instruction's ``arrays``; empty
        means the run's global model. A client whose own model differs cuts a
        width sub-model from them (``slicing``) or, for another architecture,
        starts from its own seeded initialisation.
    slicing : str
        How width sub-models are cut from the global model: ``"static"``
        (HeteroFL), ``"rolling"`` (FedRolex), or ``""`` (not at all).
    settings : dict
        The strategy's client-side settings (prototype k, generator losses, ...).
    """

    phase: str = "train"
    learning_rate_scale: float = 1.0
    local_epochs: int = 0
    local_steps: int = 0
    objective: str = ""
    upload_counts: bool = False
    upload_stats: bool = False
    upload_generator: bool = False
    keep_model: bool = False
    arrays_model: str = ""
    slicing: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> ConfigRecord:
        """The task as a ConfigRecord for the instruction message."""
        record: dict[str, Any] = {
            "phase": self.phase, "learning-rate-scale": self.learning_rate_scale,
            "local-epochs": self.local_epochs, "local-steps": self.local_steps,
            "objective": self.objective,
            "upload-counts": self.upload_counts, "upload-stats": self.upload_stats,
            "upload-generator": self.upload_generator, "keep-model": self.keep_model,
            "arrays-model": self.arrays_model, "slicing": self.slicing}
        record.update({SETTING_PREFIX + k: v for k, v in self.settings.items()})
        return ConfigRecord(record)

    @classmethod
    def from_message(cls, msg: Message) -> "TrainTask":
        """The task a message carries; plain local training when it carries none."""
        record = msg.content.config_records.get(TASK_RECORD)
        if record is None:
            return cls()
        return cls(
            phase=str(record.get("phase", "train")),
            learning_rate_scale=float(record.get("learning-rate-scale", 1.0)),
            local_epochs=int(record.get("local-epochs", 0)),
            local_steps=int(record.get("local-steps", 0)),
            objective=str(record.get("objective", "")),
            upload_counts=bool(record.get("upload-counts", False)),
            upload_stats=bool(record.get("upload-stats", False)),
            upload_generator=bool(record.get("upload-generator", False)),
            keep_model=bool(record.get("keep-model", False)),
            arrays_model=str(record.get("arrays-model", "")),
            slicing=str(record.get("slicing", "")),
            settings={k[len(SETTING_PREFIX):]: v for k, v in record.items()
                      if k.startswith(SETTING_PREFIX)})


def label_counts_array(labels: torch.Tensor, num_classes: int) -> Array:
    """Per-class sample counts as the int64 array clients upload (``label-counts``)."""
    return Array(torch.bincount(labels, minlength=num_classes).numpy().astype("int64"))


def label_counts_record(labels: torch.Tensor, num_classes: int) -> ArrayRecord:
    """The ``stats`` record of a task that asks for label counts only (``upload_counts``)."""
    return ArrayRecord({LABEL_COUNTS: label_counts_array(labels.cpu(), num_classes)})


@dataclass(frozen=True)
class ClientUpload:  # pylint: disable=too-many-instance-attributes
    """One usable training reply, decoded: what a strategy's server step reads.

    Attributes
    ----------
    node_id, partition_id : int
        Who sent it.
    model : str
        The architecture it trained (``name@width``).
    arrays : ArrayRecord
        The trained weights.
    weight : float
        Its aggregation weight (``num-examples``).
    stats : ArrayRecord or None
        The ``stats`` record, when the task asked for one (label counts, and
        Mosaic's prototypes and probe head).
    generator : ArrayRecord or None
        The ``generator`` record, when the task asked for one.
    metrics : dict
        The reply's scalar metrics (``num-examples``, timings, what a method's part added).
    """

    node_id: int
    partition_id: int
    model: str
    arrays: ArrayRecord
    weight: float
    stats: ArrayRecord | None = None
    generator: ArrayRecord | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def label_counts(self) -> torch.Tensor:
        """Per-class sample counts (C,) from the ``stats`` record."""
        assert self.stats is not None, "the task asked for no label counts"
        return torch.from_numpy(self.stats[LABEL_COUNTS].numpy())
