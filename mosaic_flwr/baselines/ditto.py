"""Ditto (Li et al., ICML 2021): personalised federated learning with a proximal tie.

Each client keeps a personalised model ``v`` next to the global one. In every
round it trains the received global model ``w`` exactly as FedAvg does and
uploads it; then it trains ``v`` (kept in the node's state; the received global
model the first time) on its data with cross-entropy plus
``(proximal / 2) * ||v - w||^2`` (``ditto-proximal``, the paper's lambda), and
scores ``v`` on its own test split. ``proximal`` trades personalisation (0:
each client fine-tunes its own model, never pulled back) against the global
model (large: ``v`` stays at ``w``). The global model is FedAvg's, so only the
personalised scores differ from FedAvg's run.

Reference code ``litian96/ditto`` (read for understanding): the personalised
model takes ``grad + lambda * (v - w)`` steps for as many local iterations as
the global one; its lambda is tuned per data set from {0.01, 0.1, 1, 2}; the
default here is 0.1 and was not tuned on any data set. Local training uses this
project's optimiser and batch settings, like every method here.

The shared machinery (keeping, training and scoring the personalised model; the
server's records) is in :mod:`.personalised`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..training import Regulariser, squared_distance
from .personalised import PersonalisedClient, PersonalisedStrategy
from .settings import DittoSettings


class DittoStrategy(PersonalisedStrategy):
    """Ditto's server: FedAvg of the global models, plus the clients' personalised scores
    (:class:`~.personalised.PersonalisedStrategy`; ``settings``: :class:`DittoSettings`)."""

    SETTINGS = DittoSettings
    SECTION = "ditto"
    OBJECTIVE = "ditto"


class DittoClient(PersonalisedClient):
    """Ditto's client part: the global model trains as under FedAvg; the personalised
    model with ``(proximal / 2) ||v - w||^2`` towards the received global weights."""

    SETTINGS = DittoSettings
    settings: DittoSettings

    def personal_term(self) -> Regulariser | None:
        weight = self.settings.proximal
        if weight == 0:
            return None
        assert self.received is not None
        reference = [p.detach().float() for p in self.received.parameters()]

        def regulariser(model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # pylint: disable=unused-argument
                        logits: torch.Tensor) -> torch.Tensor:
            return 0.5 * weight * squared_distance(model, reference)

        return regulariser
