"""The meta model: attention over the experts' logit vectors, trained on prototypes.

Each expert's logit vector becomes one token (a shared linear lift to
``dim`` plus a learned embedding saying which expert it came from). One
Transformer encoder layer lets the tokens attend to each other. The output is
a gated mixture of the experts' logits (a softmax over experts, per sample)
plus a linear read-out of the summed tokens. Both the gate's scores and the
read-out start at zero, so an untrained meta model is exactly the uniform
ensemble of the experts, and training only has to learn the corrections.

It trains on prototypes (feature centres uploaded by clients) through the
experts' heads, with Adam and an exponential moving average of its weights;
the EMA copy is the one used as part of the teacher.
"""

from __future__ import annotations

import copy
import time
from logging import INFO

import torch
from flwr.supercore import log
from torch import nn
from torch.nn import functional as F


class MetaModel(nn.Module):
    """Attention over E expert logit vectors of C classes -> C logits."""

    def __init__(self, num_experts: int, num_classes: int, dim: int = 100, heads: int = 10,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.lift = nn.Linear(num_classes, dim)
        self.expert_embedding = nn.Parameter(torch.zeros(num_experts, dim))
        nn.init.normal_(self.expert_embedding, std=0.02)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim,
                                                  dropout=dropout, batch_first=True)
        self.gate = nn.Linear(dim, 1)
        self.readout = nn.Linear(dim, num_classes)
        for layer in (self.gate, self.readout):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        """(batch, E, C) expert logits -> (batch, C) logits."""
        logits = logits.float()
        tokens = self.encoder(self.lift(logits) + self.expert_embedding)
        gate = torch.softmax(self.gate(tokens).squeeze(-1), dim=1)  # (batch, E)
        return torch.einsum("be,bec->bc", gate, logits) + self.readout(tokens.sum(1))


class EMA:
    """Exponential moving average of a model's weights: ``avg = d * avg + (1 - d) * w``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        for avg, new in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.is_floating_point():
                avg.mul_(self.decay).add_(new, alpha=1 - self.decay)
            else:
                avg.copy_(new)


def train_meta_model(meta: MetaModel, logits: torch.Tensor, labels: torch.Tensor, *,
                     epochs: int, lr: float, batch_size: int, ema_decay: float,
                     rng: torch.Generator, log_every: int = 0) -> MetaModel:
    """Fit ``meta`` to (P, E, C) expert logits of prototypes and their labels.

    Every epoch visits every prototype once in shuffled batches. Returns the EMA
    copy (eval mode); ``meta`` itself ends with the last raw weights.
    """
    optimiser = torch.optim.Adam(meta.parameters(), lr=lr)
    ema = EMA(meta, ema_decay)
    start = time.monotonic()
    n = len(labels)
    for epoch in range(1, epochs + 1):
        meta.train()
        order = torch.randperm(n, generator=rng)
        total = torch.zeros((), device=logits.device)
        for begin in range(0, n, batch_size):
            idx = order[begin:begin + batch_size]
            loss = F.cross_entropy(meta(logits[idx]), labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            ema.update(meta)
            total += loss.detach() * len(idx)
        if log_every and (epoch % log_every == 0 or epoch == epochs):
            log(INFO, "[mosaic] meta model epoch %d/%d  loss %.4f  elapsed %.1fs",
                epoch, epochs, float(total) / max(n, 1),  # host read: every log_every epochs
                time.monotonic() - start)
    return ema.model
