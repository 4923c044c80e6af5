"""The generator a client trains on its own data and uploads (Mosaic, FedDF).

:func:`client_generator` works on tensors (an existing ClientApp can call it);
:class:`GeneratorUpload` is its part of this project's client pipeline
(:mod:`mosaic_flwr.client_part`). Only the generator's weights leave the client.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord
from torch import nn

from ..client_part import ClientPart, ClientWork
from ..data.augment import BatchTransform
from ..data.datasets import DatasetSpec
from ..records import GENERATOR_RECORD
from .generator import GeneratorReport, build_generator, train_generator
from .settings import GeneratorSettings


def client_generator(classifier: nn.Module, images: torch.Tensor, transform: BatchTransform,
                     spec: DatasetSpec, settings: GeneratorSettings, device: torch.device,
                     rng: torch.Generator, amp: bool = True, cpu_bf16: bool = False
                     ) -> tuple[ArrayRecord, GeneratorReport]:
    """Train this client's generator against its (trained) classifier; its weights and report
    (``amp``/``cpu_bf16``: the precision of the frozen classifier's pass, as in
    :func:`~mosaic_flwr.kd.generator.train_generator`)."""
    generator = build_generator(spec, settings)
    report = train_generator(generator, classifier, images, transform, settings, device, rng,
                             amp, cpu_bf16)
    return ArrayRecord(generator.to("cpu").state_dict()), report


class GeneratorUpload(ClientPart):
    """After training: train a generator against the trained model and add it to the reply
    (settings from the task: the ``generator_*`` fields of Mosaic's or FedDF's settings)."""

    def after_training(self, work: ClientWork) -> None:
        setup = work.setup
        start = time.monotonic()
        work.extra[GENERATOR_RECORD], report = client_generator(
            setup.model, setup.images, setup.transform, setup.spec,
            GeneratorSettings.from_mapping(work.task.settings), setup.device, work.rng,
            setup.config.amp, setup.config.cpu_bf16)
        work.metrics["generator-seconds"] = time.monotonic() - start
        work.metrics["generator-loss-first"] = report.first["total"]
        work.metrics["generator-loss-last"] = report.last["total"]
