"""Shared fixtures, and the small in-process runs several test modules read.

Each configuration in :data:`harness.TINY` runs once per test session
(in-process, through :func:`harness.run_inline`), the first time a test asks for it.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from harness import TINY, InlineRun, run_inline

# One thread per torch op in the test process, as every ClientApp runs (num-threads = 1):
# the small models here gain nothing from more, and on a 2-core machine shared with
# SuperLinks, Ray actors or other jobs, more threads than free cores slow each op down
# many times over.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Decoded data sets and partitions go to a folder of this session's own, in this
    process and in every process a test starts (SuperLinks, Ray actors inherit the
    environment): the suite neither reads nor fills the user's cache."""
    saved = os.environ.get("MOSAIC_FLWR_CACHE")
    os.environ["MOSAIC_FLWR_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        del os.environ["MOSAIC_FLWR_CACHE"]
    else:
        os.environ["MOSAIC_FLWR_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_run() -> Callable[[str], InlineRun]:
    """``tiny_run("fedgen")``: the tiny run of that strategy (run once per session)."""
    done: dict[str, InlineRun] = {}

    def get(strategy: str) -> InlineRun:
        if strategy not in done:
            done[strategy] = run_inline(TINY[strategy])
        return done[strategy]
    return get


@pytest.fixture(scope="session")
def fedavg3() -> InlineRun:
    """FedAvg over three tiny rounds: what the personalised methods' global model and a
    strategy whose server step is refused must reproduce."""
    return run_inline({**TINY["fedavg"], "num-server-rounds": 3})


@pytest.fixture
def task_identity():
    """Lets a test build Flower Messages outside a running Flower runtime."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # pylint: disable=protected-access
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # pylint: disable=protected-access


@pytest.fixture
def skewed_labels() -> np.ndarray:
    """2,000 labels over 10 balanced classes."""
    return np.repeat(np.arange(10), 200)
