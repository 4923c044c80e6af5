"""mosaic-flwr: Mosaic and its peers for heterogeneous federated learning, on Flower."""

from .config import ConfigError, RunConfig, resolve_run_config
from .strategies import STRATEGIES, TolerantFedAvg, TolerantFedProx, build_strategy

__version__ = "0.1.0"

__all__ = ["ConfigError", "RunConfig", "STRATEGIES", "TolerantFedAvg", "TolerantFedProx",
           "build_strategy", "resolve_run_config"]
