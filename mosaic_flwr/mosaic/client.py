"""What a client computes for Mosaic when the strategy asks: statistics and a generator.

These functions work on tensors, so an existing ClientApp with its own data can
call them directly; :func:`mosaic_flwr.client.handle_train` calls them for this
project's ClientApp. Only aggregates leave the client: label counts, k-means
centres of features, a linear probe head, and generator weights.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from ..data.augment import BatchTransform
from ..data.datasets import DatasetSpec
from ..records import LABEL_COUNTS, PROBE_BIAS, PROBE_WEIGHT, PROTOTYPE_LABELS, PROTOTYPES
from .generator import GeneratorReport, build_generator, train_generator
from .prototypes import prototype_centres
from .settings import MosaicSettings


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, transform: BatchTransform,
                     device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features of ``images`` (in [0, 1]) under ``model``, on the CPU."""
    model.to(device).eval()
    chunks = [model.features(transform(images[i:i + batch_size].to(device), train=False)).float().cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, model.feature_dim)


def label_counts_array(labels: torch.Tensor, num_classes: int) -> Array:
    """Per-class sample counts as the int64 array clients upload (``label-counts``)."""
    return Array(torch.bincount(labels, minlength=num_classes).numpy().astype("int64"))


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


def client_generator(classifier: nn.Module, images: torch.Tensor, transform: BatchTransform,
                     spec: DatasetSpec, settings: MosaicSettings, device: torch.device,
                     rng: torch.Generator) -> tuple[ArrayRecord, GeneratorReport]:
    """Train this client's generator against its (trained) classifier; its weights and report."""
    generator = build_generator(spec, settings)
    report = train_generator(generator, classifier, images, transform, settings, device, rng)
    return ArrayRecord(generator.to("cpu").state_dict()), report
