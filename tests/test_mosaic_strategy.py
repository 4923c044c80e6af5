"""MosaicStrategy driving the real client handlers in-process (tests/harness.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from harness import TINY, InlineGrid, partition_id, run_inline, server_round

from mosaic_flwr.aggregation import average_arrays
from mosaic_flwr.client import handle_evaluate, handle_train
from mosaic_flwr.config import RunConfig
from mosaic_flwr.data import client_indices, load_dataset
from mosaic_flwr.data.datasets import DATASETS
from mosaic_flwr.data.augment import BatchTransform
from mosaic_flwr.errors import NotEnoughRepliesError
from mosaic_flwr.kd.generator import ImageGenerator
from mosaic_flwr.models import build_model
from mosaic_flwr.mosaic.settings import MosaicSettings
from mosaic_flwr.mosaic.strategy import MosaicStrategy
from mosaic_flwr.mosaic.client import (PROBE_BIAS, PROBE_WEIGHT, PROTOTYPE_LABELS, PROTOTYPES,
                                       extract_features)
from mosaic_flwr.records import GENERATOR_RECORD, LABEL_COUNTS, STATS_RECORD, TASK_RECORD
from mosaic_flwr.server import CentralEvaluator
from mosaic_flwr.strategies import build_strategy

#: Mosaic with no warm-up and no fine-tuning: one round, the distillation round.
DISTILL_ONLY = {**TINY["mosaic"], "num-server-rounds": 1, "mosaic-warmup-rounds": 0,
                "mosaic-finetune-rounds": 0}


@pytest.fixture(scope="module")
def mosaic(tiny_run):
    """Warm-up round 1, distillation in round 2, fine-tuning round 3, 4 clients."""
    return tiny_run("mosaic")


def test_tasks_follow_the_schedule(mosaic):
    by_round = {server_round(m): m.content.config_records[TASK_RECORD] for m in mosaic.grid.sent}
    assert sorted(by_round) == [1, 2, 3]
    assert by_round[1]["phase"] == "warmup" and not by_round[1]["upload-stats"]
    assert by_round[2]["phase"] == "distill"
    assert by_round[2]["upload-stats"] and by_round[2]["upload-generator"]
    assert by_round[2]["setting.prototypes_per_class"] == \
        mosaic.overrides["mosaic-prototypes-per-class"]
    assert by_round[3]["phase"] == "finetune" and not by_round[3]["upload-generator"]
    assert by_round[3]["learning-rate-scale"] == mosaic.overrides["mosaic-finetune-lr-scale"]
    assert by_round[1]["learning-rate-scale"] == 1.0
    assert all(by_round[r]["objective"] == "" for r in (1, 2, 3))  # the anchor is off here
    # By default, fine-tuning anchors local training to the distilled model (FinetuneAnchor).
    strategy = build_strategy(RunConfig.from_mapping({**TINY["mosaic"], "mosaic-finetune-anchor": 1.0}))
    task = strategy.task_for(3)
    assert task.objective == "mosaic-anchor" and task.settings["finetune_anchor"] == 1.0
    assert strategy.task_for(1).objective == strategy.task_for(2).objective == ""


def test_after_a_discarded_distillation_fine_tuning_rounds_train_as_fedavg_rounds():
    strategy = build_strategy(RunConfig.from_mapping({**TINY["mosaic"], "mosaic-trust": True,
                                                      "mosaic-finetune-anchor": 1.0}))
    anchored = strategy.task_for(3)
    assert (anchored.phase, anchored.objective) == ("finetune", "mosaic-anchor")
    state = strategy.state_dict()
    assert state["distilled"] is None  # before the distillation round
    # What a checkpoint written after a discarded distillation restores.
    strategy.load_state_dict({**state, "distilled": False})
    plain = strategy.task_for(3)
    assert (plain.phase, plain.objective, plain.learning_rate_scale) == ("train", "", 1.0)
    assert strategy.state_dict()["distilled"] is False
    # (Its average is still checked by the clients: test_a_change_is_kept_only_if_...)


def test_the_distillation_round_trains_exactly_as_fedavg_does(mosaic, fedavg3):
    """Prototypes (k-means) before local training and generators after it draw from
    streams of their own: each client's model of the distillation round is FedAvg's
    round-2 model bit for bit, so the student before distillation is FedAvg's model
    and the distillation's effect is measured against FedAvg, not against another
    shuffle of the same data."""
    assert mosaic.round_stats[2]["phase"] == "distill"
    for ours, fedavg in zip(mosaic.replies_in_round(2), fedavg3.replies_in_round(2)):
        assert partition_id(ours) == partition_id(fedavg)
        mine, theirs = ours.content.array_records["arrays"], fedavg.content.array_records["arrays"]
        assert all(np.array_equal(mine[k].numpy(), theirs[k].numpy()) for k in theirs.keys())
    assert mosaic.round_stats[2]["student_accuracy_before"] == fedavg3.accuracies[2]


def test_distillation_round_records_its_phase_metrics(mosaic):
    stats, num_clients = mosaic.round_stats, mosaic.config.num_clients
    assert [stats[r]["phase"] for r in (1, 2, 3)] == ["warmup", "distill", "finetune"]
    distill = stats[2]
    assert distill["clients_ok"] == num_clients
    replies = mosaic.replies_in_round(2)
    assert distill["num_prototypes"] == sum(len(r.content[STATS_RECORD][PROTOTYPES].numpy())
                                            for r in replies) > 0
    # The student starts as the round's plain average and ends as the round's global model.
    average, _ = mosaic.strategy.average(replies)
    _, average_accuracy = CentralEvaluator(mosaic.config)(average)
    assert distill["student_accuracy_before"] == average_accuracy
    assert distill["student_accuracy_after"] == mosaic.accuracies[2]
    for key in ("teacher_accuracy", "ensemble_accuracy", "meta_prototype_accuracy",
                "ensemble_prototype_accuracy"):
        assert 0.0 < distill[key] <= 1.0, key
    assert distill["distill_loss_last"] != distill["distill_loss_first"]
    assert distill["distill_seconds"] > 0 and distill["meta_seconds"] > 0
    assert sorted(mosaic.result.train_metrics_clientapp) == [1, 2, 3]


def test_distillation_changes_the_averaged_model(mosaic):
    replies = mosaic.replies_in_round(2)
    assert all(GENERATOR_RECORD in r.content.array_records for r in replies)
    average, _ = mosaic.strategy.average(replies)
    distilled = mosaic.sent_in_round(3)[0].content.array_records["arrays"]
    diffs = [np.abs(distilled[k].numpy() - average[k].numpy()).max() for k in average.keys()]
    assert max(diffs) > 1e-4


def rigged_evaluate(*scores: float):
    """An evaluate handler whose nodes report ``scores`` in turn (and again from the start)
    for the models they are sent: the distillation round's check sends the student before
    distillation first, then the mixes 25/50/75 % of the way (the default
    mosaic-trust-mixes = 4) and the distilled student; a fine-tuning round's check sends
    the model it started from, then the round's average."""
    seen: dict[int, int] = {}

    def handler(msg: Message, context: Context) -> Message:
        reply = handle_evaluate(msg, context)
        node = msg.metadata.dst_node_id
        reply.content["metrics"]["local-accuracy"] = scores[seen.get(node, 0) % len(scores)]
        seen[node] = seen.get(node, 0) + 1
        return reply
    return handler


@pytest.mark.parametrize("incumbent, candidate", [(0.9, 0.1), (0.1, 0.9)])
def test_a_change_is_kept_only_if_the_clients_score_it_no_lower(incumbent, candidate):
    """Round 2's distilled student and round 3's fine-tuning average each replace the model
    only if the clients score them no lower (after a discarded distillation, round 3
    trains as a FedAvg round, and is checked the same way). Half the clients train per round, yet all four distil
    (mosaic-distill-fraction) and judge the fine-tuning average."""
    run = run_inline({**TINY["mosaic"], "mosaic-trust": True, "mosaic-finetune-anchor": 1.0,
                      "fraction-train": 0.5},
                     evaluate=rigged_evaluate(incumbent, *[candidate] * 4, incumbent, candidate))
    assert [run.round_stats[r]["clients_sampled"] for r in (1, 2, 3)] == [2, 4, 2]
    distill, finetune = run.round_stats[2], run.round_stats[3]
    kept = candidate >= incumbent
    # The distillation round: before vs the mixes and the distilled student (a tie goes to
    # the last), judged by its four clients.
    assert distill["federated_check_clients"] == 4
    assert (distill["federated_accuracy_before"], distill["federated_accuracy_distilled"]) == \
        pytest.approx((incumbent, candidate))
    assert distill["distill_share"] == (1.0 if kept else 0.0)
    assert distill["meta_used"] == float(distill["meta_holdout_accuracy"]
                                         >= distill["ensemble_holdout_accuracy"])
    average, _ = run.strategy.average(run.replies_in_round(2))
    sent = run.sent_in_round(3)[0].content.array_records["arrays"]
    unchanged = all(np.array_equal(sent[k].numpy(), average[k].numpy()) for k in average.keys())
    assert unchanged == (not kept) == (distill["distilled"] == 0.0)
    assert distill["student_accuracy_after"] == run.accuracies[2] == distill[
        "student_accuracy_distilled" if kept else "student_accuracy_before"]
    final = run.result.arrays
    task = run.sent_in_round(3)[0].content["task"]
    if not kept:
        # No distilled model to anchor to: round 3 trains as a FedAvg round (full learning
        # rate, no anchor), and the same check keeps the model round 2 left.
        assert (task["phase"], task["objective"], task["learning-rate-scale"]) == ("train", "", 1.0)
    else:
        # The fine-tuning round is anchored (FinetuneAnchor ran in handle_train).
        assert task["objective"] == "mosaic-anchor"
    # Either way, start vs average, judged by the distillation round's four clients.
    assert (finetune["federated_accuracy_start"], finetune["federated_accuracy_average"]) == \
        pytest.approx((incumbent, candidate))
    assert finetune["federated_check_clients"] == 4
    assert finetune["finetune_kept"] == float(kept)
    assert all(np.array_equal(final[k].numpy(), sent[k].numpy())
               for k in sent.keys()) == (not kept)
    # What the checks ask of a client: 5 + 2 scores on its data, nothing per sample.
    scored = [r for r in run.grid.replies if r.metadata.message_type == "evaluate"]
    assert len(scored) == (5 + 2) * 4
    for reply in scored:
        assert not reply.content.array_records
        assert set(reply.content.metric_records["metrics"].keys()) == {
            "num-examples", "local-loss", "local-accuracy"}


def test_the_clients_can_keep_a_student_part_of_the_way_to_the_distilled_one():
    """The clients score the student before distillation, the mixes 25/50/75 % of the way
    and the distilled student; the best, here the halfway mix, becomes the global model:
    exactly the interpolated weights, scored on the test split as recorded."""
    run = run_inline({**DISTILL_ONLY, "mosaic-trust": True},
                     evaluate=rigged_evaluate(0.5, 0.6, 0.9, 0.7, 0.2))
    stats = run.round_stats[1]
    names = ("before", "mix25", "mix50", "mix75", "distilled")
    assert [stats[f"federated_accuracy_{name}"] for name in names] == \
        pytest.approx([0.5, 0.6, 0.9, 0.7, 0.2])
    assert (stats["distill_share"], stats["distilled"]) == (0.5, 1.0)
    assert stats["student_accuracy_after"] == stats["student_accuracy_mix50"] == run.accuracies[1]
    node = run.grid.sent[-1].metadata.dst_node_id
    scored = [m.content.array_records["arrays"].to_torch_state_dict() for m in run.grid.sent
              if m.metadata.message_type == "evaluate" and m.metadata.dst_node_id == node]
    before, halfway, distilled = scored[0], scored[2], scored[4]
    final = run.result.arrays.to_torch_state_dict()
    for name, value in final.items():
        assert torch.equal(value, halfway[name])
        if value.is_floating_point():
            assert torch.allclose(value, (before[name] + distilled[name]) / 2, atol=1e-6)
    assert any(not torch.equal(before[k], distilled[k]) for k in before)


def test_training_after_distillation_beats_the_untrained_model(mosaic):
    assert mosaic.accuracies[3] > mosaic.accuracies[0] + 0.1


def test_nothing_per_sample_leaves_a_client(mosaic):
    """Every record of every reply: model weights, a generator, counts, prototypes, scalars."""
    config, grid, overrides = mosaic.config, mosaic.grid, mosaic.overrides
    data = load_dataset(config.dataset, config.data_path)
    model_sig = {k: tuple(v.shape) for k, v in build_model(config.model, data.spec).state_dict().items()}
    generator = ImageGenerator(data.spec, overrides["mosaic-generator-latent-dim"],
                               overrides["mosaic-generator-width"])
    gen_sig = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
    feature_dim = build_model(config.model, data.spec).feature_dim
    instructions = {m.metadata.message_id: m for m in grid.sent}
    assert len(grid.replies) == 3 * config.num_clients
    for reply in grid.replies:
        content = reply.content
        pid = partition_id(reply)
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
        assert stats[LABEL_COUNTS].numpy().tolist() == np.bincount(
            labels.numpy(), minlength=10).tolist()
        if set(stats.keys()) == {LABEL_COUNTS}:  # round 1: the label counts alone
            continue
        assert set(stats.keys()) == {LABEL_COUNTS, PROTOTYPES, PROTOTYPE_LABELS, PROBE_WEIGHT,
                                     PROBE_BIAS}
        assert stats[PROBE_WEIGHT].shape == (10, feature_dim)
        protos = torch.from_numpy(stats[PROTOTYPES].numpy())
        proto_labels = stats[PROTOTYPE_LABELS].numpy()
        assert protos.shape[1] == feature_dim
        assert len(protos) <= overrides["mosaic-prototypes-per-class"] * 10
        assert len(protos) < len(labels)
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
    # Distillation in round 1, one fine-tuning round; 3 of 5 clients break the contract.
    run = run_inline({**DISTILL_ONLY, "num-clients": 5, "num-server-rounds": 2,
                      "mosaic-finetune-rounds": 1},
                     train=faulty({0: "no-generator", 1: "nan-prototypes", 2: "short-counts"}))
    assert run.round_stats[1]["phase"] == "distill"
    assert (run.round_stats[1]["clients_ok"], run.round_stats[1]["clients_failed"]) == (2, 3)
    good = run.replies_in_round(1)[3:]  # partitions 3 and 4
    assert run.round_stats[1]["num_prototypes"] == sum(
        len(r.content[STATS_RECORD][PROTOTYPES].numpy()) for r in good)
    assert run.round_stats[2]["clients_ok"] == 5


def test_too_few_good_distillation_replies_stop_the_run():
    with pytest.raises(NotEnoughRepliesError, match="round 1: only 1 usable replies"):
        run_inline(DISTILL_ONLY, train=faulty({0: "no-generator", 1: "no-generator",
                                               2: "nan-prototypes"}))


def plain_client(msg: Message, context: Context) -> Message:
    """A ClientApp that trains but ignores the task, like Flower's quickstart apps."""
    reply = handle_train(msg, context)
    reply.content = RecordDict({"arrays": reply.content["arrays"],
                                "metrics": reply.content["metrics"]})
    return reply


def test_a_client_app_that_ignores_the_task_is_reported_in_round_one():
    """Round 1 asks for the label counts: a ClientApp that does not follow the task is
    found there, with the reason, not after the warm-up rounds."""
    with pytest.raises(NotEnoughRepliesError) as err:
        run_inline({**TINY["mosaic"], "num-server-rounds": 3}, train=plain_client)
    assert str(err.value).startswith("round 1: only 0 usable replies")
    assert "no stats record, which the round's task asked for: the ClientApp does not do " \
           "MosaicStrategy's client part" in str(err.value)


def test_settings_built_in_python_are_refused_in_python_names():
    spec = DATASETS["digits"]
    with pytest.raises(ValueError, match=r"^MosaicSettings\.distill_steps=-1: must be an integer >= 0$"):
        MosaicStrategy(lambda: build_model("cnn", spec), lambda: ImageGenerator(spec, 8, 8),
                       MosaicSettings(distill_steps=-1))


@pytest.mark.parametrize("ablation", [
    {"mosaic-meta-model": False}, {"mosaic-generators": False},
    {"mosaic-expert-weighting": "uniform"}])
def test_ablations_run_and_say_what_they_used(ablation):
    run = run_inline({**DISTILL_ONLY, **ablation})
    distill = run.round_stats[1]
    assert distill["phase"] == "distill" and distill["clients_ok"] == run.config.num_clients
    if "mosaic-meta-model" in ablation:
        assert distill["meta_prototype_accuracy"] == distill["ensemble_prototype_accuracy"]
        assert distill["teacher_accuracy"] == distill["ensemble_accuracy"]
    if "mosaic-generators" in ablation:
        assert not any(GENERATOR_RECORD in r.content.array_records for r in run.grid.replies)
        assert distill["distill_loss_last"] != distill["distill_loss_first"]
    if "mosaic-expert-weighting" in ablation:
        # Every expert is the same plain average of the client models: the
        # ensemble is that one model.
        replies = [r for r in run.grid.replies if STATS_RECORD in r.content.array_records]
        plain = average_arrays([r.content.array_records["arrays"] for r in replies],
                               [1.0] * len(replies))
        _, accuracy = CentralEvaluator(run.config)(plain)
        assert distill["ensemble_accuracy"] == pytest.approx(accuracy, abs=1e-3)


def test_schedule_that_does_not_fit_is_rejected_before_round_one():
    strategy = build_strategy(RunConfig.from_mapping(TINY["mosaic"]))
    with pytest.raises(ValueError, match="num_rounds=2"):  # the Python argument's name
        strategy.start(grid=InlineGrid(4), initial_arrays=ArrayRecord(), num_rounds=2)


def test_fedavg_with_batchnorm_keeps_integer_buffers_across_rounds():
    """Flower's averaging turns num_batches_tracked into float64; ours keeps int64."""
    run = run_inline({"strategy": "fedavg", "model": "resnet8", "model-width": 0.25,
                      "num-clients": 3, "num-server-rounds": 2, "local-epochs": 1})
    assert run.round_stats[2]["clients_ok"] == 3
    assert run.result.arrays["body.1.num_batches_tracked"].dtype == "int64"
    # Round 2 started from round 1's average, whose counter is the clients' (integer) mean.
    sent = run.sent_in_round(2)[0].content["arrays"]["body.1.num_batches_tracked"]
    assert sent.dtype == "int64" and int(sent.numpy()) > 0

