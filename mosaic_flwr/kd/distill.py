"""Distillation of a teacher into a student on synthetic inputs (Mosaic stage 4, FedDF).

The loss mixes KL(teacher || student) at temperature T (scaled by T^2, as usual),
cross-entropy against the teacher's argmax, and the Jensen-Shannon divergence
between the two predictions, each with its own weight. The student keeps its
BatchNorm statistics (eval mode): synthetic batches must not overwrite the
statistics it learnt on real client data. Inputs come from a sampler under
``torch.no_grad()``; on CUDA the forward passes run in mixed precision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import INFO
from typing import Callable

import torch
from flwr.supercore import log
from torch import nn
from torch.nn import functional as F

from ..training import autocast


@dataclass(frozen=True)
class DistillWeights:
    """Weights of the three distillation terms and the temperature."""

    kl: float = 0.8
    ce: float = 0.2
    jsd: float = 1.0
    temperature: float = 1.0


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      weights: DistillWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted KL + CE + JSD of the student against the teacher; total and each term."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    temp = weights.temperature
    kl = F.kl_div(F.log_softmax(student_logits / temp, 1), F.log_softmax(teacher_logits / temp, 1),
                  reduction="batchmean", log_target=True) * temp * temp
    ce = F.cross_entropy(student_logits, teacher_logits.argmax(1))
    p_s, p_t = F.softmax(student_logits, 1), F.softmax(teacher_logits, 1)
    log_m = torch.log(((p_s + p_t) / 2).clamp_min(1e-8))
    jsd = 0.5 * (F.kl_div(log_m, p_s, reduction="batchmean")
                 + F.kl_div(log_m, p_t, reduction="batchmean"))
    total = weights.kl * kl + weights.ce * ce + weights.jsd * jsd
    return total, {"kl": float(kl.detach()), "ce": float(ce.detach()), "jsd": float(jsd.detach())}


def distill_into(student: nn.Module, teacher: Callable[[torch.Tensor], torch.Tensor],
                 sample: Callable[[], torch.Tensor], *, steps: int, lr: float,
                 weights: DistillWeights, device: torch.device, amp: bool = True,
                 log_every: int = 0, cosine: bool = False, max_grad_norm: float = 0.0,
                 tag: str = "mosaic") -> list[dict[str, float]]:
    """Train ``student`` with Adam to match ``teacher`` on ``steps`` batches from ``sample()``.

    ``teacher`` maps inputs to logits and is called under ``torch.no_grad()``.
    ``cosine`` anneals the learning rate to 0 over the steps, ``max_grad_norm``
    clips gradients (FedDF uses both); ``tag`` prefixes the log lines.
    Returns one record of loss terms per step.
    """
    student.to(device).eval()
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, steps)) if cosine else None
    use_scaler = device.type == "cuda" and amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    history: list[dict[str, float]] = []
    start = time.monotonic()
    for step in range(1, steps + 1):
        with torch.no_grad():
            x = sample()
            with autocast(device, amp):
                target = teacher(x)
        with autocast(device, amp):
            out = student(x)
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
        history.append({"loss": float(loss.detach()), **terms})
        if log_every and (step % log_every == 0 or step == steps):
            recent = history[-log_every:]
            log(INFO, "[%s] distillation step %d/%d  loss %.4f  (kl %.4f ce %.4f jsd %.4f)"
                "  elapsed %.1fs", tag, step, steps, _avg(recent, "loss"), _avg(recent, "kl"),
                _avg(recent, "ce"), _avg(recent, "jsd"), time.monotonic() - start)
    return history


def _avg(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)
