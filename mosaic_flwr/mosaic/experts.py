"""Per-class experts: client models averaged with each client's count of one class.

With K clients and C classes, expert c's parameters are
``sum_k w[k, c] * theta_k`` where ``w[k, c] = n[k, c] / sum_j n[j, c]``: clients
that hold much of class c dominate expert c. The experts share one architecture;
their parameters are stacked along a leading expert axis (the meta model reads
the stacked heads), and on classifier inputs each expert runs as its own frozen
module in channels-last layout (:func:`expert_modules`). Measured on a 28x28 CNN
with ten experts and 320 inputs on two CPU threads, that loop takes 0.38x the
time of a plain loop of default-layout modules, exactly (within 3e-7); bfloat16
autocast takes it to 0.14x. A ``torch.func.vmap`` over the stacked state took
1.5x, and grouped convolutions 1.3x (``docs/results/speed.md``).

When clients train different models (widths or architectures), parameters
cannot be mixed. Expert c is then the same mixture taken over the client
models' predictive distributions, ``log sum_k w[k, c] * softmax(f_k(x))``
(:func:`mixture_log_probs`): mixing probabilities, not logits, because the
logit scales of different architectures differ by orders of magnitude on
synthetic inputs (measured: max |logit| from 1 to 1000 among ten clients after
one round), and a logit mixture then follows whichever model is loudest. On
prototypes (global-model features) each client is represented by a linear
probe head that mimics it (:func:`mosaic_flwr.mosaic.client.probe_head`),
mixed the same way.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..kd.ensemble import client_logits
from ..training import fast_layout


def expert_weights(counts: torch.Tensor, weighting: str = "counts") -> torch.Tensor:
    """(K, C) mixing weights whose columns sum to 1, from (K, C) label counts.

    ``counts``: column c is each client's share of class c. A class no client
    holds gets the sample-weighted (FedAvg) average. ``uniform``: every expert
    is the plain average of the client models (the ablation of count weighting).
    """
    counts = counts.double()
    num_clients, num_classes = counts.shape
    if weighting == "uniform":
        return torch.full((num_clients, num_classes), 1.0 / num_clients, dtype=torch.float64)
    if weighting != "counts":
        raise ValueError(f"unknown expert weighting {weighting!r}")
    per_class = counts.sum(0, keepdim=True)
    sizes = counts.sum(1, keepdim=True)
    fallback = (sizes / sizes.sum()).expand(-1, num_classes)
    return torch.where(per_class > 0, counts / per_class.clamp_min(1), fallback)


def class_experts(states: list[Mapping[str, torch.Tensor]], weights: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """Stacked expert state: each entry has a leading axis of size C (one per expert).

    Floating-point entries are mixed with ``weights`` (K, C); integer entries
    (BatchNorm's ``num_batches_tracked``) are copied from the first client.
    """
    if len(states) != weights.shape[0]:
        raise ValueError(f"{len(states)} client states but weights for {weights.shape[0]} clients")
    num_experts = weights.shape[1]
    experts: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            stacked = torch.stack([s[name].double() for s in states])  # (K, ...)
            mixed = torch.einsum("kc,k...->c...", weights.double(), stacked)
            experts[name] = mixed.to(first.dtype)
        else:
            experts[name] = first.unsqueeze(0).expand(num_experts, *first.shape).clone()
    return experts


def expert_modules(model_fn: Callable[[], nn.Module], experts: Mapping[str, torch.Tensor],
                   device: torch.device | str = "cpu") -> list[nn.Module]:
    """One frozen module per expert (eval mode, channels-last layout, on ``device``),
    built by ``model_fn`` and loaded with that expert's slice of ``experts``.

    Their logits on classifier inputs, (C_experts, batch, classes), are
    :func:`~mosaic_flwr.kd.ensemble.client_logits` of the list. BatchNorm uses
    each expert's mixed running statistics.
    """
    num_experts = len(next(iter(experts.values())))
    modules = []
    for e in range(num_experts):
        module = model_fn()
        module.load_state_dict({name: value[e] for name, value in experts.items()})
        module.requires_grad_(False)
        modules.append(fast_layout(module.to(device)).eval())
    return modules


def mixture_log_probs(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Experts of models that differ: ``log sum_k weights[k, e] * softmax(logits[k])``.

    ``logits`` (K, batch, classes) from K client models, ``weights`` (K, E)
    with columns summing to 1; returns (batch, E, classes) log-probabilities.
    """
    log_probs = torch.log_softmax(logits.float(), dim=2).unsqueeze(3)  # (K, B, C, 1)
    log_w = weights.to(log_probs).log()[:, None, None, :]  # (K, 1, 1, E); log 0 = -inf
    return torch.logsumexp(log_probs + log_w, dim=0).permute(0, 2, 1)  # (B, E, C)


def mixed_expert_logits(models: list[nn.Module], weights: torch.Tensor, x: torch.Tensor
                        ) -> torch.Tensor:
    """:func:`mixture_log_probs` of K models (eval mode) on ``x``: (batch, E, classes)."""
    return mixture_log_probs(client_logits(models, x), weights)


def ensemble_logits(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted average over experts of (batch, E, C) logits with (E,) weights."""
    weights = (weights / weights.sum()).to(logits.dtype)
    return torch.einsum("bec,e->bc", logits, weights)
