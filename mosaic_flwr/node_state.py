"""What a node keeps between rounds, saved to disk so that it survives a restart.

Three methods keep client state between rounds in the node's ``context.state``:
FedCOG's previous local model, FedLGD's local virtual images and Spectral
Co-Distillation's personalised model. ``context.state`` lives as long as one
Flower run; a run continued with ``resume-from`` is a new Flower run, so without
a copy on disk that state would be gone and the continued run would differ from
one never stopped.

After every training message that leaves something in ``context.state``, the
node writes its array records to ``client-<partition>/round-<r>.pt`` in its
state folder (atomically, like a checkpoint) and keeps the newest
``checkpoint-keep + 1`` files (the server may resume from its oldest kept
checkpoint). A node whose ``context.state`` is empty at the start of round
``t`` (a new Flower run) loads the newest file of a round before ``t``: the
state it had after the last round the server's checkpoint covers, exactly what
an uninterrupted node would hold. Rounds after the checkpoint (run again after
a resume) are never read.

The state folder is, in this order: ``<state-dir>/<run folder name>`` when the
SuperNode's ``--node-config`` sets ``state-dir`` (a folder on the node's own
machine); else ``<run folder>/node-state`` when ``node-state='run-folder'``
(the default: simulations, and nodes sharing the server's file system); none
with ``node-state='memory'``, with ``checkpoint-keep=0`` (nothing can be
resumed) or when the server names no run folder (a strategy inside another
ServerApp). The state never leaves the node: the file is written where the node
runs. A node that cannot write there logs a warning and goes on (its state is
then kept in memory only).
"""

from __future__ import annotations

import re
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.supercore import log

from .checkpoint import save_atomic
from .config import RunConfig

#: The sub-folder of a run folder that holds the nodes' state (``node-state='run-folder'``).
RUN_FOLDER_STATE = "node-state"
_ROUND_FILE = re.compile(r"round-(\d+)\.pt")


def state_folder(config: RunConfig, run_folder: str, node_state_dir: str, partition_id: int
                 ) -> Path | None:
    """Where this node's state goes (see the module docstring), or None to keep it in
    memory only. ``run_folder``: the server's run folder ('' when it names none);
    ``node_state_dir``: the node's ``state-dir`` ('' when unset)."""
    if not run_folder or config.checkpoint_keep == 0:
        return None
    if node_state_dir:
        base = Path(node_state_dir) / Path(run_folder).name
    elif config.node_state == "run-folder":
        base = Path(run_folder) / RUN_FOLDER_STATE
    else:
        return None
    return base / f"client-{partition_id}"


def saved_rounds(folder: Path) -> list[int]:
    """The rounds whose state a node folder holds, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir()
                  if (m := _ROUND_FILE.fullmatch(p.name)))


def save_state(folder: Path, server_round: int, state: RecordDict, keep: int) -> None:
    """Write the array records of ``state`` as round ``server_round``'s file and keep the
    newest ``keep`` files. An unwritable folder is a warning, not an error."""
    records = {name: record.to_torch_state_dict() for name, record in state.array_records.items()}
    if not records:
        return
    try:
        save_atomic(records, folder / f"round-{server_round:05d}.pt")
        for old in saved_rounds(folder)[:-keep]:
            (folder / f"round-{old:05d}.pt").unlink(missing_ok=True)
    except OSError as err:
        log(WARNING, "node state not saved to %s (%s): it is kept in memory only and a "
            "resumed run starts this client's state afresh", folder, err)


def restore_state(folder: Path, server_round: int, state: RecordDict) -> int | None:
    """Load into an empty ``state`` the newest saved round before ``server_round``; return
    that round, or None when nothing was loaded (state not empty, or no such file)."""
    if len(state.array_records):
        return None
    earlier = [r for r in saved_rounds(folder) if r < server_round]
    if not earlier:
        return None
    records = torch.load(folder / f"round-{earlier[-1]:05d}.pt", map_location="cpu",
                         weights_only=True)
    for name, arrays in records.items():
        state[name] = ArrayRecord(arrays)
    return earlier[-1]
