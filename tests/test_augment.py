"""Batched augmentation: shapes, shifts, flips, normalisation."""

import torch

from mosaic_flwr.data import DATASETS, BatchTransform


def test_normalise_uses_the_data_sets_mean_and_std_per_channel():
    transform = BatchTransform(DATASETS["cifar10"])
    images = torch.rand(4, 3, 32, 32)
    spec = DATASETS["cifar10"]
    for channel in range(3):
        expected = (images[:, channel] - spec.mean[channel]) / spec.std[channel]
        assert torch.allclose(transform.normalise(images)[:, channel], expected, atol=1e-6)
    normalised = transform.normalise(torch.full((1, 3, 2, 2), 0.4914))
    assert abs(float(normalised[0, 0, 0, 0])) < 1e-6


def test_random_crop_shifts_each_image_within_the_padding():
    spec = DATASETS["digits"]  # padding 1, no flip
    transform = BatchTransform(spec)
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 4, 4] = 1.0
    batch = image.repeat(64, 1, 1, 1)
    out = transform.augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    positions = {tuple((o[0] == 1).nonzero()[0].tolist()) for o in out}
    assert positions <= {(4 + dy, 4 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert len(positions) > 3  # offsets really vary per image
    assert torch.all(out.sum(dim=(1, 2, 3)) == 1)


def test_flip_only_for_data_sets_that_allow_it():
    image = torch.zeros(1, 3, 32, 32)
    image[..., 0] = 1.0  # left column lit
    batch = image.repeat(64, 1, 1, 1)
    cifar = BatchTransform(DATASETS["cifar10"])
    cifar.padding = 0
    flipped = cifar.augment(batch, torch.Generator().manual_seed(0))
    right_lit = flipped[:, 0, 0, -1] == 1
    assert 0 < int(right_lit.sum()) < 64
    svhn = BatchTransform(DATASETS["svhn"])
    svhn.padding = 0
    assert torch.equal(svhn.augment(batch), batch)


def test_eval_mode_only_normalises():
    transform = BatchTransform(DATASETS["digits"])
    images = torch.rand(3, 1, 8, 8)
    assert torch.equal(transform(images, train=False), transform.normalise(images))
