"""Each baseline's distinguishing step on small tensors, then each strategy in-process."""

from __future__ import annotations

import torch
from flwr.app import Message
from inline_grid import InlineGrid
from test_mosaic_strategy import run_short
from torch import nn

from mosaic_flwr.baselines.common import (classwise_probabilities, labels_by_counts,
                                          pairwise_diversity_loss, soft_cross_entropy)
from mosaic_flwr.baselines.dense import DenseSettings, Synthesizer, adversarial_loss
from mosaic_flwr.baselines.fedcog import (complementary_counts, js_agreement,
                                          synthesize_complementary)
from mosaic_flwr.baselines.fedftg import disagreement, generator_loss
from mosaic_flwr.baselines.fedgen import FeatureGenerator, teacher_loss, train_feature_generator
from mosaic_flwr.baselines.settings import FedCOGSettings, FedFTGSettings
from mosaic_flwr.config import RunConfig
from mosaic_flwr.data import client_indices, load_dataset, partitions_for, proxy_indices
from mosaic_flwr.data.augment import BatchTransform
from mosaic_flwr.data.datasets import DATASETS
from mosaic_flwr.models import build_model
from mosaic_flwr.mosaic.experts import head_logits
from mosaic_flwr.mosaic.generator import ImageGenerator
from mosaic_flwr.records import GENERATOR_RECORD, LOCAL_MODEL_RECORD, STATS_RECORD, TASK_RECORD
from mosaic_flwr.training import TrainSettings, train

DIGITS = DATASETS["digits"]


def trained_digits_model(seed: int = 0, epochs: int = 3) -> nn.Module:
    """A CNN trained briefly on all of digits (~90% test accuracy)."""
    torch.manual_seed(seed)
    data = load_dataset("digits")
    model = build_model("cnn", DIGITS)
    train(model, torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels),
          BatchTransform(DIGITS, torch.device("cpu")),
          TrainSettings(epochs=epochs, batch_size=32, learning_rate=0.05, augment=False),
          torch.device("cpu"), torch.Generator().manual_seed(seed))
    return model.eval()


# -------------------------------------------------------------------- shared parts
def test_labels_by_counts_follow_the_counts_exactly():
    labels = labels_by_counts(torch.tensor([6, 0, 3, 1]), 20, torch.Generator().manual_seed(0))
    assert torch.bincount(labels, minlength=4).tolist() == [12, 0, 6, 2]


def test_pairwise_diversity_loss_is_one_for_collapsed_outputs_and_lower_for_spread_ones():
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert float(pairwise_diversity_loss(noise, torch.ones(8, 5))) == 1.0
    assert float(pairwise_diversity_loss(noise, noise.repeat(1, 3))) < 0.5


def test_classwise_ensemble_takes_each_class_from_the_clients_that_hold_it():
    logits = torch.tensor([[[4.0, 0.0]], [[0.0, 4.0]]])  # client 0 says class 0, client 1 class 1
    only_own = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # each client holds only "its" class
    probs = classwise_probabilities(logits, only_own)
    p_hi = torch.softmax(torch.tensor([4.0, 0.0]), 0)[0]
    assert torch.allclose(probs, torch.tensor([[0.5, 0.5]]))  # both confident in their class
    shared = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # client 0 holds everything
    assert torch.allclose(classwise_probabilities(logits, shared), torch.tensor([[p_hi, 1 - p_hi]]))
    assert torch.allclose(soft_cross_entropy(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]])),
                          torch.log(torch.tensor(2.0)))


# -------------------------------------------------------------------------- FedGen
def test_fedgen_generator_training_makes_the_weighted_heads_predict_the_sampled_labels():
    torch.manual_seed(0)
    num_clients, classes, dim = 3, 4, 16
    weights, biases = torch.randn(num_clients, classes, dim), torch.zeros(num_clients, classes)
    counts = torch.tensor([[50, 0, 5, 0], [0, 40, 5, 0], [1, 1, 30, 20]]).double()
    class_weights = counts / counts.sum(0)
    generator = FeatureGenerator(classes, dim, noise_dim=8, hidden_dim=32)
    labels = torch.arange(classes)
    rng = torch.Generator().manual_seed(0)

    def weighted_accuracy() -> float:
        generator.eval()
        with torch.no_grad():
            y = labels.repeat(64)
            logits = head_logits({"head.weight": weights, "head.bias": biases},
                                 generator(y, rng)[0])  # (B, K, C)
            mixed = torch.einsum("bkc,kb->bc", logits, class_weights[:, y].float())
        return float((mixed.argmax(1) == y).float().mean())

    before = weighted_accuracy()
    optimiser = torch.optim.Adam(generator.parameters(), lr=1e-2)
    history = train_feature_generator(generator, optimiser, weights, biases, class_weights,
                                      labels, steps=150, batch_size=32, diversity_weight=1.0,
                                      rng=rng)
    after = weighted_accuracy()
    assert history[-1] < history[0] / 2
    assert before < 0.6 and after > 0.95


def test_fedgen_teacher_loss_weighs_each_head_by_its_share_of_the_label():
    features = torch.tensor([[1.0, 0.0]])
    weights = torch.stack([torch.eye(2), -torch.eye(2)])  # head 0 right, head 1 wrong
    biases = torch.zeros(2, 2)
    label = torch.tensor([0])
    logits = head_logits({"head.weight": weights, "head.bias": biases}, features)  # (B, K, C)
    ce = [float(torch.nn.functional.cross_entropy(logits[:, k], label)) for k in range(2)]
    only_first = torch.tensor([[1.0, 0.5], [0.0, 0.5]])
    assert abs(float(teacher_loss(features, label, weights, biases, only_first)) - ce[0]) < 1e-6
    half = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert abs(float(teacher_loss(features, label, weights, biases, half))
               - (ce[0] + ce[1]) / 2) < 1e-6


# -------------------------------------------------------------------------- FedFTG
def test_fedftg_hard_sample_term_raises_global_client_disagreement_on_the_batch():
    torch.manual_seed(0)
    student, client = build_model("cnn", DIGITS).eval(), build_model("cnn", DIGITS).eval()
    student.requires_grad_(False)
    client.requires_grad_(False)
    generator = ImageGenerator(DIGITS, latent_dim=8, width=8, num_classes=10)
    settings = FedFTGSettings(ce_weight=0.0, diversity_weight=0.0, hard_weight=1.0)
    z, y = torch.randn(32, 8), torch.arange(10).repeat(4)[:32]
    weight = torch.ones(10)

    def gap() -> float:
        with torch.no_grad():
            x = generator(z, y)
            return float(disagreement(student(x), client(x)).mean())

    before = gap()
    optimiser = torch.optim.Adam(generator.parameters(), lr=1e-2)
    for _ in range(30):
        x = generator(z, y)
        loss, terms = generator_loss(x, z, y, student(x), client(x), weight, settings, 1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert terms["hard"] < 0
    assert gap() > 2 * before


# --------------------------------------------------------------------------- DENSE
def test_dense_adversarial_loss_counts_only_samples_where_student_and_teacher_disagree():
    teacher = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    student = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # agrees on sample 0, not on 1
    t = torch.log_softmax(teacher[1], 0)
    kl = float((t.exp() * (t - torch.log_softmax(student[1], 0))).sum())
    assert abs(float(adversarial_loss(student, teacher)) + kl / 2) < 1e-6
    assert float(adversarial_loss(teacher, teacher)) == 0.0


def test_dense_synthesis_makes_the_ensemble_predict_the_targets():
    clients = [trained_digits_model(seed, epochs=2).requires_grad_(False) for seed in (0, 1)]
    settings = DenseSettings(generator_steps=40, synthesis_batch_size=64, latent_dim=16,
                             generator_width=16, adv_weight=0.0)
    synthesizer = Synthesizer(clients, lambda: ImageGenerator(DIGITS, 16, 16), 10, settings,
                              torch.device("cpu"))
    batch, history = synthesizer.synthesize(build_model("cnn", DIGITS),
                                            torch.Generator().manual_seed(0))
    synthesizer.remove()
    assert batch.shape == (64, 1, 8, 8)
    assert history[-1]["ce"] < history[0]["ce"] / 4


# -------------------------------------------------------------------------- FedCOG
def test_fedcog_targets_the_classes_a_client_lacks():
    assert complementary_counts(torch.tensor([10, 0, 5]), 30).tolist() == [0, 20, 10]
    assert complementary_counts(torch.tensor([4, 4]), 30).tolist() == [0, 0]


def test_fedcog_samples_are_classified_as_the_targeted_missing_classes_by_the_global_model():
    global_model = trained_digits_model(0)
    local = trained_digits_model(1, epochs=1)
    per_class = complementary_counts(torch.tensor([90, 90, 0, 90, 0, 90, 90, 90, 90, 90]), 40)
    x, labels, targets = synthesize_complementary(
        global_model, local, per_class, (1, 8, 8), FedCOGSettings(generation_steps=100),
        torch.device("cpu"), torch.Generator().manual_seed(0))
    assert sorted(set(labels.tolist())) == [2, 4] and len(x) == 40
    with torch.no_grad():
        predicted = global_model(x).argmax(1)
    assert float((predicted == labels).float().mean()) > 0.95
    assert torch.allclose(targets.argmax(1), predicted)
    # JS between identical predictions is 0: no disagreement to gain.
    assert float(js_agreement(targets, targets).abs().max()) < 1e-6


# ------------------------------------------------------- strategies, in-process
TINY = dict(partitioner="dirichlet", dirichlet_alpha=0.3, num_clients=4, min_clients=2,
            num_server_rounds=2, local_epochs=1, mosaic_generator_steps=4,
            mosaic_generator_width=8, mosaic_generator_latent_dim=8)


def tiny_run(strategy: str, **overrides):
    config = RunConfig(strategy=strategy, **{**TINY, **overrides})
    grid = InlineGrid(config.num_clients)
    strategy_obj, result = run_short(config, grid)
    return config, grid, strategy_obj, result


def sent_in_round(grid: InlineGrid, server_round: int) -> list[Message]:
    return [m for m in grid.sent if m.metadata.message_type == "train"
            and int(m.content.config_records["config"]["server-round"]) == server_round]


def replies_in_round(grid: InlineGrid, server_round: int) -> list[Message]:
    # InlineGrid answers each message in turn: sent[i] is answered by replies[i].
    return [reply for msg, reply in zip(grid.sent, grid.replies)
            if msg.metadata.message_type == "train"
            and int(msg.content.config_records["config"]["server-round"]) == server_round]


def test_fedgen_sends_its_generator_from_round_two_and_clients_use_it():
    config, grid, strategy, _ = tiny_run("fedgen", fedgen_generator_steps=20)
    assert all(GENERATOR_RECORD not in m.content.array_records for m in sent_in_round(grid, 1))
    round2 = sent_in_round(grid, 2)
    assert all(set(m.content[GENERATOR_RECORD].keys()) == set(strategy.generator.state_dict())
               for m in round2)
    for reply in replies_in_round(grid, 2):
        pid = int(reply.content.config_records["client"]["partition-id"])
        counts = reply.content[STATS_RECORD]["label-counts"].numpy()
        labels = load_dataset("digits").train_labels[client_indices(config, pid)]
        assert counts.tolist() == torch.bincount(torch.from_numpy(labels), minlength=10).tolist()
        assert list(reply.content[STATS_RECORD].keys()) == ["label-counts"]  # nothing else
        metrics = reply.content.metric_records["metrics"]
        assert abs(metrics["fedgen-alpha"] - config.fedgen_alpha * config.fedgen_decay) < 1e-9
    assert all("fedgen-alpha" not in r.content.metric_records["metrics"]
               for r in replies_in_round(grid, 1))
    for stats in strategy.round_stats.values():
        assert stats["generator_loss_last"] < stats["generator_loss_first"]


def test_fedftg_fine_tunes_the_average_on_the_server_every_round():
    _, grid, strategy, result = tiny_run("fedftg", fedftg_iterations=3, fedftg_latent_dim=8,
                                         fedftg_generator_width=8)
    assert all(m.content[TASK_RECORD]["upload-counts"] for m in grid.sent
               if m.metadata.message_type == "train")
    for stats in strategy.round_stats.values():
        assert {"hard_disagreement_first", "student_accuracy_before", "student_accuracy_after",
                "distill_loss_first"} <= set(stats)
    # The global model is the fine-tuned average, not the average itself.
    final = result.arrays.to_torch_state_dict()
    average = strategy.average(replies_in_round(grid, 2))[0].to_torch_state_dict()
    assert any(not torch.equal(final[k], average[k]) for k in final)


def test_dense_is_one_shot_with_the_whole_local_budget_and_a_fresh_student():
    config, grid, strategy, result = tiny_run(
        "dense", num_server_rounds=3, dense_epochs=2, dense_generator_steps=3,
        dense_synthesis_batch_size=16, dense_latent_dim=8, dense_generator_width=8)
    train_messages = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_messages) == config.num_clients  # one round only
    assert all(m.content[TASK_RECORD]["local-epochs"] == config.local_epochs * 3
               for m in train_messages)
    assert list(strategy.round_stats) == [1]
    assert {"ensemble_accuracy", "student_accuracy_after"} <= set(strategy.round_stats[1])
    average = strategy.average(replies_in_round(grid, 1))[0].to_torch_state_dict()
    final = result.arrays.to_torch_state_dict()
    assert all(not torch.equal(final[k], average[k]) for k in final if final[k].is_floating_point())


def test_proxy_split_is_held_out_from_every_client():
    config = RunConfig(num_clients=4, partitioner="dirichlet", proxy_fraction=0.2)
    proxy = set(proxy_indices(config).tolist())
    clients = [set(p.tolist()) for p in partitions_for(config)]
    total = len(load_dataset("digits").train_labels)
    assert len(proxy) == round(0.2 * total)
    assert all(not (proxy & c) for c in clients)
    assert len(proxy) + sum(len(c) for c in clients) == total
    assert len(proxy_indices(config.replace(proxy_fraction=0.0))) == 0


def test_feddf_distils_the_ensemble_on_client_generators_or_on_the_proxy_split():
    _, grid, strategy, _ = tiny_run("feddf", feddf_steps=10)
    assert all(GENERATOR_RECORD in r.content.array_records for r in grid.replies)
    _, grid, strategy, _ = tiny_run("feddf", feddf_steps=30, feddf_inputs="proxy",
                                    proxy_fraction=0.2)
    assert all(GENERATOR_RECORD not in r.content.array_records for r in grid.replies)
    num_train = len(load_dataset("digits").train_labels)
    assert strategy.proxy_inputs is not None and len(strategy.proxy_inputs) == round(0.2 * num_train)
    for stats in strategy.round_stats.values():
        assert stats["distill_loss_last"] < stats["distill_loss_first"]


def test_fedcog_clients_keep_their_model_and_synthesise_from_the_start_round():
    config, grid, _, _ = tiny_run("fedcog", num_server_rounds=3, fedcog_start_round=3,
                                  fedcog_generation_steps=5, fedcog_num_samples=32)
    for server_round in (1, 2):
        assert all("fedcog-samples" not in r.content.metric_records["metrics"]
                   for r in replies_in_round(grid, server_round))
    samples = [r.content.metric_records["metrics"]["fedcog-samples"]
               for r in replies_in_round(grid, 3)]
    assert len(samples) == config.num_clients and all(0 < n <= 32 for n in samples)
    # Each node kept its own last trained model in its state (the one it uploaded in
    # round 3), and that record never left the node.
    for msg, reply in zip(grid.sent, grid.replies):
        if int(msg.content.config_records["config"]["server-round"]) == 3:
            kept = grid.contexts[msg.metadata.dst_node_id].state[LOCAL_MODEL_RECORD]
            kept, uploaded = kept.to_torch_state_dict(), reply.content["arrays"].to_torch_state_dict()
            assert all(torch.equal(kept[k], uploaded[k]) for k in kept)
    assert all(LOCAL_MODEL_RECORD not in r.content.array_records for r in grid.replies)


def test_a_counts_only_upload_is_screened_like_any_other_reply():
    import numpy as np  # pylint: disable=import-outside-toplevel
    from flwr.app import Array, ArrayRecord  # pylint: disable=import-outside-toplevel

    from mosaic_flwr.baselines.fedftg import FedFTGStrategy  # pylint: disable=import-outside-toplevel

    strategy = FedFTGStrategy.from_config(RunConfig(strategy="fedftg"))
    good = ArrayRecord({"label-counts": Array(np.arange(10, dtype=np.int64))})
    assert strategy.stats_problem(good, prototypes=False) == ""
    floats = ArrayRecord({"label-counts": Array(np.ones(10, dtype=np.float32))})
    assert "10 non-negative integers" in strategy.stats_problem(floats, prototypes=False)
    negative = ArrayRecord({"label-counts": Array(-np.ones(10, dtype=np.int64))})
    assert "non-negative" in strategy.stats_problem(negative, prototypes=False)
    extra = ArrayRecord({"label-counts": Array(np.arange(10, dtype=np.int64)),
                         "prototypes": Array(np.zeros((1, 512), dtype=np.float32))})
    assert "stats must hold label-counts" in strategy.stats_problem(extra, prototypes=False)
