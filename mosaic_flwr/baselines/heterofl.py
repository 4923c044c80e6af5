"""HeteroFL and FedRolex: clients train width sub-models cut from one global model.

HeteroFL (Diao et al., ICLR 2021) gives a client of width ``r`` the first
``round(r * c)`` channels of every hidden layer; FedRolex (Alam et al., NeurIPS
2022) moves that window by one channel per round (modulo the layer's width), so
that over the rounds every channel of the global model is trained by clients of
every capacity. In both the server averages each parameter entry over the
clients whose slice holds it (:func:`mosaic_flwr.submodels.aggregate_submodels`).

Here the server sends the full global model and each client cuts its own slice
(it knows its width and the round), so a SuperNode's model can come from its
``--node-config``; a deployment that pays for download bandwidth would send
the slices instead. Not reproduced from the papers' code (stated in the
results): HeteroFL's static batch normalisation and output scaler, and its
masking of the classes a client lacks; BatchNorm running statistics are
averaged slice-wise like the weights.
"""

from __future__ import annotations

from ..config import RunConfig
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options


class HeteroFLStrategy(TaskStrategy):
    """HeteroFL: static width slices of the global model, averaged slice-wise.

    Clients whose ``client-models`` entry is the global model train all of it;
    the others train the width sub-model their entry names (same family,
    smaller width). Takes :class:`~mosaic_flwr.task_strategy.TaskStrategy`'s
    arguments.
    """

    MIXED_MODELS = "width"
    SLICING = "static"

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "HeteroFLStrategy":
        """The strategy for a run config's data set and models."""
        return cls(model_fn_for(config), **server_options(config, score_fn), **kwargs)


class FedRolexStrategy(HeteroFLStrategy):
    """FedRolex: like HeteroFL, but the slice window rolls by one channel per round."""

    SLICING = "rolling"
