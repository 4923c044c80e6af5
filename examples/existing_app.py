"""Mosaic dropped into an existing Flower app that has its own model and data.

The ServerApp builds ``MosaicStrategy`` directly and calls ``start`` as with
Flower's ``FedAvg``. The ClientApp keeps its own training loop and data; it only
reads the strategy's ``TrainTask`` and, when asked, adds the two Mosaic records
with the tensor-level helpers. Its evaluate handler reports ``local-accuracy``
and ``num-examples``, which Mosaic's federated checks read (without it the
distilled model and the fine-tuning averages are kept unchecked). Nothing here uses
this project's run config.

Wire it in your ``pyproject.toml`` as ``serverapp = "existing_app:server"`` and
``clientapp = "existing_app:client"`` (``tests/test_examples.py`` runs it
in-process).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from sklearn.datasets import load_digits
from torch import nn

from mosaic_flwr import MosaicSettings, MosaicStrategy, TrainTask
from mosaic_flwr.data import BatchTransform, DatasetSpec
from mosaic_flwr.kd.generator import build_generator
from mosaic_flwr.kd.upload import client_generator
from mosaic_flwr.mosaic.client import client_statistics
from mosaic_flwr.records import label_counts_record

NUM_CLIENTS = 4
SPEC = DatasetSpec("my-digits", channels=1, image_size=8, num_classes=10, mean=(0.3,),
                   std=(0.38,), hflip=False, crop_padding=0)
# A short schedule for the example: 2 warm-up rounds, distillation, 1 fine-tuning round.
SETTINGS = MosaicSettings(warmup_rounds=2, finetune_rounds=1, generator_steps=10,
                          meta_epochs=5, distill_steps=10)


class MyNet(nn.Module):
    """Any model works if it has ``features(x)``, a linear ``head`` and ``feature_dim``."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_dim = 64
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        return self.head(self.body(x))


def my_client_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] and labels: client i holds mostly classes 3i .. 3i + 2."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    mine = (labels // 3) % NUM_CLIENTS == partition_id
    return images[mine], labels[mine]


server = ServerApp()


@server.main()
def server_main(grid: Grid, context: Context) -> None:  # pylint: disable=unused-argument
    """FedAvg-style setup; only the strategy differs."""
    strategy = MosaicStrategy(model_fn=MyNet,
                              generator_fn=lambda: build_generator(SPEC, SETTINGS.generator),
                              settings=SETTINGS, min_available_nodes=NUM_CLIENTS,
                              min_train_nodes=NUM_CLIENTS, fraction_evaluate=0.0)
    torch.manual_seed(0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(MyNet().state_dict()),
                            num_rounds=4)
    context.state["final"] = result.arrays  # keep it, e.g. to save it


client = ClientApp()


@client.train()
def client_train(msg: Message, context: Context) -> Message:
    """Your usual local training, plus the records Mosaic's task asks for."""
    task = TrainTask.from_message(msg)
    settings = MosaicSettings.from_mapping(task.settings)
    images, labels = my_client_data(int(context.node_config["partition-id"]))
    transform, device = BatchTransform(SPEC), torch.device("cpu")
    rng = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
    model = MyNet()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    content = RecordDict()
    if task.upload_stats:  # prototypes use the received global model's features
        content["stats"] = client_statistics(model, images, labels, transform, 10, settings,
                                             device, rng)
    elif task.upload_counts:  # round 1: the label counts only
        content["stats"] = label_counts_record(labels, 10)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1 * task.learning_rate_scale)
    for _ in range(3):
        for batch in torch.randperm(len(labels), generator=rng).split(32):
            loss = nn.functional.cross_entropy(model(transform(images[batch], train=False)),
                                               labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    if task.upload_generator:
        content["generator"], _ = client_generator(model, images, transform, SPEC,
                                                   settings.generator, device, rng)
    content["arrays"] = ArrayRecord(model.state_dict())
    content["metrics"] = MetricRecord({"num-examples": len(labels),
                                       "train-loss": float(loss.detach())})
    return Message(content, reply_to=msg)


@client.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this client's data: what Mosaic's federated check asks."""
    images, labels = my_client_data(int(context.node_config["partition-id"]))
    model = MyNet()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    with torch.no_grad():
        predictions = model.eval()(BatchTransform(SPEC)(images, train=False)).argmax(1)
    accuracy = float((predictions == labels).float().mean())
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(labels),
                                                        "local-accuracy": accuracy})}),
                   reply_to=msg)
