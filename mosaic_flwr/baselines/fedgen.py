"""FedGen (Zhu et al., ICML 2021): a server-side generator of features regularises clients.

Every round the clients train and send their label counts. The server averages
the models (FedAvg) and trains a small generator G(noise, label) -> feature
vector so that the clients' classifier heads, weighted per class by their share
of that class, classify G's output as the label (plus a diversity term). The
generator goes out with the next round's instructions; each client adds to its
cross-entropy

- ``alpha_t * CE(head(G(y_hat)), y_hat)`` for labels ``y_hat`` drawn from the
  classes it holds (scaled by sample batch / batch size), and
- ``beta_t * KL(softmax(head(G(y))) || softmax(model(x)))`` on its real batch,

with ``alpha_t = max(1e-4, alpha * decay^t)`` (same for beta) in round ``t + 1``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn import functional as F

from ..client_part import ClientPart, ClientWork
from ..config import RunConfig
from ..kd.ensemble import head_logits, pairwise_diversity_loss
from ..models import Classifier
from ..records import GENERATOR_RECORD, ClientUpload, TrainTask
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options
from ..training import Regulariser
from .settings import FedGenSettings


class FeatureGenerator(nn.Module):
    """(uniform noise, one-hot label) -> a feature vector for the classifier head.

    The output passes through a ReLU because every model here feeds its head
    rectified features (the reference's CNN feeds an unrectified linear layer,
    and its generator ends linear): generated features must lie where real ones do.
    """

    def __init__(self, num_classes: int, feature_dim: int, noise_dim: int = 32,
                 hidden_dim: int = 256) -> None:
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.net = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden_dim),
                                 nn.BatchNorm1d(hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, feature_dim), nn.ReLU())

    def forward(self, labels: torch.Tensor,  # pylint: disable=arguments-differ
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features for ``labels`` and the noise that made them."""
        device = self.net[0].weight.device
        noise = torch.rand(len(labels), self.noise_dim, generator=generator).to(device)
        one_hot = F.one_hot(labels.to(device), self.num_classes).float()
        return self.net(torch.cat([noise, one_hot], dim=1)), noise


def build_feature_generator(num_classes: int, feature_dim: int,
                            settings: FedGenSettings) -> FeatureGenerator:
    """The generator a FedGen run trains and sends (same shape on server and clients)."""
    return FeatureGenerator(num_classes, feature_dim, settings.noise_dim, settings.hidden_dim)


def teacher_loss(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 biases: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """``sum_k mean_i w[k, y_i] * CE(head_k(features_i), y_i)`` (FedGen's teacher loss) for
    K heads ``weights`` (K, C, D), ``biases`` (K, C) and class weights (K, C)."""
    logits = head_logits({"head.weight": weights, "head.bias": biases}, features).transpose(0, 1)
    num_heads = logits.shape[0]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[2]), labels.repeat(num_heads),
                         reduction="none").view(num_heads, -1)
    return (class_weights[:, labels].to(ce.dtype) * ce).mean(1).sum()


def train_feature_generator(generator: FeatureGenerator, optimiser: torch.optim.Optimizer,
                            weights: torch.Tensor, biases: torch.Tensor,
                            class_weights: torch.Tensor, labels: torch.Tensor, *, steps: int,
                            batch_size: int, diversity_weight: float,
                            rng: torch.Generator) -> list[float]:
    """Train ``generator`` against frozen heads; labels are drawn from ``labels``. Losses per step."""
    generator.train()
    history = []
    for _ in range(steps):
        y = labels[torch.randint(0, len(labels), (batch_size,), generator=rng)]
        features, noise = generator(y, rng)
        loss = (teacher_loss(features, y.to(features.device), weights, biases, class_weights)
                + diversity_weight * pairwise_diversity_loss(noise, features))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append(loss.detach())
    generator.eval()
    return torch.stack(history).tolist() if history else []  # one read, at the end


class FedGenStrategy(TaskStrategy):
    """FedGen: FedAvg plus a server-trained feature generator sent to clients.

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global model (its ``head`` is what the generator feeds).
    settings : FedGenSettings (default: FedGenSettings())
    **kwargs
        Passed to :class:`~mosaic_flwr.task_strategy.TaskStrategy` (device,
        seed, score_fn) and FedAvg.
    """

    def __init__(self, model_fn: Callable[[], Classifier], settings: FedGenSettings | None = None,
                 **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        self.settings = settings or FedGenSettings()
        self.settings.check()
        self.generator = build_feature_generator(self.num_classes, self.feature_dim,
                                                 self.settings).to(self.device)
        self.optimiser = torch.optim.Adam(self.generator.parameters(), lr=self.settings.generator_lr,
                                          weight_decay=1e-2)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(
            self.optimiser, gamma=self.settings.generator_lr_decay)
        self.generator_ready = False

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "FedGenStrategy":
        """The strategy for a run config."""
        return cls(model_fn_for(config), config.fedgen,
                   **server_options(config, score_fn), **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the server generator, its optimiser and learning-rate schedule."""
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "optimiser": self.optimiser.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator_ready": self.generator_ready}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator_ready = bool(state["generator_ready"])

    def task_for(self, server_round: int) -> TrainTask:
        """Every round: the FedGen objective and the label counts."""
        return TrainTask(objective="fedgen", upload_counts=True,
                         settings=self.settings.to_mapping())

    def instruction_records(self, server_round: int) -> dict[str, ArrayRecord]:
        """The generator, once it has been trained (from round 2 on)."""
        if not self.generator_ready:
            return {}
        state = {k: v.detach().cpu()  # host read: the generator's state, once per round
                 for k, v in self.generator.state_dict().items()}
        return {GENERATOR_RECORD: ArrayRecord(state)}

    def server_step(self, server_round: int, uploads: list[ClientUpload], arrays: ArrayRecord
                    ) -> tuple[ArrayRecord, dict[str, float]]:
        """Train the generator against this round's client heads; the average stays global."""
        start = time.monotonic()
        counts = self.label_counts(uploads).double()
        held = counts.sum(0)
        class_weights = (counts / held.clamp_min(1)).to(self.device)  # (K, C), columns sum to 1
        labels = torch.nonzero((counts > 1).any(0)).flatten()
        if len(labels) == 0:
            labels = torch.nonzero(held > 0).flatten()
        states = [u.arrays.to_torch_state_dict() for u in uploads]
        weights = torch.stack([s["head.weight"].float() for s in states]).to(self.device)
        biases = torch.stack([s["head.bias"].float() for s in states]).to(self.device)
        history = train_feature_generator(
            self.generator, self.optimiser, weights, biases, class_weights, labels,
            steps=self.settings.generator_steps, batch_size=self.settings.generator_batch_size,
            diversity_weight=self.settings.diversity_weight, rng=self.rng)
        self.scheduler.step()
        self.generator_ready = bool(history) or self.generator_ready
        stats = {"generator_seconds": time.monotonic() - start}
        if history:
            stats.update(generator_loss_first=history[0], generator_loss_last=history[-1])
        return arrays, stats


class FedGenObjective(ClientPart):
    """FedGen's part of local training: the generator's terms, from round 2 on."""

    def before_training(self, work: ClientWork) -> Regulariser | None:
        """The client's FedGen terms, or None before the server has a generator (round 1)."""
        setup, msg, task, rng, metrics = (work.setup, work.msg, work.task, work.rng,
                                          work.metrics)
        if GENERATOR_RECORD not in msg.content.array_records:
            return None
        settings = FedGenSettings.from_mapping(task.settings)
        model: Classifier = setup.model
        generator = build_feature_generator(int(model.head.out_features),
                                            int(model.head.in_features), settings)
        generator.load_state_dict(msg.content[GENERATOR_RECORD].to_torch_state_dict())
        generator.to(setup.device).eval().requires_grad_(False)
        t = max(0, setup.server_round - 1)
        alpha = max(1e-4, settings.alpha * settings.decay ** t)
        beta = max(1e-4, settings.beta * settings.decay ** t)
        held = torch.unique(setup.labels)
        ratio = settings.sample_batch_size / setup.config.batch_size
        metrics.update({"fedgen-alpha": alpha, "fedgen-beta": beta})

        def regulariser(model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # pylint: disable=unused-argument
                        logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                target = F.softmax(model.head(generator(y, rng)[0]), dim=1)
            latent = F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="batchmean")
            sampled = held[torch.randint(0, len(held), (settings.sample_batch_size,), generator=rng)]
            with torch.no_grad():
                features = generator(sampled, rng)[0]
            teacher = F.cross_entropy(model.head(features).float(), sampled.to(features.device))
            return alpha * ratio * teacher + beta * latent

        return regulariser
