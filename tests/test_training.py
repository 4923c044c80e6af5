"""Local training: it learns, FedProx's term pulls towards the global model, it is reproducible."""

import torch

from mosaic_flwr.client import train_settings
from mosaic_flwr.config import RunConfig
from mosaic_flwr.data import DATASETS, BatchTransform, load_dataset
from mosaic_flwr.models import build_model
from mosaic_flwr.records import TrainTask
from mosaic_flwr.strategies import build_strategy
from mosaic_flwr import training
from mosaic_flwr.training import TrainSettings, autocast, evaluate, fast_layout, train

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


def test_channels_last_layout_computes_the_same_function():
    torch.manual_seed(0)
    for name in ("cnn", "resnet8"):
        model = build_model(name, SPEC).eval()
        x = torch.randn(16, 1, 8, 8)
        with torch.no_grad():
            before = model(x)
            after = fast_layout(model)(x)
        assert model.body[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(before, after, atol=1e-5)


def test_cpu_bf16_autocast_only_when_asked_for_and_supported(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    x = torch.randn(4, 8)
    layer = torch.nn.Linear(8, 3)

    def dtype_under(context) -> torch.dtype:
        with context:
            return layer(x).dtype

    monkeypatch.setattr(training, "cpu_bf16_supported", lambda: True)
    assert dtype_under(autocast(cpu, cpu_bf16=True)) == torch.bfloat16
    assert dtype_under(autocast(cpu)) == torch.float32  # CPU mixed precision is opt-in
    assert dtype_under(autocast(cpu, enabled=False, cpu_bf16=True)) == torch.float32
    monkeypatch.setattr(training, "cpu_bf16_supported", lambda: False)
    assert dtype_under(autocast(cpu, cpu_bf16=True)) == torch.float32
    assert type(autocast(cuda, enabled=False)).__name__ == "nullcontext"


def test_uint8_images_train_and_evaluate_like_their_float_copies():
    images, labels = digits_subset(64)
    pixels = (images * 255).round().to(torch.uint8)
    transform = BatchTransform(SPEC)
    assert torch.allclose(transform(pixels, train=False), transform(pixels.float() / 255, train=False))
    model = build_model("cnn", SPEC)
    assert evaluate(model, pixels, labels, transform, CPU) == \
        evaluate(model, pixels.float() / 255, labels, transform, CPU)


def test_local_steps_count_sgd_steps_across_epochs():
    """``steps`` trains exactly that many batches, reshuffling when a pass ends; ten steps
    over 300 samples in batches of 32 are exactly one epoch."""
    calls = []

    def count(model, x, y, logits):  # pylint: disable=unused-argument
        calls.append(len(y))
        return torch.zeros(())

    images, labels = digits_subset()
    train(build_model("cnn", SPEC), images, labels, BatchTransform(SPEC),
          TrainSettings(epochs=1, steps=25, batch_size=32, learning_rate=0.05), CPU,
          torch.Generator().manual_seed(0), count)
    assert len(calls) == 25 and calls[9] == 12 and calls[10] == 32
    by_steps, _ = trained(TrainSettings(epochs=5, steps=10, batch_size=32, learning_rate=0.05))
    by_epoch, _ = trained(TrainSettings(epochs=1, batch_size=32, learning_rate=0.05))
    assert all(torch.equal(a, b) for a, b in zip(by_steps.state_dict().values(),
                                                 by_epoch.state_dict().values()))


def test_local_steps_key_reaches_every_kind_of_task():
    config = RunConfig.from_mapping({"local-steps": 7, "local-epochs": 2})
    assert (train_settings(config).steps, train_settings(config).epochs) == (7, 2)
    assert train_settings(config, TrainTask(local_epochs=3)).steps == 0  # a task's own epochs win
    assert train_settings(config, TrainTask(local_steps=70)).steps == 70
    dense = RunConfig.from_mapping({"strategy": "dense", "local-steps": 7, "num-server-rounds": 4})
    assert build_strategy(dense).task_for(1).local_steps == 28
