"""Batched image augmentation and normalisation as tensor operations.

Working on whole batches on the training device keeps the GPU busy and avoids
per-sample PIL transforms (and torchvision, which the core must not need).
"""

from __future__ import annotations

import torch

from .datasets import DatasetSpec


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1]: uint8 pixels are divided by 255, floats pass through."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images


class BatchTransform:
    """Random crop with zero padding, optional horizontal flip, then normalisation.

    Takes uint8 pixels or float images in [0, 1] (see :func:`to_unit`).
    """

    def __init__(self, spec: DatasetSpec, device: torch.device | str = "cpu") -> None:
        self.padding = spec.crop_padding
        self.hflip = spec.hflip
        self.mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Map images (uint8 or [0, 1]) into the classifier's input space."""
        return (to_unit(images) - self.mean) / self.std

    def augment(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Randomly crop (after padding) and flip a batch of images (any dtype)."""
        batch, _, height, width = images.shape
        device = images.device
        if self.padding > 0:
            pad = self.padding
            padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
            # One random offset per image, applied with a single gather.
            off_y = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(device)
            off_x = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(device)
            rows = (off_y[:, None] + torch.arange(height, device=device)[None, :])
            cols = (off_x[:, None] + torch.arange(width, device=device)[None, :])
            batch_idx = torch.arange(batch, device=device)[:, None, None]
            images = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]
            images = images.permute(0, 3, 1, 2)
        if self.hflip:
            flip = (torch.rand(batch, generator=generator) < 0.5).to(device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images

    def __call__(self, images: torch.Tensor, train: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if train:
            images = self.augment(images, generator)
        return self.normalise(images)
