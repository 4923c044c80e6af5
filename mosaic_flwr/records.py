"""What travels in Flower messages besides the model: record names and the train task.

A strategy that needs more than local training from a client says so in a
``task`` ConfigRecord next to the usual ``arrays`` and ``config`` records; the
client reads it with :meth:`TrainTask.from_message` and answers with extra
records named here. A message without a ``task`` record asks for plain local
training, so FedAvg-style strategies need nothing from this module.

Reply records:

- ``arrays`` (ArrayRecord): the trained classifier;
- ``metrics`` (MetricRecord): ``num-examples`` and training metrics;
- ``client`` (ConfigRecord): the sender's ``partition-id``;
- ``generator`` (ArrayRecord): the client's image generator, when asked;
- ``stats`` (ArrayRecord): ``label-counts`` (per class), ``prototypes`` (k-means
  feature centres) and ``prototype-labels`` (the class of each centre), when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message

CLIENT_RECORD = "client"
TASK_RECORD = "task"
GENERATOR_RECORD = "generator"
STATS_RECORD = "stats"
LABEL_COUNTS = "label-counts"
PROTOTYPES = "prototypes"
PROTOTYPE_LABELS = "prototype-labels"

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
    upload_stats : bool
        Also send label counts and per-class feature prototypes.
    upload_generator : bool
        Also train an image generator on the local data and send it.
    settings : dict
        The strategy's client-side settings (prototype k, generator losses, ...).
    """

    phase: str = "train"
    learning_rate_scale: float = 1.0
    upload_stats: bool = False
    upload_generator: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> ConfigRecord:
        """The task as a ConfigRecord for the instruction message."""
        record: dict[str, Any] = {
            "phase": self.phase, "learning-rate-scale": self.learning_rate_scale,
            "upload-stats": self.upload_stats, "upload-generator": self.upload_generator}
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
            upload_stats=bool(record.get("upload-stats", False)),
            upload_generator=bool(record.get("upload-generator", False)),
            settings={k[len(SETTING_PREFIX):]: v for k, v in record.items()
                      if k.startswith(SETTING_PREFIX)})
