"""The dataset registry: what each data set is, and how to load it into memory.

Every data set is held as :class:`ImageData`: images (N, C, H, W), as 8-bit
pixels (uint8, 0..255: a quarter of float32's memory in every process that
holds them) or as float32 in ``[0, 1]`` (``digits``, whose 17 grey levels are
not bytes), and int64 labels, with a fixed train/test split. Conversion to
float, normalisation and augmentation happen per batch on the training device
(:mod:`mosaic_flwr.data.augment`).

``digits`` ships with scikit-learn and works offline everywhere. The others load
by their Hugging Face hub name (the same loader flwr-datasets uses) when the
machine is online, or from ``data-path``: a ``save_to_disk`` folder, parquet
files, or an imagefolder tree.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetUnavailableError
from .cache import cached_arrays, entry_key, folder_signature


@dataclass(frozen=True)
class DatasetSpec:  # pylint: disable=too-many-instance-attributes
    """Static facts about a data set: shape, classes, where it lives, how to normalise."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    crop_padding: int
    hub_id: str = ""
    hub_config: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    test_split: str = "test"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return (self.channels, self.image_size, self.image_size)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # 8x8 UCI digits; mean/std measured on all 1,797 images scaled to [0, 1].
        DatasetSpec("digits", 1, 8, 10, (0.3054,), (0.3782,), hflip=False, crop_padding=1),
        DatasetSpec("mnist", 1, 28, 10, (0.1307,), (0.3081,), hflip=False, crop_padding=2,
                    hub_id="ylecun/mnist"),
        DatasetSpec("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,), hflip=True,
                    crop_padding=2, hub_id="zalando-datasets/fashion_mnist"),
        DatasetSpec("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    hflip=True, crop_padding=4, hub_id="uoft-cs/cifar10", image_column="img"),
        DatasetSpec("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                    hflip=True, crop_padding=4, hub_id="uoft-cs/cifar100", image_column="img",
                    label_column="fine_label"),
        DatasetSpec("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                    hflip=False, crop_padding=2, hub_id="ufldl-stanford/svhn",
                    hub_config="cropped_digits"),
    )
}

#: Share of ``digits`` held out as the test split (stratified, fixed across seeds).
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class ImageData:
    """A data set in memory: images (N, C, H, W), uint8 pixels or float32 in [0, 1]
    (:func:`mosaic_flwr.data.augment.to_unit` reads both); int64 labels."""

    spec: DatasetSpec
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@functools.lru_cache(maxsize=2)
def load_dataset(name: str, data_path: str = "") -> ImageData:
    """Load a registered data set (cached per process: Ray actors serve many clients)."""
    spec = DATASETS[name]
    if name == "digits" and not data_path:
        return _load_digits(spec)
    if data_path:
        path = _checked_folder(spec, Path(data_path).expanduser().resolve())
        source: tuple = (str(path), folder_signature(path))
    else:
        path, source = None, (spec.hub_id, spec.hub_config)

    def decode() -> tuple[np.ndarray, ...]:
        splits = _load_local(spec, path) if path is not None else _load_hub(spec)
        return (*_to_arrays(spec, splits["train"]), *_to_arrays(spec, splits["test"]))

    # Decoded once per machine (mosaic_flwr.data.cache): the ServerApp and every Ray
    # actor of every run after the first map the same uint8 arrays.
    return ImageData(spec, *cached_arrays(name, entry_key(spec, source), decode))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as (N, 8, 8) pixels 0..16 and labels.

    Read straight from the CSV that scikit-learn ships (what ``load_digits``
    reads): importing scikit-learn costs 1.7 s in the ServerApp and in every
    Ray actor of every run, reading the file 0.01 s.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    bunch = load_digits()
    return bunch.images, bunch.target


def _load_digits(spec: DatasetSpec) -> ImageData:
    pixels, target = _digits_arrays()
    images = (pixels.astype(np.float32) / 16.0)[:, None, :, :]
    labels = target.astype(np.int64)
    # Stratified split with a fixed generator: every seed is scored on the same test set.
    rng = np.random.default_rng(12345)
    test_idx = []
    for label in range(spec.num_classes):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        test_idx.append(idx[: round(len(idx) * DIGITS_TEST_FRACTION)])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    return ImageData(spec, images[~test_mask], labels[~test_mask],
                     images[test_mask], labels[test_mask])


def _how_to_provide(spec: DatasetSpec) -> str:
    return (f"Provide it with --run-config \"data-path='/abs/path'\" pointing to a "
            f"Hugging Face `save_to_disk` folder, a folder of parquet files "
            f"(train*.parquet and test*.parquet) or an imagefolder tree "
            f"(train/<label>/*.png, test/<label>/*.png) with columns "
            f"'{spec.image_column}' and '{spec.label_column}'.")


def _load_hub(spec: DatasetSpec):
    import datasets  # pylint: disable=import-outside-toplevel

    try:
        return datasets.load_dataset(spec.hub_id, spec.hub_config)
    except Exception as err:  # the hub raises many kinds of errors when offline
        raise DatasetUnavailableError(
            f"dataset '{spec.name}' is not available: loading Hugging Face hub "
            f"dataset '{spec.hub_id}' failed ({type(err).__name__}: {' '.join(str(err).split())}). "
            f"{_how_to_provide(spec)}"
        ) from err


def _checked_folder(spec: DatasetSpec, path: Path) -> Path:
    """``path`` when it is a folder with something in it, else a clear error."""
    if not path.is_dir() or not any(path.iterdir()):
        what = ("is empty" if path.is_dir() else
                "is a file, not a folder" if path.exists() else "does not exist")
        raise DatasetUnavailableError(
            f"dataset '{spec.name}' is not available: data-path {path} {what}. "
            f"{_how_to_provide(spec)}")
    return path


def _load_local(spec: DatasetSpec, path: Path):
    import datasets  # pylint: disable=import-outside-toplevel (slow: only for a real folder)

    try:
        if (path / "dataset_dict.json").is_file():
            splits = datasets.load_from_disk(str(path))
        elif list(path.glob("*.parquet")) or list(path.glob("*/*.parquet")):
            files = sorted(path.rglob("*.parquet"))
            splits = datasets.load_dataset("parquet", data_files={
                split: [str(f) for f in files
                        if f.name.startswith(split) or f.parent.name == split]
                for split in ("train", spec.test_split)})
        else:
            splits = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as err:
        reason = " ".join(str(err).split())  # one line
        raise DatasetUnavailableError(
            f"dataset '{spec.name}' is not available: reading data-path {path} failed "
            f"({type(err).__name__}: {reason}). {_how_to_provide(spec)}") from err
    missing = {"train", spec.test_split} - set(splits.keys())
    if missing:
        raise DatasetUnavailableError(
            f"dataset '{spec.name}' at {path} lacks split(s) {sorted(missing)}. "
            f"{_how_to_provide(spec)}")
    return {"train": splits["train"], "test": splits[spec.test_split]}


def _to_arrays(spec: DatasetSpec, split) -> tuple[np.ndarray, np.ndarray]:
    """Decode a Hugging Face split into (N, C, H, W) uint8 pixels and int64 labels.

    Array columns (``Array2D``/``Array3D``, as ``benchmarks/prepare_mnist.py``
    writes) convert in one step; image columns decode image by image.
    """
    columns = split.column_names
    image_col = spec.image_column if spec.image_column in columns else next(
        (c for c in ("image", "img") if c in columns), None)
    label_col = spec.label_column if spec.label_column in columns else (
        "label" if "label" in columns else None)
    if image_col is None or label_col is None:
        raise DatasetUnavailableError(
            f"dataset '{spec.name}': expected columns '{spec.image_column}' and "
            f"'{spec.label_column}', found {columns}. {_how_to_provide(spec)}")
    if type(split.features[image_col]).__name__.startswith("Array"):
        # One slice of the whole split (indexing a column alone yields a lazy Column
        # that converts row by row: 5 s instead of 0.06 s for 12k MNIST images).
        columns = split.with_format("numpy", columns=[image_col, label_col])[:]
        images = _pixels_to_array(np.asarray(columns[image_col]), spec, batched=True)
        return images, np.asarray(columns[label_col], dtype=np.int64)
    labels = np.asarray(split[label_col], dtype=np.int64)
    images = np.stack([_image_to_array(img, spec) for img in split[image_col]])
    return images, labels


def _image_to_array(image, spec: DatasetSpec) -> np.ndarray:
    if hasattr(image, "convert"):  # a PIL image
        image = image.convert("L" if spec.channels == 1 else "RGB")
    return _pixels_to_array(np.asarray(image), spec, batched=False)


def _pixels_to_array(array: np.ndarray, spec: DatasetSpec, batched: bool) -> np.ndarray:
    """(H, W[, C]) pixels, or (N, H, W[, C]) when ``batched``, as (.., C, H, W) uint8."""
    if array.ndim == 2 + batched:
        array = array[..., None]
    size = (spec.image_size, spec.image_size)
    if array.ndim != 3 + batched or array.shape[-3:-1] != size or array.shape[-1] != spec.channels:
        shape = array.shape[1:] if batched else array.shape
        raise DatasetUnavailableError(
            f"dataset '{spec.name}': an image has shape {shape}, expected "
            f"{(spec.image_size, spec.image_size, spec.channels)} (H, W, C); data-path must "
            f"hold images of the size and channels of dataset '{spec.name}'")
    if array.dtype != np.uint8:  # pixel values 0..255 in another type
        if array.dtype.kind == "f":
            array = np.rint(array)
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(array, -1, -3))
