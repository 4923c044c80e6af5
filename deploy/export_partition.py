#!/usr/bin/env python3
"""Write one client's share of a data set to a folder, as that node's own data.

A SuperNode started with ``--data-path DIR`` (``--node-config
"data-path='DIR'"``) trains on all of DIR's training split instead of a
partition of the shared data set. On real machines DIR holds data that never
left that machine; to try the mode on one machine, this script cuts such a
folder out of a registered data set: the training samples of partition
``--partition-id`` (same partitioner and seed as a run would use) plus the
whole test split, as a Hugging Face ``save_to_disk`` folder (columns ``image``,
``label``), the format ``data-path`` reads.

Usage::

    python deploy/export_partition.py --partition-id 2 --num-partitions 3 \\
        --out deploy-state/data/node-2
    python deploy/export_partition.py --dataset digits --partitioner dirichlet \\
        --dirichlet-alpha 0.1 --partition-id 0 --num-partitions 10 --out /data/node-0

Your own data in this format: ``datasets.DatasetDict({"train": ..., "test": ...})``
with an ``image`` column of PIL images (or uint8 arrays) of the data set's size
and an integer ``label`` column, saved with ``.save_to_disk(DIR)``; parquet files
(``train*.parquet``, ``test*.parquet``) or an imagefolder tree work too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def export_partition(out: Path, dataset: str, partition_id: int, num_partitions: int,
                     partitioner: str = "iid", seed: int = 0, dirichlet_alpha: float = 0.5) -> int:
    """Write the partition's training samples and the test split to ``out``; return its size."""
    import datasets  # pylint: disable=import-outside-toplevel

    from mosaic_flwr.config import RunConfig  # pylint: disable=import-outside-toplevel
    from mosaic_flwr.data import load_dataset, partitions_for  # pylint: disable=import-outside-toplevel

    datasets.disable_progress_bars()
    config = RunConfig(dataset=dataset, partitioner=partitioner, num_clients=num_partitions,
                       min_clients=min(2, num_partitions), seed=seed,
                       dirichlet_alpha=dirichlet_alpha)
    data = load_dataset(dataset)
    indices = partitions_for(config)[partition_id]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(num_classes=data.spec.num_classes)})

    def split(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
        pixels = np.rint(images * 255).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        return datasets.Dataset.from_dict({"image": list(pixels), "label": labels.tolist()},
                                          features=features)

    folder = datasets.DatasetDict({
        "train": split(data.train_images[indices], data.train_labels[indices]),
        "test": split(data.test_images, data.test_labels)})
    out.mkdir(parents=True, exist_ok=True)
    folder.save_to_disk(str(out))
    return len(indices)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--dataset", default="digits", help="a registered data set (default digits)")
    parser.add_argument("--partition-id", type=int, required=True)
    parser.add_argument("--num-partitions", type=int, required=True)
    parser.add_argument("--partitioner", default="iid",
                        help="iid, dirichlet, dirichlet-unbalanced, pathological (default iid)")
    parser.add_argument("--dirichlet-alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.partition_id < args.num_partitions:
        parser.error("--partition-id must be in 0 .. num-partitions-1")
    size = export_partition(args.out, args.dataset, args.partition_id, args.num_partitions,
                            args.partitioner, args.seed, args.dirichlet_alpha)
    print(f"wrote {size} training samples (partition {args.partition_id} of "
          f"{args.num_partitions}, {args.partitioner}) and the test split to {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
