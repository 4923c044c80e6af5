"""Local training: it learns, FedProx's term pulls towards the global model, it is reproducible."""

import torch

from mosaic_flwr.data import DATASETS, BatchTransform, load_dataset
from mosaic_flwr.models import build_model
from mosaic_flwr.training import TrainSettings, evaluate, train

SPEC = DATASETS["digits"]
CPU = torch.device("cpu")


def digits_subset(n=300):
    data = load_dataset("digits")
    return torch.from_numpy(data.train_images[:n]), torch.from_numpy(data.train_labels[:n])


def trained(settings, seed=0, model=None):
    images, labels = digits_subset()
    torch.manual_seed(0)
    model = model or build_model("cnn", SPEC)
    result = train(model, images, labels, BatchTransform(SPEC), settings, CPU,
                   torch.Generator().manual_seed(seed))
    return model, result


def test_training_lowers_the_loss_on_the_training_data():
    images, labels = digits_subset()
    torch.manual_seed(0)
    model = build_model("cnn", SPEC)
    before, _ = evaluate(model, images, labels, BatchTransform(SPEC), CPU)
    _, result = trained(TrainSettings(epochs=10, batch_size=32, learning_rate=0.05), model=model)
    after, accuracy = evaluate(model, images, labels, BatchTransform(SPEC), CPU)
    assert after < 0.5 * before
    assert accuracy > 0.8
    assert result.num_examples == 300


def test_proximal_term_keeps_weights_closer_to_the_start():
    torch.manual_seed(0)
    start = build_model("cnn", SPEC).state_dict()

    def drift(mu):
        model = build_model("cnn", SPEC)
        model.load_state_dict(start)
        trained(TrainSettings(epochs=2, batch_size=32, learning_rate=0.05, proximal_mu=mu),
                model=model)
        return sum(float((model.state_dict()[k] - start[k]).pow(2).sum()) for k in start)
    assert drift(1.0) < 0.8 * drift(0.0)


def test_same_seed_gives_identical_weights_on_cpu():
    settings = TrainSettings(epochs=1, batch_size=32, learning_rate=0.05)
    first, _ = trained(settings, seed=3)
    second, _ = trained(settings, seed=3)
    other, _ = trained(settings, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 second.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                     other.state_dict().values()))
