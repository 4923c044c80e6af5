"""The image generator, its discriminator, and the four generator losses.

A client trains one unconditional generator on its own data when the strategy
asks for it (Mosaic stage 2, once; FedDF, every round), as
:class:`~mosaic_flwr.kd.settings.GeneratorSettings` say. FedFTG's and DENSE's
servers train label-conditioned ones. The generator's last layer is a Tanh, but
its output is mapped to [0, 1] and then normalised with the data set's mean and
std, so its samples live where the classifier's inputs live (the reference code
fed raw [-1, 1] Tanh values to classifiers trained on normalised images).

The generator loss has four weighted terms:

- adversarial: a DCGAN discriminator, trained alongside on the local data,
  should judge the samples real (non-saturating BCE);
- entropy: a frozen copy of the local classifier should be confident on each
  sample (mean per-sample prediction entropy);
- diversity: the batch-mean prediction should spread over the classes
  (``log C`` minus the entropy of the mean prediction, so 0 is best);
- inversion: for clients with little data, the batch statistics entering each
  BatchNorm layer of the classifier should match the running statistics it
  recorded on real data (DeepInversion). Models without BatchNorm skip it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..data.augment import BatchTransform
from ..data.datasets import DatasetSpec
from ..errors import ConfigError
from ..training import FrozenForward, fast_layout
from .settings import GeneratorSettings


def sized_width(channels: int, image_size: int, width: int = 0) -> int:
    """A generator's (and its discriminator's) base width: ``width`` when given, else sized
    to the image: 64 (the reference DCGAN's, for 3x32x32 images) times the square root of
    the image's share of 3x32x32 values, rounded to a multiple of 8, at least 16.

    The convolutions' cost grows with width squared times pixels, so this keeps a
    generator's cost per sample proportional to the image's size: 32 for 1x28x28
    (MNIST), 64 for 3x32x32 (CIFAR), 16 for 1x8x8 (digits).
    """
    if width:
        return width
    scaled = 64 * math.sqrt(channels * image_size * image_size / (3 * 32 * 32))
    return max(16, 8 * round(scaled / 8))


class ImageGenerator(nn.Module):
    """DCGAN-style generator: z -> (C, H, W) classifier inputs (normalised images).

    The image side must be divisible by 4 (8, 28 and 32 are): a linear layer
    projects z to a (2w, H/4, W/4) map, two stride-2 transposed convolutions
    upsample it to (C, H, W); ``width`` 0 sizes w to the image (:func:`sized_width`).
    With ``num_classes > 0`` it is label-conditioned (the server-side generators
    of FedFTG and DENSE): a one-hot label is concatenated to z.
    """

    def __init__(self, spec: DatasetSpec, latent_dim: int = 100, width: int = 0,
                 num_classes: int = 0) -> None:
        super().__init__()
        if spec.image_size % 4:
            size = spec.image_size
            fit = size + 4 - size % 4  # the next side the generators can make
            raise ConfigError("image-size", size,
                              f"dataset {spec.name!r} has {size}x{size} images, but the image "
                              f"generators need a side divisible by 4: set image-size={fit} "
                              f"to resize the images to {fit}x{fit}")
        width = sized_width(spec.channels, spec.image_size, width)
        self.width = width
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.start = spec.image_size // 4
        self.project = nn.Linear(latent_dim + num_classes, 2 * width * self.start ** 2, bias=False)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, spec.channels, 4, stride=2, padding=1),
            nn.Tanh(),
        )
        # Not persistent: they come from the data set spec, not from training.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, z: torch.Tensor,  # pylint: disable=arguments-differ
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            if labels is None:
                raise ValueError("a label-conditioned generator needs labels")
            z = torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1)
        hidden = self.project(z).view(len(z), -1, self.start, self.start)
        images = (self.body(hidden) + 1) / 2  # [0, 1]
        return (images - self.mean) / self.std

    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` samples in the classifier's input space (uniform labels when conditioned
        and none are given)."""
        device = self.project.weight.device
        z = torch.randn(n, self.latent_dim, generator=generator).to(device)
        if self.num_classes and labels is None:
            labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        return self(z, None if labels is None else labels.to(device))


def build_generator(spec: DatasetSpec, settings: GeneratorSettings) -> ImageGenerator:
    """The generator every client of a run trains (same shape, so the server can load any)."""
    return ImageGenerator(spec, settings.generator_latent_dim, settings.generator_width)


class Discriminator(nn.Module):
    """DCGAN discriminator on classifier inputs: two stride-2 convolutions, one logit."""

    def __init__(self, channels: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        start = image_size // 4
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2, True),
            nn.Flatten(), nn.Linear(2 * width * start * start, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
        return self.net(x).squeeze(1)


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the per-sample predictions (low: the classifier is confident)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()


def diversity_loss(logits: torch.Tensor) -> torch.Tensor:
    """``log C`` minus the entropy of the batch-mean prediction (0: classes equally used)."""
    mean_p = F.softmax(logits, dim=1).mean(0)
    entropy = -(mean_p * torch.log(mean_p.clamp_min(1e-8))).sum()
    return math.log(logits.shape[1]) - entropy


class BatchNormStatistics:
    """Records, for every BatchNorm layer of a model, how far a batch's statistics
    are from the layer's running statistics (DeepInversion's feature loss)."""

    def __init__(self, model: nn.Module) -> None:
        self.losses: list[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._hook) for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # pylint: disable=protected-access

    @property
    def active(self) -> bool:
        """Whether the model has BatchNorm layers at all."""
        return bool(self._hooks)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _output) -> None:
        x = inputs[0].float()
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self.losses.append(torch.norm(mean - module.running_mean, 2)
                           + torch.norm(var - module.running_var, 2))

    def pop(self) -> torch.Tensor:
        """Sum of the losses recorded since the last call."""
        total = torch.stack(self.losses).sum() if self.losses else torch.zeros(())
        self.losses = []
        return total

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for hook in self._hooks:
            hook.remove()


@dataclass(frozen=True)
class GeneratorWeights:
    """Weights of the four generator loss terms."""

    adversarial: float = 1.0
    entropy: float = 1.0
    diversity: float = 1.0
    inversion: float = 0.0


def generator_objective(generator: ImageGenerator, classifier: nn.Module,
                        discriminator: nn.Module, z: torch.Tensor, weights: GeneratorWeights,
                        bn_stats: BatchNormStatistics | None = None,
                        fake: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted generator loss on latents ``z`` and each term's value (detached 0-d
    tensors, on the device). ``fake``: ``generator(z)`` when the caller computed it already."""
    fake = generator(z) if fake is None else fake
    if bn_stats is not None:
        bn_stats.pop()
    logits = classifier(fake).float()
    terms = {
        "adversarial": F.binary_cross_entropy_with_logits(
            discriminator(fake).float(), torch.ones(len(z), device=fake.device)),
        "entropy": prediction_entropy(logits),
        "diversity": diversity_loss(logits),
        "inversion": (bn_stats.pop().to(fake.device) if bn_stats is not None
                      else torch.zeros((), device=fake.device)),
    }
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: value.detach().float() for name, value in terms.items()}


@dataclass(frozen=True)
class GeneratorReport:
    """Generator loss terms averaged over the first and the last tenth of training.

    ``inversion`` is 0 throughout when that term is off (a client with
    ``inversion_max_samples`` samples or more, or a classifier without BatchNorm).
    """

    first: dict[str, float]
    last: dict[str, float]


def train_generator(generator: ImageGenerator, classifier: nn.Module, images: torch.Tensor,
                    transform: BatchTransform, settings: GeneratorSettings,
                    device: torch.device, rng: torch.Generator, amp: bool = True,
                    cpu_bf16: bool = False) -> GeneratorReport:
    """Train ``generator`` on local ``images`` (uint8 or [0, 1]) against a frozen ``classifier``.

    Each step draws one generated batch and uses it twice: detached for the
    discriminator's step, then for the generator's (the DCGAN recipe). The
    generator and the discriminator train in float32; the frozen classifier's
    pass runs under ``amp`` (CUDA) or ``cpu_bf16`` (:class:`FrozenForward`).
    Loss values stay on the device until the end.
    """
    classifier = fast_layout(copy.deepcopy(classifier).to(device)).eval()
    classifier.requires_grad_(False)
    use_inversion = len(images) < settings.inversion_max_samples and settings.inversion_weight > 0
    bn_stats = BatchNormStatistics(classifier) if use_inversion else None
    frozen = FrozenForward(classifier, device, amp, cpu_bf16)
    use_inversion = bool(bn_stats is not None and bn_stats.active)
    weights = GeneratorWeights(settings.adversarial_weight, settings.entropy_weight,
                               settings.diversity_weight,
                               settings.inversion_weight if use_inversion else 0.0)
    fast_layout(generator.to(device)).train()
    discriminator = Discriminator(images.shape[1], images.shape[-1], generator.width)
    fast_layout(discriminator.to(device)).train()
    betas = (0.5, 0.999)
    opt_g = torch.optim.Adam(generator.parameters(), lr=settings.generator_lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=settings.generator_lr, betas=betas)
    batch = min(settings.generator_batch_size, len(images))
    real_label = torch.ones(batch, device=device)
    fake_label = torch.zeros(batch, device=device)
    names = ("adversarial", "entropy", "diversity", "inversion", "total", "discriminator")
    history = torch.zeros(settings.generator_steps, len(names), device=device)
    for step in range(settings.generator_steps):
        idx = torch.randint(0, len(images), (batch,), generator=rng)
        real = transform(images[idx].to(device), train=True, generator=rng)
        z = torch.randn(batch, generator.latent_dim, generator=rng).to(device)
        fake = generator(z)
        # Discriminator step: real -> 1, generated -> 0.
        d_loss = (F.binary_cross_entropy_with_logits(discriminator(real), real_label)
                  + F.binary_cross_entropy_with_logits(discriminator(fake.detach()), fake_label))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # Generator step, on the same generated batch.
        loss, terms = generator_objective(generator, frozen, discriminator, z, weights, bn_stats,
                                          fake=fake)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        history[step] = torch.stack([*(terms[n] for n in names[:4]), loss.detach().float(),
                                     d_loss.detach().float()])
    if bn_stats is not None:
        bn_stats.remove()
    generator.eval()
    rows = [dict(zip(names, row)) for row in history.tolist()]  # one read, at the end
    tenth = max(1, len(rows) // 10)
    return GeneratorReport(_mean(rows[:tenth]), _mean(rows[-tenth:]))


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
