"""Per-node settings from a SuperNode's --node-config."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from mosaic_flwr.config import RunConfig
from mosaic_flwr.node import NodeSettings
from mosaic_flwr.node_state import restore_state, save_state, saved_rounds, state_folder


def test_node_settings_override_device_and_threads_and_log(tmp_path):
    config = RunConfig.from_mapping({"num-clients": 3, "device": "auto", "num-threads": 1})
    node = NodeSettings.from_node_config(
        {"partition-id": 2, "num-partitions": 3, "device": "cpu", "num-threads": 4,
         "log-dir": str(tmp_path / "logs")}, config)
    applied = node.apply(config)
    assert (node.partition_id, applied.device, applied.num_threads) == (2, "cpu", 4)
    assert (config.device, config.num_threads) == ("auto", 1)
    node.log({"message": "train", "train-loss": 0.5})
    node.log({"message": "evaluate"})
    lines = (tmp_path / "logs" / "client-2.jsonl").read_text().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["train", "evaluate"]
    assert json.loads(lines[0])["train-loss"] == 0.5


def test_node_settings_without_overrides_keep_the_run_config():
    config = RunConfig.from_mapping({"num-clients": 3})
    node = NodeSettings.from_node_config({"partition-id": 0}, config)
    assert node.apply(config) is config
    node.log({"message": "train"})  # no log-dir: nothing written, no error


@pytest.mark.parametrize("node, needle", [
    ({}, "no 'partition-id'"),
    ({"partition-id": 3}, "outside 0..2"),
    ({"partition-id": 0, "num-partitions": 5}, "num-partitions=5"),
    ({"partition-id": 0, "device": "tpu"}, "device='tpu'"),
    ({"partition-id": 0, "num-threads": 0}, "num-threads=0"),
    ({"partition-id": 0, "log-dir": "relative"}, "absolute"),
    ({"partition-id": 0, "state-dir": "relative"}, "state-dir='relative': must be an absolute"),
    ({"partition-id": 0, "gpu": 1}, "unknown keys ['gpu']"),
])
def test_bad_node_config_is_refused_clearly(node, needle):
    with pytest.raises(ValueError, match=None) as err:
        NodeSettings.from_node_config(node, RunConfig.from_mapping({"num-clients": 3}))
    assert needle in str(err.value)


def test_the_state_folder_is_the_nodes_own_then_the_run_folder_else_none(tmp_path):
    run = str(tmp_path / "outputs" / "run-a")
    config = RunConfig.from_mapping({"num-clients": 3})
    assert state_folder(config, run, "", 2) == tmp_path / "outputs" / "run-a" / "node-state" / "client-2"
    assert state_folder(config, run, "/var/state", 1).as_posix() == "/var/state/run-a/client-1"
    memory = RunConfig.from_mapping({"num-clients": 3, "node-state": "memory"})
    assert state_folder(memory, run, "", 0) is None
    assert state_folder(memory, run, "/var/state", 0).as_posix() == "/var/state/run-a/client-0"
    no_checkpoints = RunConfig.from_mapping({"num-clients": 3, "checkpoint-keep": 0})
    assert state_folder(no_checkpoints, run, "/var/state", 0) is None  # nothing to resume
    assert state_folder(config, "", "/var/state", 0) is None  # the server names no run folder


def _state(value: float) -> RecordDict:
    return RecordDict({"kept": ArrayRecord({"w": torch.full((2, 3), value)})})


def test_a_restarted_node_gets_the_state_of_the_last_round_before_the_one_it_is_asked_for(
        tmp_path):
    for rnd in (1, 2, 4, 5):  # it took no part in round 3
        save_state(tmp_path, rnd, _state(float(rnd)), keep=3)
    assert saved_rounds(tmp_path) == [2, 4, 5]  # the newest `keep`
    save_state(tmp_path, 6, RecordDict(), keep=3)  # nothing kept: nothing written
    assert saved_rounds(tmp_path) == [2, 4, 5]
    for asked, expected in ((6, 5), (5, 4), (4, 2), (3, 2)):  # resumed after round asked - 1
        state = RecordDict()
        assert restore_state(tmp_path, asked, state) == expected
        assert torch.equal(state.array_records["kept"].to_torch_state_dict()["w"],
                           torch.full((2, 3), float(expected)))
    assert restore_state(tmp_path, 2, RecordDict()) is None  # nothing from before round 2
    held = _state(9.0)
    assert restore_state(tmp_path, 6, held) is None  # a node that has its state keeps it
    assert held.array_records["kept"].to_torch_state_dict()["w"][0, 0] == 9.0


def test_a_node_that_cannot_write_its_state_warns_and_goes_on(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    save_state(blocker / "client-0", 1, _state(1.0), keep=2)
    assert "node state not saved" in caplog.text
