"""mosaic-flwr: Mosaic and its peers for heterogeneous federated learning, on Flower.

The names below are imported on first use (PEP 562), so ``import mosaic_flwr``
and the ``mosaic-flwr`` command load neither torch nor Flower until a name
that needs them is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "ConfigError": ".errors",
    "DenseStrategy": ".baselines.dense",
    "DittoStrategy": ".baselines.ditto",
    "FedCOGStrategy": ".baselines.fedcog",
    "FedDFStrategy": ".baselines.feddf",
    "FedFTGStrategy": ".baselines.fedftg",
    "FedGenStrategy": ".baselines.fedgen",
    "FedLGDStrategy": ".baselines.fedlgd",
    "FedRolexStrategy": ".baselines.heterofl",
    "HeteroFLStrategy": ".baselines.heterofl",
    "ModelSpec": ".models",
    "MosaicSettings": ".mosaic.settings",
    "MosaicStrategy": ".mosaic.strategy",
    "RunConfig": ".config",
    "SpectralStrategy": ".baselines.spectral",
    "STRATEGIES": ".strategies",
    "TaskStrategy": ".task_strategy",
    "TolerantFedAvg": ".strategies",
    "TolerantFedProx": ".strategies",
    "TrainTask": ".records",
    "assign_client_models": ".client_models",
    "build_strategy": ".strategies",
    "handle_evaluate": ".client",
    "handle_train": ".client",
    "resolve_run_config": ".config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
