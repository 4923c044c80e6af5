"""FedDF (Lin et al., NeurIPS 2020): ensemble distillation on unlabelled inputs, every round.

After FedAvg, the average (the student) is trained for ``steps`` Adam steps
(cosine schedule, gradients clipped to norm 5) to match the uniform ensemble of
the client models (the mean of their logits) under KL at temperature T. The
inputs come from ``feddf-inputs``:

- ``generators``: every client also trains Mosaic's kind of image generator on
  its data each round (``feddf-generator-*`` and the ``feddf-*-weight`` keys)
  and uploads it; a batch takes an equal share from each one. This keeps FedDF
  data-free, like the other methods here.
- ``proxy``: an unlabelled split of the training data held out from every
  client (``proxy-fraction``), as in the paper's setting with a proxy data set
  (which had no labels in common with the clients' data; here it is the same
  distribution, so this mode is an optimistic reference, not a data-free method).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from flwr.app import ArrayRecord
from torch import nn

from ..config import RunConfig
from ..data import BatchTransform, load_data, proxy_indices
from ..data.datasets import dataset_spec
from ..kd.distill import DistillWeights, distill_into
from ..kd.ensemble import average_logits
from ..kd.generator import build_generator
from ..models import Classifier
from ..records import ClientUpload, TrainTask
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options
from .settings import FedDFSettings


class FedDFStrategy(TaskStrategy):
    """FedDF: FedAvg, then distillation of the client ensemble into the average.

    Clients may train different architectures (``client-models``): the ensemble
    is every client's own model; clients of the global architecture are averaged
    into the student, the others with their own group. (The paper distils into
    every group's model; here only the global model is distilled.)

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global model.
    settings : FedDFSettings (default: FedDFSettings())
        Distillation, and how clients train their generator (``settings.generator``,
        sent to them in each ``task`` record).
    generator_fn : Callable[[], nn.Module], optional
        The clients' generator, for ``inputs='generators'``.
    proxy_inputs : torch.Tensor, optional
        Unlabelled classifier inputs (already normalised) for ``inputs='proxy'``.
    **kwargs
        Passed to :class:`~mosaic_flwr.task_strategy.TaskStrategy` and FedAvg.
    """

    MIXED_MODELS = "any"

    def __init__(self, model_fn: Callable[[], Classifier], settings: FedDFSettings | None = None,
                 *, generator_fn: Callable[[], nn.Module] | None = None,
                 proxy_inputs: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(model_fn, generator_fn=generator_fn, **kwargs)
        self.settings = settings or FedDFSettings()
        self.settings.check()
        if self.settings.inputs == "generators" and generator_fn is None:
            raise ValueError("FedDF with inputs='generators' needs generator_fn")
        if self.settings.inputs == "proxy" and (proxy_inputs is None or len(proxy_inputs) == 0):
            raise ValueError("FedDF with inputs='proxy' needs proxy_inputs (set proxy-fraction > 0)")
        self.proxy_inputs = proxy_inputs

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "FedDFStrategy":
        """The strategy for a run config (loads the proxy split for ``inputs='proxy'``)."""
        spec = dataset_spec(config)
        settings = config.feddf
        proxy = None
        if settings.inputs == "proxy":
            images = load_data(config).train_images
            proxy = BatchTransform(spec, torch.device("cpu"))(
                torch.from_numpy(images[proxy_indices(config)]), train=False)
        return cls(model_fn_for(config), settings,
                   generator_fn=lambda: build_generator(spec, settings.generator),
                   proxy_inputs=proxy, **server_options(config, score_fn), **kwargs)

    def task_for(self, server_round: int) -> TrainTask:
        """Local training, plus a generator when the inputs come from generators."""
        if self.settings.inputs != "generators":
            return TrainTask()
        return TrainTask(upload_generator=True, settings=self.settings.generator.to_mapping())

    def server_step(self, server_round: int, uploads: list[ClientUpload], arrays: ArrayRecord
                    ) -> tuple[ArrayRecord, dict[str, float]]:
        """Distil the uniform client ensemble into the average."""
        s = self.settings
        start = time.monotonic()
        clients = self.client_models(uploads)
        student = self.global_model(arrays)
        stats: dict[str, float] = {}
        if self.score_fn is not None:
            stats["student_accuracy_before"] = self.score_fn(student.eval())
            stats["ensemble_accuracy"] = self.score_fn(lambda x: average_logits(clients, x))
        history = distill_into(
            student, lambda x: average_logits(clients, x), self._sampler(uploads),
            steps=s.steps, lr=s.lr,
            weights=DistillWeights(kl=1.0, ce=0.0, jsd=0.0, temperature=s.temperature),
            device=self.device, amp=self.amp, cpu_bf16=self.cpu_bf16,
            log_every=max(1, s.steps // 5), cosine=True,
            max_grad_norm=5.0, tag="feddf")
        if history:
            stats.update(distill_loss_first=history[0]["loss"], distill_loss_last=history[-1]["loss"])
        if self.score_fn is not None:
            stats["student_accuracy_after"] = self.score_fn(student.eval())
        stats["distill_seconds"] = time.monotonic() - start
        return ArrayRecord(student.to("cpu").state_dict()), stats

    def _sampler(self, uploads: list[ClientUpload]) -> Callable[[], torch.Tensor]:
        """One batch of distillation inputs per call (with generators: an equal share from
        each, at least ``batch_size`` in all)."""
        batch = self.settings.batch_size
        if self.settings.inputs == "proxy":
            proxy = self.proxy_inputs
            assert proxy is not None
            return lambda: proxy[torch.randint(0, len(proxy), (batch,), generator=self.rng)
                                 ].to(self.device)
        generators = self.client_generators(uploads)
        share = math.ceil(batch / len(generators))
        return lambda: torch.cat([g.sample(share, self.rng) for g in generators])
