"""Data sets, partitioners and batched augmentation."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from .augment import BatchTransform
from .datasets import (DATASETS, DatasetSpec, DatasetUnavailableError, ImageData, data_request,
                       dataset_spec, load_data, load_dataset)
from .partition import PARTITIONERS, label_counts, partition_labels

if TYPE_CHECKING:  # the run config imports the registries defined in this package
    from ..config import RunConfig

__all__ = [
    "BatchTransform", "DATASETS", "DatasetSpec", "DatasetUnavailableError", "ImageData",
    "PARTITIONERS", "client_indices", "client_test_splits", "dataset_spec", "label_counts",
    "load_data", "load_dataset", "partition_labels",
    "partitions_for", "proxy_indices",
]


def partitions_for(config: RunConfig) -> list[np.ndarray]:
    """Every client's training indices for this config (cached per process)."""
    return _cached_partitions(data_request(config), config.partitioner,
                              config.num_clients, config.seed, config.dirichlet_alpha,
                              config.min_partition_size, config.classes_per_client,
                              config.proxy_fraction)


def proxy_indices(config: RunConfig) -> np.ndarray:
    """Training indices held out from every client (``proxy-fraction``), for server-side
    proxy data; empty when the fraction is 0."""
    num_train = len(load_data(config).train_labels)
    return _proxy_split(num_train, config.seed, config.proxy_fraction)[0]


def _proxy_split(num_train: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(held-out proxy indices, the rest), both sorted; a seeded random split."""
    order = np.random.default_rng([seed, 7919]).permutation(num_train)
    cut = int(round(fraction * num_train))
    return np.sort(order[:cut]), np.sort(order[cut:])


def client_indices(config: RunConfig, partition_id: int) -> np.ndarray:
    """Training indices of one client."""
    return partitions_for(config)[partition_id]


def client_test_splits(config: RunConfig) -> list[np.ndarray]:
    """Each client's personal test split: indices into the test split that follow the
    client's training label proportions.

    The test images of each class are shuffled (seeded by the run seed) and cut into
    consecutive pieces, one per client, sized by the client's share of that class's
    training images (rounded so that every piece is within one image of its exact
    share). So the splits are disjoint, together hold every test image of every class
    some client holds, and a client receives ``T_c * n_kc / N_c`` images of class c
    (``T_c`` test and ``N_c`` training images of the class, ``n_kc`` its own).
    """
    data = load_data(config)
    parts = partitions_for(config)
    num_classes = data.spec.num_classes
    counts = np.stack([np.bincount(data.train_labels[p], minlength=num_classes) for p in parts])
    rng = np.random.default_rng([config.seed, 104729])
    pieces: list[list[np.ndarray]] = [[] for _ in parts]
    for c in range(num_classes):
        total = counts[:, c].sum()
        if total == 0:
            continue
        idx = rng.permutation(np.flatnonzero(data.test_labels == c))
        bounds = np.rint(np.cumsum(counts[:, c]) / total * len(idx)).astype(int)
        for k, (start, end) in enumerate(zip(np.concatenate([[0], bounds[:-1]]), bounds)):
            pieces[k].append(idx[start:end])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]


# The key lists every input of the partitioning, so no two configs share an entry.
@functools.lru_cache(maxsize=8)
def _cached_partitions(request: tuple, partitioner: str, num_clients: int, seed: int,
                       alpha: float, min_size: int, classes_per_client: int,
                       proxy_fraction: float) -> list[np.ndarray]:
    labels = load_dataset(*request).train_labels
    _, kept = _proxy_split(len(labels), seed, proxy_fraction)
    parts = partition_labels(labels[kept], partitioner=partitioner, num_clients=num_clients,
                             seed=seed, dirichlet_alpha=alpha, min_partition_size=min_size,
                             classes_per_client=classes_per_client, dataset=request[0])
    return [kept[part] for part in parts]
