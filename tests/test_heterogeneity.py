"""Clients that train different models: assignment, configuration, experts, strategies in-process."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from harness import BASE, TINY, run_inline
from torch import nn

from mosaic_flwr.client_models import assign_client_models, client_model_spec, global_model_spec
from mosaic_flwr.config import ConfigError, RunConfig, load_preset
from mosaic_flwr.data import load_dataset
from mosaic_flwr.local_only import local_only, personal_summary, summarise
from mosaic_flwr.models import ModelSpec
from mosaic_flwr.mosaic.client import (PROBE_BIAS, PROBE_WEIGHT, PROTOTYPE_LABELS, PROTOTYPES,
                                       probe_head)
from mosaic_flwr.mosaic.experts import expert_weights, mixed_expert_logits, mixture_log_probs
from mosaic_flwr.node import NodeSettings
from mosaic_flwr.records import LABEL_COUNTS, STATS_RECORD, TASK_RECORD
from mosaic_flwr.strategies import build_strategy, check_strategy
from mosaic_flwr.submodels import channel_indices

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
    def checked(values: dict) -> None:
        check_strategy(RunConfig.from_mapping(values))

    config = RunConfig.from_mapping({"strategy": "heterofl", "model": "resnet8",
                                     "client-models": "resnet8@1,resnet8@0.5"})
    check_strategy(config)
    assert global_model_spec(config) == ModelSpec("resnet8")
    assert {str(client_model_spec(config, p)) for p in range(10)} == {"resnet8@1", "resnet8@0.5"}
    with pytest.raises(ConfigError, match="needs every client to train the global model"):
        checked({"strategy": "fedavg", "client-models": "cnn@1,cnn@0.5"})
    with pytest.raises(ConfigError, match="width sub-models of the global model cnn@1"):
        checked({"strategy": "fedrolex", "client-models": "cnn,resnet8"})
    with pytest.raises(ConfigError, match="width sub-models"):
        checked({"strategy": "heterofl", "global-model": "cnn@0.5",
                 "client-models": "cnn@1,cnn@0.5"})
    with pytest.raises(ConfigError, match="global-model"):
        checked({"global-model": "vgg"})
    checked({"strategy": "mosaic", "num-server-rounds": 3, "mosaic-warmup-rounds": 1,
             "global-model": "resnet8", "client-models": "cnn,resnet8,resnet18@0.25"})
    checked({"strategy": "fedavg", "client-models": "cnn@1"})  # one model for all: homogeneous


def test_presets_write_client_models_as_mapping_or_list(tmp_path):
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("num-clients: 3\nclient-models: {'0-1': cnn, '2': resnet8@0.5}\n")
    assert load_preset(str(mapping))["client-models"] == "0-1:cnn,2:resnet8@0.5"
    listed = tmp_path / "listed.yaml"
    listed.write_text("num-clients: 2\nclient-models: [cnn, resnet8]\n")
    assert load_preset(str(listed))["client-models"] == "0:cnn,1:resnet8"


def test_node_config_names_its_model():
    config = RunConfig.from_mapping({})
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
#: Three architectures over 4 clients: two CNNs (the global model), a ResNet-8 and a ResNet-18.
FAMILIES = "0-1:cnn,2:resnet8@0.5,3:resnet18@0.25"


def conv1_average(replies, slicing: str, server_round: int) -> np.ndarray:
    """Slice-wise average of the replies' first conv layer (32 output channels): each
    channel over the clients whose sub-model holds it, weighted by their examples."""
    total, weight = np.zeros((32, 1, 5, 5)), np.zeros(32)
    for reply in replies:
        arrays = reply.content["arrays"]["body.0.weight"].numpy().astype(np.float64)
        examples = float(reply.content["metrics"]["num-examples"])
        channels = channel_indices(32, arrays.shape[0], slicing, server_round).numpy()
        total[channels] += examples * arrays
        weight[channels] += examples
    return total / weight[:, None, None, None]


@pytest.mark.parametrize("strategy", ["heterofl", "fedrolex"])
def test_width_strategies_train_sub_models_and_average_them_slice_wise(strategy, tiny_run):
    run = tiny_run(strategy)
    assert run.reply_models() == {0: "cnn@1", 1: "cnn@1", 2: "cnn@0.5", 3: "cnn@0.25"}
    quarter = [m for _, m in run.exchanges()
               if m.content.config_records["client"]["model"] == "cnn@0.25"]
    assert tuple(quarter[0].content["arrays"]["body.0.weight"].shape) == (8, 1, 5, 5)
    for msg in run.grid.sent:  # every client gets the full global model and the slicing rule
        assert tuple(msg.content["arrays"]["body.0.weight"].shape) == (32, 1, 5, 5)
        assert msg.content[TASK_RECORD]["slicing"] == run.strategy.SLICING
    assert all(run.round_stats[r]["clients_ok"] == 4 for r in (1, 2))
    final = run.result.arrays.to_torch_state_dict()["body.0.weight"].double().numpy()
    expected = conv1_average(run.replies_in_round(2), run.strategy.SLICING, 2)
    assert np.allclose(final, expected, atol=1e-6)
    assert run.strategy.group_arrays == {}  # width sub-models never form groups


def test_mosaic_combines_three_architectures_through_probe_heads():
    run = run_inline({**TINY["mosaic"], "num-server-rounds": 2, "mosaic-finetune-rounds": 0,
                      "global-model": "cnn", "client-models": FAMILIES, "mosaic-trust": True})
    assert run.reply_models() == {0: "cnn@1", 1: "cnn@1", 2: "resnet8@0.5", 3: "resnet18@0.25"}
    stats = [m.content[STATS_RECORD] for m in run.replies_in_round(2)]
    assert len(stats) == 4 and all(PROBE_WEIGHT in s for s in stats)
    assert set(run.strategy.group_arrays) == {"resnet8@0.5", "resnet18@0.25"}
    round2 = run.sent_in_round(2)
    sent_models = {m.metadata.dst_node_id: m.content[TASK_RECORD]["arrays-model"] for m in round2}
    assert sent_models == {1: "cnn@1", 2: "cnn@1", 3: "resnet8@0.5", 4: "resnet18@0.25"}
    # Nodes of other architectures also get the global model for their prototypes.
    assert all(("global-model" in m.content) == (m.metadata.dst_node_id > 2) for m in round2)
    step = run.round_stats[2]
    assert step["phase"] == "distill" and step["clients_ok"] == 4
    assert step["num_prototypes"] == sum(len(s[PROTOTYPES].numpy()) for s in stats)
    assert step["student_accuracy_after"] == run.accuracies[2]
    assert step["distill_loss_last"] != step["distill_loss_first"]
    # Clients of every architecture score the global candidates of the federated check.
    assert step["federated_check_clients"] == 4


@pytest.mark.parametrize("strategy", ["dense", "feddf"])
def test_ensemble_baselines_distil_clients_of_three_architectures(strategy):
    run = run_inline({**TINY[strategy], "num-server-rounds": 1, "global-model": "cnn",
                      "client-models": FAMILIES})
    assert run.reply_models() == {0: "cnn@1", 1: "cnn@1", 2: "resnet8@0.5", 3: "resnet18@0.25"}
    assert run.round_stats[1]["clients_ok"] == 4
    # The distilled student is the new global model.
    assert run.round_stats[1]["student_accuracy_after"] == run.accuracies[1]
    initial = run.sent_in_round(1)[0].content["arrays"].to_torch_state_dict()
    final = run.result.arrays.to_torch_state_dict()
    assert any(not torch.equal(initial[k], final[k]) for k in final)


@pytest.mark.parametrize("name", ["fedavg", "fedftg"])
def test_a_strategy_without_mixing_leaves_out_a_node_of_another_model(name, caplog):
    run = run_inline({**TINY[name], "num-server-rounds": 1, "fedftg-iterations": 1,
                      "fedftg-distill-steps": 1, "fedftg-batch-size": 8}, {1: "resnet8"})
    assert run.round_stats[1]["clients_ok"] == 3
    assert run.round_stats[1]["clients_failed"] == 1
    reason = ("needs every client to train the global model cnn@1" if name == "fedftg"
              else "array names differ from the global model")
    assert reason in caplog.text


def test_local_only_trains_each_client_model_alone():
    config = RunConfig.from_mapping({**BASE, "num-server-rounds": 1, "client-models": FAMILIES})
    rows = local_only(config)
    assert [r["model"] for r in rows] == ["cnn@1", "cnn@1", "resnet8@0.5", "resnet18@0.25"]
    assert sum(r["num-examples"] for r in rows) == len(load_dataset("digits").train_labels)
    assert local_only(config) == rows  # seeded: the same numbers again
    # A model trained on one client's skewed labels does better on that client's own test
    # split (its classes, in its proportions) than on the whole test split.
    assert np.mean([r["personal-accuracy"] for r in rows]) > \
        np.mean([r["accuracy"] for r in rows]) + 0.1
    other = [{**r, "seed": 1, "personal-accuracy": r["personal-accuracy"] / 2} for r in rows]
    own = [r["personal-accuracy"] for r in rows]
    assert personal_summary(rows + other) == pytest.approx(
        (0.75 * np.mean(own), np.std([np.mean(own), np.mean(own) / 2], ddof=1),
         0.75 * min(own)))  # 4 clients: the worst decile is the worst client
    summary = summarise(rows + [{**r, "seed": 1, "accuracy": r["accuracy"] / 2} for r in rows])
    cnn = [r["accuracy"] for r in rows if r["model"] == "cnn@1"]
    mean = np.mean(cnn)
    assert summary["cnn@1"][0] == pytest.approx(0.75 * mean)
    assert summary["cnn@1"][1] == pytest.approx(np.std([mean, mean / 2], ddof=1))
    assert summary["cnn@1"][2] == 2


def test_probe_heads_are_required_from_other_models_and_checked():
    strategy = build_strategy(RunConfig.from_mapping({
        "strategy": "mosaic", "num-server-rounds": 3, "mosaic-warmup-rounds": 1,
        "client-models": "cnn,resnet8"}))
    base = {LABEL_COUNTS: Array(np.arange(10, dtype=np.int64)),
            PROTOTYPES: Array(np.ones((2, 512), dtype=np.float32)),
            PROTOTYPE_LABELS: Array(np.array([0, 1], dtype=np.int64))}
    distill = strategy.task_for(2)  # the distillation round: prototypes are uploaded

    def problem(stats: dict, model: str) -> str:
        return strategy.stats_problem(ArrayRecord(stats), distill, model)
    assert problem(base, "cnn@1") == ""
    assert "probe-bias, probe-weight" in problem(base, "resnet8@1")
    probe = {PROBE_WEIGHT: Array(np.zeros((10, 512), dtype=np.float32)),
             PROBE_BIAS: Array(np.zeros(10, dtype=np.float32))}
    assert problem({**base, **probe}, "resnet8@1") == ""
    narrow = {**probe, PROBE_WEIGHT: Array(np.zeros((10, 64), dtype=np.float32))}
    assert "shaped (10, 512)" in problem({**base, **narrow}, "cnn@1")


def test_a_node_config_model_joins_a_width_strategy_without_client_models():
    run = run_inline({**TINY["heterofl"], "num-server-rounds": 1, "client-models": ""},
                     {1: "cnn@0.5"})
    assert run.round_stats[1]["clients_ok"] == 4
    assert run.reply_models() == {0: "cnn@0.5", 1: "cnn@1", 2: "cnn@1", 3: "cnn@1"}
    # conv1's first 16 of 32 channels are averaged over all 4 clients, the rest over the
    # 3 full-width ones, each weighted by its number of examples.
    final = run.result.arrays.to_torch_state_dict()["body.0.weight"].double()
    weights = {m.content.config_records["client"]["model"]: [] for m in run.grid.replies}
    for msg in run.grid.replies:
        weights[msg.content.config_records["client"]["model"]].append(
            (float(msg.content["metrics"]["num-examples"]),
             msg.content["arrays"]["body.0.weight"].numpy()))
    full, half = weights["cnn@1"], weights["cnn@0.5"]
    low = sum(n * w[:16] for n, w in full + half) / sum(n for n, _ in full + half)
    high = sum(n * w[16:] for n, w in full) / sum(n for n, _ in full)
    assert np.allclose(final[:16].numpy(), low, atol=1e-6)
    assert np.allclose(final[16:].numpy(), high, atol=1e-6)
