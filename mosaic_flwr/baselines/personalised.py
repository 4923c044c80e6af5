"""What the personalised methods share: a model kept on each client, trained and scored there.

Under Spectral Co-Distillation (:mod:`.spectral`) and Ditto (:mod:`.ditto`)
each client keeps a personalised model next to the generic (global) one. In
every round it trains the received generic model on its data (with the
method's term towards the personalised model, if any) and uploads it, as under
FedAvg; then it trains its personalised model (kept in the node's state under
:data:`PERSONAL_MODEL_RECORD`; the received generic model the first time) with
the method's term towards the received generic model, and scores it on its own
test split (``personal-accuracy``). The server averages the generic models and
records the personalised scores (``personalised_accuracy_mean`` / ``_std`` /
``_worst10`` in ``metrics.jsonl``).

What leaves a client: the generic model's weights and scalar metrics (its
personalised model's accuracy among them), as under FedAvg. The personalised
model stays in the node's state (and its saved copy, :mod:`mosaic_flwr.node_state`).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, ClassVar

import torch
from flwr.app import ArrayRecord

from ..client_part import ClientPart, ClientWork, train_settings
from ..config import RunConfig
from ..data import client_test_splits, load_data
from ..method_settings import MethodSettings
from ..models import Classifier
from ..records import ClientUpload, TrainTask
from ..results import per_client_summary
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options
from ..training import Regulariser, evaluate, frozen, train

#: The node-state record that keeps a client's personalised model (it never leaves the node).
PERSONAL_MODEL_RECORD = "personal-model"


class PersonalisedStrategy(TaskStrategy):
    """The server of a personalised method: FedAvg of the generic models; each round also
    records the clients' personalised models' accuracy on their own test splits.

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global (generic) model.
    settings : the method's settings (default: ``SETTINGS()``)
    **kwargs
        Passed to :class:`~mosaic_flwr.task_strategy.TaskStrategy` and FedAvg.
    """

    #: The method's settings class, its run-config section and its client part's name.
    SETTINGS: ClassVar[type[MethodSettings]]
    SECTION: ClassVar[str]
    OBJECTIVE: ClassVar[str]

    def __init__(self, model_fn: Callable[[], Classifier],
                 settings: MethodSettings | None = None, **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        self.settings = settings or self.SETTINGS()
        self.settings.check()

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "PersonalisedStrategy":
        """The strategy for a run config."""
        return cls(model_fn_for(config), getattr(config, cls.SECTION),
                   **server_options(config, score_fn), **kwargs)

    def task_for(self, server_round: int) -> TrainTask:
        """Both models are trained every round."""
        return TrainTask(objective=self.OBJECTIVE, settings=self.settings.to_mapping())

    def server_step(self, server_round: int, uploads: list[ClientUpload], arrays: ArrayRecord
                    ) -> tuple[ArrayRecord, dict[str, float]]:
        """The average stays the global model; the personalised models' scores are recorded."""
        scores = [u.metrics["personal-accuracy"] for u in uploads
                  if u.metrics.get("personal-accuracy", -1.0) >= 0]
        return arrays, per_client_summary(scores, "personalised_accuracy") if scores else {}


class PersonalisedClient(ClientPart):
    """The client part of a personalised method: load the personalised model before
    training; train, keep and score it after. A method sets :attr:`SETTINGS` and gives
    its two terms (:meth:`generic_term`, :meth:`personal_term`)."""

    SETTINGS: ClassVar[type[MethodSettings]]

    def __init__(self) -> None:
        self.settings = self.SETTINGS()
        self.personal: Classifier | None = None
        self.received: Classifier | None = None

    def keeps_personal(self) -> bool:
        """Whether the personalised model persists across rounds (else it is the received
        model trained afresh each round)."""
        return True

    def generic_term(self, device: torch.device) -> Regulariser | None:
        """The generic model's term (it may read ``self.personal``); None: cross-entropy only."""
        return None

    def personal_term(self) -> Regulariser | None:
        """The personalised model's term (it may read ``self.received``, the received
        generic model, frozen); None: cross-entropy only."""
        return None

    def before_training(self, work: ClientWork) -> Regulariser | None:
        setup = work.setup
        self.settings = self.SETTINGS.from_mapping(work.task.settings)
        self.received = frozen(copy.deepcopy(setup.model), setup.device)
        stored = setup.context.state.array_records.get(PERSONAL_MODEL_RECORD)
        self.personal = copy.deepcopy(setup.model)
        if stored is not None and self.keeps_personal():
            self.personal.load_state_dict(stored.to_torch_state_dict())
        work.metrics["personal-model-kept"] = float(stored is not None)
        return self.generic_term(setup.device)

    def after_training(self, work: ClientWork) -> None:
        setup = work.setup
        assert self.personal is not None and self.received is not None
        start = time.monotonic()
        epochs = self.settings.personal_epochs  # type: ignore[attr-defined]
        train(self.personal, setup.images, setup.labels, setup.transform,
              train_settings(setup.config, TrainTask(local_epochs=epochs)),
              setup.device, work.rng, self.personal_term())
        if self.keeps_personal():
            work.context.state[PERSONAL_MODEL_RECORD] = ArrayRecord(
                {k: v.detach().cpu()  # host read: the model's state, once per round
                 for k, v in self.personal.state_dict().items()})
        images, labels = own_test_split(setup)
        work.metrics["personal-accuracy"] = (
            evaluate(self.personal, images, labels, setup.transform, setup.device,
                     amp=setup.config.amp)[1] if len(labels) else -1.0)
        work.metrics["personal-seconds"] = time.monotonic() - start


def own_test_split(setup) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's own test split: its share of the run's test split
    (:func:`~mosaic_flwr.data.client_test_splits`), or a node's own data's test split."""
    if setup.node.data_path:
        data = load_data(setup.config, setup.node.data_path)
        return torch.from_numpy(data.test_images), torch.from_numpy(data.test_labels)
    data = load_data(setup.config)
    split = torch.from_numpy(client_test_splits(setup.config)[setup.partition_id])
    return torch.from_numpy(data.test_images)[split], torch.from_numpy(data.test_labels)[split]
