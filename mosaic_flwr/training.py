"""Local training and evaluation loops, device selection, precision and layout.

Data are held as tensors in memory and batched by index: no DataLoader worker
processes inside Ray actors, and augmentation runs batched on the device.
Training is reproducible on the CPU: every random choice draws from a
``torch.Generator`` seeded by the caller. Loops keep their running losses and
counts on the device and read them once at the end, so a GPU never waits for
the host between batches.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .data.augment import BatchTransform


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present (in Ray, only for actors given a GPU share)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was requested but CUDA is not available here")
    return device


@functools.lru_cache(maxsize=1)
def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX, through oneDNN)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def autocast(device: torch.device, enabled: bool = True, cpu_bf16: bool = False
             ) -> contextlib.AbstractContextManager:
    """Mixed precision: on CUDA when ``enabled`` (bfloat16 where supported, else float16);
    on the CPU only when ``cpu_bf16`` is also asked for and the CPU computes bfloat16
    natively. Callers ask for the CPU path only for forward passes of frozen models
    (teachers, generators being sampled): on the CPU every training step stays
    float32."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    if device.type == "cpu" and cpu_bf16 and cpu_bf16_supported():
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class FrozenForward(nn.Module):
    """A frozen classifier run under :func:`~mosaic_flwr.training.autocast` (CUDA AMP, or
    bfloat16 on a CPU that computes it natively), its logits returned in float32.

    Gradients still flow through it to its input (a generator's samples, synthetic
    inputs); its own weights take none. Such passes are the largest cost of training a
    client generator, FedCOG's synthesis and DENSE's: a 28x28 CNN's forward and
    backward to its input on 64 samples take 51 ms in float32 and 22 ms in bfloat16
    on one core (``docs/results/speed.md``).
    """

    def __init__(self, classifier: nn.Module, device: torch.device, amp: bool = True,
                 cpu_bf16: bool = False) -> None:
        super().__init__()
        self.classifier = classifier
        self.device, self.amp, self.cpu_bf16 = device, amp, cpu_bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        with autocast(self.device, self.amp, self.cpu_bf16):
            return self.classifier(x).float()


def fast_layout(module: nn.Module) -> nn.Module:
    """Put a convolutional model's 4-d weights in channels-last order, in place.

    Exact (the same function, measured within 3e-7 of the default layout) and
    oneDNN's fast path on the CPU: a 28x28 CNN's forward runs 2.6x faster in
    float32 and 7x faster under bfloat16 autocast on an AMX CPU
    (``docs/results/speed.md``); on CUDA it enables tensor-core kernels.
    """
    return module.to(memory_format=torch.channels_last)


def squared_distance(model: nn.Module, reference: list[torch.Tensor]) -> torch.Tensor:
    """``||w - w_ref||^2`` over the model's parameters (float32; differentiable in ``w``):
    FedProx's and Ditto's proximal terms, Spectral Co-Distillation's distance."""
    return sum((p.float() - r).pow(2).sum() for p, r in zip(model.parameters(), reference))


def frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` (in place) on ``device``, channels-last (:func:`fast_layout`), in eval
    mode and taking no gradients: a teacher, an anchor, a network whose features are
    matched. Gradients still flow through it to its input."""
    return fast_layout(model.to(device)).eval().requires_grad_(False)


@dataclass(frozen=True)
class TrainSettings:
    """What one call of :func:`train` does."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    steps: int = 0  # > 0: exactly this many SGD steps (batches), whatever ``epochs`` says
    augment: bool = True
    amp: bool = True


@dataclass(frozen=True)
class TrainResult:
    """Mean loss and accuracy over the training samples seen, and their number."""

    loss: float
    accuracy: float
    num_examples: int


#: An extra loss term per batch: ``regulariser(model, x, y, logits)`` (FedGen, FedCOG).
Regulariser = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
          transform: BatchTransform, settings: TrainSettings, device: torch.device,
          generator: torch.Generator, regulariser: Regulariser | None = None) -> TrainResult:
    """SGD on local data; with ``proximal_mu > 0`` adds FedProx's mu/2 * ||w - w_global||^2,
    and with a ``regulariser`` its term on every batch (reported ``loss`` includes both)."""
    fast_layout(model.to(device)).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=settings.learning_rate,
                                momentum=settings.momentum, weight_decay=settings.weight_decay)
    global_params = ([p.detach().clone() for p in model.parameters()]
                     if settings.proximal_mu > 0 else None)
    use_fp16_scaler = (device.type == "cuda" and settings.amp
                       and not torch.cuda.is_bf16_supported())
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16_scaler)
    loss_fn = nn.CrossEntropyLoss()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, n, steps = 0, len(labels), 0
    passes = itertools.count() if settings.steps > 0 else range(settings.epochs)
    for _ in passes:
        if settings.steps > 0 and (steps == settings.steps or n == 0):
            break
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            if settings.steps > 0 and steps == settings.steps:
                break
            idx = order[start:start + settings.batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # a batch of one breaks BatchNorm and adds only noise
            steps += 1
            x = images[idx].to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            x = transform(x, train=settings.augment, generator=generator)
            with autocast(device, settings.amp):
                logits = model(x)
                loss = loss_fn(logits, y)
                if regulariser is not None:
                    loss = loss + regulariser(model, x, y, logits)
            if global_params is not None:
                loss = loss + 0.5 * settings.proximal_mu * squared_distance(model, global_params)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            total_loss += loss.detach().float() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    if seen == 0:
        raise ValueError("no training batch: the client holds fewer than two samples")
    return TrainResult(float(total_loss) / seen, int(correct) / seen, n)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             transform: BatchTransform, device: torch.device, batch_size: int = 512,
             amp: bool = True) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on the given samples."""
    fast_layout(model.to(device)).eval()
    return evaluate_predictor(model, images, labels, transform, device, batch_size, amp)


@torch.no_grad()
def evaluate_predictor(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       labels: torch.Tensor, transform: BatchTransform, device: torch.device,
                       batch_size: int = 512, amp: bool = True) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of any predictor (classifier inputs -> logits),
    e.g. a model or Mosaic's teacher over its experts."""
    losses, correct = score_samples(predict, images, labels, transform, device, batch_size, amp)
    return float(losses.sum()) / len(labels), int(correct.sum()) / len(labels)


@torch.no_grad()
def score_samples(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  labels: torch.Tensor, transform: BatchTransform, device: torch.device,
                  batch_size: int = 512, amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, on ``device``: the predictor's cross-entropy and whether it is right."""
    losses, correct = [], []
    for start in range(0, len(labels), batch_size):
        x = transform(images[start:start + batch_size].to(device), train=False)
        y = labels[start:start + batch_size].to(device)
        with autocast(device, amp):
            logits = predict(x)
        losses.append(nn.functional.cross_entropy(logits.float(), y, reduction="none"))
        correct.append(logits.argmax(1) == y)
    return torch.cat(losses), torch.cat(correct)
