"""FedFTG (Zhang et al., CVPR 2022): data-free fine-tuning of the global model every round.

After FedAvg, the server fine-tunes the average for ``iterations`` iterations.
Each draws a batch of labels (in proportion to the clients' summed label
counts) and latents, then

1. takes one generator step per client k, with client k as the teacher:
   ``ce * w_k(y) * CE(t_k(x), y) - hard * mean_i w_k(y_i) |s(x_i) - t_k(x_i)|_1
   + diversity / K * div(z, x)``, where ``w[k, c] = n[k, c] / sum_j n[j, c]``.
   The second term mines hard samples: inputs where the global model ``s``
   and the client disagree;
2. takes ``distill_steps`` SGD steps of the global model towards the class-wise
   weighted ensemble of client probabilities on that batch.

The label-conditioned image generator persists across rounds; both learning
rates decay by ``lr_decay`` per round.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn import functional as F

from ..config import RunConfig
from ..data.datasets import dataset_spec
from ..kd.ensemble import (classwise_probabilities, client_logits, labels_by_counts,
                           pairwise_diversity_loss, soft_cross_entropy)
from ..kd.generator import ImageGenerator
from ..models import Classifier
from ..records import ClientUpload, TrainTask
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options
from ..training import fast_layout
from .settings import FedFTGSettings


def disagreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute logit difference (FedFTG's model discrepancy)."""
    return (student_logits.float() - teacher_logits.float()).abs().mean(1)


def generator_loss(x: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
                   student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   class_weight: torch.Tensor, settings: FedFTGSettings, num_clients: int
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FedFTG's generator loss for one teacher client; ``class_weight`` is its (C,) share.
    The terms come back detached, on the device."""
    w = class_weight[labels].to(x.dtype)
    terms = {
        "ce": F.cross_entropy(teacher_logits.float(), labels) * w.mean(),
        "hard": -(w * disagreement(student_logits, teacher_logits)).mean(),
        "diversity": pairwise_diversity_loss(z, x) / num_clients,
    }
    total = (settings.ce_weight * terms["ce"] + settings.hard_weight * terms["hard"]
             + settings.diversity_weight * terms["diversity"])
    return total, {k: v.detach() for k, v in terms.items()}


def fine_tune(student: nn.Module, generator: ImageGenerator, clients: list[nn.Module],
              counts: torch.Tensor, settings: FedFTGSettings, server_round: int,
              rng: torch.Generator) -> dict[str, float]:
    """One round of FedFTG's server fine-tuning of ``student`` (in place); diagnostics."""
    device = next(student.parameters()).device
    decay = settings.lr_decay ** max(0, server_round - 1)
    opt_g = torch.optim.Adam(generator.parameters(), lr=settings.generator_lr * decay)
    opt_s = torch.optim.SGD(student.parameters(), lr=settings.distill_lr * decay,
                            weight_decay=1e-3)
    counts = counts.double()
    class_weights = (counts / (counts.sum(0, keepdim=True) + 1e-6)).float().to(device)  # (K, C)
    bs = settings.batch_size
    labels = labels_by_counts(counts.sum(0), bs * settings.iterations, rng).to(device)
    student.eval()
    hard_first, hard_last, kd = [], [], []
    for it in range(settings.iterations):
        y = labels[it * bs:(it + 1) * bs]
        z = torch.randn(len(y), generator.latent_dim, generator=rng).to(device)
        generator.train()
        student.requires_grad_(False)
        for k, client in enumerate(clients):
            x = generator(z, y)
            loss, terms = generator_loss(x, z, y, student(x), client(x), class_weights[k],
                                         settings, len(clients))
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            (hard_first if it == 0 else hard_last).append(-terms["hard"])
        generator.eval()
        student.requires_grad_(True)
        with torch.no_grad():
            x = generator(z, y)
            target = classwise_probabilities(client_logits(clients, x), class_weights)
        for _ in range(settings.distill_steps):
            loss = soft_cross_entropy(student(x), target)
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            kd.append(loss.detach())
    stats = {"hard_disagreement_first": float(torch.stack(hard_first).mean()) if hard_first else 0.0}
    if hard_last:
        stats["hard_disagreement_last"] = float(torch.stack(hard_last).mean())
    if kd:
        stats.update(distill_loss_first=float(kd[0]), distill_loss_last=float(kd[-1]))
    return stats


class FedFTGStrategy(TaskStrategy):
    """FedFTG: FedAvg, then data-free fine-tuning of the average on the server.

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global model (and the clients' models, to load their uploads).
    generator_fn : Callable[[], ImageGenerator]
        Builds the server's label-conditioned generator (``num_classes > 0``).
    settings : FedFTGSettings (default: FedFTGSettings())
    **kwargs
        Passed to :class:`~mosaic_flwr.task_strategy.TaskStrategy` and FedAvg.
    """

    def __init__(self, model_fn: Callable[[], Classifier],
                 generator_fn: Callable[[], ImageGenerator],
                 settings: FedFTGSettings | None = None, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        self.settings = settings or FedFTGSettings()
        self.settings.check()
        self.generator = generator_fn().to(self.device)
        if not self.generator.num_classes:
            raise ValueError("FedFTG needs a label-conditioned generator (num_classes > 0)")

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "FedFTGStrategy":
        """The strategy for a run config."""
        spec = dataset_spec(config)
        settings = config.fedftg
        return cls(model_fn_for(config),
                   lambda: ImageGenerator(spec, settings.latent_dim, settings.generator_width,
                                          spec.num_classes),
                   settings, **server_options(config, score_fn), **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the server's generator (trained on from round to round)."""
        return {**super().state_dict(), "generator": self.generator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])

    def task_for(self, server_round: int) -> TrainTask:
        """Plain local training, plus the label counts."""
        return TrainTask(upload_counts=True)

    def server_step(self, server_round: int, uploads: list[ClientUpload], arrays: ArrayRecord
                    ) -> tuple[ArrayRecord, dict[str, float]]:
        """Fine-tune the average against the class-wise weighted client ensemble."""
        start = time.monotonic()
        student = self.global_model(arrays)
        stats: dict[str, float] = {}
        if self.score_fn is not None:
            stats["student_accuracy_before"] = self.score_fn(student.eval())
        fast_layout(student)
        fast_layout(self.generator)
        stats.update(fine_tune(student, self.generator, self.client_models(uploads),
                               self.label_counts(uploads), self.settings, server_round, self.rng))
        if self.score_fn is not None:
            stats["student_accuracy_after"] = self.score_fn(student.eval())
        stats["distill_seconds"] = time.monotonic() - start
        return ArrayRecord(student.to("cpu").state_dict()), stats
