"""The no-federation reference: every client trains its own model on its own data alone.

Each client builds the model ``client-models`` assigns it (with the same seeded
initialisation it would start a federated run from), trains it on its own
partition for the whole budget of a federated run (``num-server-rounds x
local-epochs`` epochs, the run's optimiser settings) and is scored on the test
split. A federated method that does not beat these numbers has not used the
other clients' data.

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
from .data import BatchTransform, client_indices, load_data
from .records import TrainTask
from .training import evaluate, select_device, train


def local_only(config: RunConfig) -> list[dict]:
    """One row per client: its partition id, model, sample count and test accuracy."""
    data = load_data(config)
    device = select_device(config.device)
    transform = BatchTransform(data.spec, device)
    test_images, test_labels = torch.from_numpy(data.test_images), torch.from_numpy(data.test_labels)
    settings = train_settings(config, TrainTask(
        local_epochs=config.num_server_rounds * config.local_epochs,
        local_steps=config.num_server_rounds * config.local_steps))
    rows = []
    for pid in range(config.num_clients):
        spec = client_model_spec(config, pid)
        model = spec.build(data.spec, seed=initial_seed(config, spec))
        idx = client_indices(config, pid)
        images = torch.from_numpy(data.train_images[idx])
        labels = torch.from_numpy(data.train_labels[idx])
        rng = torch.Generator().manual_seed(round_seed(config, pid, 0))
        train(model, images, labels, transform, settings, device, rng)
        _, accuracy = evaluate(model, test_images, test_labels, transform, device, amp=config.amp)
        rows.append({"seed": config.seed, "partition-id": pid, "model": str(spec),
                     "num-examples": len(labels), "accuracy": accuracy})
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


def write_csv(rows: list[dict], path: Path) -> None:
    """Every client's row, as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
