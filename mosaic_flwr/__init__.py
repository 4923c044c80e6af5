"""mosaic-flwr: Mosaic and its peers for heterogeneous federated learning, on Flower."""

from .baselines.dense import DenseStrategy
from .baselines.fedcog import FedCOGStrategy
from .baselines.feddf import FedDFStrategy
from .baselines.fedftg import FedFTGStrategy
from .baselines.fedgen import FedGenStrategy
from .baselines.heterofl import FedRolexStrategy, HeteroFLStrategy
from .client_models import assign_client_models
from .config import ConfigError, RunConfig, resolve_run_config
from .client import handle_evaluate, handle_train
from .mosaic.settings import MosaicSettings
from .models import ModelSpec
from .mosaic.strategy import MosaicStrategy
from .records import TrainTask
from .strategies import STRATEGIES, TolerantFedAvg, TolerantFedProx, build_strategy
from .task_strategy import TaskStrategy

__version__ = "0.2.0"

__all__ = ["ConfigError", "DenseStrategy", "FedCOGStrategy", "FedDFStrategy", "FedFTGStrategy",
           "FedGenStrategy", "FedRolexStrategy", "HeteroFLStrategy", "ModelSpec", "MosaicSettings",
           "MosaicStrategy", "RunConfig", "STRATEGIES", "TaskStrategy", "TolerantFedAvg",
           "TolerantFedProx", "TrainTask", "assign_client_models", "build_strategy",
           "handle_evaluate", "handle_train", "resolve_run_config"]
