"""FedLGD's steps on small tensors (distribution matching, gradient matching, the
anchor), then the strategy in-process: what travels, what stays on the node, when
each virtual set changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import TINY, SimulatedCrash, partition_id, run_inline, serve_inline, server_round

from mosaic_flwr.baselines.fedlgd import (GLOBAL_VIRTUAL_RECORD, LOCAL_VIRTUAL_RECORD,
                                          NormalisedInputs, anchor_regulariser,
                                          class_gaussian_images, distribution_matching,
                                          gradient_distance, gradient_matching,
                                          mean_feature_distance, real_images,
                                          round_update,
                                          supervised_contrastive)
from mosaic_flwr.baselines.settings import FedLGDSettings
from mosaic_flwr.data import client_indices, load_dataset
from mosaic_flwr.data.augment import BatchTransform
from mosaic_flwr.checkpoint import latest_checkpoint, load_checkpoint
from mosaic_flwr.client import handle_train
from mosaic_flwr.data.datasets import DATASETS
from mosaic_flwr.models import ModelSpec
from mosaic_flwr.records import TASK_RECORD
from mosaic_flwr.training import TrainSettings, train

DIGITS = DATASETS["digits"]


def digits(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` digits training images (normalised) and labels."""
    data = load_dataset("digits")
    images = BatchTransform(DIGITS).normalise(torch.from_numpy(data.train_images[:n]))
    return images, torch.from_numpy(data.train_labels[:n]).long()


def cnn(seed: int):
    return ModelSpec.parse("cnn").build(DIGITS, seed=seed).eval().requires_grad_(False)


# ------------------------------------------------------------------ distribution matching
def test_distribution_matching_moves_virtual_class_means_to_the_real_ones():
    images, labels = digits()
    rng = torch.Generator().manual_seed(0)
    counts = torch.bincount(labels, minlength=10).clamp_max(5)
    virtual, virtual_labels = class_gaussian_images(images, labels, counts, rng)
    assert torch.bincount(virtual_labels, minlength=10).tolist() == counts.tolist()
    judge = cnn(99)  # never used for matching

    def distance(x):
        return float(mean_feature_distance(judge.features, images, labels, x, virtual_labels, 10))
    settings = FedLGDSettings(real_batch_size=32)
    # Under freshly initialised networks (the warm-up) ...
    seeds = iter(range(1000))
    warm, first, last = distribution_matching(
        virtual, virtual_labels, images, labels, lambda: cnn(next(seeds)), 40, settings,
        DIGITS, rng)
    assert distance(warm) < 0.6 * distance(virtual)
    # ... and under one fixed network (the global model), where it fits that network closely.
    fixed = cnn(7)
    refined, first, last = distribution_matching(
        virtual, virtual_labels, images, labels, lambda: fixed, 40, settings, DIGITS, rng)
    exact = float(mean_feature_distance(fixed.features, images, labels, refined,
                                        virtual_labels, 10))
    assert exact < 0.2 * float(mean_feature_distance(fixed.features, images, labels, virtual,
                                                     virtual_labels, 10))
    assert float(last) < float(first)


def test_a_virtual_class_starts_from_that_class_pixel_statistics():
    images, labels = digits()
    counts = torch.zeros(10, dtype=torch.long)
    counts[3] = 2000
    virtual, virtual_labels = class_gaussian_images(images, labels, counts,
                                                    torch.Generator().manual_seed(0))
    assert virtual_labels.unique().tolist() == [3]
    real = images[labels == 3]
    assert float(virtual.mean()) == pytest.approx(float(real.mean()), abs=0.02)
    assert float(virtual.std()) == pytest.approx(float(real.std()), rel=0.05)


def test_real_init_takes_distinct_real_images_of_each_class():
    images, labels = digits()
    counts = torch.bincount(labels, minlength=10).clamp_max(4)
    virtual, virtual_labels = real_images(images, labels, counts, torch.Generator().manual_seed(0))
    assert torch.bincount(virtual_labels, minlength=10).tolist() == counts.tolist()
    for x, y in zip(virtual, virtual_labels):
        matches = (images == x).flatten(1).all(1)
        assert matches.any() and set(labels[matches].tolist()) == {int(y)}
    assert len(torch.unique(virtual.flatten(1), dim=0)) == len(virtual)


# ------------------------------------------------------------------ gradient matching
def test_gradient_distance_is_zero_for_parallel_gradients_and_counts_units():
    g = [torch.randn(4, 3, 5, 5), torch.randn(4), torch.randn(10, 8)]
    assert float(gradient_distance(g, [3 * t for t in g])) == pytest.approx(0.0, abs=1e-5)
    # Opposite gradients: 2 per output unit of each weight (the bias is not compared).
    assert float(gradient_distance(g, [-t for t in g])) == pytest.approx(2 * (4 + 10), rel=1e-5)


def test_round_update_over_the_learning_rate_is_the_gradient_of_one_sgd_step():
    images, labels = digits(64)
    before = ModelSpec.parse("cnn").build(DIGITS, seed=0)
    after = ModelSpec.parse("cnn").build(DIGITS, seed=0)
    loss = torch.nn.functional.cross_entropy(after(images), labels)
    grads = torch.autograd.grad(loss, [p for p in after.parameters() if p.dim() >= 2])
    with torch.no_grad():
        for p, g in zip([p for p in after.parameters() if p.dim() >= 2], grads):
            p -= 0.1 * g
    for got, want in zip(round_update(before, after, 0.1), grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-3)


def test_gradient_matching_makes_the_virtual_gradient_point_where_the_update_went():
    images, labels = digits(200)
    model = ModelSpec.parse("cnn").build(DIGITS, seed=0)
    params = [p for p in model.parameters() if p.dim() >= 2]
    target = [g.detach() for g in torch.autograd.grad(
        torch.nn.functional.cross_entropy(model(images), labels), params)]
    virtual_labels = torch.arange(10).repeat_interleave(2)
    start = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def distance(x):
        loss = torch.nn.functional.cross_entropy(model(x), virtual_labels)
        return float(gradient_distance(list(torch.autograd.grad(loss, params)), target))
    matched, first, last = gradient_matching(model, target, start, virtual_labels, 100, 1.0)
    assert distance(matched) < 0.7 * distance(start)
    assert float(last) < float(first)
    assert all(not p.grad for p in model.parameters())  # the model itself is left alone


# ------------------------------------------------------------------ the anchor
def naive_supcon(features, labels, temperature):
    z = torch.nn.functional.normalize(features, dim=1)
    losses = []
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i]
        denominator = torch.logsumexp(torch.stack([z[i] @ z[j] / temperature for j in others]), 0)
        positives = [j for j in others if labels[j] == labels[i]]
        terms = [z[i] @ z[p] / temperature - denominator for p in positives]
        losses.append(-torch.stack(terms).mean() if terms else torch.tensor(0.0))
    return torch.stack(losses).mean()


def test_supervised_contrastive_loss_matches_its_definition():
    features = torch.randn(9, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0])  # class 2 alone: adds 0
    torch.testing.assert_close(supervised_contrastive(features, labels, 0.5),
                               naive_supcon(features, labels, 0.5))


def class_alignment(model, images, labels, anchors, anchor_labels) -> float:
    """Mean cosine similarity of features to the global images of the same class, minus
    that to the global images of other classes."""
    with torch.no_grad():
        a = torch.nn.functional.normalize(model.features(images), dim=1)
        b = torch.nn.functional.normalize(model.features(anchors), dim=1)
    same = labels[:, None] == anchor_labels[None, :]
    sim = a @ b.T
    return float(sim[same].mean() - sim[~same].mean())


def test_the_anchor_pulls_features_towards_the_global_virtual_images_of_their_class():
    images, labels = digits(300)
    anchors = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    anchor_labels = torch.arange(10).repeat_interleave(2)
    settings = TrainSettings(epochs=3, batch_size=32, learning_rate=0.05, augment=False)
    scores = []
    for regulariser in (None, anchor_regulariser(anchors, anchor_labels, FedLGDSettings())):
        model = ModelSpec.parse("cnn").build(DIGITS, seed=0)
        train(model, images, labels, NormalisedInputs(), settings, torch.device("cpu"),
              torch.Generator().manual_seed(0), regulariser)
        scores.append(class_alignment(model, images, labels, anchors, anchor_labels))
    assert scores[1] > scores[0] + 0.1


# ------------------------------------------------------------------ the strategy in-process
def test_schedule_follows_the_reference_iterations():
    s = FedLGDSettings()
    assert [r for r in range(1, 70) if s.server_update(r)] == list(range(1, 52, 5))
    assert [r for r in range(1, 70) if s.client_refine(r)] == list(range(6, 52, 5))


def test_only_model_weights_leave_a_client_and_virtual_data_stay_on_the_node(tiny_run):
    run = tiny_run("fedlgd")
    config, grid = run.config, run.grid
    ipc = run.overrides["fedlgd-images-per-class"]
    data = load_dataset(config.dataset)
    model_keys = set(ModelSpec.parse("cnn").build(DIGITS).state_dict())
    for reply in grid.replies:
        content = reply.content
        assert set(content.array_records) == {"arrays"}
        assert set(content.array_records["arrays"].keys()) == model_keys
        assert set(content.config_records) == {"client"}
        assert all(isinstance(v, (int, float))
                   for v in content.metric_records["metrics"].values())
    for node, context in grid.contexts.items():
        stored = context.state.array_records[LOCAL_VIRTUAL_RECORD]
        held = np.bincount(data.train_labels[client_indices(config, node - 1)], minlength=10)
        assert np.bincount(stored["labels"].numpy(), minlength=10).tolist() == \
            np.minimum(held, ipc).tolist()
        assert stored["images"].numpy().shape[1:] == (1, 8, 8)


def test_the_global_virtual_set_changes_in_the_update_rounds_and_reaches_every_client(tiny_run):
    run = tiny_run("fedlgd")
    sent = {}
    for msg in run.grid.sent:
        if msg.metadata.message_type != "train":
            continue
        record = msg.content.array_records[GLOBAL_VIRTUAL_RECORD]
        sent.setdefault(server_round(msg), []).append(record["images"].numpy())
        assert record["labels"].numpy().tolist() == np.repeat(np.arange(10), 10).tolist()
        task = msg.content.config_records[TASK_RECORD]
        assert (task["setting.anchor"], task["setting.refine"]) == \
            {1: (False, False), 2: (True, False), 3: (False, True)}[server_round(msg)]
    for images in sent.values():  # one set per round, to every client
        assert all(np.array_equal(images[0], other) for other in images)
    assert not np.array_equal(sent[1][0], sent[2][0])  # updated after round 1
    assert np.array_equal(sent[2][0], sent[3][0])  # not after round 2 (anchored)
    for r in (1, 3):
        stats = run.round_stats[r]
        assert stats["gradient_match_last"] < stats["gradient_match_first"]
    assert "gradient_match_first" not in run.round_stats[2]
    steps = {(server_round(m), partition_id(r)): r.content.metric_records["metrics"]
             ["fedlgd-matching-steps"] for m, r in zip(run.grid.sent, run.grid.replies)
             if r.metadata.message_type == "train"}
    assert {r: sorted({v for (rr, _), v in steps.items() if rr == r}) for r in (1, 2, 3)} == \
        {1: [20], 2: [0], 3: [5]}
    timed = {r: (run.round_stats[r]["fedlgd_warmup_seconds_sum"] > 0,
                 run.round_stats[r]["fedlgd_refine_seconds_sum"] > 0) for r in (1, 2, 3)}
    assert timed == {1: (True, False), 2: (False, False), 3: (False, True)}


def test_a_node_that_lost_its_virtual_data_builds_it_again_and_its_reply_still_counts():
    def forgetful(msg, context):
        if server_round(msg) == 2 and context.node_config["partition-id"] == 0:
            del context.state[LOCAL_VIRTUAL_RECORD]  # as after a restart of the node
        return handle_train(msg, context)
    run = run_inline({**TINY["fedlgd"], "num-server-rounds": 2}, train=forgetful)
    assert run.round_stats[2]["clients_ok"] == 4
    steps = {partition_id(r): r.content.metric_records["metrics"]["fedlgd-matching-steps"]
             for m, r in zip(run.grid.sent, run.grid.replies)
             if r.metadata.message_type == "train" and server_round(m) == 2}
    assert steps == {0: 20, 1: 0, 2: 0, 3: 0}


def test_a_stopped_run_resumes_with_the_servers_global_virtual_images(tmp_path):
    """The checkpoint holds the global virtual set; the resumed run (new node ids, no
    client state: each client warms up again) sends exactly that set in round 3."""
    overrides = {**TINY["fedlgd"], "server-threads": 1, "output-dir": str(tmp_path),
                 "run-name": "run"}
    with pytest.raises(SimulatedCrash):
        serve_inline(overrides, crash_at=(3, 1))
    saved = load_checkpoint(latest_checkpoint(tmp_path / "run"))["strategy"]["global_images"]
    sent = []

    def recording(msg, context):
        sent.append((server_round(msg), msg.content.array_records[GLOBAL_VIRTUAL_RECORD]))
        return handle_train(msg, context)
    summary = serve_inline({**overrides, "run-name": "x", "resume-from": str(tmp_path / "run")},
                           first_node_id=101, train=recording)
    assert summary["status"] == "completed" and len(summary["rounds"]) == 3
    assert [r for r, _ in sent] == [3] * 4
    for _, record in sent:
        assert torch.equal(torch.from_numpy(record["images"].numpy()), saved)
