"""DENSE (Zhang et al., NeurIPS 2022): one-shot FL by data-free ensemble distillation.

Clients train once (one communication round, ``dense-local-epochs``) and upload
their models, which may have different architectures. The server then runs
``epochs`` epochs, each of which

1. synthesises one batch: a freshly initialised generator and its latents are
   optimised together for ``generator_steps`` Adam steps on
   ``ce * CE(ensemble(x), y) + bn * sum_BN |batch stats - running stats|
   + adv * L_adv``, where ``L_adv = -mean_i [argmax s != argmax t] KL(t || s)``
   pushes samples to where the student ``s`` and the ensemble ``t`` (mean of the
   client logits) disagree; the lowest-loss batch joins a pool;
2. distils the ensemble into the student with one pass over the pool (SGD,
   KL at temperature T, scaled by T^2).

The student is a new model (``student_init='fresh'``, as in the reference) or
the FedAvg of the uploads (``'average'``).
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log
from torch import nn
from torch.nn import functional as F

from ..config import RunConfig
from ..data.datasets import dataset_spec
from ..kd.distill import DistillWeights, distillation_loss
from ..kd.ensemble import client_logits, keep_best
from ..kd.generator import BatchNormStatistics, ImageGenerator
from ..models import Classifier
from ..records import ClientUpload, TrainTask
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options
from ..training import autocast, fast_layout
from .settings import DenseSettings


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``-mean_i [argmax s_i == argmax t_i] * KL(t_i || s_i)``: samples on which student
    and teacher still agree are pushed towards the student's decision boundary; once
    they disagree a sample no longer counts, which keeps the term bounded (the DENSE
    reference's mask). Counting the disagreeing ones instead pushes them apart without
    limit: on MNIST at Dirichlet 0.05 its value reached -848, then NaN."""
    t_log = F.log_softmax(teacher_logits.float(), dim=1)
    s_log = F.log_softmax(student_logits.float(), dim=1)
    kl = (t_log.exp() * (t_log - s_log)).sum(1)
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(agree * kl).mean()


class Synthesizer:
    """DENSE's data synthesis against a fixed set of client models and a student."""

    def __init__(self, clients: list[nn.Module], generator_fn: Callable[[], ImageGenerator],
                 num_classes: int, settings: DenseSettings, device: torch.device,
                 amp: bool = True, cpu_bf16: bool = False) -> None:
        self.clients, self.generator_fn, self.num_classes = clients, generator_fn, num_classes
        self.settings, self.device = settings, device
        self.amp, self.cpu_bf16 = amp, cpu_bf16
        self.bn_stats = [BatchNormStatistics(model) for model in clients]

    def loss(self, x: torch.Tensor, y: torch.Tensor, student: nn.Module
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted synthesis loss on inputs ``x`` for targets ``y``, and its terms
        (detached, on the device)."""
        for stats in self.bn_stats:
            stats.pop()
        # The client models and the student are frozen here: they run under amp /
        # cpu_bf16 (gradients still reach the generator through them).
        with autocast(self.device, self.amp, self.cpu_bf16):
            teacher = client_logits(self.clients, x).mean(0).float()
            student_logits = student(x).float()
        bn = sum((stats.pop().to(x.device) for stats in self.bn_stats), torch.zeros((), device=x.device))
        terms = {"ce": F.cross_entropy(teacher, y), "bn": bn,
                 "adv": adversarial_loss(student_logits, teacher)}
        s = self.settings
        total = s.ce_weight * terms["ce"] + s.bn_weight * terms["bn"] + s.adv_weight * terms["adv"]
        return total, {k: v.detach() for k, v in terms.items()}

    def synthesize(self, student: nn.Module, rng: torch.Generator
                   ) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        """One batch from a fresh generator and latents, optimised together: the batch of
        the lowest loss, and the first and the last step's loss terms (read at the end)."""
        s = self.settings
        generator = fast_layout(self.generator_fn().to(self.device)).train()
        z = torch.randn(s.synthesis_batch_size, generator.latent_dim, generator=rng).to(self.device)
        z.requires_grad_(True)
        y = torch.randint(0, self.num_classes, (s.synthesis_batch_size,), generator=rng).to(self.device)
        optimiser = torch.optim.Adam([*generator.parameters(), z], lr=s.generator_lr,
                                     betas=(0.5, 0.999))
        student.eval().requires_grad_(False)
        best, best_loss = None, None
        steps: list[dict[str, torch.Tensor]] = []
        for _ in range(s.generator_steps):
            x = generator(z)
            loss, terms = self.loss(x, y, student)
            best, best_loss = keep_best(best, best_loss, x, loss)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            terms["total"] = loss.detach()
            steps.append(terms)
        student.requires_grad_(True)
        assert best is not None
        first, last = ({k: float(v) for k, v in terms.items()}  # host read: once, at the end
                       for terms in (steps[0], steps[-1]))
        return best, first, last

    def remove(self) -> None:
        """Detach the BatchNorm hooks from the client models."""
        for stats in self.bn_stats:
            stats.remove()


def distill_pool(student: nn.Module, optimiser: torch.optim.Optimizer, pool: torch.Tensor,
                 targets: torch.Tensor, settings: DenseSettings, rng: torch.Generator) -> float:
    """One pass over the pool: KL(T) of the student to the stored ensemble logits; mean loss."""
    student.eval()
    weights = DistillWeights(kl=1.0, ce=0.0, jsd=0.0, temperature=settings.temperature)
    order = torch.randperm(len(pool), generator=rng).to(pool.device)
    total, batches = torch.zeros((), device=pool.device), 0
    for start in range(0, len(pool), settings.distill_batch_size):
        idx = order[start:start + settings.distill_batch_size]
        loss, _ = distillation_loss(student(pool[idx]), targets[idx], weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.detach()
        batches += 1
    return float(total) / batches


class DenseStrategy(TaskStrategy):
    """DENSE: one round of local training, then data-free distillation on the server.

    ``start`` runs one communication round whatever ``num_rounds`` says (the
    round budget goes into local epochs instead: see ``local_epochs``). Clients
    may train different architectures (``client-models``): the ensemble is their
    own models, whatever their architectures.

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global model (the student).
    generator_fn : Callable[[], ImageGenerator]
        Builds the synthesis generator (unconditional).
    settings : DenseSettings (default: DenseSettings())
    local_epochs : int (default: 0)
        Epochs of the clients' one local training (0: the run config's).
    local_steps : int (default: 0)
        SGD steps of that training instead of epochs (0: epochs).
    **kwargs
        Passed to :class:`~mosaic_flwr.task_strategy.TaskStrategy` and FedAvg.
    """

    MIXED_MODELS = "any"

    def __init__(self, model_fn: Callable[[], Classifier],
                 generator_fn: Callable[[], ImageGenerator],
                 settings: DenseSettings | None = None, *, local_epochs: int = 0,
                 local_steps: int = 0, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        self.settings = settings or DenseSettings()
        self.settings.check()
        self.synthesis_generator_fn = generator_fn
        self.local_epochs = local_epochs
        self.local_steps = local_steps

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "DenseStrategy":
        """The strategy for a run config; clients train ``local-epochs x num-server-rounds``
        epochs (``local-steps x num-server-rounds`` steps when ``local-steps`` is set) unless
        ``dense-local-epochs`` says otherwise."""
        spec = dataset_spec(config)
        settings = config.dense
        epochs = settings.local_epochs or config.local_epochs * config.num_server_rounds
        steps = 0 if settings.local_epochs else config.local_steps * config.num_server_rounds
        return cls(model_fn_for(config),
                   lambda: ImageGenerator(spec, settings.latent_dim, settings.generator_width),
                   settings, local_epochs=epochs, local_steps=steps,
                   **server_options(config, score_fn), **kwargs)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              first_round: int = 1) -> Result:
        """One communication round (DENSE is one-shot), whatever ``num_rounds`` is."""
        if num_rounds != 1:
            log(INFO, "[dense] one-shot: 1 communication round (of the %d budgeted), clients "
                "train %s local epochs in it", num_rounds, self.local_epochs or "the configured")
        return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=1,
                             timeout=timeout, train_config=train_config,
                             evaluate_config=evaluate_config, evaluate_fn=evaluate_fn,
                             first_round=first_round)

    def task_for(self, server_round: int) -> TrainTask:
        """The one round: local training for ``local_epochs`` epochs (or ``local_steps``)."""
        return TrainTask(phase="one-shot", local_epochs=self.local_epochs,
                         local_steps=self.local_steps)

    def server_step(self, server_round: int, uploads: list[ClientUpload], arrays: ArrayRecord
                    ) -> tuple[ArrayRecord, dict[str, float]]:
        """Synthesis alternating with distillation, into a fresh (or averaged) student."""
        s, device = self.settings, self.device
        start = time.monotonic()
        clients = self.client_models(uploads)
        student = fast_layout(self.model_fn().to(device) if s.student_init == "fresh"
                              else self.global_model(arrays))
        optimiser = torch.optim.SGD(student.parameters(), lr=s.distill_lr, momentum=0.9)
        synthesizer = Synthesizer(clients, self.synthesis_generator_fn, self.num_classes, s,
                                  device, self.amp, self.cpu_bf16)
        stats: dict[str, float] = {}
        if self.score_fn is not None:
            stats["ensemble_accuracy"] = self.score_fn(
                lambda x: client_logits(clients, x).mean(0))
        pool: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        log_every = max(1, s.epochs // 10)
        synthesis_seconds = 0.0
        try:
            for epoch in range(1, s.epochs + 1):
                began = time.monotonic()
                batch, _, last = synthesizer.synthesize(student, self.rng)
                synthesis_seconds += time.monotonic() - began
                pool.append(batch)
                with torch.no_grad(), autocast(device, self.amp, self.cpu_bf16):  # frozen
                    targets.append(client_logits(clients, batch).mean(0).float())
                kd = distill_pool(student, optimiser, torch.cat(pool), torch.cat(targets), s,
                                  self.rng)
                if epoch == 1:
                    stats["synthesis_loss_first"] = last["total"]
                if epoch % log_every == 0 or epoch == s.epochs:
                    log(INFO, "[dense] epoch %d/%d  synthesis %.4f (ce %.4f bn %.4f adv %.4f)  "
                        "kd %.4f  pool %d  elapsed %.1fs", epoch, s.epochs, last["total"],
                        last["ce"], last["bn"], last["adv"], kd,
                        sum(len(p) for p in pool), time.monotonic() - start)
                stats.update(synthesis_loss_last=last["total"], distill_loss_last=kd)
        finally:
            synthesizer.remove()
        if self.score_fn is not None:
            stats["student_accuracy_after"] = self.score_fn(student.eval())
        stats["distill_seconds"] = time.monotonic() - start
        stats["synthesis_seconds"] = synthesis_seconds  # of distill_seconds
        return ArrayRecord(student.to("cpu").state_dict()), stats
