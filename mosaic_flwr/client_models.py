"""Which model each client trains, and which one the server holds (model heterogeneity).

Run-config keys:

- ``global-model``: the server's model as ``name@width`` (``resnet18@1.0``);
  empty means ``model`` at ``model-width``, as in a homogeneous run.
- ``client-models``: empty (every client trains the global model), or one of

  * capacity groups, ``"resnet18@1.0,resnet18@0.5,resnet18@0.25"``: the
    partitions, shuffled with the run's seed, are dealt to the groups in turn,
    so group sizes differ by at most one (10 clients, 3 groups: 4, 3, 3);
  * an explicit mapping, ``"0-3:cnn,4-6:resnet8,7-9:resnet18@0.5"``: every
    partition id exactly once. A YAML preset may write it as a mapping
    (``{"0-3": cnn, "4-6": resnet8}``) or as a list with one model per partition.

A SuperNode's ``--node-config model='resnet8@0.5'`` wins over both for that
node (:mod:`mosaic_flwr.node`). Clients report the model they trained in each
reply, so the server never has to know the assignment in advance.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from .models import ModelSpec


def global_model_spec(config: Any) -> ModelSpec:
    """The server's model: ``global-model``, or ``model`` at ``model-width``."""
    if config.global_model:
        return ModelSpec.parse(config.global_model)
    return ModelSpec(config.model, config.model_width)


def assign_client_models(text: str, num_clients: int, seed: int, default: ModelSpec
                         ) -> list[ModelSpec]:
    """The model of every partition id, from a ``client-models`` value (see the module doc)."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        return [default] * num_clients
    explicit = [":" in e for e in entries]
    if any(explicit) and not all(explicit):
        raise ValueError("client-models mixes 'ids:model' entries with plain models; "
                         "use either capacity groups or an explicit mapping")
    if not all(explicit):
        groups = [ModelSpec.parse(e) for e in entries]
        order = np.random.default_rng(seed).permutation(num_clients)
        models = [default] * num_clients
        for rank, pid in enumerate(order):
            models[int(pid)] = groups[rank % len(groups)]
        return models
    assigned: dict[int, ModelSpec] = {}
    for entry in entries:
        ids, _, model = entry.partition(":")
        spec = ModelSpec.parse(model)
        for pid in _id_range(ids):
            if pid in assigned:
                raise ValueError(f"client-models assigns partition {pid} twice")
            assigned[pid] = spec
    missing = sorted(set(range(num_clients)) - set(assigned))
    extra = sorted(set(assigned) - set(range(num_clients)))
    if missing or extra:
        raise ValueError(f"client-models must name every partition 0..{num_clients - 1} once "
                         f"(missing {missing[:5]}, outside the range {extra[:5]})")
    return [assigned[pid] for pid in range(num_clients)]


def client_model_spec(config: Any, partition_id: int) -> ModelSpec:
    """The model partition ``partition_id`` trains under ``config``."""
    return assign_client_models(config.client_models, config.num_clients, config.seed,
                                global_model_spec(config))[partition_id]


def initial_seed(config: Any, model: ModelSpec) -> int:
    """The seed of a client model's first initialisation: the run seed and the model's name,
    so that all clients of one model start alike (and the local-only reference too)."""
    return zlib.crc32(f"{config.seed}:{model}".encode())


def client_models_value(value: Any) -> str:
    """A preset's ``client-models`` (string, mapping or per-partition list) as the run-config string."""
    if isinstance(value, dict):
        return ",".join(f"{ids}:{model}" for ids, model in value.items())
    if isinstance(value, list):
        return ",".join(f"{pid}:{model}" for pid, model in enumerate(value))
    return value


def _id_range(text: str) -> range:
    first, dash, last = text.strip().partition("-")
    try:
        lo, hi = int(first), int(last) if dash else int(first)
    except ValueError as err:
        raise ValueError(f"client-models: bad partition ids {text!r} (expected N or N-M)") from err
    if hi < lo:
        raise ValueError(f"client-models: empty partition range {text!r}")
    return range(lo, hi + 1)
