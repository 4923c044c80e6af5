"""Build the strategy a run config names, and check that it can run that config.

The names, and where each class lives, are in :mod:`mosaic_flwr.registry`; a
class is imported only when a run asks for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .client_models import assign_client_models, global_model_spec
from .errors import ConfigError
from .registry import STRATEGIES

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from .config import RunConfig
    from .task_strategy import ScoreFn


def strategy_class(name: str) -> type:
    """The class a registered strategy name builds (imported now)."""
    module, _, attr = STRATEGIES[name].target.partition(":")
    return getattr(importlib.import_module(module, __package__), attr)


def model_mixing(name: str) -> str:
    """Which different client models a strategy combines (its ``MIXED_MODELS``): ``""``
    (none: every client trains the global model), ``"width"`` (width sub-models of the
    global model) or ``"any"`` (any architecture)."""
    return getattr(strategy_class(name), "MIXED_MODELS", "")


def check_strategy(config: RunConfig) -> None:
    """Raise :class:`ConfigError` when the strategy cannot combine the config's client models."""
    global_spec = global_model_spec(config)
    specs = assign_client_models(config.client_models, config.num_clients, config.seed,
                                 global_spec)
    if all(spec == global_spec for spec in specs):
        return
    mixing = model_mixing(config.strategy)
    if not mixing:
        raise ConfigError("client-models", config.client_models,
                          f"strategy {config.strategy!r} needs every client to train the global "
                          f"model {global_spec}; strategies that combine different client "
                          f"models: {', '.join(n for n in STRATEGIES if model_mixing(n))}")
    if mixing == "width" and not all(s.holds_slice_of(global_spec) for s in specs):
        raise ConfigError("client-models", config.client_models,
                          f"strategy {config.strategy!r} needs width sub-models of the global "
                          f"model {global_spec} (same family, width <= {global_spec.width:g})")


def sampling_options(config: RunConfig) -> dict:
    """How many clients a round samples and needs (keyword arguments of every strategy)."""
    return {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_clients,
        "min_evaluate_nodes": config.min_clients if config.fraction_evaluate > 0 else 0,
        # Wait for no more than the minimum: a node lost mid-run must not stall the run.
        "min_available_nodes": config.min_clients,
        "min_replies": config.min_clients,
    }


def build_strategy(config: RunConfig, score_fn: ScoreFn | None = None) -> Strategy:
    """The server-side strategy the config names (``score_fn`` feeds extra phase metrics)."""
    check_strategy(config)
    return strategy_class(config.strategy).from_config(config, score_fn=score_fn,
                                                      **sampling_options(config))
