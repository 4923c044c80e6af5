"""Write a generated CIFAR-10-shaped data set as a Hugging Face ``save_to_disk`` folder.

50,000 train and 10,000 test 32x32 RGB images in 10 classes, PNG-encoded in an
``img`` column with a ``label`` column, as the hub's ``uoft-cs/cifar10`` holds
them, so that ``dataset='cifar10' data-path=...`` reads it offline. Each class
is a coloured pattern (a class-specific colour and stripe frequency) under
pixel noise, drawn from ``numpy.random.default_rng(seed)``: learnable, but the
point is the shape and the PNG decoding cost, which are those of CIFAR-10.
The data-cache benchmark (``docs/results/data.md``) runs on it.

Example::

    python benchmarks/make_cifar_shaped.py --out data/cifar-shaped
    python benchmarks/speed.py --data-path data/cifar-shaped --methods fedavg \\
        -c "dataset='cifar10' num-server-rounds=1 local-epochs=1"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` uint8 images (N, 32, 32, 3) and their labels 0..9."""
    labels = rng.integers(0, 10, count)
    colours = rng.integers(40, 216, (10, 3))
    columns = np.arange(32)
    stripes = np.stack([(np.sin(columns * (c + 1) * np.pi / 16) + 1) * 20 for c in range(10)])
    base = colours[labels][:, None, None, :] + stripes[labels][:, None, :, None]
    noise = rng.normal(0, 24, (count, 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8), labels


def main(argv: list[str] | None = None) -> None:
    """Write the folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--test-size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import datasets  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(args.seed)
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(num_classes=10)})
    splits = {}
    for split, count in (("train", args.train_size), ("test", args.test_size)):
        pixels, labels = images(count, rng)
        splits[split] = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(p) for p in pixels], "label": labels.tolist()},
            features=features)
    datasets.DatasetDict(splits).save_to_disk(str(args.out))
    print(f"wrote {args.out}: train {args.train_size}, test {args.test_size} images")


if __name__ == "__main__":
    main()
