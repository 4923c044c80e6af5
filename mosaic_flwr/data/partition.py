"""Partitioners: split a training set's labels into per-client index sets.

All partitioners are pure functions of the labels, the number of clients and a
seed, so every node and every run computes the same partitions from the same
configuration. Each returns one sorted int64 index array per client.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from importlib import metadata
from typing import Callable

import numpy as np

from ..errors import ConfigError
from .cache import cache_dir

#: Redraws allowed before a Dirichlet split that leaves a client too small gives up.
MAX_DIRICHLET_DRAWS = 1000


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and cut into near-equal shares."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, seed: int, alpha: float,
              min_partition_size: int) -> list[np.ndarray]:
    """flwr-datasets' DirichletPartitioner on the label (per class, shares ~ Dir(alpha)).

    Importing flwr-datasets costs about 2.5 s (it loads its plotting modules), in
    the ServerApp and in every Ray actor of every run; so the partition is kept
    on disk (:func:`cache_dir`) under a key of the labels' bytes, the arguments
    and the flwr-datasets version, and read back by every later process.
    """
    key = hashlib.sha256(b"".join([
        np.ascontiguousarray(labels, dtype=np.int64).tobytes(),
        repr((num_clients, seed, float(alpha), min_partition_size,
              metadata.version("flwr-datasets"))).encode()])).hexdigest()[:32]
    path = cache_dir() / "partitions" / f"dirichlet-{key}.npz"
    try:
        with np.load(path) as stored:
            return [stored[f"client{i}"] for i in range(num_clients)]
    except (OSError, KeyError, ValueError):
        pass  # not cached yet (or unreadable): compute it
    parts = _flwr_dirichlet(labels, num_clients, seed, alpha, min_partition_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(partial, **{f"client{i}": part for i, part in enumerate(parts)})
        os.replace(partial, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only home: every process computes it
    return parts


def _flwr_dirichlet(labels: np.ndarray, num_clients: int, seed: int, alpha: float,
                    min_partition_size: int) -> list[np.ndarray]:
    # Imported here: flwr_datasets pulls in `datasets`, which is slow to import.
    from datasets import Dataset  # pylint: disable=import-outside-toplevel
    from flwr_datasets.partitioner import DirichletPartitioner  # pylint: disable=import-outside-toplevel

    partitioner = DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=alpha,
        min_partition_size=min_partition_size, self_balancing=False, shuffle=True, seed=seed)
    partitioner.dataset = Dataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns on every redraw; we report failure ourselves
        try:
            return [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
                    for i in range(num_clients)]
        except ValueError as err:
            raise ConfigError(
                "dirichlet-alpha", alpha,
                f"the Dirichlet draw left a client with fewer than min-partition-size="
                f"{min_partition_size} samples after repeated tries ({err}); raise "
                f"dirichlet-alpha or lower min-partition-size") from err


def dirichlet_unbalanced(labels: np.ndarray, num_clients: int, seed: int, alpha: float,
                         min_partition_size: int) -> list[np.ndarray]:
    """The NIID-Bench split used by Mosaic's paper.

    For each class, client shares are drawn from Dir(alpha); a client that already
    holds N / num_clients samples receives no more; the whole draw is repeated until
    every client holds at least ``min_partition_size`` samples.
    """
    rng = np.random.default_rng(seed)
    cap = len(labels) / num_clients
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for label in classes:
            idx = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            open_clients = sizes < cap
            if open_clients.any():
                shares = shares * open_clients
            shares = shares / shares.sum()
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= min_partition_size:
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ConfigError("dirichlet-alpha", alpha,
                      f"no unbalanced Dirichlet draw gave every client min-partition-size="
                      f"{min_partition_size} samples in {MAX_DIRICHLET_DRAWS} tries; raise "
                      f"dirichlet-alpha or lower min-partition-size")


def pathological(labels: np.ndarray, num_clients: int, seed: int,
                 classes_per_client: int) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes.

    Classes are dealt round-robin over a seeded class order, so every class is held
    by about ``num_clients * classes_per_client / num_classes`` clients, and each
    class's samples are shared evenly among the clients that hold it.
    """
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    if classes_per_client > len(classes):
        raise ConfigError("classes-per-client", classes_per_client,
                          f"must be <= the number of classes ({len(classes)})")
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for slot in range(classes_per_client):
            label = classes[(client * classes_per_client + slot) % len(classes)]
            holders[int(label)].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label, owners in holders.items():
        if not owners:
            continue
        idx = rng.permutation(np.flatnonzero(labels == label))
        for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
            parts[owner].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "dirichlet-unbalanced": dirichlet_unbalanced,
    "pathological": pathological,
}


def partition_labels(labels: np.ndarray, *, partitioner: str, num_clients: int, seed: int,
                     dirichlet_alpha: float = 0.5, min_partition_size: int = 0,
                     classes_per_client: int = 2, dataset: str = "the data set") -> list[np.ndarray]:
    """Split ``labels`` into ``num_clients`` index sets with the named partitioner."""
    n = num_clients
    if n > len(labels):
        raise ConfigError("num-clients", n, f"must be <= the {len(labels)} training samples of {dataset}")
    if min_partition_size * n > len(labels):
        raise ConfigError("min-partition-size", min_partition_size,
                          f"times num-clients ({n}) exceeds the {len(labels)} training samples")
    if partitioner == "iid":
        return iid(labels, n, seed)
    if partitioner == "pathological":
        return pathological(labels, n, seed, classes_per_client)
    return PARTITIONERS[partitioner](labels, n, seed, dirichlet_alpha, min_partition_size)


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(num_clients, num_classes) matrix of how many samples of each class a client holds."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
