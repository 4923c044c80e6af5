"""Checks that run before anything starts, so a mistake costs seconds, not a SuperLink.

``mosaic-flwr simulate`` and ``compare`` call :func:`preflight` on every run's
config before they start a SuperLink: the data set loads and holds enough
samples for the partitions, the output folder can be written, and the device
and the GPU share asked for exist. The ServerApp, which plain ``flwr run`` and
deployments start without the launcher, runs the same checks on its own
(:func:`check_device`, :func:`check_output_dir`; the data checks are its data
loading) with the same wording. Each failure is a :class:`ConfigError` or
:class:`DatasetUnavailableError` whose one line names the key, value or path
and what to do.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .config import RunConfig
from .errors import ConfigError


def check_device(device: str, gpus_per_client: float = 0.0) -> None:
    """``device`` and ``--gpus-per-client`` ask only for hardware this machine has."""
    import torch  # pylint: disable=import-outside-toplevel

    wants_cuda = device.startswith("cuda")
    if (wants_cuda or gpus_per_client > 0) and not torch.cuda.is_available():
        key, value = ("device", device) if wants_cuda else ("--gpus-per-client", gpus_per_client)
        raise ConfigError(key, value, "CUDA is not available on this machine (no GPU, or a CPU "
                                      "build of torch); use device='cpu' (or 'auto') and "
                                      "--gpus-per-client 0")
    if device.startswith("cuda:") and int(device.split(":", 1)[1]) >= torch.cuda.device_count():
        raise ConfigError("device", device, f"this machine has {torch.cuda.device_count()} CUDA "
                                            f"device(s), numbered from 0")


def check_output_dir(config: RunConfig) -> None:
    """The folder results go to can be created and written."""
    from .results import DEFAULT_OUTPUT_DIR  # pylint: disable=import-outside-toplevel

    base = Path(config.output_dir) if config.output_dir else DEFAULT_OUTPUT_DIR
    try:
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise ConfigError("output-dir", str(base), f"cannot write there ({err.strerror or err}); "
                                                   f"choose a folder you can write") from None


def preflight(config: RunConfig, gpus_per_client: float = 0.0) -> None:
    """Everything a run needs that can be checked without starting it (see the module doc)."""
    from .data import load_data, partitions_for  # pylint: disable=import-outside-toplevel

    check_output_dir(config)
    check_device(config.device, gpus_per_client)
    load_data(config)
    partitions_for(config)
