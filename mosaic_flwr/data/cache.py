"""Data decoded once per machine: a compact on-disk cache every later process maps.

Decoding a data set (reading a ``save_to_disk`` folder, parquet files or an
imagefolder tree, or a hub download, through the ``datasets`` library) costs
every process that needs it the ``datasets`` import (about 1 s) plus the
decoding itself (for 60,000 PNG images, tens of seconds). In a simulation the
ServerApp and every Ray actor load the same data set, and a comparison repeats
that for every run. So the first process that decodes a data set writes its
arrays, uint8 pixels and int64 labels as ``.npy`` files, and what it read from
the data (classes, shape, normalisation) as ``meta.json``, into a folder of
:func:`cache_dir` named by a key of everything the result depends on; every
later process maps the images read-only-shared from the page cache
(``numpy.load(mmap_mode="c")``: pages are shared between processes until one
writes to them, which the project never does).

The key covers the data set's registered name and shape, the source (the
resolved ``data-path`` with the name, size and modification time of every file
under it, or the hub id and config), and :data:`CACHE_FORMAT`, which changes
whenever the decoding does. A changed file under ``data-path`` therefore makes
a new entry; old entries are never read again and may be deleted at any time
(``rm -r ~/.cache/mosaic-flwr/data``).

The entry is written into a private temporary folder and renamed into place,
so concurrent processes never read half an entry: when two race, both decode,
one rename wins and the other process discards its copy and maps the winner's.
Where the cache folder cannot be written (a read-only home), every process
decodes on its own, as without a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

#: Changes whenever what a cache entry holds, or how it is decoded, changes.
CACHE_FORMAT = 2

#: The arrays of an entry, in :class:`~mosaic_flwr.data.datasets.ImageData` order.
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def cache_dir() -> Path:
    """Where computed data (decoded data sets, partitions) are kept between processes:
    ``$MOSAIC_FLWR_CACHE``, else ``$XDG_CACHE_HOME/mosaic-flwr``, else
    ``~/.cache/mosaic-flwr``."""
    if os.environ.get("MOSAIC_FLWR_CACHE"):
        return Path(os.environ["MOSAIC_FLWR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mosaic-flwr"


def folder_signature(path: Path) -> str:
    """Every file under ``path`` (relative name, size, modification time), one per line:
    a changed, added or removed file changes it."""
    lines = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            lines.append(f"{os.path.relpath(os.path.join(root, name), path)}\t"
                         f"{stat.st_size}\t{stat.st_mtime_ns}")
    return "\n".join(lines)


def entry_key(*parts: object) -> str:
    """The cache key of a decoded data set: a hash of ``parts`` and :data:`CACHE_FORMAT`."""
    text = repr((CACHE_FORMAT, *parts)).encode()
    return hashlib.sha256(text).hexdigest()[:32]


Decoded = tuple[tuple[np.ndarray, ...], dict]


def cached_decode(name: str, key: str, decode: Callable[[], Decoded]) -> Decoded:
    """The arrays of :data:`ARRAYS` and the JSON-able facts for ``key``: mapped from the
    cache when an entry exists, else ``decode()``d, written to the cache (atomically)
    and returned. ``name`` starts the entry's folder name (any characters)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    entry = cache_dir() / "data" / f"{safe}-{key}"
    stored = _read(entry)
    if stored is not None:
        return stored
    arrays, meta = decoded = decode()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for array_name, array in zip(ARRAYS, arrays):
            np.save(partial / f"{array_name}.npy", np.ascontiguousarray(array))
        (partial / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(partial, entry)  # atomic; fails when another process was first
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
    except OSError:
        return decoded  # the cache folder is not writable: decode in every process
    stored = _read(entry)
    return decoded if stored is None else stored


def _read(entry: Path) -> Decoded | None:
    """A complete entry's arrays (images mapped, labels read) and facts, or None."""
    try:
        arrays = tuple(np.load(entry / f"{array_name}.npy",
                               mmap_mode="c" if array_name.endswith("images") else None)
                       for array_name in ARRAYS)
        return arrays, json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
