"""Clients that train different models: assignment, configuration, experts, strategies in-process."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from inline_grid import InlineGrid
from torch import nn

from mosaic_flwr.client_models import assign_client_models, client_model_spec, global_model_spec
from mosaic_flwr.config import ConfigError, RunConfig, load_preset
from mosaic_flwr.data import load_dataset
from mosaic_flwr.local_only import local_only, summarise
from mosaic_flwr.models import ModelSpec
from mosaic_flwr.mosaic.client import probe_head
from mosaic_flwr.mosaic.experts import expert_weights, mixed_expert_logits, mixture_log_probs
from mosaic_flwr.node import NodeSettings
from mosaic_flwr.records import (LABEL_COUNTS, PROBE_BIAS, PROBE_WEIGHT, PROTOTYPE_LABELS,
                                 PROTOTYPES, STATS_RECORD, TASK_RECORD)
from mosaic_flwr.server import CentralEvaluator
from mosaic_flwr.strategies import build_strategy

CNN = ModelSpec("cnn")


# ------------------------------------------------------------------ naming and assignment
def test_model_spec_parses_and_prints():
    assert ModelSpec.parse("resnet18@0.5") == ModelSpec("resnet18", 0.5)
    assert ModelSpec.parse(" cnn ") == ModelSpec("cnn", 1.0)
    assert str(ModelSpec("resnet8", 0.25)) == "resnet8@0.25"
    assert ModelSpec.parse(str(ModelSpec("cnn", 0.5))) == ModelSpec("cnn", 0.5)
    assert ModelSpec("cnn", 0.5).holds_slice_of(ModelSpec("cnn", 1.0))
    assert not ModelSpec("cnn", 1.0).holds_slice_of(ModelSpec("cnn", 0.5))
    assert not ModelSpec("resnet8", 0.5).holds_slice_of(ModelSpec("cnn", 1.0))
    for bad, words in (("vgg", "unknown model"), ("cnn@x", "bad model width"), ("cnn@0", "> 0")):
        with pytest.raises(ValueError, match=words):
            ModelSpec.parse(bad)


def test_capacity_groups_are_dealt_evenly_by_a_seeded_rule():
    groups = "cnn@1.0,cnn@0.5,cnn@0.25"
    models = assign_client_models(groups, 10, seed=0, default=CNN)
    assert sorted(Counter(str(m) for m in models).values()) == [3, 3, 4]
    assert models == assign_client_models(groups, 10, seed=0, default=CNN)
    assert models != assign_client_models(groups, 10, seed=1, default=CNN)
    assert assign_client_models("", 4, seed=0, default=CNN) == [CNN] * 4


def test_explicit_mapping_names_every_partition_once():
    models = assign_client_models("0-1:cnn, 2:resnet8@0.5, 3:cnn@0.5", 4, 0, CNN)
    assert [str(m) for m in models] == ["cnn@1", "cnn@1", "resnet8@0.5", "cnn@0.5"]
    for text, words in (("0-2:cnn", "missing \\[3\\]"), ("0-3:cnn,3:resnet8", "twice"),
                        ("0-3:cnn,resnet8", "mixes"), ("0-4:cnn", "outside the range \\[4\\]"),
                        ("a-b:cnn", "bad partition ids")):
        with pytest.raises(ValueError, match=words):
            assign_client_models(text, 4, 0, CNN)


def test_config_checks_models_against_the_strategy():
    config = RunConfig().replace(strategy="heterofl", model="resnet8", client_models="resnet8@1,resnet8@0.5")
    assert global_model_spec(config) == ModelSpec("resnet8")
    assert {str(client_model_spec(config, p)) for p in range(10)} == {"resnet8@1", "resnet8@0.5"}
    with pytest.raises(ConfigError, match="needs every client to train the global model"):
        RunConfig().replace(strategy="fedavg", client_models="cnn@1,cnn@0.5")
    with pytest.raises(ConfigError, match="width sub-models of the global model cnn@1"):
        RunConfig().replace(strategy="fedrolex", client_models="cnn,resnet8")
    with pytest.raises(ConfigError, match="width sub-models"):
        RunConfig().replace(strategy="heterofl", global_model="cnn@0.5", client_models="cnn@1,cnn@0.5")
    with pytest.raises(ConfigError, match="global-model"):
        RunConfig().replace(global_model="vgg")
    RunConfig().replace(strategy="mosaic", num_server_rounds=3, mosaic_warmup_rounds=1,
              global_model="resnet8", client_models="cnn,resnet8,resnet18@0.25")
    RunConfig().replace(strategy="fedavg", client_models="cnn@1")  # one model for all: homogeneous


def test_presets_write_client_models_as_mapping_or_list(tmp_path):
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("num-clients: 3\nclient-models: {'0-1': cnn, '2': resnet8@0.5}\n")
    assert load_preset(str(mapping))["client-models"] == "0-1:cnn,2:resnet8@0.5"
    listed = tmp_path / "listed.yaml"
    listed.write_text("num-clients: 2\nclient-models: [cnn, resnet8]\n")
    assert load_preset(str(listed))["client-models"] == "0:cnn,1:resnet8"


def test_node_config_names_its_model():
    config = RunConfig()
    assert NodeSettings.from_node_config({"partition-id": 0, "model": "resnet8@0.5"},
                                         config).model == "resnet8@0.5"
    with pytest.raises(ValueError, match="node_config model='vgg'"):
        NodeSettings.from_node_config({"partition-id": 0, "model": "vgg"}, config)


# ------------------------------------------------------------------ experts of different models
class Fixed(nn.Module):
    """A toy model that returns fixed logits for every input."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        return self.logits.expand(len(x), -1)


def test_mixed_experts_weight_each_class_by_the_clients_counts():
    # Two clients, two classes: client 0 holds 3 of class 0 and none of class 1,
    # client 1 holds 1 of class 0 and 4 of class 1.
    counts = torch.tensor([[3, 0], [1, 4]])
    weights = expert_weights(counts)
    assert weights.tolist() == [[0.75, 0.0], [0.25, 1.0]]
    models = [Fixed([2.0, -2.0]), Fixed([-1.0, 1.0])]
    experts = mixed_expert_logits(models, weights, torch.zeros(5, 3))
    assert experts.shape == (5, 2, 2)  # (batch, experts, classes)
    p0, p1 = torch.softmax(torch.tensor([2.0, -2.0]), 0), torch.softmax(torch.tensor([-1.0, 1.0]), 0)
    # Expert 0: 0.75 of client 0's distribution + 0.25 of client 1's; expert 1: client 1 alone.
    assert torch.allclose(experts[0, 0].exp(), 0.75 * p0 + 0.25 * p1)
    assert torch.allclose(experts[0, 1].exp(), p1)


def test_mixed_experts_are_not_ruled_by_the_loudest_model():
    # Client 0 (weight 0.2 for expert 1) shouts class 0 with logits of +-1000;
    # client 1 (weight 0.8) prefers class 1 mildly. A logit mixture follows client 0.
    weights = torch.tensor([[0.5, 0.2], [0.5, 0.8]])
    models = [Fixed([1000.0, -1000.0]), Fixed([-1.0, 1.0])]
    experts = mixed_expert_logits(models, weights, torch.zeros(1, 3))
    assert experts[0, 1].argmax() == 1 and torch.isfinite(experts).all()
    logit_mix = 0.2 * torch.tensor([1000.0, -1000.0]) + 0.8 * torch.tensor([-1.0, 1.0])
    assert logit_mix.argmax() == 0
    # Prototype space: the same mixture of probe-head logits (K, P, C).
    assert torch.allclose(mixture_log_probs(torch.stack([m(torch.zeros(1, 3)) for m in models]),
                                            weights), experts)


def test_probe_head_mimics_the_local_model_on_global_features():
    torch.manual_seed(0)
    features = torch.randn(200, 6)
    local = nn.Linear(6, 3)  # the "local model" seen through these features
    with torch.no_grad():
        logits = local(features) * 3
    start = nn.Linear(6, 3)
    before = (start(features).argmax(1) == logits.argmax(1)).float().mean()
    probe = probe_head(features, logits, start, steps=300, lr=0.05)
    weight, bias = (torch.from_numpy(probe[k].numpy()) for k in ("probe-weight", "probe-bias"))
    after = ((features @ weight.T + bias).argmax(1) == logits.argmax(1)).float().mean()
    assert before < 0.7 and after > 0.95
    start_weight = start.weight.detach().clone()
    rng_state = torch.get_rng_state()
    again = probe_head(features, logits, start, steps=300, lr=0.05)
    assert np.array_equal(again["probe-weight"].numpy(), probe["probe-weight"].numpy())
    # Neither the global RNG (the client's generator initialisation draws from it
    # next) nor the head it starts from is touched.
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.equal(start.weight, start_weight)


# ------------------------------------------------------------------ strategies, in process
NUM_CLIENTS = 6
QUICK = dict(partitioner="dirichlet", dirichlet_alpha=0.5, num_clients=NUM_CLIENTS,
             min_clients=2, num_server_rounds=2, local_epochs=1)
WIDTHS = "0-1:cnn@1,2-3:cnn@0.5,4-5:cnn@0.25"
FAMILIES = "0-1:cnn,2-3:resnet8@0.5,4-5:resnet18@0.25"
MOSAIC_SHORT = dict(mosaic_warmup_rounds=1, mosaic_finetune_rounds=0, mosaic_generator_steps=3,
                    mosaic_generator_width=8, mosaic_generator_latent_dim=8, mosaic_meta_epochs=2,
                    mosaic_meta_dim=16, mosaic_meta_heads=2, mosaic_distill_steps=3,
                    mosaic_samples_per_generator=4, mosaic_prototypes_per_class=2)


def run_inline(node_models: dict[int, str] | None = None, **overrides):
    """A whole run in process; ``node_models`` sets some nodes' ``--node-config model``."""
    config = RunConfig(**{**QUICK, **overrides})
    evaluator = CentralEvaluator(config)
    strategy = build_strategy(config, score_fn=evaluator.score)
    grid = InlineGrid(NUM_CLIENTS)
    for node, model in (node_models or {}).items():
        grid.contexts[node].node_config["model"] = model
    torch.manual_seed(config.seed)
    initial = ArrayRecord(global_model_spec(config).build(
        load_dataset(config.dataset).spec).state_dict())
    result = strategy.start(grid=grid, initial_arrays=initial,
                            num_rounds=config.num_server_rounds,
                            train_config=ConfigRecord(config.to_mapping()))
    return config, strategy, grid, result


def _reply_models(grid: InlineGrid) -> dict[int, str]:
    return {int(m.content.config_records["client"]["partition-id"]):
            str(m.content.config_records["client"]["model"]) for m in grid.replies}


@pytest.mark.parametrize("strategy", ["heterofl", "fedrolex"])
def test_width_strategies_train_sub_models_and_average_them_slice_wise(strategy):
    config, run, grid, result = run_inline(strategy=strategy, client_models=WIDTHS)
    assert _reply_models(grid) == {0: "cnn@1", 1: "cnn@1", 2: "cnn@0.5", 3: "cnn@0.5",
                                   4: "cnn@0.25", 5: "cnn@0.25"}
    quarter = [m for m in grid.replies if m.content.config_records["client"]["model"] == "cnn@0.25"]
    assert tuple(quarter[0].content["arrays"]["body.0.weight"].shape) == (8, 1, 5, 5)
    for msg in grid.sent:  # every client gets the full global model and the slicing rule
        assert tuple(msg.content["arrays"]["body.0.weight"].shape) == (32, 1, 5, 5)
        assert msg.content[TASK_RECORD]["slicing"] == run.SLICING
    assert all(run.round_stats[r]["clients_ok"] == NUM_CLIENTS for r in (1, 2))
    final = result.arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert run.group_arrays == {}  # width sub-models never form groups


def test_mosaic_combines_three_architectures_through_probe_heads():
    config, run, grid, result = run_inline(strategy="mosaic", global_model="cnn",
                                           client_models=FAMILIES, **MOSAIC_SHORT)
    assert set(_reply_models(grid).values()) == {"cnn@1", "resnet8@0.5", "resnet18@0.25"}
    stats = [m.content[STATS_RECORD] for m in grid.replies if STATS_RECORD in m.content]
    assert len(stats) == NUM_CLIENTS and all(PROBE_WEIGHT in s for s in stats)
    assert set(run.group_arrays) == {"resnet8@0.5", "resnet18@0.25"}
    round2 = [m for m in grid.sent if m.content["config"]["server-round"] == 2]
    sent_models = {m.metadata.dst_node_id: m.content[TASK_RECORD]["arrays-model"] for m in round2}
    assert sent_models == {1: "cnn@1", 2: "cnn@1", 3: "resnet8@0.5", 4: "resnet8@0.5",
                           5: "resnet18@0.25", 6: "resnet18@0.25"}
    # Nodes of other architectures also get the global model for their prototypes.
    assert all(("global-model" in m.content) == (m.metadata.dst_node_id > 2) for m in round2)
    step = run.round_stats[2]
    assert step["phase"] == "distill" and step["clients_ok"] == NUM_CLIENTS
    assert 0.0 <= step["teacher_accuracy"] <= 1.0 and "student_accuracy_after" in step


@pytest.mark.parametrize("strategy", ["dense", "feddf"])
def test_ensemble_baselines_distil_clients_of_three_architectures(strategy):
    extra = {"dense_epochs": 1, "dense_generator_steps": 2, "dense_synthesis_batch_size": 8,
             "dense_latent_dim": 8, "dense_generator_width": 8} \
        if strategy == "dense" else {"feddf_steps": 3, "feddf_inputs": "generators",
                                     "mosaic_generator_steps": 2, "mosaic_generator_width": 8,
                                     "mosaic_generator_latent_dim": 8}
    _, run, grid, _ = run_inline(strategy=strategy, global_model="cnn", client_models=FAMILIES,
                                 **extra)
    assert set(_reply_models(grid).values()) == {"cnn@1", "resnet8@0.5", "resnet18@0.25"}
    last = max(run.round_stats)
    assert run.round_stats[last]["clients_ok"] == NUM_CLIENTS
    assert 0.0 <= run.round_stats[last]["ensemble_accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["fedavg", "fedftg"])
def test_a_strategy_without_mixing_leaves_out_a_node_of_another_model(name, caplog):
    _, strategy, _, _ = run_inline({1: "resnet8"}, num_server_rounds=1, strategy=name,
                                   fedftg_iterations=1, fedftg_distill_steps=1,
                                   fedftg_batch_size=8)
    assert strategy.round_stats[1]["clients_ok"] == NUM_CLIENTS - 1
    assert strategy.round_stats[1]["clients_failed"] == 1
    reason = ("needs every client to train the global model cnn@1" if name == "fedftg"
              else "array names differ from the global model")
    assert reason in caplog.text


def test_local_only_trains_each_client_model_alone():
    config = RunConfig(**{**QUICK, "num_server_rounds": 1, "client_models": FAMILIES})
    rows = local_only(config)
    assert [r["model"] for r in rows] == ["cnn@1", "cnn@1", "resnet8@0.5", "resnet8@0.5",
                                          "resnet18@0.25", "resnet18@0.25"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    summary = summarise(rows + [{**r, "seed": 1, "accuracy": r["accuracy"] / 2} for r in rows])
    cnn = [r["accuracy"] for r in rows if r["model"] == "cnn@1"]
    mean = np.mean(cnn)
    assert summary["cnn@1"][0] == pytest.approx(0.75 * mean)
    assert summary["cnn@1"][1] == pytest.approx(np.std([mean, mean / 2], ddof=1))
    assert summary["cnn@1"][2] == 2


def test_probe_heads_are_required_from_other_models_and_checked():
    strategy = build_strategy(RunConfig().replace(
        strategy="mosaic", num_server_rounds=3, mosaic_warmup_rounds=1, client_models="cnn,resnet8"))
    base = {LABEL_COUNTS: Array(np.arange(10, dtype=np.int64)),
            PROTOTYPES: Array(np.ones((2, 512), dtype=np.float32)),
            PROTOTYPE_LABELS: Array(np.array([0, 1], dtype=np.int64))}
    assert strategy.stats_problem(ArrayRecord(base), prototypes=True) == ""
    assert "probe-bias, probe-weight" in strategy.stats_problem(ArrayRecord(base), True, probe=True)
    probe = {PROBE_WEIGHT: Array(np.zeros((10, 512), dtype=np.float32)),
             PROBE_BIAS: Array(np.zeros(10, dtype=np.float32))}
    assert strategy.stats_problem(ArrayRecord({**base, **probe}), True, probe=True) == ""
    narrow = {**probe, PROBE_WEIGHT: Array(np.zeros((10, 64), dtype=np.float32))}
    assert "shaped (10, 512)" in strategy.stats_problem(ArrayRecord({**base, **narrow}), True)


def test_a_node_config_model_joins_a_width_strategy_without_client_models():
    _, strategy, grid, result = run_inline({1: "cnn@0.5"}, num_server_rounds=1,
                                           strategy="heterofl")
    assert strategy.round_stats[1]["clients_ok"] == NUM_CLIENTS
    assert _reply_models(grid)[0] == "cnn@0.5" and set(_reply_models(grid).values()) == {
        "cnn@0.5", "cnn@1"}
    # conv1's first 16 of 32 channels are averaged over all 6 clients, the rest over the
    # 5 full-width ones, each weighted by its number of examples.
    final = result.arrays.to_torch_state_dict()["body.0.weight"].double()
    weights = {m.content.config_records["client"]["model"]: [] for m in grid.replies}
    for msg in grid.replies:
        weights[msg.content.config_records["client"]["model"]].append(
            (float(msg.content["metrics"]["num-examples"]),
             msg.content["arrays"]["body.0.weight"].numpy()))
    full, half = weights["cnn@1"], weights["cnn@0.5"]
    low = sum(n * w[:16] for n, w in full + half) / sum(n for n, _ in full + half)
    high = sum(n * w[16:] for n, w in full) / sum(n for n, _ in full)
    assert np.allclose(final[:16].numpy(), low, atol=1e-6)
    assert np.allclose(final[16:].numpy(), high, atol=1e-6)
