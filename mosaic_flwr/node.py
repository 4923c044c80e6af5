"""What one SuperNode says about itself: its partition, its own data, device, threads, logs.

The run config is the same on every node (the server sends it with each
message). A SuperNode's ``--node-config`` holds what differs between machines:

- ``partition-id`` (required) and ``num-partitions``: which share of the shared
  data set this node trains on (and its identity in the results);
- ``data-path``: a local folder with this node's *own* data set (same format as
  the run config's ``data-path``); the node then trains on all of its training
  split instead of a partition of the shared data;
- ``device`` (``cpu``, ``cuda``, ``cuda:N``) and ``num-threads``: override the
  run config on this node;
- ``model``: the model this node trains (``name@width``, e.g. ``resnet8@0.5``),
  instead of its ``client-models`` entry; the strategy must combine it with
  the global model (:mod:`mosaic_flwr.client_models`);
- ``log-dir``: an absolute folder where the node appends one JSON line per
  message it answered (``client-<partition-id>.jsonl``);
- ``state-dir``: an absolute folder on the node where it saves what it keeps
  between rounds, so that a resumed run continues it
  (:mod:`mosaic_flwr.node_state`; default: the server's run folder).

Example: ``flower-supernode ... --node-config "partition-id=0 num-partitions=3
device='cuda:1' num-threads=4 log-dir='/var/log/mosaic'"``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import DEVICES, RunConfig
from .models import ModelSpec

#: The node_config keys a SuperNode may set.
NODE_KEYS = ("partition-id", "num-partitions", "data-path", "device", "num-threads", "log-dir",
             "model", "state-dir")


@dataclass(frozen=True)
class NodeSettings:
    """One node's settings, checked against the run config."""

    partition_id: int
    data_path: str = ""
    device: str = ""
    num_threads: int = 0
    log_dir: str = ""
    model: str = ""
    state_dir: str = ""

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any], config: RunConfig) -> "NodeSettings":
        """Read and check a node's ``node_config`` (unknown keys are errors)."""
        unknown = sorted(set(node) - set(NODE_KEYS))
        if unknown:
            raise ValueError(f"node_config has unknown keys {unknown}; known: {', '.join(NODE_KEYS)}")
        if "partition-id" not in node:
            raise ValueError("node_config has no 'partition-id'; start the SuperNode with "
                             "--node-config \"partition-id=N num-partitions=M\"")
        pid = int(node["partition-id"])
        num = int(node.get("num-partitions", config.num_clients))
        if num != config.num_clients:
            raise ValueError(f"node_config num-partitions={num} but the run has "
                             f"num-clients={config.num_clients}; make them equal")
        if not 0 <= pid < config.num_clients:
            raise ValueError(f"partition-id={pid} is outside 0..{config.num_clients - 1}")
        device = str(node.get("device", ""))
        if device and not (device in DEVICES or device.startswith("cuda:")):
            raise ValueError(f"node_config device={device!r}: must be auto, cpu, cuda or cuda:N")
        threads = int(node.get("num-threads", 0))
        if "num-threads" in node and threads < 1:
            raise ValueError(f"node_config num-threads={threads}: must be >= 1")
        folders = {key: str(node.get(key, "")) for key in ("log-dir", "state-dir")}
        for key, folder in folders.items():
            if folder and not Path(folder).is_absolute():
                raise ValueError(f"node_config {key}={folder!r}: must be an absolute path")
        model = str(node.get("model", ""))
        if model:
            try:
                ModelSpec.parse(model)
            except ValueError as err:
                raise ValueError(f"node_config model={model!r}: {err}") from None
        return cls(pid, str(node.get("data-path", "")), device, threads, folders["log-dir"], model,
                   folders["state-dir"])

    def apply(self, config: RunConfig) -> RunConfig:
        """The run config as this node runs it (its device and thread count win; both
        were checked in :meth:`from_node_config`, the rest by the server)."""
        changes: dict[str, Any] = {}
        if self.device:
            changes["device"] = self.device
        if self.num_threads:
            changes["num_threads"] = self.num_threads
        return dataclasses.replace(config, **changes) if changes else config

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to this node's log file (no-op without ``log-dir``)."""
        if not self.log_dir:
            return
        folder = Path(self.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "partition-id": self.partition_id, **record})
        with (folder / f"client-{self.partition_id}.jsonl").open("a", encoding="utf-8") as out:
            out.write(line + "\n")
