"""Each baseline's distinguishing step on small tensors, then each strategy in-process."""

from __future__ import annotations

import copy
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from harness import TINY, partition_id, run_inline
from torch import nn

from mosaic_flwr.baselines.dense import DenseSettings, Synthesizer, adversarial_loss
from mosaic_flwr.baselines.fedcog import (LOCAL_MODEL_RECORD, complementary_counts, js_agreement,
                                          synthesize_complementary)
from mosaic_flwr.baselines.fedftg import FedFTGStrategy, disagreement, generator_loss
from mosaic_flwr.baselines.fedgen import FeatureGenerator, teacher_loss, train_feature_generator
from mosaic_flwr.baselines.settings import FedCOGSettings, FedFTGSettings
from mosaic_flwr.config import RunConfig
from mosaic_flwr.data import client_indices, load_dataset, partitions_for, proxy_indices
from mosaic_flwr.data.augment import BatchTransform
from mosaic_flwr.data.datasets import DATASETS
from mosaic_flwr.kd.ensemble import (classwise_probabilities, head_logits, labels_by_counts,
                                     pairwise_diversity_loss, soft_cross_entropy)
from mosaic_flwr.kd.generator import ImageGenerator
from mosaic_flwr.models import build_model
from mosaic_flwr.records import GENERATOR_RECORD, STATS_RECORD, TASK_RECORD
from mosaic_flwr.training import TrainSettings, train

DIGITS = DATASETS["digits"]


@lru_cache(maxsize=None)
def _trained_state(seed: int, epochs: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    data = load_dataset("digits")
    model = build_model("cnn", DIGITS)
    train(model, torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels),
          BatchTransform(DIGITS, torch.device("cpu")),
          TrainSettings(epochs=epochs, batch_size=32, learning_rate=0.05, augment=False),
          torch.device("cpu"), torch.Generator().manual_seed(seed))
    return copy.deepcopy(model.state_dict())


def trained_digits_model(seed: int, epochs: int = 2) -> nn.Module:
    """A CNN trained briefly on all of digits (~90% test accuracy). Each (seed, epochs)
    trains once per session; every call returns a fresh copy."""
    model = build_model("cnn", DIGITS)
    model.load_state_dict(_trained_state(seed, epochs))
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
def test_dense_adversarial_loss_counts_only_samples_where_student_and_teacher_agree():
    teacher = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    student = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # agrees on sample 0, not on 1
    t = torch.log_softmax(teacher[0], 0)
    kl = float((t.exp() * (t - torch.log_softmax(student[0], 0))).sum())
    assert kl > 0 and abs(float(adversarial_loss(student, teacher)) + kl / 2) < 1e-6
    assert float(adversarial_loss(teacher, teacher)) == 0.0
    # Once they disagree, pulling them further apart gains nothing: the term is bounded.
    assert float(adversarial_loss(student[1:] * 100, teacher[1:])) == 0.0


def test_dense_synthesis_makes_the_ensemble_predict_the_targets():
    clients = [trained_digits_model(seed).requires_grad_(False) for seed in (0, 1)]
    settings = DenseSettings(generator_steps=40, synthesis_batch_size=64, latent_dim=16,
                             generator_width=16, adv_weight=0.0)
    synthesizer = Synthesizer(clients, lambda: ImageGenerator(DIGITS, 16, 16), 10, settings,
                              torch.device("cpu"))
    batch, first, last = synthesizer.synthesize(build_model("cnn", DIGITS),
                                                torch.Generator().manual_seed(0))
    synthesizer.remove()
    assert batch.shape == (64, 1, 8, 8)
    assert last["ce"] < first["ce"] / 4


# -------------------------------------------------------------------------- FedCOG
def test_fedcog_targets_the_classes_a_client_lacks():
    assert complementary_counts(torch.tensor([10, 0, 5]), 30).tolist() == [0, 20, 10]
    assert complementary_counts(torch.tensor([4, 4]), 30).tolist() == [0, 0]


def test_fedcog_samples_are_classified_as_the_targeted_missing_classes_by_the_global_model():
    global_model, local = trained_digits_model(0), trained_digits_model(1)
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
def test_fedgen_sends_its_generator_from_round_two_and_clients_use_it(tiny_run):
    run = tiny_run("fedgen")
    assert all(GENERATOR_RECORD not in m.content.array_records for m in run.sent_in_round(1))
    assert all(set(m.content[GENERATOR_RECORD].keys()) == set(run.strategy.generator.state_dict())
               for m in run.sent_in_round(2))
    decayed_alpha = run.overrides["fedgen-alpha"] * run.overrides["fedgen-decay"]
    train_labels = load_dataset("digits").train_labels
    for reply in run.replies_in_round(2):
        pid = partition_id(reply)
        counts = reply.content[STATS_RECORD]["label-counts"].numpy()
        labels = train_labels[client_indices(run.config, pid)]
        assert counts.tolist() == np.bincount(labels, minlength=10).tolist()
        assert list(reply.content[STATS_RECORD].keys()) == ["label-counts"]  # nothing else
        metrics = reply.content.metric_records["metrics"]
        assert abs(metrics["fedgen-alpha"] - decayed_alpha) < 1e-9
    assert all("fedgen-alpha" not in r.content.metric_records["metrics"]
               for r in run.replies_in_round(1))
    for stats in run.round_stats.values():
        assert stats["generator_loss_last"] < stats["generator_loss_first"]


def test_fedftg_fine_tunes_the_average_on_the_server_every_round(tiny_run):
    run = tiny_run("fedftg")
    assert all(m.content[TASK_RECORD]["upload-counts"] for m in run.sent_in_round(1)
               + run.sent_in_round(2))
    for stats in run.round_stats.values():
        assert {"hard_disagreement_first", "student_accuracy_before", "student_accuracy_after",
                "distill_loss_first"} <= set(stats)
    # The global model is the fine-tuned average, not the average itself.
    final = run.result.arrays.to_torch_state_dict()
    average = run.strategy.average(run.replies_in_round(2))[0].to_torch_state_dict()
    assert any(not torch.equal(final[k], average[k]) for k in final)
    assert run.round_stats[2]["student_accuracy_after"] == run.accuracies[2]


def test_dense_is_one_shot_with_the_whole_local_budget_and_a_fresh_student(tiny_run):
    run = tiny_run("dense")
    train_messages = run.sent_in_round(1)
    assert len(run.grid.sent) == len(train_messages) == run.config.num_clients  # one round only
    budget = run.overrides["local-epochs"] * run.overrides["num-server-rounds"]
    assert all(m.content[TASK_RECORD]["local-epochs"] == budget for m in train_messages)
    assert list(run.round_stats) == [1]
    assert {"ensemble_accuracy", "student_accuracy_after"} <= set(run.round_stats[1])
    assert 0 < run.round_stats[1]["synthesis_seconds"] < run.round_stats[1]["distill_seconds"]
    average = run.strategy.average(run.replies_in_round(1))[0].to_torch_state_dict()
    final = run.result.arrays.to_torch_state_dict()
    assert all(not torch.equal(final[k], average[k]) for k in final if final[k].is_floating_point())


def test_proxy_split_is_held_out_from_every_client():
    settings = {"num-clients": 4, "partitioner": "dirichlet", "proxy-fraction": 0.2}
    config = RunConfig.from_mapping(settings)
    proxy = set(proxy_indices(config).tolist())
    clients = [set(p.tolist()) for p in partitions_for(config)]
    total = len(load_dataset("digits").train_labels)
    assert len(proxy) == round(0.2 * total)
    assert all(not (proxy & c) for c in clients)
    assert len(proxy) + sum(len(c) for c in clients) == total
    assert len(proxy_indices(RunConfig.from_mapping({**settings, "proxy-fraction": 0.0}))) == 0


def test_feddf_distils_the_ensemble_on_client_generators(tiny_run):
    run = tiny_run("feddf")
    assert all(GENERATOR_RECORD in r.content.array_records for r in run.grid.replies)
    assert run.strategy.proxy_inputs is None
    for stats in run.round_stats.values():
        assert stats["distill_loss_last"] != stats["distill_loss_first"]


def test_feddf_distils_the_ensemble_on_the_held_out_proxy_split():
    run = run_inline({**TINY["feddf"], "num-server-rounds": 1, "feddf-steps": 30,
                      "feddf-inputs": "proxy", "proxy-fraction": 0.2})
    assert all(GENERATOR_RECORD not in r.content.array_records for r in run.grid.replies)
    num_train = len(load_dataset("digits").train_labels)
    assert run.strategy.proxy_inputs is not None
    assert len(run.strategy.proxy_inputs) == round(0.2 * num_train)
    assert run.round_stats[1]["distill_loss_last"] < run.round_stats[1]["distill_loss_first"]


def test_fedcog_clients_keep_their_model_and_synthesise_from_the_start_round(tiny_run):
    run = tiny_run("fedcog")
    start = run.overrides["fedcog-start-round"]
    for server_round in range(1, start):
        assert all("fedcog-samples" not in r.content.metric_records["metrics"]
                   for r in run.replies_in_round(server_round))
    samples = [r.content.metric_records["metrics"]["fedcog-samples"]
               for r in run.replies_in_round(start)]
    assert len(samples) == run.config.num_clients
    assert all(0 < n <= run.overrides["fedcog-num-samples"] for n in samples)
    # Each node kept its own last trained model in its state (the one it uploaded in
    # the last round), and that record never left the node.
    for msg, reply in run.exchanges():
        if int(msg.content.config_records["config"]["server-round"]) == start:
            kept = run.grid.contexts[msg.metadata.dst_node_id].state[LOCAL_MODEL_RECORD]
            kept, uploaded = kept.to_torch_state_dict(), reply.content["arrays"].to_torch_state_dict()
            assert all(torch.equal(kept[k], uploaded[k]) for k in kept)
    assert all(LOCAL_MODEL_RECORD not in r.content.array_records for r in run.grid.replies)


def test_a_counts_only_upload_is_screened_like_any_other_reply():
    strategy = FedFTGStrategy.from_config(RunConfig.from_mapping({"strategy": "fedftg"}))
    task, model = strategy.task_for(1), strategy.global_name

    def problem(counts: np.ndarray, **extra: np.ndarray) -> str:
        return strategy.stats_problem(ArrayRecord({"label-counts": Array(counts),
                                                   **{k: Array(v) for k, v in extra.items()}}),
                                      task, model)
    assert problem(np.arange(10, dtype=np.int64)) == ""
    assert "10 non-negative integers" in problem(np.ones(10, dtype=np.float32))
    assert "non-negative" in problem(-np.ones(10, dtype=np.int64))
    assert "stats must hold label-counts" in problem(
        np.arange(10, dtype=np.int64), prototypes=np.zeros((1, 512), dtype=np.float32))


def test_keep_best_keeps_the_lowest_loss_batch_on_the_device():
    from mosaic_flwr.kd.ensemble import keep_best  # pylint: disable=import-outside-toplevel

    best, loss = keep_best(None, None, torch.full((2,), 1.0), torch.tensor(3.0))
    for value, candidate_loss in ((2.0, 5.0), (3.0, 1.0), (4.0, 1.0)):
        best, loss = keep_best(best, loss, torch.full((2,), value), torch.tensor(candidate_loss))
    assert best.tolist() == [3.0, 3.0] and float(loss) == 1.0  # ties keep the earlier batch
