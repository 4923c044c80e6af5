"""Every strategy by name: where its class lives and which run-config section it reads.

This module is data only and imports nothing, so the run config can check a
strategy's name and rules without importing any method (and so torch or
Flower); :func:`mosaic_flwr.strategies.build_strategy` imports the class when
a run starts. To add a method, add its entry here (see ``docs/architecture.md``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy.

    Attributes
    ----------
    target : str
        ``module:Class`` of the Flower strategy (relative to ``mosaic_flwr``).
    section : str
        The :class:`~mosaic_flwr.config.RunConfig` section (a method's settings,
        e.g. ``mosaic``) whose cross-key rules apply when this strategy runs;
        empty for strategies without settings of their own.
    """

    target: str
    section: str = ""


#: Every strategy a run config may name.
STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(".aggregation:TolerantFedAvg"),
    "fedprox": StrategyEntry(".aggregation:TolerantFedProx"),
    "mosaic": StrategyEntry(".mosaic.strategy:MosaicStrategy", "mosaic"),
    "fedgen": StrategyEntry(".baselines.fedgen:FedGenStrategy", "fedgen"),
    "fedftg": StrategyEntry(".baselines.fedftg:FedFTGStrategy", "fedftg"),
    "dense": StrategyEntry(".baselines.dense:DenseStrategy", "dense"),
    "feddf": StrategyEntry(".baselines.feddf:FedDFStrategy", "feddf"),
    "fedcog": StrategyEntry(".baselines.fedcog:FedCOGStrategy", "fedcog"),
    "fedlgd": StrategyEntry(".baselines.fedlgd:FedLGDStrategy", "fedlgd"),
    "spectral-codistillation": StrategyEntry(".baselines.spectral:SpectralStrategy", "spectral"),
    "ditto": StrategyEntry(".baselines.ditto:DittoStrategy", "ditto"),
    "heterofl": StrategyEntry(".baselines.heterofl:HeteroFLStrategy"),
    "fedrolex": StrategyEntry(".baselines.heterofl:FedRolexStrategy"),
}
