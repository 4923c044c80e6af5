"""Mosaic's trust checks and the rules that keep its gain: held-out prototypes, pooled
client scores, distillation restricted to the classes held, and the fine-tuning anchor."""

import copy

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from mosaic_flwr.data.augment import BatchTransform
from mosaic_flwr.data.datasets import DATASETS, load_dataset
from mosaic_flwr.kd.distill import DistillWeights, distill_into
from mosaic_flwr.kd.generator import build_generator
from mosaic_flwr.models import build_model
from mosaic_flwr.mosaic.client import PROTOTYPE_LABELS, PROTOTYPES, not_true_distillation
from mosaic_flwr.mosaic.settings import MosaicSettings
from mosaic_flwr.mosaic.strategy import MosaicStrategy
from mosaic_flwr.mosaic.trust import holdout_split, pooled_accuracy
from mosaic_flwr.records import LABEL_COUNTS, ClientUpload
from mosaic_flwr.training import TrainSettings, train

DIGITS = DATASETS["digits"]


def test_holdout_split_holds_out_part_of_every_group_of_two_or_more():
    groups = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # sizes 1, 2, 10
    train, held = holdout_split(groups, 0.2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([train, held]).tolist()) == list(range(13))
    assert torch.bincount(groups[held], minlength=3).tolist() == [0, 1, 2]
    train, held = holdout_split(groups, 0.0, torch.Generator().manual_seed(0))
    assert train.tolist() == list(range(13)) and held.tolist() == []


def test_pooled_accuracy_weights_each_client_by_its_examples():
    scores = {1: (0.5, 10), 2: (1.0, 30), 3: (0.0, 1000)}
    assert pooled_accuracy(scores, [1, 2]) == 0.875
    assert pooled_accuracy(scores, []) == 0.0


def test_distillation_on_some_classes_leaves_the_others_head_rows_alone():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    student = build_model("cnn", DIGITS, width=0.5)
    before = student.head.weight.detach().clone()
    rng = torch.Generator().manual_seed(1)
    distill_into(student, teacher, lambda: torch.randn(32, 1, 8, 8, generator=rng), steps=20,
                 lr=1e-2, weights=DistillWeights(), device=torch.device("cpu"),
                 classes=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    after = student.head.weight.detach()
    assert torch.equal(after[8:], before[8:])
    assert not torch.allclose(after[:8], before[:8])


# ------------------------------------------------------------------ the server's verdict
def _upload(k: int, model: nn.Module, counts: list[int], generator: nn.Module) -> ClientUpload:
    stats = ArrayRecord({
        LABEL_COUNTS: Array(np.array(counts, dtype="int64")),
        PROTOTYPES: Array(np.zeros((0, model.feature_dim), dtype="float32")),
        PROTOTYPE_LABELS: Array(np.zeros(0, dtype="int64"))})
    return ClientUpload(node_id=k, partition_id=k, model="cnn", arrays=ArrayRecord(model.state_dict()),
                        weight=float(sum(counts)), stats=stats,
                        generator=ArrayRecord(generator.state_dict()))


def _strategy(**changes) -> MosaicStrategy:
    settings = MosaicSettings(warmup_rounds=0, meta_model=False, distill_steps=30,
                              distill_pool_batches=3, samples_per_generator=16,
                              generator_width=8, **changes)
    return MosaicStrategy(lambda: build_model("cnn", DIGITS), lambda: build_generator(DIGITS, settings),
                          settings, global_name="cnn", cpu_bf16=False)


def _state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def test_a_class_no_client_of_the_round_holds_is_left_alone_by_distillation():
    """Outside a Flower round (no grid) the distilled student is kept; the two clients hold
    classes 0-8 only, so the global model's head row of class 9 does not move."""
    torch.manual_seed(0)
    strategy = _strategy()
    student = build_model("cnn", DIGITS)
    uploads = [_upload(k, build_model("cnn", DIGITS), [10] * 9 + [0], strategy.generator_fn())
               for k in range(2)]
    arrays, stats = strategy.distill_round(uploads, ArrayRecord(student.state_dict()))
    assert stats["classes_held"] == 9 and stats["distilled"] == 1.0
    head = _state(arrays)["head.weight"]
    assert torch.equal(head[9], student.state_dict()["head.weight"][9])
    assert not torch.equal(head[:9], student.state_dict()["head.weight"][:9])


# ------------------------------------------------------------------ keeping the gain
def test_not_true_distillation_ignores_the_true_class_and_vanishes_on_agreement():
    torch.manual_seed(0)
    anchor, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    assert not_true_distillation(anchor, anchor, labels).item() == pytest.approx(0.0, abs=1e-6)
    # Only the true class differs (and a constant shift): still no penalty.
    moved = anchor + 3.0
    moved[torch.arange(6), labels] += torch.randn(6) * 5
    assert not_true_distillation(moved, anchor, labels).item() == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(6, 5)
    loss = not_true_distillation(other.requires_grad_(), anchor, labels)
    assert loss.item() > 0.01
    loss.backward()
    assert torch.all(other.grad[torch.arange(6), labels] == 0)


def test_the_anchor_keeps_local_training_closer_to_the_received_model_on_other_classes():
    """One client holding two classes fine-tunes with and without the anchor: with it, the
    trained model's predictions on the other classes' images stay closer to the received model's."""
    data = load_dataset("digits")
    images, labels = torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels)
    transform = BatchTransform(DIGITS)
    torch.manual_seed(0)
    received = build_model("cnn", DIGITS)
    train(received, images, labels, transform, TrainSettings(epochs=3, batch_size=64,
          learning_rate=0.05), torch.device("cpu"), torch.Generator().manual_seed(0))
    local = (labels == 0) | (labels == 1)
    others = images[~local][:300]
    with torch.no_grad():
        target = torch.softmax(received.eval()(transform(others, train=False)), 1)
    gaps = {}
    for weight in (0.0, 1.0):
        model = copy.deepcopy(received)
        anchor = copy.deepcopy(received).eval().requires_grad_(False)

        def regulariser(m, x, y, logits, anchor=anchor, weight=weight):  # pylint: disable=unused-argument
            with torch.no_grad():
                anchor_logits = anchor(x)
            return weight * not_true_distillation(logits, anchor_logits, y)

        train(model, images[local], labels[local], transform,
              TrainSettings(epochs=5, batch_size=32, learning_rate=0.01), torch.device("cpu"),
              torch.Generator().manual_seed(1), regulariser)
        with torch.no_grad():
            probs = torch.softmax(model.eval()(transform(others, train=False)), 1)
        gaps[weight] = float((probs - target).abs().sum(1).mean())
    assert gaps[1.0] < 0.7 * gaps[0.0]
