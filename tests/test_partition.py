"""Partitioners: coverage, sizes, label skew versus alpha, determinism, errors."""

import numpy as np
import pytest

from mosaic_flwr.config import ConfigError
from mosaic_flwr.data.partition import label_counts, partition_labels


def split(labels, partitioner, seed=0, **kwargs):
    kwargs.setdefault("num_clients", 10)
    return partition_labels(labels, partitioner=partitioner, seed=seed, **kwargs)


def mean_label_entropy(labels, parts) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    counts = label_counts(labels, parts, 10).astype(float)
    probs = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
    return float(ent.mean())


@pytest.mark.parametrize("name", ["iid", "dirichlet", "dirichlet-unbalanced", "pathological"])
def test_every_sample_goes_to_exactly_one_client(skewed_labels, name):
    parts = split(skewed_labels, name, dirichlet_alpha=0.3, min_partition_size=5)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(skewed_labels)


def test_iid_sizes_differ_by_at_most_one(skewed_labels):
    sizes = [len(p) for p in split(skewed_labels, "iid", num_clients=7)]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 2000


@pytest.mark.parametrize("name", ["dirichlet", "dirichlet-unbalanced"])
def test_label_skew_grows_as_alpha_falls(skewed_labels, name):
    entropy = {alpha: np.mean([mean_label_entropy(skewed_labels, split(
        skewed_labels, name, seed=s, dirichlet_alpha=alpha, min_partition_size=1))
        for s in range(3)]) for alpha in (100.0, 1.0, 0.1)}
    assert entropy[100.0] > entropy[1.0] > entropy[0.1]
    assert entropy[100.0] > 0.9 * np.log(10)  # nearly uniform labels at large alpha
    assert entropy[0.1] < 0.5 * np.log(10)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "dirichlet-unbalanced", "pathological"])
def test_same_seed_same_partitions_other_seed_other_partitions(skewed_labels, name):
    first = split(skewed_labels, name, seed=7, dirichlet_alpha=0.5, min_partition_size=5)
    again = split(skewed_labels, name, seed=7, dirichlet_alpha=0.5, min_partition_size=5)
    other = split(skewed_labels, name, seed=8, dirichlet_alpha=0.5, min_partition_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_dirichlet_unbalanced_respects_minimum_size(skewed_labels):
    parts = split(skewed_labels, "dirichlet-unbalanced", dirichlet_alpha=0.05,
                  min_partition_size=40)
    assert min(len(p) for p in parts) >= 40


def test_pathological_gives_each_client_exactly_k_classes(skewed_labels):
    parts = split(skewed_labels, "pathological", classes_per_client=3)
    held = (label_counts(skewed_labels, parts, 10) > 0).sum(1)
    assert held.tolist() == [3] * 10


def test_more_clients_than_samples_is_a_config_error():
    with pytest.raises(ConfigError, match=r"num-clients=.*must be <= the 5 training samples"):
        split(np.arange(5) % 2, "iid", num_clients=6)


def test_too_many_classes_per_client_is_a_config_error(skewed_labels):
    with pytest.raises(ConfigError, match="classes-per-client=11"):
        split(skewed_labels, "pathological", classes_per_client=11)


def test_impossible_minimum_size_is_a_config_error(skewed_labels):
    with pytest.raises(ConfigError, match="min-partition-size=300"):
        split(skewed_labels, "dirichlet", min_partition_size=300)


def test_dirichlet_partitions_are_cached_on_disk_and_read_back(tmp_path, monkeypatch):
    from mosaic_flwr.data import partition  # pylint: disable=import-outside-toplevel

    monkeypatch.setenv("MOSAIC_FLWR_CACHE", str(tmp_path))
    labels = np.random.default_rng(0).integers(0, 10, 500)
    first = partition.dirichlet(labels, 5, 3, 0.3, 10)
    files = list((tmp_path / "partitions").glob("dirichlet-*.npz"))
    assert len(files) == 1
    computed = []
    monkeypatch.setattr(partition, "_flwr_dirichlet",
                        lambda *args: computed.append(args) or [np.arange(3)] * 5)
    again = partition.dirichlet(labels, 5, 3, 0.3, 10)
    assert computed == [] and all(np.array_equal(a, b) for a, b in zip(first, again))
    other = partition.dirichlet(labels, 5, 4, 0.3, 10)  # another seed: another key
    assert len(computed) == 1 and len(other) == 5
    files[0].write_bytes(b"not an npz")  # a damaged entry is recomputed, not trusted
    partition.dirichlet(labels, 5, 3, 0.3, 10)
    assert len(computed) == 2
