"""Bring your own data: any image-classification folder or column layout, resized and
converted on request, and a clear error (data set, path, what is wrong, the fix) for
each kind of bad input. Generated data only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from harness import BASE, COLOURS, MOSAIC, serve_inline, write_imagefolder

from mosaic_flwr.config import RunConfig
from mosaic_flwr.data import datasets as ds
from mosaic_flwr.data import DatasetUnavailableError, load_dataset
from mosaic_flwr.errors import ConfigError
from mosaic_flwr.strategies import build_strategy

@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """No data set loaded in this process, and an empty on-disk cache."""
    monkeypatch.setenv("MOSAIC_FLWR_CACHE", str(tmp_path / "cache"))
    ds.load_dataset.cache_clear()
    yield
    ds.load_dataset.cache_clear()


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory):
    """A 5-class imagefolder of 24x24 RGB images (60 train, 20 test)."""
    return write_imagefolder(tmp_path_factory.mktemp("five"))


def test_a_folder_is_read_with_its_shape_classes_and_normalisation(five_classes):
    data = load_dataset("folder", str(five_classes))
    spec = data.spec
    assert (spec.image_size, spec.channels, spec.num_classes) == (24, 3, 5)
    assert spec.class_names == tuple(COLOURS)
    assert data.train_images.shape == (60, 3, 24, 24) and data.train_images.dtype == np.uint8
    assert np.bincount(data.test_labels).tolist() == [4] * 5
    unit = data.train_images.astype(np.float64) / 255
    assert np.allclose(spec.mean, unit.mean(axis=(0, 2, 3)), atol=1e-4)
    assert np.allclose(spec.std, unit.std(axis=(0, 2, 3)), atol=1e-4)
    # The first image's pixels are the file's.
    from PIL import Image  # pylint: disable=import-outside-toplevel

    first = np.asarray(Image.open(five_classes / "train" / "cat" / "0.png"))
    assert np.array_equal(np.moveaxis(data.train_images[0], 0, -1), first)


@pytest.mark.parametrize("method", ["fedavg", "mosaic"])
def test_fedavg_and_mosaic_train_on_a_five_class_rgb_folder(method, five_classes, tmp_path):
    overrides = {**BASE, **(MOSAIC if method == "mosaic" else {}), "strategy": method,
                 "dataset": "folder", "data-path": str(five_classes), "num-clients": 3,
                 "partitioner": "iid", "min-partition-size": 1, "output-dir": str(tmp_path),
                 "run-name": method, "server-threads": 1}
    summary = serve_inline(overrides)
    assert summary["status"] == "completed"
    assert summary["data"]["num_classes"] == 5 and summary["data"]["class_names"] == list(COLOURS)
    assert (summary["data"]["image_size"], summary["data"]["channels"]) == (24, 3)
    written = json.loads((tmp_path / method / "summary.json").read_text())
    assert written["data"] == summary["data"]
    final = torch.load(tmp_path / method / "final_model.pt")
    assert final["head.weight"].shape[0] == 5 and final["body.0.weight"].shape[1] == 3
    assert 0.0 <= summary["final_accuracy"] <= 1.0


def test_parquet_with_other_column_names_and_the_keys_that_name_them(tmp_path):
    import datasets  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(1)
    for split, n in (("train", 9), ("test", 3)):
        datasets.Dataset.from_dict(
            {"picture": [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(n)],
             "category": (np.arange(n) % 3).tolist(), "note": ["x"] * n},
            features=datasets.Features({"picture": datasets.Image(), "category": datasets.Value(
                "int64"), "note": datasets.Value("string")})
        ).to_parquet(str(tmp_path / f"{split}-0.parquet"))
    with pytest.raises(DatasetUnavailableError) as caught:
        load_dataset("folder", str(tmp_path))
    assert str(caught.value) == (f"dataset 'folder' at {tmp_path}: no label column among "
                                 f"['picture', 'category', 'note']; name it with label-column")
    data = load_dataset("folder", str(tmp_path), label_column="category")
    assert data.spec.image_column == "picture" and data.spec.label_column == "category"
    assert (data.spec.num_classes, data.spec.channels, data.spec.image_size) == (3, 1, 16)
    assert data.train_labels.tolist() == [0, 1, 2] * 3
    with pytest.raises(DatasetUnavailableError, match="image-column='pic' is not a column"):
        load_dataset("folder", str(tmp_path), image_column="pic", label_column="category")


def test_a_registered_set_resized_and_converted_as_the_reference_feeds_mnist(tmp_path):
    from test_datasets import fake_mnist  # pylint: disable=import-outside-toplevel

    fake_mnist(8, 0).to_parquet(str(tmp_path / "train-0.parquet"))
    fake_mnist(4, 1).to_parquet(str(tmp_path / "test-0.parquet"))
    own = load_dataset("mnist", str(tmp_path))
    assert own.spec is ds.DATASETS["mnist"]  # nothing changed: the registered facts
    big = load_dataset("mnist", str(tmp_path), image_size=32, channels=3)
    assert big.train_images.shape == (8, 3, 32, 32)
    assert np.array_equal(big.train_images[:, 0], big.train_images[:, 2])  # grey in RGB
    assert (big.spec.image_size, big.spec.channels, big.spec.num_classes) == (32, 3, 10)
    assert big.spec.mean == (0.1307,) * 3 and big.spec.std == (0.3081,) * 3
    # Bilinear resizing keeps the picture: the mean brightness hardly moves.
    assert abs(big.train_images.mean() - own.train_images.mean()) < 2.0
    config = RunConfig.from_mapping({"dataset": "mnist", "data-path": str(tmp_path),
                                     "image-size": 32, "channels": 3})
    assert ds.dataset_spec(config) == big.spec


def test_mixed_sizes_need_image_size(tmp_path):
    write_imagefolder(tmp_path, sizes=(20, 28))
    with pytest.raises(DatasetUnavailableError) as caught:
        load_dataset("folder", str(tmp_path))
    assert str(caught.value) == (f"dataset 'folder' at {tmp_path}: images are not all one "
                                 f"square size (20x20, 28x28); set image-size=N to resize "
                                 f"them to NxN")
    data = load_dataset("folder", str(tmp_path), image_size=24)
    assert data.train_images.shape == (60, 3, 24, 24)


def test_a_corrupt_image_file_is_named(tmp_path):
    write_imagefolder(tmp_path)
    broken = tmp_path / "train" / "owl" / "3.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DatasetUnavailableError, match=f"cannot read image {broken}"):
        load_dataset("folder", str(tmp_path))


def _dataset_dict(path, splits):
    import datasets  # pylint: disable=import-outside-toplevel

    datasets.DatasetDict({name: datasets.Dataset.from_dict(columns)
                          for name, columns in splits.items()}).save_to_disk(str(path))
    return path


def test_labels_that_are_not_class_indices_are_refused(tmp_path):
    images = [np.zeros((8, 8), np.uint8)] * 4
    path = _dataset_dict(tmp_path / "d", {"train": {"image": images, "label": ["a", "b"] * 2},
                                          "test": {"image": images, "label": ["a"] * 4}})
    with pytest.raises(DatasetUnavailableError) as caught:
        load_dataset("folder", str(path))
    assert str(caught.value) == (
        f"dataset 'folder' at {path}: label column 'label' is not integer-like (e.g. "
        f"np.str_('a')); labels must be class indices 0..C-1 (name another column with "
        f"label-column)")


def test_one_split_only_is_refused(tmp_path):
    path = _dataset_dict(tmp_path / "d", {"train": {"image": [np.zeros((8, 8), np.uint8)] * 4,
                                                    "label": [0, 1, 0, 1]}})
    with pytest.raises(DatasetUnavailableError, match=r"at .*/d: needs a 'train' and a test "
                                                      r"split \('test' or 'validation' or "
                                                      r"'valid' or 'val'\); it has \['train'\]"):
        load_dataset("folder", str(path))


def test_an_image_side_the_generators_cannot_make_is_refused_with_the_size_to_use(tmp_path):
    write_imagefolder(tmp_path, size=30, per_class=(2, 1))
    config = RunConfig.from_mapping({"strategy": "mosaic", "dataset": "folder",
                                     "data-path": str(tmp_path), "num-clients": 2})
    with pytest.raises(ConfigError) as caught:
        build_strategy(config)
    assert str(caught.value) == (
        "invalid run config: image-size=30: dataset 'folder' has 30x30 images, but the image "
        "generators need a side divisible by 4: set image-size=32 to resize the images to 32x32")
    build_strategy(RunConfig.from_mapping({**config.to_mapping(), "image-size": 32}))


@pytest.mark.parametrize("key, value, message", [
    ("dataset", "nonsense", "must be one of cifar10, cifar100, digits, fashion-mnist, food101, "
                            "mnist, svhn, tiny-imagenet, a Hugging Face hub id (owner/name), "
                            "or 'folder' with data-path"),
    ("dataset", "folder", "'folder' needs data-path"),
    ("channels", 2, "must be 0 (the data's own), 1 (grey) or 3 (RGB)"),
    ("image-size", 2, "must be 0 (the data's own size) or in 4..1024"),
])
def test_data_keys_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_mapping({key: value})
