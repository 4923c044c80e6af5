"""A method's part of a client's training round: what it does before and after local training.

:func:`mosaic_flwr.client.handle_train` runs one pipeline for every method:
build the :class:`~mosaic_flwr.client.LocalSetup` (config, node, data, device,
model), call each part's :meth:`ClientPart.before_training` in order, train
(with the regulariser a part returned, if any), call each part's
:meth:`ClientPart.after_training` in the same order, and reply with the model,
the records the parts added to :attr:`ClientWork.extra` and the metrics. Each
method keeps its part in its own module (Mosaic's statistics in
:mod:`mosaic_flwr.mosaic.client`, FedGen's and FedCOG's objectives in theirs,
the generator upload in :mod:`mosaic_flwr.kd.upload`); the task record says
which parts a round needs (:func:`mosaic_flwr.client.client_parts`).
:func:`train_settings` turns a task into local-training settings, for the
pipeline and for parts that train a second model (Spectral Co-Distillation).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from flwr.app import ArrayRecord, Context, Message

from .records import TrainTask
from .training import Regulariser, TrainSettings

if TYPE_CHECKING:
    from .client import LocalSetup
    from .config import RunConfig


def train_settings(config: RunConfig, task: TrainTask | None = None) -> TrainSettings:
    """Local-training settings for a task; the proximal term is on only for FedProx.

    A task's own ``local_steps`` or ``local_epochs`` wins over the run's; otherwise
    ``local-steps`` (when > 0) replaces ``local-epochs``."""
    task = task or TrainTask()
    steps = task.local_steps or (0 if task.local_epochs else config.local_steps)
    return TrainSettings(
        epochs=task.local_epochs or config.local_epochs, steps=steps, batch_size=config.batch_size,
        learning_rate=config.learning_rate * task.learning_rate_scale, momentum=config.momentum,
        weight_decay=config.weight_decay,
        proximal_mu=config.proximal_mu if config.strategy == "fedprox" else 0.0,
        augment=config.augment, amp=config.amp)


@dataclass(frozen=True)
class TrainingData:
    """What local training runs on: images, labels and the batch transform that turns a
    batch of images into classifier inputs (``transform(images, train, generator)``)."""

    images: torch.Tensor
    labels: torch.Tensor
    transform: Callable[..., torch.Tensor]


@dataclass
class ClientWork:  # pylint: disable=too-many-instance-attributes
    """One training message on one client: what the parts read and what they add.

    ``rng`` is the round's random stream: parts draw from it in pipeline order,
    so a run is reproducible for a seed. Work that should leave local training as
    it would be without it draws from :meth:`side_stream` instead.
    """

    msg: Message
    context: Context
    task: TrainTask
    setup: LocalSetup
    rng: torch.Generator
    #: Records to send back besides the model (``stats``, ``generator``).
    extra: dict[str, ArrayRecord] = field(default_factory=dict)
    #: Metrics to send back (``*-seconds`` timings among them).
    metrics: dict[str, float] = field(default_factory=dict)
    #: What local training runs on instead of the client's data, when a part sets it
    #: (FedLGD trains on virtual data).
    train_data: TrainingData | None = None

    def side_stream(self, name: str) -> torch.Generator:
        """A random stream of its own, for ``name``'s work, derived from the round's seed
        without drawing from :attr:`rng`: local training then shuffles and augments
        exactly as it would without that work (Mosaic's prototypes before training)."""
        return torch.Generator().manual_seed(
            (self.rng.initial_seed() + zlib.crc32(name.encode())) % 2**63)


class ClientPart:
    """A method's client-side work around local training (both steps do nothing by default)."""

    def before_training(self, work: ClientWork) -> Regulariser | None:  # pylint: disable=unused-argument
        """Work before training, on the received model; may return a training regulariser."""
        return None

    def after_training(self, work: ClientWork) -> None:  # pylint: disable=unused-argument
        """Work after training, on the trained model."""
        return None
