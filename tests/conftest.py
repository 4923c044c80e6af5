"""Shared fixtures."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity


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
