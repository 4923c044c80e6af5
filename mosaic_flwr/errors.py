"""Every error type the project raises on purpose; this module imports nothing of the project.

Keeping them here lets any module (settings, data, strategies, the command
line) raise or catch them without importing the module that aggregates
everything, so the import graph stays a tree.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A run-config value that is not allowed; the message names key, value and rule."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid run config: {key}={value!r}: {allowed}")


class DatasetUnavailableError(RuntimeError):
    """A data set could not be loaded; the message says where we looked and what to do."""


class NotEnoughRepliesError(RuntimeError):
    """Fewer usable replies than ``min-clients`` in a round."""


class FederationTooSmallError(RuntimeError):
    """Fewer SuperNodes connected than ``num-clients`` within ``node-wait-timeout``."""


class ResumeError(RuntimeError):
    """A run cannot be resumed from a folder; the message names the file and the reason."""
