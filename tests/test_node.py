"""Per-node settings from a SuperNode's --node-config."""

import json

import pytest

from mosaic_flwr.config import RunConfig
from mosaic_flwr.node import NodeSettings


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
    ({"partition-id": 0, "gpu": 1}, "unknown keys ['gpu']"),
])
def test_bad_node_config_is_refused_clearly(node, needle):
    with pytest.raises(ValueError, match=None) as err:
        NodeSettings.from_node_config(node, RunConfig.from_mapping({"num-clients": 3}))
    assert needle in str(err.value)
