"""Run configuration: defaults, presets, precedence, and one clear error per mistake."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from mosaic_flwr.config import ConfigError, RunConfig, available_presets, load_preset, resolve_run_config
from mosaic_flwr.mosaic.settings import MosaicSettings
from mosaic_flwr.server import message_config

ROOT = Path(__file__).resolve().parent.parent


def app_defaults() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as stream:
        return tomllib.load(stream)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_equal_the_dataclass_defaults():
    assert app_defaults() == RunConfig().to_mapping()


def test_issue_keys_exist_with_their_names():
    required = {"strategy", "dataset", "data-path", "partitioner", "dirichlet-alpha",
                "num-server-rounds", "local-epochs", "batch-size", "learning-rate", "model",
                "seed", "output-dir", "wandb"}
    assert required <= set(RunConfig.keys())


@pytest.mark.parametrize("key,value,message", [
    ("strategy", "fedsgd", "strategy='fedsgd': must be one of dense, ditto, fedavg, fedcog, feddf, fedftg"),
    ("dataset", "imagenet", "dataset='imagenet': must be one of"),
    ("model", "vgg", "model='vgg': must be one of cnn, resnet18, resnet8"),
    ("partitioner", "shards", "partitioner='shards': must be one of"),
    ("dirichlet-alpha", 0.0, "dirichlet-alpha=0.0: must be > 0"),
    ("dirichlet-alpha", -1.0, "dirichlet-alpha=-1.0: must be > 0"),
    ("learning-rate", -0.1, "learning-rate=-0.1: must be > 0"),
    ("num-clients", 0, "num-clients=0: must be an integer >= 1"),
    ("num-server-rounds", 0, "num-server-rounds=0: must be an integer >= 1"),
    ("batch-size", 2.5, "batch-size=2.5: must be an integer"),
    ("min-clients", 11, "min-clients=11: must be <= num-clients (10)"),
    ("fraction-train", 1.5, "fraction-train=1.5: must be in (0, 1]"),
    ("output-dir", "relative/path", "output-dir='relative/path': must be an absolute path"),
    ("wandb", "yes", "wandb='yes': must be true or false"),
    ("device", "tpu", "device='tpu': must be one of auto, cpu, cuda, cuda:N"),
    ("no-such-key", 1, "no-such-key=1: unknown key"),
    ("proxy-fraction", 1.0, "proxy-fraction=1.0: must be in [0, 1)"),
    ("fedgen-generator-lr", 0.0, "fedgen-generator-lr=0.0: must be > 0"),
    ("fedgen-alpha", -1.0, "fedgen-alpha=-1.0: must be >= 0"),
    ("fedftg-batch-size", 0, "fedftg-batch-size=0: must be an integer >= 1"),
    ("dense-student-init", "pretrained", "dense-student-init='pretrained': must be one of fresh, average"),
    ("dense-temperature", 0.0, "dense-temperature=0.0: must be > 0"),
    ("feddf-inputs", "web", "feddf-inputs='web': must be one of generators, proxy"),
    ("fedcog-start-round", 0, "fedcog-start-round=0: must be an integer >= 1"),
    ("server-threads", -1, "server-threads=-1: must be >= 0 (0: all cores)"),
    ("cpu-bf16", "on", "cpu-bf16='on': must be true or false"),
    ("mosaic-distill-pool-batches", -1, "mosaic-distill-pool-batches=-1: must be an integer >= 0"),
    ("mosaic-generator-width", -8, "mosaic-generator-width=-8: must be an integer >= 0"),
    ("dense-generator-width", -8, "dense-generator-width=-8: must be >= 0"),
    ("local-steps", -1, "local-steps=-1: must be >= 0"),
    ("mosaic-distill-fraction", 0.0, "mosaic-distill-fraction=0.0: must be in (0, 1]"),
    ("mosaic-trust-holdout", 1.0, "mosaic-trust-holdout=1.0: must be in [0, 1)"),
    ("mosaic-trust-mixes", 0, "mosaic-trust-mixes=0: must be an integer in 1..100"),
    ("mosaic-finetune-anchor", -1.0, "mosaic-finetune-anchor=-1.0: must be >= 0"),
    ("mosaic-trust", "yes", "mosaic-trust='yes': must be true or false"),
])
def test_each_bad_value_names_key_value_and_rule(key, value, message):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_mapping({key: value})
    assert message in str(caught.value)


@pytest.mark.parametrize("values,message", [
    ({"strategy": "fedcog", "num-server-rounds": 5, "fedcog-start-round": 6},
     "fedcog-start-round=6: must be <= num-server-rounds (5)"),
    ({"strategy": "feddf", "feddf-inputs": "proxy"},
     "feddf-inputs='proxy': 'proxy' needs proxy-fraction > 0"),
])
def test_a_strategy_checks_what_it_needs_from_the_rest_of_the_config(values, message):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_mapping(values)
    assert message in str(caught.value)
    # The same values are fine for another strategy (the rule is the strategy's).
    RunConfig.from_mapping({**values, "strategy": "fedavg"})
    assert "\n" not in str(caught.value)


def test_preset_overrides_defaults_and_explicit_values_override_the_preset():
    fused = {**app_defaults(), "preset": "digits-dirichlet", "dirichlet-alpha": 0.7}
    config = resolve_run_config(fused, explicit={"preset": "digits-dirichlet",
                                                 "dirichlet-alpha": 0.7})
    assert config.partitioner == "dirichlet"  # from the preset
    assert config.dirichlet_alpha == 0.7  # explicit wins over the preset's 0.1


def test_explicit_value_equal_to_the_default_still_beats_the_preset():
    explicit = {"preset": "digits-dirichlet", "partitioner": "iid"}
    config = resolve_run_config({**app_defaults(), **explicit}, explicit=explicit)
    assert config.partitioner == "iid"


def test_without_explicit_overrides_values_differing_from_defaults_count_as_explicit():
    fused = {**app_defaults(), "preset": "digits-dirichlet", "seed": 3}
    config = resolve_run_config(fused)
    assert (config.partitioner, config.seed) == ("dirichlet", 3)


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"preset='nope'.*shipped presets: .*digits-dirichlet"):
        resolve_run_config({**app_defaults(), "preset": "nope"})


def test_preset_with_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: digits\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate=0.1: unknown key in preset"):
        load_preset(str(path))


def test_a_preset_starts_from_the_preset_it_names_and_a_cycle_is_refused(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("preset: digits-dirichlet\ndirichlet-alpha: 0.5\nseed: 4\n")
    values = load_preset(str(child))
    assert values == {**load_preset("digits-dirichlet"), "dirichlet-alpha": 0.5, "seed": 4}
    assert values["partitioner"] == "dirichlet"  # from the base
    (tmp_path / "a.yaml").write_text(f"preset: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"preset: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="presets name each other in a cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_preset(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("name", available_presets())
def test_every_shipped_preset_is_valid(name):
    config = resolve_run_config({**app_defaults(), "preset": name})
    assert config.preset == name


def test_round_trip_through_a_config_record_mapping():
    config = RunConfig.from_mapping({"strategy": "fedprox", "seed": 4, "learning-rate": 0.2,
                                     "mosaic-meta-dim": 40, "feddf-steps": 7})
    assert RunConfig.from_mapping(config.to_mapping()) == config


def test_method_keys_land_in_their_typed_section():
    config = RunConfig.from_mapping({"mosaic-warmup-rounds": 3, "fedgen-noise-dim": 8,
                                     "feddf-generator-steps": 5})
    assert config.mosaic == MosaicSettings(warmup_rounds=3)
    assert config.fedgen.noise_dim == 8 and config.feddf.generator_steps == 5
    assert config.mosaic.generator_steps == 200  # FedDF's generator keys are its own
    assert config.to_mapping()["mosaic-warmup-rounds"] == 3
    assert dataclasses.is_dataclass(config.mosaic) and not hasattr(config, "mosaic_warmup_rounds")


def test_a_message_carries_the_core_keys_and_a_client_rebuilds_them_without_revalidating():
    config = RunConfig.from_mapping({"strategy": "mosaic", "mosaic-warmup-rounds": 3})
    record = message_config(config)
    assert set(record.keys()) == set(RunConfig.core_keys())
    assert not any(key.startswith("mosaic-") for key in record.keys())
    rebuilt = RunConfig.from_mapping(dict(record.items()), validate=False)
    assert rebuilt.core_mapping() == config.core_mapping()
    # validate=False really skips the checks (the server ran them once).
    bad = RunConfig.from_mapping({"num-clients": 0}, validate=False)
    assert bad.num_clients == 0
    with pytest.raises(ConfigError):
        bad.validate()


def test_the_serverapp_takes_every_core_it_may_use_unless_told():
    import os  # pylint: disable=import-outside-toplevel

    from mosaic_flwr.server import server_threads  # pylint: disable=import-outside-toplevel

    assert server_threads(RunConfig(server_threads=3)) == 3
    assert server_threads(RunConfig()) == len(os.sched_getaffinity(0))
