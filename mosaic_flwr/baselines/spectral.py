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
personalised model's accuracy among them), as under FedAvg. The machinery
shared with Ditto (keeping, training and scoring the personalised model; the
server's records) is in :mod:`.personalised`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..training import Regulariser, squared_distance
from .personalised import PersonalisedClient, PersonalisedStrategy
from .settings import SpectralSettings


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
    squares = squared_distance(model, reference)
    return torch.sqrt(squares + 1e-12)


class SpectralStrategy(PersonalisedStrategy):
    """Spectral Co-Distillation's server: FedAvg of the generic models, plus the clients'
    personalised scores (:class:`~.personalised.PersonalisedStrategy`; ``settings``:
    :class:`SpectralSettings`)."""

    SETTINGS = SpectralSettings
    SECTION = "spectral"
    OBJECTIVE = "spectral"


class SpectralClient(PersonalisedClient):
    """Spectral Co-Distillation's client part: each model's term pulls its weight spectrum
    towards the other model's; the personalised model also towards the generic weights."""

    SETTINGS = SpectralSettings
    settings: SpectralSettings

    def keeps_personal(self) -> bool:
        return self.settings.keep_personal

    def generic_term(self, device: torch.device) -> Regulariser | None:
        settings = self.settings
        if settings.generic_weight == 0:
            return None
        assert self.personal is not None
        teacher = weight_spectrum(self.personal.to(device)).detach()

        def regulariser(model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # pylint: disable=unused-argument
                        logits: torch.Tensor) -> torch.Tensor:
            return settings.generic_weight * spectral_divergence(model, teacher, settings.ratio)

        return regulariser

    def personal_term(self) -> Regulariser | None:
        """The personalised model's terms: its spectrum towards the received generic
        model's, and the proximal distance to the generic weights (None when both weights
        are 0)."""
        settings = self.settings
        if settings.personal_weight == 0 and settings.proximal == 0:
            return None
        assert self.received is not None
        teacher = weight_spectrum(self.received).detach()
        reference = [p.detach().float() for p in self.received.parameters()]

        def regulariser(model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # pylint: disable=unused-argument
                        logits: torch.Tensor) -> torch.Tensor:
            return (settings.personal_weight * spectral_divergence(model, teacher)
                    + settings.proximal * weight_distance(model, reference))

        return regulariser
