"""mosaic-flwr: Mosaic and its peers for heterogeneous federated learning, on Flower."""

from .config import ConfigError, RunConfig, resolve_run_config
from .client import handle_evaluate, handle_train
from .mosaic.settings import MosaicSettings
from .mosaic.strategy import MosaicStrategy
from .records import TrainTask
from .strategies import STRATEGIES, TolerantFedAvg, TolerantFedProx, build_strategy

__version__ = "0.2.0"

__all__ = ["ConfigError", "MosaicSettings", "MosaicStrategy", "RunConfig", "STRATEGIES",
           "TolerantFedAvg", "TolerantFedProx", "TrainTask", "build_strategy", "handle_evaluate",
           "handle_train", "resolve_run_config"]
