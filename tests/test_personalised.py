"""The personalised methods: Spectral Co-Distillation's spectral term and Ditto's proximal
term on small models, then both strategies in-process (personalised models kept in the node
state, scored on each client's own test split; FedAvg-FT as Spectral with its terms off;
Ditto's global model is FedAvg's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import TINY, partition_id, run_inline
from torch import nn

from mosaic_flwr.baselines.ditto import DittoClient
from mosaic_flwr.baselines.personalised import PERSONAL_MODEL_RECORD
from mosaic_flwr.baselines.settings import DittoSettings
from mosaic_flwr.baselines.spectral import spectral_divergence, weight_spectrum
from mosaic_flwr.compare import METHODS
from mosaic_flwr.data.datasets import DATASETS
from mosaic_flwr.models import ModelSpec

DIGITS = DATASETS["digits"]


def small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                         nn.BatchNorm1d(5))


def test_the_spectrum_is_the_references_fft_magnitudes_normalised():
    model = small(0)
    parts = []
    for module in model.modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            w = module.weight.detach().numpy()
            w = w.reshape(len(w), -1) if w.ndim > 2 else w
            parts.append(np.abs(np.fft.fft2(w) if w.ndim == 2 else np.fft.fft(w)).ravel())
    expected = np.concatenate(parts)
    np.testing.assert_allclose(weight_spectrum(model).detach().numpy(),
                               expected / expected.sum(), rtol=1e-4, atol=1e-9)


def test_the_spectral_term_is_zero_when_spectra_agree_and_falls_under_its_own_gradient():
    student, teacher = small(0), small(1)

    def divergence(target, ratio=1.0) -> float:
        with torch.no_grad():
            return float(spectral_divergence(student, target, ratio))
    same = weight_spectrum(student).detach()
    assert divergence(same) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():  # scaling every weight leaves the normalised spectrum as it is
        for p in student.parameters():
            p.mul_(3.0)
    assert divergence(same) == pytest.approx(0.0, abs=1e-6)
    target = weight_spectrum(teacher).detach()
    for ratio in (1.0, 0.4):
        before = spectral_divergence(student, target, ratio)
        assert float(before.detach()) > 1e-3
        grads = torch.autograd.grad(before, list(student.parameters()), allow_unused=True)
        with torch.no_grad():
            for p, g in zip(student.parameters(), grads):
                if g is not None:
                    p -= 1.0 * g / max(float(torch.cat([x.flatten() for x in grads
                                                        if x is not None]).norm()), 1e-12)
        assert divergence(target, ratio) < float(before.detach())


def test_dittos_term_pulls_the_personalised_weights_towards_the_global_ones():
    personal, global_ = small(0), small(1)
    client = DittoClient()
    client.settings, client.received = DittoSettings(proximal=0.5), global_
    term = client.personal_term()
    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    value = term(personal, x, y, torch.zeros(2, 5))
    grads = torch.autograd.grad(value, list(personal.parameters()))
    diffs = [p.detach() - g.detach() for p, g in zip(personal.parameters(), global_.parameters())]
    assert float(value.detach()) == pytest.approx(0.25 * sum(float(d.pow(2).sum()) for d in diffs))
    for grad, diff in zip(grads, diffs):  # the gradient of (lambda/2)||v - w||^2: lambda (v - w)
        torch.testing.assert_close(grad, 0.5 * diff)
    assert float(term(global_, x, y, torch.zeros(2, 5)).detach()) == 0.0
    client.settings = DittoSettings(proximal=0.0)
    assert client.personal_term() is None


@pytest.mark.parametrize("method", ["spectral-codistillation", "ditto"])
def test_personalised_models_stay_on_the_node_and_are_scored_on_its_own_split(method, tiny_run):
    run = tiny_run(method)
    for reply in run.grid.replies:
        assert set(reply.content.array_records) == {"arrays"}  # the generic model only
    kept = {}
    for msg, reply in zip(run.grid.sent, run.grid.replies):
        metrics = reply.content.metric_records["metrics"]
        kept.setdefault(int(msg.content.config_records["config"]["server-round"]), []).append(
            metrics["personal-model-kept"])
        assert 0 <= metrics["personal-accuracy"] <= 1
    assert kept == {1: [0.0] * 4, 2: [1.0] * 4, 3: [1.0] * 4}
    keys = set(ModelSpec.parse("cnn").build(DIGITS).state_dict())
    for context in run.grid.contexts.values():
        assert set(context.state.array_records[PERSONAL_MODEL_RECORD].keys()) == keys
    for r in (1, 2, 3):
        scores = sorted(reply.content.metric_records["metrics"]["personal-accuracy"]
                        for msg, reply in zip(run.grid.sent, run.grid.replies)
                        if int(msg.content.config_records["config"]["server-round"]) == r)
        stats = run.round_stats[r]
        assert stats["personalised_accuracy_mean"] == pytest.approx(np.mean(scores))
        assert stats["personalised_accuracy_std"] == pytest.approx(np.std(scores))
        assert stats["personalised_accuracy_worst10"] == pytest.approx(scores[0])
    assert len({partition_id(r) for r in run.grid.replies}) == 4


def test_dittos_global_model_is_fedavgs(tiny_run, fedavg3):
    assert tiny_run("ditto").accuracies == fedavg3.accuracies


def test_fedavg_ft_trains_the_global_model_as_fedavg_and_keeps_nothing(fedavg3):
    overrides = {k: v for k, v in METHODS["fedavg-ft"].items()}
    ft = run_inline({**TINY["spectral-codistillation"], **overrides})
    assert ft.accuracies == fedavg3.accuracies
    assert all(PERSONAL_MODEL_RECORD not in c.state.array_records
               for c in ft.grid.contexts.values())
    assert all(0 < ft.round_stats[r]["personalised_accuracy_mean"] <= 1 for r in (1, 2, 3))
