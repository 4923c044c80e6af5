"""Checkpoints: what a run needs to continue after a crash, written after every round.

After round ``r`` the ServerApp writes ``<run folder>/checkpoints/round-<r>.pt``
(``torch.save`` of one dictionary, written to a temporary file and renamed, so
a crash never leaves a half-written checkpoint under that name) and deletes all
but the newest ``checkpoint-keep``. At the end of the run the global model also
goes to ``final_model.pt``. A checkpoint holds:

- ``format`` and ``code_version``: a checkpoint of another format or of
  another version of mosaic-flwr is refused, not misread;
- ``config``: the run config (run-config keys), compared with the resuming
  run's except for :data:`MAY_CHANGE`;
- ``round``, ``arrays`` (the global model's state dict after that round),
  ``initial`` (the score before round 1), ``rounds`` (every round record so far,
  what ``metrics.jsonl`` holds) and ``elapsed_seconds``;
- ``strategy``: :meth:`~mosaic_flwr.task_strategy.TaskStrategy.state_dict`,
  every piece of server state a later round reads (random streams, a server
  generator and its optimiser, model groups, ...);
- ``rng``: the ServerApp process's global random states (``random``, numpy,
  torch).

Client-side state does not travel to the server: a client's training randomness
is derived from the run seed, its partition and the round (``round_seed``), so
it needs no saving. What clients keep across rounds in ``context.state``
(FedCOG's previous local model, FedLGD's local virtual images, Spectral
Co-Distillation's personalised model) each node saves itself after every round,
where it runs (:mod:`mosaic_flwr.node_state`), and loads again when a resumed
run reaches it; with ``node-state='memory'`` it is lost in a restart and starts
afresh as in round 1.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import ResumeError

#: Bumped whenever what a checkpoint holds changes meaning.
FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL = "final_model.pt"
#: Run-config keys a resumed run may set differently: where results go and how the
#: run is watched, never what it computes.
MAY_CHANGE = frozenset({"resume-from", "output-dir", "run-name", "checkpoint-keep",
                        "node-wait-timeout", "round-timeout", "server-threads", "node-state",
                        "wandb", "wandb-project", "wandb-mode"})


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    """Where the checkpoint of one round goes."""
    return run_dir / CHECKPOINT_DIR / f"round-{server_round:05d}.pt"


def checkpoints(run_dir: Path) -> list[Path]:
    """A run folder's checkpoints, oldest first (empty when it has none)."""
    return sorted((run_dir / CHECKPOINT_DIR).glob("round-*.pt"))


def save_atomic(payload: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder, flushed to
    disk and renamed: readers see the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as stream:
        torch.save(payload, stream)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def rng_states() -> dict[str, Any]:
    """The process-wide random states the ServerApp's code draws from."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` returned."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def write_checkpoint(run_dir: Path, server_round: int, payload: dict[str, Any], keep: int
                     ) -> Path:
    """Write one round's checkpoint (plus format and version) and keep only the newest ``keep``."""
    path = checkpoint_path(run_dir, server_round)
    save_atomic({"format": FORMAT, "code_version": __version__, "round": server_round,
                 **payload}, path)
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run folder, or :class:`ResumeError`."""
    if not run_dir.is_dir():
        raise ResumeError(f"{run_dir}: no such run folder")
    found = checkpoints(run_dir)
    if not found:
        raise ResumeError(f"{run_dir / CHECKPOINT_DIR}: no checkpoint to resume from (the run "
                          f"wrote none: it stopped before its first round ended, or "
                          f"checkpoint-keep=0)")
    return found[-1]


def load_checkpoint(path: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint and check it fits this code and ``config`` (run-config keys).

    Every reason not to resume is one :class:`ResumeError` line naming the file.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ResumeError(f"{path}: truncated or corrupt checkpoint ({err})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise ResumeError(f"{path}: not a mosaic-flwr checkpoint")
    if payload["format"] != FORMAT or payload.get("code_version") != __version__:
        raise ResumeError(f"{path}: written by mosaic-flwr {payload.get('code_version')} "
                          f"(checkpoint format {payload['format']}), this is {__version__} "
                          f"(format {FORMAT}); resume it with that version")
    if config is not None:
        differ = config_difference(payload["config"], config)
        if differ:
            raise ResumeError(f"{path}: the run was configured differently: {differ}; resume "
                              f"with the run's own configuration (mosaic-flwr simulate --resume "
                              f"reads it from the run folder)")
    return payload


def config_difference(saved: dict[str, Any], current: dict[str, Any],
                      where: str = "in the checkpoint") -> str:
    """The keys (outside :data:`MAY_CHANGE`) on which two run configs differ, in words."""
    keys = sorted((set(saved) | set(current)) - MAY_CHANGE)
    return ", ".join(f"{k}={saved.get(k)!r} {where}, {current.get(k)!r} now"
                     for k in keys if saved.get(k) != current.get(k))


def save_final_model(run_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    """The final global model's state dict, as ``final_model.pt`` in the run folder."""
    path = run_dir / FINAL_MODEL
    save_atomic(state, path)
    return path
