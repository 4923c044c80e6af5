"""Spectral Co-Distillation (Chen et al., NeurIPS 2023): personalised federated learning.

Each client keeps a personalised model next to the generic (global) one. In every
round it

1. trains the received generic model on its data with cross-entropy plus
   ``generic_weight`` times the divergence of the generic model's weight
   spectrum from its personalised model's (the leading ``ratio`` share of the
   spectrum), and uploads it for averaging, as under FedAvg;
2. trains its personalised model (kept in the node's state; the received
   generic model the first time) with cross-entropy plus ``personal_weight``
   times the divergence of its spectrum from the received generic model's, plus
   ``proximal`` times the distance ``||w_p - w_g||`` to the received generic
   weights; and scores it on its own test split (``personal-accuracy``).

So knowledge flows both ways through the spectra: the generic model is pulled
towards the personalised model's spectrum and the personalised model towards
the generic one's. A model's *weight spectrum* follows the reference code:
for every module with a ``weight``, in module order, the magnitudes of the
2-d FFT of the weight as an (outputs, rest) matrix (a 1-d FFT for a vector),
concatenated and normalised to sum 1; the divergence is
``KL(teacher || student)`` over the compared entries (each renormalised).

Deviations from the reference code, with the reason:

- its spectra are computed in NumPy from detached weights, so the two spectral
  terms carry no gradient and never change a model; here they are torch
  operations and train both models;
- it applies ``log_softmax`` to the normalised spectrum (so two equal spectra
  do not give 0); here the divergence is the KL divergence of the spectra;
- its generic model is regularised towards the received global model's
  spectrum, not the personalised one's, although the paper co-distils the
  two; here it is the personalised model's, as the paper describes;
- the paper trains the personalised model while the client waits for the
  server ("wait-free"); a Flower ClientApp handles one message at a time, so
  here it trains right after the generic model, in the same message (the
  round takes that much longer; the results are what the protocol computes);
- local training uses this project's optimiser and batch settings, like every
  method here (the reference: SGD lr 0.03, momentum 0.5, batch 8, 5 epochs).

What leaves a client: the generic model's weights and scalar metrics (its
personalised model's accuracy among them), as under FedAvg.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from flwr.app import ArrayRecord
from torch import nn

from ..client_part import ClientPart, ClientWork, train_settings
from ..config import RunConfig
from ..data import client_test_splits, load_data
from ..models import Classifier
from ..records import ClientUpload, TrainTask
from ..results import per_client_summary
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options
from ..training import Regulariser, evaluate, frozen, train
from .settings import SpectralSettings

#: The node-state record that keeps a client's personalised model (it never leaves the node).
PERSONAL_MODEL_RECORD = "spectral-personal-model"


def weight_spectrum(model: nn.Module) -> torch.Tensor:
    """The model's weight spectrum: |FFT| of every module's ``weight`` (2-d FFT of the
    weight as an (outputs, rest) matrix, 1-d FFT of a vector), in module order,
    concatenated and normalised to sum 1. Differentiable in the weights."""
    parts = []
    for module in model.modules():
        weight = module._parameters.get("weight")  # pylint: disable=protected-access
        if weight is None:
            continue
        w = weight.float()
        w = w.reshape(len(w), -1) if w.dim() > 2 else w
        spectrum = torch.fft.fft2(w) if w.dim() == 2 else torch.fft.fft(w)
        parts.append(spectrum.abs().flatten())
    spectrum = torch.cat(parts)
    return spectrum / spectrum.sum()


def spectral_divergence(student: nn.Module, teacher: torch.Tensor, ratio: float = 1.0
                        ) -> torch.Tensor:
    """``KL(teacher || student)`` between the leading ``ratio`` share of the two weight
    spectra (``teacher``: a spectrum from :func:`weight_spectrum`), each renormalised to
    sum 1; 0 when the two agree."""
    spectrum = weight_spectrum(student)
    n = max(1, int(len(spectrum) * ratio))
    p = teacher[:n] / teacher[:n].sum()
    q = spectrum[:n] / spectrum[:n].sum()
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum()


def weight_distance(model: nn.Module, reference: list[torch.Tensor]) -> torch.Tensor:
    """``||w - w_ref||`` over all parameters (differentiable also at 0)."""
    squares = sum((p.float() - r).pow(2).sum() for p, r in zip(model.parameters(), reference))
    return torch.sqrt(squares + 1e-12)


def personal_regulariser(generic: nn.Module, settings: SpectralSettings) -> Regulariser | None:
    """The personalised model's terms: its spectrum towards the generic model's, and the
    proximal distance to the generic weights (None when both weights are 0)."""
    if settings.personal_weight == 0 and settings.proximal == 0:
        return None
    teacher = weight_spectrum(generic).detach()
    reference = [p.detach().float() for p in generic.parameters()]

    def regulariser(model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # pylint: disable=unused-argument
                    logits: torch.Tensor) -> torch.Tensor:
        return (settings.personal_weight * spectral_divergence(model, teacher)
                + settings.proximal * weight_distance(model, reference))

    return regulariser


class SpectralStrategy(TaskStrategy):
    """Spectral Co-Distillation's server: FedAvg of the generic models; each round also
    records the clients' personalised models' accuracy on their own test splits
    (``personalised_accuracy_mean`` / ``_std`` / ``_worst10``).

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global (generic) model.
    settings : SpectralSettings (default: SpectralSettings())
    **kwargs
        Passed to :class:`~mosaic_flwr.task_strategy.TaskStrategy` and FedAvg.
    """

    def __init__(self, model_fn: Callable[[], Classifier],
                 settings: SpectralSettings | None = None, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        self.settings = settings or SpectralSettings()
        self.settings.check()

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "SpectralStrategy":
        """The strategy for a run config."""
        return cls(model_fn_for(config), config.spectral, **server_options(config, score_fn),
                   **kwargs)

    def task_for(self, server_round: int) -> TrainTask:
        """Both models are trained every round."""
        return TrainTask(objective="spectral", settings=self.settings.to_mapping())

    def server_step(self, server_round: int, uploads: list[ClientUpload], arrays: ArrayRecord
                    ) -> tuple[ArrayRecord, dict[str, float]]:
        """The average stays the global model; the personalised models' scores are recorded."""
        scores = [u.metrics["personal-accuracy"] for u in uploads
                  if u.metrics.get("personal-accuracy", -1.0) >= 0]
        return arrays, per_client_summary(scores, "personalised_accuracy") if scores else {}


class SpectralClient(ClientPart):
    """Spectral Co-Distillation's client part: the generic model's spectral term before
    training; the personalised model's training, storage and score after it."""

    def __init__(self) -> None:
        self.settings = SpectralSettings()
        self.personal: Classifier | None = None
        self.received: Classifier | None = None

    def before_training(self, work: ClientWork) -> Regulariser | None:
        setup = work.setup
        self.settings = settings = SpectralSettings.from_mapping(work.task.settings)
        self.received = frozen(copy.deepcopy(setup.model), setup.device)
        stored = setup.context.state.array_records.get(PERSONAL_MODEL_RECORD)
        self.personal = copy.deepcopy(setup.model)
        if stored is not None and settings.keep_personal:
            self.personal.load_state_dict(stored.to_torch_state_dict())
        work.metrics["spectral-personal-kept"] = float(stored is not None)
        if settings.generic_weight == 0:
            return None
        teacher = weight_spectrum(self.personal.to(setup.device)).detach()

        def regulariser(model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # pylint: disable=unused-argument
                        logits: torch.Tensor) -> torch.Tensor:
            return settings.generic_weight * spectral_divergence(model, teacher, settings.ratio)

        return regulariser

    def after_training(self, work: ClientWork) -> None:
        setup, settings = work.setup, self.settings
        assert self.personal is not None and self.received is not None
        start = time.monotonic()
        config = setup.config
        train(self.personal, setup.images, setup.labels, setup.transform,
              train_settings(config, TrainTask(local_epochs=settings.personal_epochs)),
              setup.device, work.rng, personal_regulariser(self.received, settings))
        if settings.keep_personal:
            work.context.state[PERSONAL_MODEL_RECORD] = ArrayRecord(
                {k: v.detach().cpu()  # host read: the model's state, once per round
                 for k, v in self.personal.state_dict().items()})
        images, labels = own_test_split(setup)
        work.metrics["personal-accuracy"] = (
            evaluate(self.personal, images, labels, setup.transform, setup.device,
                     amp=config.amp)[1] if len(labels) else -1.0)
        work.metrics["spectral-personal-seconds"] = time.monotonic() - start


def own_test_split(setup) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's own test split: its share of the run's test split
    (:func:`~mosaic_flwr.data.client_test_splits`), or a node's own data's test split."""
    if setup.node.data_path:
        data = load_data(setup.config, setup.node.data_path)
        return torch.from_numpy(data.test_images), torch.from_numpy(data.test_labels)
    data = load_data(setup.config)
    split = torch.from_numpy(client_test_splits(setup.config)[setup.partition_id])
    return torch.from_numpy(data.test_images)[split], torch.from_numpy(data.test_labels)[split]
