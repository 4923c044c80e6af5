"""The no-federation reference: every client trains its own model on its own data alone.

Each client builds the model ``client-models`` assigns it (with the same seeded
initialisation it would start a federated run from), trains it on its own
partition for the whole budget of a federated run (``num-server-rounds x
local-epochs`` epochs, the run's optimiser settings) and is scored on the test
split. A federated method that does not beat these numbers has not used the
other clients' data. Each client is also scored on its own test split (the one
that follows its training label proportions, :func:`~mosaic_flwr.data.client_test_splits`),
the measure of personalised federated learning.

Run it with ``mosaic-flwr local-only -c "preset='...'" --seeds 0 1 2``.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from .client import round_seed, train_settings
from .client_models import client_model_spec, initial_seed
from .config import RunConfig
from .data import BatchTransform, client_indices, client_test_splits, load_data
from .records import TrainTask
from .results import per_client_summary
from .training import fast_layout, score_samples, select_device, train


def local_only(config: RunConfig) -> list[dict]:
    """One row per client: its partition id, model, sample count, test accuracy and
    accuracy on its own test split."""
    data = load_data(config)
    device = select_device(config.device)
    transform = BatchTransform(data.spec, device)
    test_images, test_labels = torch.from_numpy(data.test_images), torch.from_numpy(data.test_labels)
    settings = train_settings(config, TrainTask(
        local_epochs=config.num_server_rounds * config.local_epochs,
        local_steps=config.num_server_rounds * config.local_steps))
    rows = []
    splits = client_test_splits(config)
    for pid in range(config.num_clients):
        spec = client_model_spec(config, pid)
        model = spec.build(data.spec, seed=initial_seed(config, spec))
        idx = client_indices(config, pid)
        images = torch.from_numpy(data.train_images[idx])
        labels = torch.from_numpy(data.train_labels[idx])
        rng = torch.Generator().manual_seed(round_seed(config, pid, 0))
        train(model, images, labels, transform, settings, device, rng)
        # One pass over the test split: the whole of it, and the client's own share.
        fast_layout(model.to(device)).eval()
        _, correct = score_samples(model, test_images, test_labels, transform, device,
                                   amp=config.amp)
        own = torch.from_numpy(splits[pid]).to(correct.device)
        rows.append({"seed": config.seed, "partition-id": pid, "model": str(spec),
                     "num-examples": len(labels), "accuracy": int(correct.sum()) / len(correct),
                     "personal-accuracy": int(correct[own].sum()) / len(own) if len(own)
                     else None})
    return rows


def summarise(rows: list[dict]) -> dict[str, tuple[float, float, int]]:
    """Per model: mean and sample std over seeds of the clients' mean accuracy, and the
    number of seeds."""
    per_seed: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        per_seed[row["model"]][row["seed"]].append(row["accuracy"])
    out = {}
    for model, seeds in sorted(per_seed.items()):
        means = [statistics.fmean(v) for v in seeds.values()]
        spread = statistics.stdev(means) if len(means) > 1 else 0.0
        out[model] = (statistics.fmean(means), spread, len(means))
    return out


def personal_summary(rows: list[dict]) -> tuple[float, float, float]:
    """Over seeds: the mean (and its sample std) of the clients' mean accuracy on their own
    test splits, and the mean of the worst decile (the lowest-scoring tenth of the clients,
    at least one)."""
    per_seed: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        if row["personal-accuracy"] is not None:
            per_seed[row["seed"]].append(row["personal-accuracy"])
    seeds = [per_client_summary(v, "personal") for v in per_seed.values()]
    means = [s["personal_mean"] for s in seeds]
    return (statistics.fmean(means), statistics.stdev(means) if len(means) > 1 else 0.0,
            statistics.fmean(s["personal_worst10"] for s in seeds))


def write_csv(rows: list[dict], path: Path) -> None:
    """Every client's row, as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
