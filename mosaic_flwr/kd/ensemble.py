"""Pieces several methods share: client ensembles, expert heads, label sampling, two losses."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def client_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Every model's logits on ``x``: shape (K, batch, classes). Architectures may differ."""
    return torch.stack([model(x).float() for model in models])


def average_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The uniform ensemble's logits (FedDF, DENSE): the mean of the client logits."""
    return client_logits(models, x).mean(0)


def classwise_probabilities(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FedFTG's teacher: class c's probability is the ``weights[:, c]``-weighted mean over
    clients of their probability of c. ``logits`` (K, B, C), ``weights`` (K, C).

    With columns of ``weights`` summing to 1 (``expert_weights``), rows stay
    distributions only when every client agrees; they are renormalised here.
    """
    probs = torch.einsum("kbc,kc->bc", F.softmax(logits, dim=2), weights.to(logits.dtype))
    return probs / probs.sum(1, keepdim=True).clamp_min(1e-12)


def head_logits(experts: Mapping[str, torch.Tensor], features: torch.Tensor,
                head: str = "head") -> torch.Tensor:
    """Each expert's classifier head applied to feature vectors: (batch, C_experts, classes).

    This is how Mosaic's meta model sees prototypes: a prototype is a feature
    vector, so only the experts' last linear layer runs on it. FedGen reads its
    generated features through the clients' heads the same way.
    """
    weight, bias = experts[f"{head}.weight"], experts[f"{head}.bias"]  # (E, C, D), (E, C)
    return torch.einsum("bd,ecd->bec", features.to(weight.dtype), weight) + bias.unsqueeze(0)


def keep_best(best: torch.Tensor | None, best_loss: torch.Tensor | None,
              candidate: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A running minimum kept on the device: ``(candidate, loss)`` when ``loss`` is lower
    than ``best_loss`` (or nothing is kept yet), else ``(best, best_loss)``; both detached.
    DENSE and FedCOG keep their lowest-loss synthetic batch this way, with no host read."""
    candidate, loss = candidate.detach(), loss.detach().float()
    if best is None or best_loss is None:
        return candidate.clone(), loss
    return torch.where(loss < best_loss, candidate, best), torch.minimum(loss, best_loss)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c p_c log softmax(logits)_c``."""
    return -(target_probs * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def pairwise_diversity_loss(noise: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """FedGen's and FedFTG's diversity loss: ``exp(-mean_ij d_z(i, j) * d_o(i, j))``.

    ``d_z`` is the mean squared difference of two latents, ``d_o`` the mean
    absolute difference of their outputs: minimising it spreads the outputs of
    distant latents apart, against mode collapse.
    """
    noise, outputs = noise.flatten(1).float(), outputs.flatten(1).float()
    d_noise = (noise.unsqueeze(0) - noise.unsqueeze(1)).pow(2).mean(2)
    d_out = (outputs.unsqueeze(0) - outputs.unsqueeze(1)).abs().mean(2)
    return torch.exp(-(d_noise * d_out).mean())


def labels_by_counts(counts: torch.Tensor, n: int, rng: torch.Generator) -> torch.Tensor:
    """``n`` labels in proportion to per-class ``counts`` (C,), shuffled."""
    share = counts.double() / counts.sum().clamp_min(1)
    per_class = torch.floor(share * n).long()
    # Hand the rounding remainder to the largest shares.
    remainder = n - int(per_class.sum())
    if remainder > 0:
        per_class[torch.argsort(share, descending=True)[:remainder]] += 1
    labels = torch.repeat_interleave(torch.arange(len(counts)), per_class)
    return labels[torch.randperm(len(labels), generator=rng)]
