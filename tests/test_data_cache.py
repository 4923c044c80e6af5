"""The decoded-data cache: one entry per data set and source, built once, safe under races."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mosaic_flwr.data import datasets as ds
from mosaic_flwr.data import cache as cache_module
from mosaic_flwr.data.cache import ARRAYS, cached_decode

from test_datasets import fake_mnist

# The racers load cache.py alone (it imports only numpy): importing the package would
# import torch, 1.4 s per process.
RACER = textwrap.dedent(f"""
    import importlib.util, sys, time
    import numpy as np
    spec = importlib.util.spec_from_file_location("cache", {cache_module.__file__!r})
    cache = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache)
    cached_decode = cache.cached_decode

    def decode():
        with open(sys.argv[1], "a") as log:
            log.write("decoded\\n")
        deadline = time.monotonic() + 60
        while open(sys.argv[1]).read().count("decoded") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until both racers are inside decode()
        rng = np.random.default_rng(7)
        return (rng.integers(0, 256, (50, 1, 4, 4), dtype=np.uint8), np.arange(50),
                rng.integers(0, 256, (10, 1, 4, 4), dtype=np.uint8), np.arange(10)), {{"n": 50}}

    arrays, meta = cached_decode("race", "k1", decode)
    assert meta == {{"n": 50}}
    print(sum(int(a.astype(np.int64).sum()) for a in arrays), type(arrays[0]).__name__)
""")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_FLWR_CACHE", str(tmp_path / "cache"))
    ds.load_dataset.cache_clear()
    yield tmp_path / "cache" / "data"
    ds.load_dataset.cache_clear()


def test_two_processes_racing_leave_one_complete_entry(cache, tmp_path):
    log = tmp_path / "decodes.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(log)], env=env,
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=120)[0].split() for r in racers]
    assert [r.returncode for r in racers] == [0, 0]
    assert outputs[0][0] == outputs[1][0]  # the same arrays in both
    assert log.read_text().count("decoded") == 2  # both decoded: they raced
    assert [p.name for p in cache.iterdir()] == ["race-k1"]  # one entry, no partial folder
    assert sorted(p.name for p in (cache / "race-k1").iterdir()) == sorted(
        [f"{name}.npy" for name in ARRAYS] + ["meta.json"])
    # A later process maps the entry and decodes nothing.
    later = subprocess.run([sys.executable, "-c", RACER, str(log)], env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    assert later == [outputs[0][0], "memmap"]
    assert log.read_text().count("decoded") == 2


def test_an_entry_is_read_back_instead_of_decoded(cache):
    calls = []

    def decode():
        calls.append(1)
        return (np.full((3, 1, 2, 2), 9, np.uint8), np.array([0, 1, 2]),
                np.zeros((1, 1, 2, 2), np.uint8), np.array([1])), {"classes": ["a", "b", "c"]}

    first, _ = cached_decode("toy", "k", decode)
    second, meta = cached_decode("toy", "k", decode)
    other, _ = cached_decode("toy", "another-key", decode)
    assert len(calls) == 2  # "k" once, "another-key" once
    assert meta == {"classes": ["a", "b", "c"]}
    assert isinstance(second[0], np.memmap) and second[0].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert all(np.array_equal(a, b) for a, b in zip(second, other))


def test_an_unwritable_cache_folder_decodes_in_every_process(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MOSAIC_FLWR_CACHE", str(blocker))
    arrays, _ = cached_decode("toy", "k", lambda: ((np.ones((2, 1, 2, 2), np.uint8), np.arange(2),
                                                    np.ones((1, 1, 2, 2), np.uint8),
                                                    np.arange(1)), {}))
    assert arrays[0].sum() == 8 and not isinstance(arrays[0], np.memmap)


def test_a_data_path_is_decoded_once_until_its_files_change(cache, tmp_path, monkeypatch):
    import datasets  # pylint: disable=import-outside-toplevel

    folder = tmp_path / "mnist"
    datasets.DatasetDict({"train": fake_mnist(20, 0), "test": fake_mnist(6, 1)}).save_to_disk(
        str(folder))
    first = ds.load_dataset("mnist", str(folder))
    ds.load_dataset.cache_clear()
    decoded = []
    real_load_local = ds._load_local  # pylint: disable=protected-access

    def counting_load_local(spec, path):
        decoded.append(path)
        return real_load_local(spec, path)

    monkeypatch.setattr(ds, "_load_local", counting_load_local)
    again = ds.load_dataset("mnist", str(folder))
    assert decoded == []  # mapped from the cache
    assert np.array_equal(first.train_images, again.train_images)
    assert np.array_equal(first.test_labels, again.test_labels)
    # New data at the same path: a new entry, decoded from the new files.
    datasets.DatasetDict({"train": fake_mnist(12, 2), "test": fake_mnist(6, 1)}).save_to_disk(
        str(folder))
    ds.load_dataset.cache_clear()
    changed = ds.load_dataset("mnist", str(folder))
    assert decoded == [folder.resolve()] and len(changed.train_labels) == 12
    assert len(list(cache.iterdir())) == 2
