"""The dataset registry: what each data set is, and how to load it into memory.

Every data set is held as :class:`ImageData`: images (N, C, H, W), as 8-bit
pixels (uint8, 0..255: a quarter of float32's memory in every process that
holds them) or as float32 in ``[0, 1]`` (``digits``, whose 17 grey levels are
not bytes), and int64 labels, with a fixed train/test split. Conversion to
float, normalisation and augmentation happen per batch on the training device
(:mod:`mosaic_flwr.data.augment`).

``dataset`` is one of three things:

- a registered name (:data:`DATASETS`): ``digits`` ships with scikit-learn and
  works offline everywhere; the others load by their Hugging Face hub id (the
  loader flwr-datasets uses) when the machine is online, or from ``data-path``:
  a ``save_to_disk`` folder, parquet files, or an imagefolder tree;
- any Hugging Face hub id (``owner/name``), read from the hub or ``data-path``;
- ``folder``, with ``data-path``.

For the last two, the image and label columns, the image size, the channels,
the classes (and their names, when the data has them) and the normalisation
are read from the data (:func:`load_dataset` returns them as the data's
:class:`DatasetSpec`). ``image-size`` and ``channels`` resize and convert any
data set, registered ones included; ``image-column`` and ``label-column``
override the guessed columns. Every data set but ``digits`` is decoded once
per machine (:mod:`mosaic_flwr.data.cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetUnavailableError
from .cache import cached_decode, entry_key, folder_signature

if TYPE_CHECKING:  # the run config imports the registry defined here
    from ..config import RunConfig


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
    # The data's own class names, when it has them (read from the data, not registered).
    class_names: tuple[str, ...] = ()
    # Registered sets whose source images differ in size from image_size (resized on
    # load); their normalisation is computed from the data when mean is empty.
    resize: bool = False

    def facts(self) -> dict[str, Any]:
        """What a run's summary records about its data."""
        return {"name": self.name, "image_size": self.image_size, "channels": self.channels,
                "num_classes": self.num_classes, "class_names": list(self.class_names),
                "mean": list(self.mean), "std": list(self.std),
                "image_column": self.image_column, "label_column": self.label_column,
                "test_split": self.test_split}

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
        # The Mosaic paper's two larger benchmarks, at 32x32 as in its code (Tiny-ImageNet's
        # 64x64 images and Food-101's varied ones are resized on load); their mean and
        # std are computed from the resized training images.
        DatasetSpec("tiny-imagenet", 3, 32, 200, (), (), hflip=True, crop_padding=4,
                    hub_id="zh-plus/tiny-imagenet", test_split="valid", resize=True),
        DatasetSpec("food101", 3, 32, 101, (), (), hflip=True, crop_padding=4,
                    hub_id="ethz/food101", test_split="validation", resize=True),
    )
}

#: ``dataset`` for a local data set (``data-path``) whose shape and classes are read from it.
FOLDER = "folder"

#: Names a test split may have, in the order they are looked for (unregistered data).
TEST_SPLITS = ("test", "validation", "valid", "val")

#: Column names guessed, in order, when the data does not say (unregistered data).
IMAGE_COLUMNS = ("image", "img", "pixels")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target", "class")


def is_hub_id(name: str) -> bool:
    """Whether ``dataset`` names a Hugging Face hub data set (``owner/name``)."""
    owner, _, rest = name.partition("/")
    return bool(owner and rest) and "/" not in rest


#: Share of ``digits`` held out as the test split (stratified, fixed across seeds).
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class ImageData:  # pylint: disable=too-many-instance-attributes
    """A data set in memory: images (N, C, H, W), uint8 pixels or float32 in [0, 1]
    (:func:`mosaic_flwr.data.augment.to_unit` reads both); int64 labels."""

    spec: DatasetSpec
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def data_request(config: RunConfig, data_path: str | None = None) -> tuple:
    """The arguments of :func:`load_dataset` that a run config asks for (``data_path``:
    another folder holding the data, e.g. a SuperNode's own)."""
    return (config.dataset, config.data_path if data_path is None else data_path,
            config.image_size, config.channels, config.image_column, config.label_column)


def load_data(config: RunConfig, data_path: str | None = None) -> ImageData:
    """The run's data set as its config asks for it (see :func:`data_request`)."""
    return load_dataset(*data_request(config, data_path))


def dataset_spec(config: RunConfig, data_path: str | None = None) -> DatasetSpec:
    """The run's data facts: a registered set's as registered (nothing is loaded), else
    as read from the data (decoded once per machine, then mapped)."""
    registered = DATASETS.get(config.dataset)
    if registered is not None and not registered.resize \
            and config.image_size in (0, registered.image_size) \
            and config.channels in (0, registered.channels):
        return registered
    return load_data(config, data_path).spec


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_path: str = "", image_size: int = 0, channels: int = 0,
                 image_column: str = "", label_column: str = "") -> ImageData:
    """Load a data set (cached per process: Ray actors serve many clients).

    ``name``: a registered name, a hub id or :data:`FOLDER`; ``image_size`` and
    ``channels`` (0: the data's own, or the registered set's) resize and convert
    the images; ``image_column``/``label_column`` ('': guessed) name the columns.
    """
    base = DATASETS.get(name)
    if name == "digits" and not data_path and not (image_size or channels):
        return _load_digits(DATASETS["digits"])
    if base is None and name != FOLDER and not is_hub_id(name):
        raise DatasetUnavailableError(
            f"dataset {name!r} is neither a registered name ({', '.join(DATASETS)}), a "
            f"Hugging Face hub id (owner/name) nor '{FOLDER}' (with data-path)")
    if name == FOLDER and not data_path:
        raise DatasetUnavailableError(
            f"dataset '{FOLDER}' needs data-path: the folder that holds the data "
            f"(a save_to_disk folder, parquet files or an imagefolder tree)")
    request = _Request(name, base, image_size, channels, image_column, label_column)
    if data_path:
        path = _checked_folder(name, Path(data_path).expanduser().resolve())
        where, source = str(path), (str(path), folder_signature(path))
    else:
        path, where = None, f"the Hugging Face hub ({base.hub_id if base else name})"
        source = (base.hub_id, base.hub_config) if base else (name,)

    def decode() -> tuple[tuple[np.ndarray, ...], dict]:
        splits = _load_local(name, path) if path is not None else _load_hub(name, base)
        return _decode(request, splits, where)

    # Decoded once per machine (mosaic_flwr.data.cache): the ServerApp and every Ray
    # actor of every run after the first map the same uint8 arrays.
    key = entry_key(name, base, source, image_size, channels, image_column, label_column)
    arrays, meta = cached_decode(name, key, decode)
    return ImageData(_spec(request, meta), *arrays)


@dataclass(frozen=True)
class _Request:
    """What :func:`load_dataset` was asked for."""

    name: str
    base: DatasetSpec | None
    image_size: int
    channels: int
    image_column: str
    label_column: str

    def problem(self, where: str, what: str) -> DatasetUnavailableError:
        """A clear error: which data set, where, what is wrong (and the fix, in ``what``)."""
        return DatasetUnavailableError(f"dataset {self.name!r} at {where}: {what}")


def _spec(request: _Request, meta: dict) -> DatasetSpec:
    """The data's spec: the registered one (with the asked shape, and computed
    normalisation where needed), or one built from what was read."""
    base, size, channels = request.base, meta["image_size"], meta["channels"]
    if base is not None and base.mean and (size, channels) == (base.image_size, base.channels):
        return base  # what dataset_spec says without loading
    if base is not None:
        mean, std = base.mean, base.std
        if not mean:
            mean, std = tuple(meta["mean"]), tuple(meta["std"])
        elif len(mean) != channels:  # grey -> RGB (or back): the channels share the value
            mean, std = ((mean[0],) * channels, (std[0],) * channels) if len(mean) == 1 else (
                (sum(mean) / len(mean),), (sum(std) / len(std),))
        return dataclasses.replace(base, image_size=size, channels=channels, mean=mean, std=std,
                                   image_column=meta["image_column"],
                                   label_column=meta["label_column"],
                                   class_names=tuple(meta["class_names"]))
    return DatasetSpec(request.name, channels, size, meta["num_classes"], tuple(meta["mean"]),
                       tuple(meta["std"]), hflip=False, crop_padding=max(1, size // 8),
                       hub_id=request.name if is_hub_id(request.name) else "",
                       image_column=meta["image_column"], label_column=meta["label_column"],
                       test_split=meta["test_split"], class_names=tuple(meta["class_names"]))


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


def _how_to_provide(name: str) -> str:
    base = DATASETS.get(name)
    columns = (f" with columns '{base.image_column}' and '{base.label_column}'" if base else
               " (columns are guessed; name them with image-column and label-column)")
    return (f"Provide it with --run-config \"data-path='/abs/path'\" pointing to a "
            f"Hugging Face `save_to_disk` folder, a folder of parquet files "
            f"(train*.parquet and test*.parquet) or an imagefolder tree "
            f"(train/<label>/*.png, test/<label>/*.png){columns}.")


def _load_hub(name: str, base: DatasetSpec | None):
    import datasets  # pylint: disable=import-outside-toplevel

    hub_id, config = (base.hub_id, base.hub_config) if base else (name, None)
    try:
        return datasets.load_dataset(hub_id, config)
    except Exception as err:  # the hub raises many kinds of errors when offline
        raise DatasetUnavailableError(
            f"dataset '{name}' is not available: loading Hugging Face hub "
            f"dataset '{hub_id}' failed ({type(err).__name__}: {' '.join(str(err).split())}). "
            f"{_how_to_provide(name)}"
        ) from err


def _checked_folder(name: str, path: Path) -> Path:
    """``path`` when it is a folder with something in it, else a clear error."""
    if not path.is_dir() or not any(path.iterdir()):
        what = ("is empty" if path.is_dir() else
                "is a file, not a folder" if path.exists() else "does not exist")
        raise DatasetUnavailableError(
            f"dataset '{name}' is not available: data-path {path} {what}. "
            f"{_how_to_provide(name)}")
    return path


def _load_local(name: str, path: Path):
    import datasets  # pylint: disable=import-outside-toplevel (slow: only for a real folder)

    try:
        if (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        files = sorted(path.rglob("*.parquet"))
        if files:
            data_files = {}
            for split in ("train", *TEST_SPLITS):
                mine = [str(f) for f in files if f.name.startswith(split) or f.parent.name == split]
                if mine:
                    data_files[split] = mine
            return datasets.load_dataset("parquet", data_files=data_files)
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as err:
        reason = " ".join(str(err).split())  # one line
        raise DatasetUnavailableError(
            f"dataset '{name}' is not available: reading data-path {path} failed "
            f"({type(err).__name__}: {reason}). {_how_to_provide(name)}") from err


def _decode(request: _Request, splits, where: str) -> tuple[tuple[np.ndarray, ...], dict]:
    """Both splits as uint8 (N, C, H, W) images and int64 labels, and what was read."""
    base = request.base
    test_names = (base.test_split,) if base else TEST_SPLITS
    test_name = next((t for t in test_names if t in splits), None)
    if "train" not in splits or test_name is None:
        raise request.problem(where, f"needs a 'train' and a test split "
                              f"({' or '.join(repr(t) for t in test_names)}); it has "
                              f"{sorted(splits.keys())}. {_how_to_provide(request.name)}")
    train, test = splits["train"], splits[test_name]
    image_col, label_col = _columns(request, train, where)
    # One Arrow read per split (a plain split[label_col] converts 60,000 rows one by one:
    # 0.6 s against 0.03 s for MNIST's labels).
    labels = [_labels(request, split.with_format("numpy", columns=[label_col])[:][label_col],
                      label_col, where) for split in (train, test)]
    num_classes, class_names = _classes(request, train.features[label_col], labels, where)
    images = _Images(request, image_col, where)
    train_images = images.decode(train)
    test_images = images.decode(test)
    mean, std = _mean_std(train_images)
    meta = {"image_size": train_images.shape[-1], "channels": train_images.shape[1],
            "num_classes": num_classes, "class_names": class_names,
            "mean": [round(float(m), 4) for m in mean], "std": [round(float(s), 4) for s in std],
            "image_column": image_col, "label_column": label_col, "test_split": test_name}
    return (train_images, labels[0], test_images, labels[1]), meta


def _mean_std(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (in chunks: no float
    copy of the whole set)."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk].astype(np.float64) / 255
        total += part.sum(axis=(0, 2, 3))
        squares += (part ** 2).sum(axis=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean ** 2, 1e-12))


def _columns(request: _Request, split, where: str) -> tuple[str, str]:
    """The image and the label column: as asked, as registered, else guessed."""
    columns, features = split.column_names, split.features
    kinds = {c: type(features[c]).__name__ for c in columns}

    def pick(asked: str, registered: str, names: tuple[str, ...], kind: tuple[str, ...],
             what: str, key: str) -> str:
        if asked:
            if asked not in columns:
                raise request.problem(where, f"{key}={asked!r} is not a column; the columns "
                                      f"are {columns}")
            return asked
        for name in (registered, *(c for c in columns if kinds[c] in kind), *names):
            if name in columns:
                return name
        raise request.problem(where, f"no {what} column among {columns}; name it with {key}")

    image = pick(request.image_column, request.base.image_column if request.base else "",
                 IMAGE_COLUMNS, ("Image", "Array2D", "Array3D"), "image", "image-column")
    label = pick(request.label_column, request.base.label_column if request.base else "",
                 LABEL_COLUMNS, ("ClassLabel",), "label", "label-column")
    return image, label


def _labels(request: _Request, values, column: str, where: str) -> np.ndarray:
    """A label column as int64 class indices, or a clear error."""
    array = np.asarray(values)
    if array.dtype.kind == "b" or (array.dtype.kind == "f" and np.all(array == np.round(array))):
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" or array.ndim != 1:
        example = array.flat[0] if array.size else None
        raise request.problem(where, f"label column {column!r} is not integer-like (e.g. "
                              f"{example!r}); labels must be class indices 0..C-1 (name "
                              f"another column with label-column)")
    if len(array) and array.min() < 0:
        raise request.problem(where, f"label column {column!r} holds negative labels")
    return array.astype(np.int64)


def _classes(request: _Request, feature, labels: list[np.ndarray], where: str
             ) -> tuple[int, list[str]]:
    """The number of classes (and their names): the data's ClassLabel, else the largest
    label + 1; a registered set must have exactly its registered classes."""
    names = list(getattr(feature, "names", None) or [])
    largest = max((int(part.max()) for part in labels if len(part)), default=-1)
    count = len(names) or largest + 1
    if largest >= count:
        raise request.problem(where, f"label {largest} is outside the {count} classes it names")
    base = request.base
    if base is not None and count != base.num_classes:
        raise request.problem(where, f"holds {count} classes, but dataset {request.name!r} has "
                              f"{base.num_classes}: use dataset='{FOLDER}' (or its hub id) to "
                              f"train a {count}-class model on it")
    return count, names


class _Images:
    """Decodes an image column to uint8 (N, C, H, W) at one size and channel count."""

    def __init__(self, request: _Request, column: str, where: str) -> None:
        base = request.base
        self.request, self.column, self.where = request, column, where
        self.size = request.image_size or (base.image_size if base else 0)
        self.channels = request.channels or (base.channels if base else 0)
        # A registered set's images must have its size and channels unless asked otherwise
        # (or it is one resized on load).
        self.strict_size = base is not None and not base.resize and not request.image_size
        self.strict_channels = base is not None and not request.channels

    def decode(self, split) -> np.ndarray:
        """The split's images as one array."""
        feature = type(split.features[self.column]).__name__
        if feature == "Image" and split.features[self.column].decode:
            import datasets  # pylint: disable=import-outside-toplevel

            # Decoded here, one by one, so that a broken file is named.
            split = split.cast_column(self.column, datasets.Image(decode=False))
        if feature.startswith("Array"):
            # One slice of the whole split (indexing a column alone yields a lazy Column
            # that converts row by row: 5 s instead of 0.06 s for 12k MNIST images).
            pixels = np.asarray(split.with_format("numpy", columns=[self.column])[:][self.column])
            if pixels.ndim == 3:
                pixels = pixels[..., None]
            return self._shaped(list(pixels), batched=pixels)
        return self._shaped([self._open(item) for item in split[self.column]])

    def _open(self, item: Any) -> Any:
        """One image: a PIL image (decoded here when the column holds paths or bytes)."""
        if isinstance(item, dict):  # an undecoded Image feature: {"bytes", "path"}
            from PIL import Image  # pylint: disable=import-outside-toplevel

            try:
                image = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes")
                                   else item["path"])
                image.load()
            except Exception as err:  # PIL raises several kinds on a broken file
                raise self.request.problem(
                    self.where, f"cannot read image {item.get('path') or '(bytes)'} "
                    f"({type(err).__name__}: {err}); remove or replace it") from err
            return image
        return item

    def _shaped(self, images: list, batched: np.ndarray | None = None) -> np.ndarray:
        """(N, C, H, W) uint8 at the target size and channels."""
        if not images:
            raise self.request.problem(self.where, "a split holds no images")
        channels = self.channels or _channels(images[0])
        size = self.size
        if not size:
            shapes = {_height_width(img) for img in images} if batched is None \
                else {batched.shape[1:3]}
            height, width = next(iter(shapes))
            if len(shapes) > 1 or height != width:
                shown = ", ".join(f"{h}x{w}" for h, w in sorted(shapes)[:3])
                raise self.request.problem(
                    self.where, f"images are not all one square size ({shown}); set "
                    f"image-size=N to resize them to NxN")
            size = height
        if batched is not None and batched.shape[1:] == (size, size, channels):
            return _to_uint8(np.ascontiguousarray(np.moveaxis(batched, -1, 1)))
        name = self.request.name
        out = np.empty((len(images), channels, size, size), dtype=np.uint8)
        for i, image in enumerate(images):
            height, width = _height_width(image)
            if self.strict_size and (height, width) != (size, size):
                raise self.request.problem(
                    self.where, f"an image is {height}x{width}, but dataset {name!r} is "
                    f"{size}x{size}: set image-size={size} to resize the images, or use "
                    f"dataset='{FOLDER}' to keep the data's own size")
            if self.strict_channels and _channels(image) != channels:
                raise self.request.problem(
                    self.where, f"an image has {_channels(image)} channel(s), but dataset "
                    f"{name!r} has {channels}: set channels={channels} to convert the images, "
                    f"or use dataset='{FOLDER}'")
            out[i] = np.moveaxis(_resized(image, size, channels), -1, 0)
        return out


def _hwc(image: Any) -> np.ndarray:
    """An image's pixels as (H, W, C)."""
    pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _height_width(image: Any) -> tuple[int, int]:
    if hasattr(image, "convert"):  # a PIL image
        return image.height, image.width
    return tuple(_hwc(image).shape[:2])


def _channels(image: Any) -> int:
    """1 for a grey image, else 3 (RGBA and palette images are read as RGB)."""
    if hasattr(image, "convert"):  # a PIL image
        return 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
    return 1 if _hwc(image).shape[-1] == 1 else 3


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":  # pixel values 0..255 in another type
        array = np.rint(array)
    return np.clip(array, 0, 255).astype(np.uint8)


def _resized(image: Any, size: int, channels: int) -> np.ndarray:
    """(size, size, channels) uint8 pixels of one image (PIL for resizing and converting)."""
    if not hasattr(image, "convert"):  # pixels
        pixels = _hwc(image)
        if pixels.shape == (size, size, channels):
            return _to_uint8(pixels)
        from PIL import Image  # pylint: disable=import-outside-toplevel

        image = Image.fromarray(_to_uint8(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), 2)  # PIL.Image.BILINEAR (antialiased when shrinking)
    return _hwc(image)
