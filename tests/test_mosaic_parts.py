"""Mosaic's pure parts: experts, prototypes, meta model, generator, distillation, schedule."""

import math

import pytest
import torch
from torch import nn

from mosaic_flwr.config import ConfigError, RunConfig
from mosaic_flwr.data.augment import BatchTransform
from mosaic_flwr.data.datasets import DATASETS, load_dataset
from mosaic_flwr.kd.distill import DistillWeights, distill_into, distillation_loss
from mosaic_flwr.kd.ensemble import client_logits, head_logits
from mosaic_flwr.kd.generator import (BatchNormStatistics, Discriminator, GeneratorWeights,
                                      ImageGenerator, generator_objective, sized_width,
                                      train_generator)
from mosaic_flwr.kd.settings import GeneratorSettings
from mosaic_flwr.models import build_model
from mosaic_flwr.mosaic.experts import class_experts, ensemble_logits, expert_modules, expert_weights
from mosaic_flwr.mosaic.meta import MetaModel, train_meta_model
from mosaic_flwr.mosaic.prototypes import kmeans, prototype_centres
from mosaic_flwr.mosaic.settings import DISTILL, FINETUNE, WARMUP, MosaicSettings
from mosaic_flwr.training import TrainSettings, train

DIGITS = DATASETS["digits"]


# ------------------------------------------------------------------------ experts
def test_each_expert_is_the_count_weighted_average_of_the_client_models():
    counts = torch.tensor([[6, 0, 1], [2, 0, 3], [0, 0, 0]])  # class 1: nobody; client 2: empty
    counts[2] = torch.tensor([0, 0, 4])
    states = [{"w": torch.full((2,), float(v)), "steps": torch.tensor(7 + v)} for v in (1, 10, 100)]
    experts = class_experts(states, expert_weights(counts))
    assert experts["w"].shape == (3, 2)
    assert torch.allclose(experts["w"][0], torch.full((2,), (6 * 1 + 2 * 10) / 8))
    assert torch.allclose(experts["w"][2], torch.full((2,), (1 * 1 + 3 * 10 + 4 * 100) / 8))
    # A class no client holds gets the sample-weighted (FedAvg) average.
    sizes = counts.sum(1).double()
    fedavg = float((sizes * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)).sum() / sizes.sum())
    assert torch.allclose(experts["w"][1], torch.full((2,), fedavg))
    # Integer buffers are copied, not averaged into floats.
    assert experts["steps"].dtype == torch.int64 and experts["steps"].tolist() == [8, 8, 8]


def test_uniform_weighting_makes_every_expert_the_plain_average():
    counts = torch.tensor([[9, 0], [1, 5]])
    weights = expert_weights(counts, "uniform")
    experts = class_experts([{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}], weights)
    assert experts["w"].flatten().tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="unknown expert weighting"):
        expert_weights(counts, "median")


@pytest.mark.parametrize("model_name", ["cnn", "resnet8"])
def test_fast_experts_match_the_straightforward_loop(model_name):
    """The teacher's fast path (frozen channels-last modules) computes exactly what a plain
    loop of default-layout models loaded with each expert computes; under CPU bfloat16
    autocast it stays close and agrees on the predicted class."""
    torch.manual_seed(0)
    clients = [build_model(model_name, DIGITS) for _ in range(3)]
    for client in clients:  # non-trivial BatchNorm statistics
        client.train()
        client(torch.randn(16, 1, 8, 8) * 2 + 0.5)
    counts = torch.tensor([[5, 1, 0, 2], [0, 4, 1, 2], [3, 0, 6, 2]])
    weights = expert_weights(counts)
    states = [c.state_dict() for c in clients]
    stacked = class_experts(states, weights)
    x = torch.randn(64, 1, 8, 8)
    modules = expert_modules(lambda: build_model(model_name, DIGITS), stacked)
    assert all(not m.training and not any(p.requires_grad for p in m.parameters())
               for m in modules)
    with torch.no_grad():
        fast = client_logits(modules, x)
        reference = []
        for e in range(4):  # the straightforward loop: mix by hand, load, run
            one = build_model(model_name, DIGITS)
            one.load_state_dict({k: (sum(w * s[k] for w, s in zip(weights[:, e].float(), states))
                                     if v.is_floating_point() else v)
                                 for k, v in states[0].items()})
            reference.append(one.eval()(x))
        reference = torch.stack(reference)
        assert fast.shape == (4, 64, 10)
        assert torch.allclose(fast, reference, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what cpu-bf16 turns on
            low = client_logits(modules, x)
        assert (low - reference).abs().max() < 0.05 * reference.abs().max()
        assert (low.argmax(2) == reference.argmax(2)).float().mean() > 0.95
    features = torch.randn(5, modules[0].feature_dim)
    heads = head_logits(stacked, features)
    assert heads.shape == (5, 4, 10)
    assert torch.allclose(heads[:, 2], features @ stacked["head.weight"][2].T + stacked["head.bias"][2],
                          atol=1e-5)


def test_ensemble_weights_experts_by_their_share():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # one sample, two experts
    assert torch.allclose(ensemble_logits(logits, torch.tensor([3.0, 1.0])), torch.tensor([[0.75, 0.75]]))


# --------------------------------------------------------------------- prototypes
def test_kmeans_finds_well_separated_clusters():
    rng = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(20, 2, generator=rng) for c in centres])
    found, assign = kmeans(points, 3, rng)
    ordered = found[torch.cdist(centres, found).argmin(1)]
    assert torch.allclose(ordered, centres, atol=0.1)
    assert torch.bincount(assign).tolist() == [20, 20, 20]


def test_prototypes_are_per_class_aggregates_never_single_samples():
    rng = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 40 + [1] * 5 + [2] * 1 + [3] * 3)
    features = torch.randn(len(labels), 6, generator=rng)
    centres, centre_labels = prototype_centres(features, labels, num_classes=5, k=4,
                                               min_cluster=2, rng=rng)
    assert centre_labels.tolist().count(0) <= 4 and 0 < centre_labels.tolist().count(0)
    # 5 samples >= k=4: k-means with at most 5 // min_cluster centres.
    assert 1 <= centre_labels.tolist().count(1) <= 2
    # Fewer samples than k: the class mean.
    assert torch.allclose(centres[centre_labels == 3][0], features[labels == 3].mean(0), atol=1e-6)
    assert 2 not in centre_labels.tolist() and 4 not in centre_labels.tolist()
    # No prototype is any single sample's feature vector.
    assert torch.cdist(centres, features).min() > 1e-4


def test_prototype_k_is_respected():
    rng = torch.Generator().manual_seed(1)
    labels = torch.zeros(200, dtype=torch.int64)
    features = torch.randn(200, 3, generator=rng)
    for k in (1, 3, 7):
        centres, _ = prototype_centres(features, labels, 1, k=k, min_cluster=2, rng=rng)
        assert 1 <= len(centres) <= k


# --------------------------------------------------------------------- meta model
def _toy_expert_logits(n: int, experts: int, rng: torch.Generator):
    """Expert e is right (and confident) exactly on class e; elsewhere confidently wrong."""
    labels = torch.randint(0, experts, (n,), generator=rng)
    logits = 0.3 * torch.randn(n, experts, experts, generator=rng)
    for e in range(experts):
        wrong = (labels + torch.randint(1, experts, (n,), generator=rng)) % experts
        target = torch.where(labels == e, labels, wrong)
        logits[torch.arange(n), e, target] += 3.0
    return logits, labels


def test_meta_model_starts_as_the_uniform_ensemble_and_learns_to_beat_it():
    rng = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    logits, labels = _toy_expert_logits(600, 6, rng)
    meta = MetaModel(6, 6, dim=24, heads=4, dropout=0.0)
    uniform = logits.mean(1)
    with torch.no_grad():
        assert torch.allclose(meta.eval()(logits), uniform, atol=1e-5)
    uniform_acc = float((uniform.argmax(1) == labels).float().mean())
    trained = train_meta_model(meta, logits, labels, epochs=40, lr=3e-3, batch_size=64,
                               ema_decay=0.9, rng=rng)
    with torch.no_grad():
        meta_acc = float((trained(logits).argmax(1) == labels).float().mean())
    assert uniform_acc < 0.8
    assert meta_acc > uniform_acc + 0.15


# ---------------------------------------------------------------------- generator
def test_generator_samples_are_normalised_classifier_inputs():
    generator = ImageGenerator(DIGITS, latent_dim=16, width=8).eval()
    z = torch.randn(64, 16)
    samples = generator(z)
    assert samples.shape == (64, *DIGITS.input_shape)
    # The Tanh output t in [-1, 1] is mapped to an image (t + 1) / 2 in [0, 1], then normalised.
    with torch.no_grad():
        tanh = generator.body(generator.project(z).view(64, -1, 2, 2))
    expected = ((tanh + 1) / 2 - DIGITS.mean[0]) / DIGITS.std[0]
    assert torch.allclose(samples, expected, atol=1e-6)
    low, high = (0 - DIGITS.mean[0]) / DIGITS.std[0], (1 - DIGITS.mean[0]) / DIGITS.std[0]
    assert samples.min() >= low - 1e-5 and samples.max() <= high + 1e-5


def test_generator_width_is_sized_to_the_image_unless_given():
    assert sized_width(3, 32) == 64  # the reference DCGAN's ngf for CIFAR
    assert sized_width(1, 28) == 32 and sized_width(1, 8) == 16 and sized_width(3, 64) == 128
    assert sized_width(1, 28, width=48) == 48
    assert ImageGenerator(DATASETS["mnist"]).width == 32
    assert ImageGenerator(DATASETS["mnist"], width=64).width == 64


def test_train_generator_runs_the_generator_once_per_step():
    """The discriminator's and the generator's step share one generated batch."""
    generator = ImageGenerator(DIGITS, latent_dim=8, width=8)
    calls = []
    generator.register_forward_hook(lambda *_: calls.append(1))
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    settings = GeneratorSettings(generator_steps=5, generator_batch_size=16, generator_width=8)
    report = train_generator(generator, build_model("cnn", DIGITS, 0.5), images,
                             BatchTransform(DIGITS), settings, torch.device("cpu"),
                             torch.Generator().manual_seed(0))
    assert len(calls) == 5
    assert set(report.first) == {"adversarial", "entropy", "diversity", "inversion", "total",
                                 "discriminator"}
    assert all(math.isfinite(v) for v in report.last.values())


def test_generator_image_size_must_be_divisible_by_four():
    spec = DATASETS["digits"].__class__("odd", 1, 10, 2, (0.5,), (0.5,), False, 0)
    with pytest.raises(ValueError, match="divisible by 4"):
        ImageGenerator(spec)


@pytest.fixture(scope="module")
def digits_classifier():
    """A ResNet-8 (with BatchNorm) trained briefly on real digits."""
    torch.manual_seed(0)
    data = load_dataset("digits", "")
    model = build_model("resnet8", DIGITS, width=0.5)
    train(model, torch.from_numpy(data.train_images[:500]), torch.from_numpy(data.train_labels[:500]),
          BatchTransform(DIGITS), TrainSettings(epochs=2, batch_size=32, learning_rate=0.05),
          torch.device("cpu"), torch.Generator().manual_seed(0))
    return model.eval()


def test_generator_steps_lower_the_generator_loss(digits_classifier):
    torch.manual_seed(0)
    generator = ImageGenerator(DIGITS, latent_dim=16, width=8)
    classifier = digits_classifier
    discriminator = Discriminator(1, 8, width=8).eval()
    z = torch.randn(64, 16)
    weights = GeneratorWeights(adversarial=1.0, entropy=1.0, diversity=1.0, inversion=0.1)
    stats = BatchNormStatistics(classifier)
    assert stats.active
    before, terms = generator_objective(generator, classifier, discriminator, z, weights, stats)
    assert set(terms) == {"adversarial", "entropy", "diversity", "inversion"}
    assert terms["inversion"] > 0
    optimiser = torch.optim.Adam(generator.parameters(), lr=1e-2)
    for _ in range(30):
        loss, _ = generator_objective(generator, classifier, discriminator, z, weights, stats)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after, _ = generator_objective(generator, classifier, discriminator, z, weights, stats)
    stats.remove()
    assert float(after.detach()) < 0.7 * float(before.detach())


def test_train_generator_uses_inversion_only_for_small_clients_with_batchnorm():
    images = torch.rand(40, 1, 8, 8)
    transform = BatchTransform(DIGITS)
    rng = torch.Generator().manual_seed(0)
    fast = GeneratorSettings(generator_steps=3, generator_batch_size=16, generator_width=8,
                             generator_latent_dim=8, inversion_max_samples=100)
    report = train_generator(ImageGenerator(DIGITS, 8, 8), build_model("resnet8", DIGITS, 0.5),
                             images, transform, fast, torch.device("cpu"), rng)
    assert report.first["inversion"] > 0 and report.last["inversion"] > 0
    report = train_generator(ImageGenerator(DIGITS, 8, 8), build_model("cnn", DIGITS, 0.5),
                             images, transform, fast, torch.device("cpu"), rng)
    assert report.first["inversion"] == 0 and report.last["inversion"] == 0
    big = GeneratorSettings(**{**fast.to_mapping(), "inversion_max_samples": 40})
    report = train_generator(ImageGenerator(DIGITS, 8, 8), build_model("resnet8", DIGITS, 0.5),
                             images, transform, big, torch.device("cpu"), rng)
    assert report.first["inversion"] == 0 and report.last["inversion"] == 0


# ------------------------------------------------------------------- distillation
def test_distillation_loss_terms():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    _, same = distillation_loss(teacher, teacher, DistillWeights())
    same = {k: float(v) for k, v in same.items()}
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["jsd"] == pytest.approx(0, abs=1e-6)
    student = torch.zeros(2, 3)
    total, terms = distillation_loss(student, teacher, DistillWeights(kl=1, ce=0, jsd=0))
    terms = {k: float(v) for k, v in terms.items()}
    p = torch.softmax(teacher, 1)
    expected_kl = float((p * (p.log() - math.log(1 / 3))).sum(1).mean())
    assert terms["kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert float(total) == pytest.approx(expected_kl, rel=1e-5)
    assert terms["ce"] == pytest.approx(math.log(3), rel=1e-5)
    q = torch.full((2, 3), 1 / 3)
    m = (p + q) / 2
    expected_jsd = float((0.5 * (p * (p / m).log() + q * (q / m).log())).sum(1).mean())
    assert terms["jsd"] == pytest.approx(expected_jsd, rel=1e-5)
    assert 0 < terms["jsd"] < math.log(2)


@pytest.mark.parametrize("weights", [DistillWeights(kl=1, ce=0, jsd=0), DistillWeights()])
def test_distillation_gradients_stay_finite_when_the_student_is_certain(weights):
    """A student whose logit gaps exceed ~100 (what distilling a one-class teacher ends
    in) has probabilities that underflow to 0: every term, weighted or not, must still
    give a finite gradient (with p log p, the JSD's made FedDF's and DENSE's steps NaN
    on MNIST at Dirichlet 0.05)."""
    student = torch.tensor([[150.0, 0.0, -30.0], [0.0, 0.0, 200.0]], requires_grad=True)
    teacher = torch.tensor([[190.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
    total, terms = distillation_loss(student, teacher, weights)
    total.backward()
    assert torch.isfinite(student.grad).all() and all(torch.isfinite(t) for t in terms.values())
    # The second sample disagrees with its teacher: the gradient pushes its logits apart.
    assert student.grad[1].abs().sum() > 0.1


def test_distillation_lowers_the_students_divergence_on_held_out_inputs():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        teacher[-1].weight.mul_(4)
    student = build_model("cnn", DIGITS, width=0.5)
    held_out = torch.randn(512, 1, 8, 8)

    def kl_to_teacher() -> float:
        with torch.no_grad():
            _, terms = distillation_loss(student.eval()(held_out), teacher(held_out),
                                         DistillWeights(kl=1, ce=0, jsd=0))
        return float(terms["kl"])

    before = kl_to_teacher()
    rng = torch.Generator().manual_seed(1)
    history = distill_into(student, teacher, lambda: torch.randn(64, 1, 8, 8, generator=rng),
                           steps=300, lr=3e-3, weights=DistillWeights(), device=torch.device("cpu"))
    assert len(history) == 300
    assert kl_to_teacher() < 0.5 * before


def test_a_teacher_pool_labels_its_batches_once_and_distils_as_well():
    """With pool_batches = P the teacher runs P times, not once per step, and the student
    still ends close to the teacher on held-out inputs."""
    torch.manual_seed(0)
    teacher_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        teacher_net[-1].weight.mul_(4)
    calls = []

    def teacher(x):
        calls.append(len(x))
        return teacher_net(x)

    held_out = torch.randn(512, 1, 8, 8)
    weights = DistillWeights(kl=1, ce=0, jsd=0)
    ends = {}
    for pool in (0, 20):
        calls.clear()
        student = build_model("cnn", DIGITS, width=0.5)
        rng = torch.Generator().manual_seed(1)
        history = distill_into(student, teacher, lambda: torch.randn(64, 1, 8, 8, generator=rng),
                               steps=300, lr=3e-3, weights=weights, device=torch.device("cpu"),
                               pool_batches=pool, rng=torch.Generator().manual_seed(2))
        assert len(history) == 300 and calls == [64] * (pool or 300)
        with torch.no_grad():
            _, terms = distillation_loss(student.eval()(held_out), teacher_net(held_out), weights)
        ends[pool] = float(terms["kl"])
    assert ends[20] < 1.5 * ends[0]


# ----------------------------------------------------------------------- schedule
def test_schedule_phases_and_fit():
    settings = MosaicSettings(warmup_rounds=3, finetune_rounds=-1)
    assert [settings.phase(r) for r in range(1, 7)] == [WARMUP] * 3 + [DISTILL] + [FINETUNE] * 2
    assert settings.schedule_problem(4) == "" and settings.schedule_problem(9) == ""
    assert "num-server-rounds=3" in settings.schedule_problem(3)
    fixed = MosaicSettings(warmup_rounds=3, finetune_rounds=2)
    assert fixed.schedule_problem(6) == ""
    assert "mosaic-finetune-rounds" in fixed.schedule_problem(7)


@pytest.mark.parametrize("changes, key", [
    ({"num-server-rounds": 5, "mosaic-warmup-rounds": 5}, "mosaic-warmup-rounds"),
    ({"num-server-rounds": 5, "mosaic-warmup-rounds": 2, "mosaic-finetune-rounds": 1},
     "mosaic-warmup-rounds"),
    ({"mosaic-meta-dim": 30, "mosaic-meta-heads": 4}, "mosaic-meta-dim"),
    ({"mosaic-expert-weighting": "median"}, "mosaic-expert-weighting"),
    ({"mosaic-kl-weight": 0.0, "mosaic-ce-weight": 0.0, "mosaic-jsd-weight": 0.0},
     "mosaic-kl-weight"),
    ({"mosaic-finetune-rounds": -2}, "mosaic-finetune-rounds"),
    ({"mosaic-meta-ema": 1.0}, "mosaic-meta-ema"),
])
def test_bad_mosaic_settings_are_config_errors(changes, key):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"strategy": "mosaic", **changes})
    assert err.value.key == key


def test_run_config_defaults_are_the_mosaic_settings_defaults():
    assert RunConfig().mosaic == MosaicSettings()
    assert RunConfig.from_mapping({"mosaic-warmup-rounds": 3}).mosaic.warmup_rounds == 3
