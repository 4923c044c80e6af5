"""What a Mosaic client computes: label counts, prototypes and a probe for the distillation
round, and the fine-tuning rounds' anchor (:class:`FinetuneAnchor`).

The functions work on tensors, so an existing ClientApp with its own data can
call them directly; :class:`MosaicStatistics` is Mosaic's part of this
project's client pipeline (:mod:`mosaic_flwr.client_part`). Only aggregates
leave the client: label counts, k-means centres of features and a linear probe
head (the generator is :mod:`mosaic_flwr.kd.upload`'s part).
"""

from __future__ import annotations

import copy
import time

import torch
from flwr.app import Array, ArrayRecord
from torch import nn
from torch.nn import functional as F

from ..client_part import ClientPart, ClientWork
from ..data.augment import BatchTransform
from ..records import LABEL_COUNTS, STATS_RECORD, label_counts_array
from ..training import Regulariser, fast_layout, frozen
from .prototypes import prototype_centres
from .settings import MosaicSettings

# Mosaic's uploads in the ``stats`` record, next to ``label-counts``:
#: k-means centres of the global model's features, (P, D) float32;
PROTOTYPES = "prototypes"
#: the class of each centre, (P,) int64;
PROTOTYPE_LABELS = "prototype-labels"
#: a linear head on global-model features that mimics the client's trained model,
#: (C, D) and (C,) float32: how the meta model sees a client of another architecture.
PROBE_WEIGHT = "probe-weight"
PROBE_BIAS = "probe-bias"


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, transform: BatchTransform,
                     device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features of ``images`` (uint8 or [0, 1]) under ``model``, on the CPU
    (copied from the device once, at the end)."""
    fast_layout(model.to(device)).eval()
    chunks = [model.features(transform(images[i:i + batch_size].to(device), train=False)).float()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).cpu() if chunks else torch.zeros(0, model.feature_dim)


def client_statistics(global_model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      transform: BatchTransform, num_classes: int, settings: MosaicSettings,
                      device: torch.device, rng: torch.Generator) -> ArrayRecord:
    """Label counts and per-class prototypes under the received global model's features."""
    features = extract_features(global_model, images, transform, device)
    return prototype_statistics(features, labels, num_classes, settings, rng)


def prototype_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         settings: MosaicSettings, rng: torch.Generator) -> ArrayRecord:
    """Label counts and per-class prototypes (k-means centres) of feature vectors."""
    centres, centre_labels = prototype_centres(
        features, labels, num_classes, settings.prototypes_per_class,
        settings.prototype_min_cluster, rng)
    return ArrayRecord({
        LABEL_COUNTS: label_counts_array(labels, num_classes),
        PROTOTYPES: Array(centres.numpy().astype("float32")),
        PROTOTYPE_LABELS: Array(centre_labels.numpy().astype("int64")),
    })


def probe_head(features: torch.Tensor, logits: torch.Tensor, head: nn.Linear, steps: int = 200,
               lr: float = 0.01) -> dict[str, Array]:
    """A linear head on the global model's features that mimics the local model's predictions.

    When a client trains another architecture than the global one, its own head
    cannot read prototypes (global-model features). This head can: started
    from the global model's ``head``, it is fitted full-batch with Adam to the
    local model's soft predictions (``logits``) on the client's own data
    (``features``: their global-model features). It fits plain tensors cloned
    from the head, so it draws nothing from the global torch RNG and the
    client's later draws (its generator's initialisation) are those of a run
    without the probe. Returns ``probe-weight`` (C, D) and ``probe-bias`` (C,).
    """
    weight = head.weight.detach().float().cpu().clone().requires_grad_(True)
    bias = head.bias.detach().float().cpu().clone().requires_grad_(True)
    if len(features):
        targets = torch.softmax(logits.float(), dim=1)
        optimiser = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(steps):
            log_probs = torch.log_softmax(features.float() @ weight.T + bias, dim=1)
            loss = -(targets * log_probs).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return {PROBE_WEIGHT: Array(weight.detach().numpy().astype("float32")),
            PROBE_BIAS: Array(bias.detach().numpy().astype("float32"))}


@torch.no_grad()
def local_logits(model: nn.Module, images: torch.Tensor, transform: BatchTransform,
                 device: torch.device) -> torch.Tensor:
    """A (trained) model's logits on the client's own data, on the CPU."""
    features = extract_features(model, images, transform, device)
    return model.head(features.to(device)).float().cpu()


class MosaicStatistics(ClientPart):
    """Mosaic's part of the distillation round: label counts and prototypes under the
    received global model's features before training, then a probe head that reads
    those features the way the trained model predicts."""

    def __init__(self) -> None:
        self.features = torch.zeros(0)
        self.global_head: nn.Linear | None = None

    def before_training(self, work: ClientWork) -> None:
        start = time.monotonic()
        setup = work.setup
        settings = MosaicSettings.from_mapping(work.task.settings)
        global_model = setup.global_model(work.msg)
        self.global_head = copy.deepcopy(global_model.head)
        self.features = extract_features(global_model, setup.images, setup.transform,
                                         setup.device)
        work.extra[STATS_RECORD] = prototype_statistics(
            self.features, setup.labels, setup.spec.num_classes, settings,
            work.side_stream("prototypes"))
        work.metrics["stats-seconds"] = time.monotonic() - start

    def after_training(self, work: ClientWork) -> None:
        assert self.global_head is not None
        setup = work.setup
        logits = local_logits(setup.model, setup.images, setup.transform, setup.device)
        work.extra[STATS_RECORD] = ArrayRecord({
            **dict(work.extra[STATS_RECORD].items()),
            **probe_head(self.features, logits, self.global_head)})


def not_true_distillation(logits: torch.Tensor, anchor_logits: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 1.0) -> torch.Tensor:
    """KL(anchor || model) over each sample's classes other than its label (FedNTD, Lee et
    al. 2022): both distributions are renormalised over the C - 1 "not-true" classes and
    compared at ``temperature`` (scaled by T^2). It leaves the true class to the
    cross-entropy and keeps what the anchor knows about the other classes."""
    batch, classes = logits.shape
    keep = ~F.one_hot(labels, classes).bool()
    student = F.log_softmax(logits.float()[keep].view(batch, classes - 1) / temperature, 1)
    teacher = F.log_softmax(anchor_logits.float()[keep].view(batch, classes - 1) / temperature, 1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2


class FinetuneAnchor(ClientPart):
    """Mosaic's fine-tuning rounds: local training also matches the received (distilled)
    model on the classes other than each sample's label, with weight
    ``finetune_anchor``, so that training on a few classes does not undo what the
    global model learnt about the others."""

    def before_training(self, work: ClientWork) -> Regulariser | None:
        settings = MosaicSettings.from_mapping(work.task.settings)
        if settings.finetune_anchor == 0:
            return None
        anchor = frozen(copy.deepcopy(work.setup.model), work.setup.device)
        weight, temperature = settings.finetune_anchor, settings.temperature

        def regulariser(model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # pylint: disable=unused-argument
                        logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                anchor_logits = anchor(x)
            return weight * not_true_distillation(logits, anchor_logits, y, temperature)

        return regulariser
