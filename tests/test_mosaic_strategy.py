"""MosaicStrategy driving the real client handlers in-process (InlineGrid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from inline_grid import InlineGrid

from mosaic_flwr.client import handle_train
from mosaic_flwr.config import RunConfig
from mosaic_flwr.data import client_indices, load_dataset
from mosaic_flwr.data.augment import BatchTransform
from mosaic_flwr.models import build_model
from mosaic_flwr.mosaic.client import extract_features
from mosaic_flwr.mosaic.generator import build_generator
from mosaic_flwr.mosaic.settings import MosaicSettings
from mosaic_flwr.records import (GENERATOR_RECORD, LABEL_COUNTS, PROBE_BIAS, PROBE_WEIGHT,
                                 PROTOTYPE_LABELS, PROTOTYPES, STATS_RECORD, TASK_RECORD)
from mosaic_flwr.strategies import NotEnoughRepliesError, average_arrays, build_strategy
from mosaic_flwr.server import CentralEvaluator

NUM_CLIENTS = 6

#: A short, cheap Mosaic schedule: 1 warm-up round, distillation in round 2, 1 fine-tuning round.
SHORT = dict(strategy="mosaic", partitioner="dirichlet", dirichlet_alpha=0.3,
             num_clients=NUM_CLIENTS, min_clients=2, num_server_rounds=3, local_epochs=1,
             mosaic_warmup_rounds=1, mosaic_finetune_rounds=1, mosaic_generator_steps=4,
             mosaic_generator_width=8, mosaic_generator_latent_dim=8, mosaic_meta_epochs=3,
             mosaic_meta_dim=20, mosaic_meta_heads=2, mosaic_distill_steps=5,
             mosaic_samples_per_generator=8, mosaic_prototypes_per_class=3)


def run_short(config: RunConfig, grid: InlineGrid):
    evaluator = CentralEvaluator(config)
    strategy = build_strategy(config, score_fn=evaluator.score)
    torch.manual_seed(0)
    spec = load_dataset(config.dataset, config.data_path).spec
    initial = ArrayRecord(build_model(config.model, spec, config.model_width).state_dict())
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=config.num_server_rounds,
                            train_config=ConfigRecord(config.to_mapping()))
    return strategy, result


@pytest.fixture(scope="module")
def short_run():
    config = RunConfig(**SHORT)
    grid = InlineGrid(NUM_CLIENTS)
    strategy, result = run_short(config, grid)
    return config, grid, strategy, result


def test_tasks_follow_the_schedule(short_run):
    _, grid, _, _ = short_run
    by_round = {}
    for msg in grid.sent:
        record = msg.content.config_records[TASK_RECORD]
        by_round[int(msg.content.config_records["config"]["server-round"])] = record
    assert by_round[1]["phase"] == "warmup" and not by_round[1]["upload-stats"]
    assert by_round[2]["phase"] == "distill"
    assert by_round[2]["upload-stats"] and by_round[2]["upload-generator"]
    assert by_round[2]["setting.prototypes_per_class"] == 3
    assert by_round[3]["phase"] == "finetune" and not by_round[3]["upload-generator"]
    assert by_round[3]["learning-rate-scale"] == pytest.approx(MosaicSettings().finetune_lr_scale)
    assert by_round[1]["learning-rate-scale"] == 1.0


def test_distillation_round_records_its_phase_metrics(short_run):
    _, _, strategy, result = short_run
    stats = strategy.round_stats
    assert [stats[r]["phase"] for r in (1, 2, 3)] == ["warmup", "distill", "finetune"]
    distill = stats[2]
    assert distill["clients_ok"] == NUM_CLIENTS
    for key in ("teacher_accuracy", "ensemble_accuracy", "student_accuracy_before",
                "student_accuracy_after", "meta_prototype_accuracy", "ensemble_prototype_accuracy"):
        assert 0.0 <= distill[key] <= 1.0, key
    assert distill["num_prototypes"] > 0
    assert distill["distill_seconds"] > 0 and distill["meta_seconds"] > 0
    assert len(result.train_metrics_clientapp) == 3


def test_distillation_changes_the_averaged_model(short_run):
    _, grid, strategy, _ = short_run
    replies = [r for r in grid.replies if GENERATOR_RECORD in r.content.array_records]
    average, _ = strategy.average(sorted(replies, key=lambda m: m.metadata.src_node_id))
    round3 = next(m for m in grid.sent
                  if m.content.config_records["config"]["server-round"] == 3)
    distilled = round3.content.array_records["arrays"]
    diffs = [np.abs(distilled[k].numpy() - average[k].numpy()).max() for k in average.keys()]
    assert max(diffs) > 1e-4


def test_nothing_per_sample_leaves_a_client(short_run):
    """Every record of every reply: model weights, a generator, counts, prototypes, scalars."""
    config, grid, _, _ = short_run
    data = load_dataset(config.dataset, config.data_path)
    model_sig = {k: tuple(v.shape) for k, v in build_model(config.model, data.spec).state_dict().items()}
    gen_sig = {k: tuple(v.shape) for k, v in
               build_generator(data.spec, MosaicSettings.from_config(config)).state_dict().items()}
    instructions = {m.metadata.message_id: m for m in grid.sent}
    assert len(grid.replies) == 3 * NUM_CLIENTS
    for reply in grid.replies:
        content = reply.content
        pid = int(content.config_records["client"]["partition-id"])
        idx = client_indices(config, pid)
        images = torch.from_numpy(data.train_images[idx])
        labels = torch.from_numpy(data.train_labels[idx])
        assert set(content.config_records) == {"client"}
        assert dict(content.config_records["client"]) == {"partition-id": pid,
                                                          "model": "cnn@1"}
        assert set(content.metric_records) == {"metrics"}
        assert all(isinstance(v, (int, float)) for v in content.metric_records["metrics"].values())
        assert set(content.array_records) <= {"arrays", GENERATOR_RECORD, STATS_RECORD}
        arrays = content.array_records["arrays"]
        assert {k: tuple(a.shape) for k, a in arrays.items()} == model_sig
        if GENERATOR_RECORD in content.array_records:
            gen = content.array_records[GENERATOR_RECORD]
            assert {k: tuple(a.shape) for k, a in gen.items()} == gen_sig
        if STATS_RECORD not in content.array_records:
            continue
        stats = content.array_records[STATS_RECORD]
        assert set(stats.keys()) == {LABEL_COUNTS, PROTOTYPES, PROTOTYPE_LABELS, PROBE_WEIGHT,
                                     PROBE_BIAS}
        assert stats[PROBE_WEIGHT].shape == (10, build_model(config.model, data.spec).feature_dim)
        assert stats[LABEL_COUNTS].numpy().tolist() == np.bincount(
            labels.numpy(), minlength=10).tolist()
        protos = torch.from_numpy(stats[PROTOTYPES].numpy())
        proto_labels = stats[PROTOTYPE_LABELS].numpy()
        assert protos.shape[1] == build_model(config.model, data.spec).feature_dim
        assert len(protos) <= 3 * 10 and len(protos) < len(labels)
        assert proto_labels.shape == (len(protos),)
        # Every prototype is an average of several samples' features under the
        # global model the client received, never one sample's feature.
        received = instructions[reply.metadata.reply_to_message_id].content.array_records["arrays"]
        global_model = build_model(config.model, data.spec)
        global_model.load_state_dict(received.to_torch_state_dict())
        features = extract_features(global_model, images, BatchTransform(data.spec),
                                    torch.device("cpu"))
        assert torch.cdist(protos, features).min() > 1e-4
        for cls in set(proto_labels.tolist()):
            assert (labels == cls).sum() >= 2


def faulty(bad_pids: dict[int, str]):
    """A train handler whose replies, for some partitions, break the distillation contract."""
    def handler(msg: Message, context: Context) -> Message:
        reply = handle_train(msg, context)
        problem = bad_pids.get(int(context.node_config["partition-id"]))
        if problem is None or GENERATOR_RECORD not in reply.content.array_records:
            return reply
        content = RecordDict(dict(reply.content.items()))
        if problem == "no-generator":
            del content[GENERATOR_RECORD]
        elif problem == "nan-prototypes":
            stats = dict(content[STATS_RECORD].items())
            bad = stats[PROTOTYPES].numpy().copy()
            bad[0, 0] = np.nan
            stats[PROTOTYPES] = Array(bad)
            content[STATS_RECORD] = ArrayRecord(stats)
        elif problem == "short-counts":
            stats = dict(content[STATS_RECORD].items())
            stats[LABEL_COUNTS] = Array(np.zeros(3, dtype=np.int64))
            content[STATS_RECORD] = ArrayRecord(stats)
        return Message(content, reply_to=msg)
    return handler


def test_bad_distillation_replies_are_left_out_and_the_round_goes_on():
    config = RunConfig(**SHORT)
    grid = InlineGrid(NUM_CLIENTS, train=faulty({0: "no-generator", 1: "nan-prototypes",
                                                 2: "short-counts"}))
    strategy, _ = run_short(config, grid)
    assert strategy.round_stats[2]["clients_ok"] == NUM_CLIENTS - 3
    assert strategy.round_stats[2]["clients_failed"] == 3
    assert strategy.round_stats[3]["clients_ok"] == NUM_CLIENTS


def test_too_few_good_distillation_replies_stop_the_run():
    config = RunConfig(**{**SHORT, "min_clients": 4})
    grid = InlineGrid(NUM_CLIENTS, train=faulty({0: "no-generator", 1: "no-generator",
                                                 2: "nan-prototypes"}))
    with pytest.raises(NotEnoughRepliesError, match="round 2: only 3 usable replies"):
        run_short(config, grid)


@pytest.mark.parametrize("ablation", [
    {"mosaic_meta_model": False}, {"mosaic_generators": False},
    {"mosaic_expert_weighting": "uniform"}])
def test_ablations_run_and_say_what_they_used(ablation):
    config = RunConfig(**{**SHORT, **ablation})
    grid = InlineGrid(NUM_CLIENTS)
    strategy, _ = run_short(config, grid)
    distill = strategy.round_stats[2]
    if "mosaic_meta_model" in ablation:
        assert distill["meta_prototype_accuracy"] == distill["ensemble_prototype_accuracy"]
        assert distill["teacher_accuracy"] == distill["ensemble_accuracy"]
    if "mosaic_generators" in ablation:
        assert not any(GENERATOR_RECORD in r.content.array_records for r in grid.replies)
    if "mosaic_expert_weighting" in ablation:
        # Every expert is the same plain average of the client models: the
        # ensemble is that one model.
        replies = [r for r in grid.replies if STATS_RECORD in r.content.array_records]
        plain = average_arrays([r.content.array_records["arrays"] for r in replies],
                               [1.0] * len(replies))
        _, accuracy = CentralEvaluator(config)(plain)
        assert distill["ensemble_accuracy"] == pytest.approx(accuracy, abs=1e-3)


def test_schedule_that_does_not_fit_is_rejected_before_round_one():
    config = RunConfig(**SHORT)
    strategy = build_strategy(config)
    with pytest.raises(ValueError, match="num-server-rounds=2"):
        strategy.start(grid=InlineGrid(NUM_CLIENTS), initial_arrays=ArrayRecord(), num_rounds=2)


def test_fedavg_with_batchnorm_keeps_integer_buffers_across_rounds():
    """Flower's averaging turns num_batches_tracked into float64; ours keeps int64."""
    config = RunConfig(strategy="fedavg", model="resnet8", model_width=0.25, num_clients=3,
                       num_server_rounds=2, local_epochs=1)
    grid = InlineGrid(3)
    strategy, result = run_short(config, grid)
    assert strategy.round_stats[2]["clients_ok"] == 3
    assert result.arrays["body.1.num_batches_tracked"].dtype == "int64"
