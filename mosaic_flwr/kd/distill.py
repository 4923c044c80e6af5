"""Distillation of a teacher into a student on synthetic inputs (Mosaic stage 4, FedDF).

The loss mixes KL(teacher || student) at temperature T (scaled by T^2, as usual),
cross-entropy against the teacher's argmax, and the Jensen-Shannon divergence
between the two predictions, each with its own weight. The student keeps its
BatchNorm statistics (eval mode): synthetic batches must not overwrite the
statistics it learnt on real client data.

Inputs come from a sampler under ``torch.no_grad()``, either fresh for every
step or, with ``pool_batches > 0``, drawn once into a pool whose teacher outputs
are computed once; each step then takes a random batch of the pool. Mixed
precision: on CUDA when ``amp`` (every forward pass); on the CPU, with
``cpu_bf16`` and a CPU that computes bfloat16 natively, only the frozen passes
(sampling and the teacher): the student's steps stay float32 there (measured on
MNIST, seed 0: a bfloat16 student ended 0.9435 after distillation, a float32
one 0.9525, ``docs/results/speed.md``). Loss values stay on the device during
the loop and are read once at the end (and at each ``log_every`` step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from logging import INFO
from typing import Callable

import torch
from flwr.supercore import log
from torch import nn
from torch.nn import functional as F

from ..training import autocast, fast_layout


@dataclass(frozen=True)
class DistillWeights:
    """Weights of the three distillation terms and the temperature."""

    kl: float = 0.8
    ce: float = 0.2
    jsd: float = 1.0
    temperature: float = 1.0


#: The loss terms :func:`distillation_loss` reports, in order.
TERMS = ("kl", "ce", "jsd")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      weights: DistillWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted KL + CE + JSD of the student against the teacher; the total and each term
    (detached 0-d tensors, still on the device)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    temp = weights.temperature
    kl = F.kl_div(F.log_softmax(student_logits / temp, 1), F.log_softmax(teacher_logits / temp, 1),
                  reduction="batchmean", log_target=True) * temp * temp
    ce = F.cross_entropy(student_logits, teacher_logits.argmax(1))
    # Jensen-Shannon in log space: with probabilities, a student probability that
    # underflows to 0 (logit gaps above ~100, reached when distilling a one-class
    # teacher) makes the gradient of p log p infinite, and the step NaN even at weight 0.
    log_s, log_t = F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1)
    log_m = torch.logaddexp(log_s, log_t) - math.log(2.0)
    jsd = 0.5 * (F.kl_div(log_m, log_s, reduction="batchmean", log_target=True)
                 + F.kl_div(log_m, log_t, reduction="batchmean", log_target=True))
    total = weights.kl * kl + weights.ce * ce + weights.jsd * jsd
    return total, {"kl": kl.detach(), "ce": ce.detach(), "jsd": jsd.detach()}


def teacher_pool(teacher: Callable[[torch.Tensor], torch.Tensor],
                 sample: Callable[[], torch.Tensor], batches: int, device: torch.device,
                 amp: bool = True, cpu_bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``batches`` draws of ``sample()`` and the teacher's logits on them, computed once
    (under :func:`~mosaic_flwr.training.autocast` with ``amp`` and ``cpu_bf16``)."""
    inputs, targets = [], []
    with torch.no_grad(), autocast(device, amp, cpu_bf16):
        for _ in range(batches):
            x = sample()
            inputs.append(x)
            targets.append(teacher(x).float())
    return torch.cat(inputs), torch.cat(targets)


def distill_into(student: nn.Module, teacher: Callable[[torch.Tensor], torch.Tensor],
                 sample: Callable[[], torch.Tensor], *, steps: int, lr: float,
                 weights: DistillWeights, device: torch.device, amp: bool = True,
                 cpu_bf16: bool = False, pool_batches: int = 0,
                 rng: torch.Generator | None = None, classes: torch.Tensor | None = None,
                 log_every: int = 0, cosine: bool = False,
                 max_grad_norm: float = 0.0, tag: str = "mosaic") -> list[dict[str, float]]:
    """Train ``student`` with Adam to match ``teacher`` for ``steps`` batches.

    ``teacher`` maps inputs to logits and is called under ``torch.no_grad()``.
    With ``pool_batches = 0`` every step draws a fresh batch from ``sample()``;
    with ``pool_batches = P`` the teacher labels P draws once (see
    :func:`teacher_pool`) and each step takes a batch of the same size from
    that pool, chosen with ``rng``. ``classes`` (indices) restricts the loss to
    those classes' logits, renormalised among them: a class no client of the
    round holds is then neither taught nor unlearnt. ``cosine`` anneals the
    learning rate to 0 over the steps, ``max_grad_norm`` clips gradients (FedDF
    uses both); ``tag`` prefixes the log lines. Returns one record of loss terms
    per step.
    """
    fast_layout(student.to(device)).eval()
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, steps)) if cosine else None
    use_scaler = device.type == "cuda" and amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if pool_batches:
        draw = _pooled(teacher_pool(teacher, sample, pool_batches, device, amp, cpu_bf16),
                       pool_batches, rng)
    else:  # a pool of one fresh batch per step
        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            return teacher_pool(teacher, sample, 1, device, amp, cpu_bf16)
    if classes is not None:
        classes = classes.to(device)
    history = torch.zeros(steps, 1 + len(TERMS), device=device)
    start = time.monotonic()
    for step in range(steps):
        x, target = draw()
        with autocast(device, amp):  # the student trains in float32 on the CPU
            out = student(x)
        if classes is not None:
            out, target = out.index_select(1, classes), target.index_select(1, classes)
        loss, terms = distillation_loss(out, target, weights)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if max_grad_norm > 0:
            scaler.unscale_(optimiser)
            nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
        scaler.step(optimiser)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        history[step] = torch.stack([loss.detach(), *(terms[t] for t in TERMS)])
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = history[max(0, step + 1 - log_every):step + 1].mean(0).tolist()  # host read: per log
            log(INFO, "[%s] distillation step %d/%d  loss %.4f  (kl %.4f ce %.4f jsd %.4f)"
                "  elapsed %.1fs", tag, step + 1, steps, *recent, time.monotonic() - start)
    return [dict(zip(("loss", *TERMS), row)) for row in history.tolist()]


def _pooled(pool: tuple[torch.Tensor, torch.Tensor], batches: int, rng: torch.Generator | None
            ) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    inputs, targets = pool
    batch = len(inputs) // batches

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(inputs), (batch,), generator=rng).to(inputs.device)
        return inputs[idx], targets[idx]
    return draw
