"""Every registered model on every data set's input shape: output, features, head."""

import pytest
import torch

from mosaic_flwr.data import DATASETS
from mosaic_flwr.models import MODELS, build_model


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_and_features_have_the_right_shapes(name, dataset):
    spec = DATASETS[dataset]
    model = build_model(name, spec).eval()
    x = torch.randn(2, *spec.input_shape)
    with torch.no_grad():
        features = model.features(x)
        logits = model(x)
    assert features.shape == (2, model.feature_dim)
    assert logits.shape == (2, spec.num_classes)
    assert model.head.in_features == model.feature_dim
    assert torch.allclose(model.head(features), logits, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_multiplier_scales_the_model(name):
    spec = DATASETS["cifar10"]
    full = sum(p.numel() for p in build_model(name, spec, 1.0).parameters())
    half = sum(p.numel() for p in build_model(name, spec, 0.5).parameters())
    quarter = sum(p.numel() for p in build_model(name, spec, 0.25).parameters())
    # Hidden widths scale linearly, so most parameter counts scale quadratically.
    assert full > 2.5 * half
    assert half > 2.5 * quarter
