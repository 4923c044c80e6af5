"""Personalised evaluation: each client's own test split, and the global model scored there
(mean, spread and worst decile of per-client accuracy in metrics.jsonl and summary.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from harness import TINY, serve_inline

from mosaic_flwr.config import RunConfig
from mosaic_flwr.data import BatchTransform, client_test_splits, load_data, partitions_for
from mosaic_flwr.models import ModelSpec
from mosaic_flwr.server import CentralEvaluator
from mosaic_flwr.training import TrainSettings, evaluate, train

SKEWED = {"partitioner": "dirichlet", "dirichlet-alpha": 0.3, "num-clients": 6}


def test_personal_test_splits_follow_each_clients_training_labels_and_are_disjoint():
    config = RunConfig.from_mapping(SKEWED)
    data = load_data(config)
    splits = client_test_splits(config)
    train_counts = np.stack([np.bincount(data.train_labels[p], minlength=10)
                             for p in partitions_for(config)])
    test_counts = np.bincount(data.test_labels, minlength=10)
    joined = np.concatenate(splits)
    assert len(joined) == len(set(joined.tolist())) == len(data.test_labels)  # disjoint, whole
    assert 0 <= joined.min() and joined.max() < len(data.test_labels)  # test images only
    for k, split in enumerate(splits):
        got = np.bincount(data.test_labels[split], minlength=10)
        exact = test_counts * train_counts[k] / train_counts.sum(0)
        assert np.abs(got - exact).max() <= 1  # the client's label proportions, to an image
        assert (got[train_counts[k] == 0] == 0).all()  # no class it never saw
    assert [s.tolist() for s in client_test_splits(config)] == [s.tolist() for s in splits]
    other = client_test_splits(RunConfig.from_mapping({**SKEWED, "seed": 1}))
    assert any(a.tolist() != b.tolist() for a, b in zip(splits, other))


def test_the_central_evaluator_scores_the_model_on_every_clients_own_split():
    config = RunConfig.from_mapping(SKEWED)
    data = load_data(config)
    spec = data.spec
    model = ModelSpec.parse("cnn").build(spec, seed=0)
    half = data.train_labels < 5  # a model that knows half the classes: clients differ
    train(model, torch.from_numpy(data.train_images[half]),
          torch.from_numpy(data.train_labels[half]).long(), BatchTransform(spec),
          TrainSettings(epochs=3, batch_size=32, learning_rate=0.05), torch.device("cpu"),
          torch.Generator().manual_seed(0))
    evaluator = CentralEvaluator(config)
    loss, accuracy = evaluator(ArrayRecord(model.state_dict()))
    images, labels = torch.from_numpy(data.test_images), torch.from_numpy(data.test_labels)
    assert (loss, accuracy) == pytest.approx(
        evaluate(model, images, labels, BatchTransform(spec), torch.device("cpu")))
    per_client = np.array([evaluate(model, images[s], labels[s], BatchTransform(spec),
                                    torch.device("cpu"))[1] for s in client_test_splits(config)])
    assert per_client.std() > 0.05
    assert evaluator.personal == pytest.approx({
        "personal_accuracy_mean": per_client.mean(),
        "personal_accuracy_std": per_client.std(),
        "personal_accuracy_worst10": per_client.min()})  # 6 clients: the worst one


def test_every_round_and_the_summary_report_personal_accuracy(tmp_path):
    summary = serve_inline({**TINY["fedavg"], "output-dir": str(tmp_path), "run-name": "run"})
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert 0 <= line["personal_accuracy_worst10"] <= line["personal_accuracy_mean"] <= 1
        assert line["personal_accuracy_std"] >= 0
    assert summary["final_personal_accuracy"] == {
        key: lines[-1][f"personal_accuracy_{key}"] for key in ("mean", "std", "worst10")}
