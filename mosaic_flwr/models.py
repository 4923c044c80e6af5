"""The model registry: classifiers with a separate feature extractor and head.

Every classifier is a :class:`Classifier`: ``features(x)`` gives the penultimate
feature vector, ``head`` is the final linear layer, and ``forward`` is
``head(features(x))``. Mosaic needs both halves: features for prototypes, heads
for the meta model. ``width`` scales every hidden width (HeteroFL / FedRolex
sub-models), and the input shape and class count come from the data set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .data.datasets import DatasetSpec


class Classifier(nn.Module):
    """A feature extractor followed by a linear classifier head."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)
        #: ``{parameter name: u}`` for a linear layer that follows a ``Flatten`` of
        #: (channels, u) maps: its input dimension is channel-major blocks of u
        #: entries, which width sub-models keep or drop whole (:mod:`mosaic_flwr.submodels`).
        self.flatten_units: dict[str, int] = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (batch, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        return self.head(self.body(x))


def classifier_problem(model: nn.Module) -> str:
    """Why ``model`` cannot serve as a strategy's global model ('' when it can): the
    server steps read features and a linear head separately."""
    missing = [what for what, ok in (
        ("a features(x) method returning (batch, feature_dim) features",
         callable(getattr(model, "features", None))),
        ("a linear classifier `head` (torch.nn.Linear) applied to those features",
         isinstance(getattr(model, "head", None), nn.Linear)),
        ("an integer `feature_dim`", isinstance(getattr(model, "feature_dim", None), int)))
        if not ok]
    if not missing:
        return ""
    return (f"the model {type(model).__name__} needs " + "; ".join(missing)
            + " (see mosaic_flwr.models.Classifier, and examples/existing_app.py for a model "
            "of your own)")


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def cnn(spec: DatasetSpec, width: float = 1.0) -> Classifier:
    """The common FL baseline CNN: two 5x5 conv + max-pool blocks, two linear layers."""
    c1, c2, hidden = _scaled(32, width), _scaled(64, width), _scaled(512, width)
    spatial = spec.image_size // 4
    body = nn.Sequential(
        nn.Conv2d(spec.channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * spatial * spatial, hidden), nn.ReLU(inplace=True),
    )
    model = Classifier(body, hidden, spec.num_classes)
    model.flatten_units = {"body.7.weight": spatial * spatial}
    return model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18's block)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet(spec: DatasetSpec, widths: tuple[int, ...], blocks: tuple[int, ...],
            width: float) -> Classifier:
    """CIFAR-style ResNet: 3x3 stem without max-pool, stages of BasicBlocks, global pool."""
    planes = [_scaled(w, width) for w in widths]
    layers: list[nn.Module] = [
        nn.Conv2d(spec.channels, planes[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(planes[0]), nn.ReLU(inplace=True),
    ]
    in_planes = planes[0]
    for stage, (out_planes, count) in enumerate(zip(planes, blocks)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(in_planes, out_planes, stride))
            in_planes = out_planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), in_planes, spec.num_classes)


def resnet8(spec: DatasetSpec, width: float = 1.0) -> Classifier:
    """ResNet-8 (FedDF's small ResNet): stages of 16, 32, 64 channels, one block each."""
    return _resnet(spec, (16, 32, 64), (1, 1, 1), width)


def resnet18(spec: DatasetSpec, width: float = 1.0) -> Classifier:
    """ResNet-18, CIFAR stem: stages of 64, 128, 256, 512 channels, two blocks each."""
    return _resnet(spec, (64, 128, 256, 512), (2, 2, 2, 2), width)


MODELS: dict[str, Callable[[DatasetSpec, float], Classifier]] = {
    "cnn": cnn,
    "resnet8": resnet8,
    "resnet18": resnet18,
}


def build_model(name: str, spec: DatasetSpec, width: float = 1.0) -> Classifier:
    """Instantiate a registered classifier for a data set's input shape and classes."""
    return MODELS[name](spec, width)


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture at a width, written ``name@width`` (``resnet18@0.5``).

    Clients and server name models this way in the run config
    (``client-models``, ``global-model``), in a SuperNode's ``--node-config
    model=...`` and in replies, so both sides build the same architecture.
    """

    name: str
    width: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r} in {self}; known: {', '.join(MODELS)}")
        if not self.width > 0:
            raise ValueError(f"model width must be > 0 in {self}")

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``"cnn"`` or ``"resnet18@0.5"`` -> ModelSpec; ValueError for anything else."""
        name, sep, width = text.strip().partition("@")
        if not sep:
            return cls(name)
        try:
            value = float(width)
        except ValueError:
            raise ValueError(f"bad model width in {text!r}: expected name@number") from None
        return cls(name, value)

    def __str__(self) -> str:
        return f"{self.name}@{self.width:g}"

    def build(self, spec: DatasetSpec, seed: int | None = None) -> Classifier:
        """The model for a data set; with ``seed``, initialised from that seed alone
        (the global torch RNG is left as it was)."""
        if seed is None:
            return build_model(self.name, spec, self.width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(self.name, spec, self.width)

    def holds_slice_of(self, other: "ModelSpec") -> bool:
        """True when this model is a width sub-model of ``other`` (same family, not wider)."""
        return self.name == other.name and self.width <= other.width
