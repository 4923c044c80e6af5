"""Hyper-parameters of the baselines, with their reference code's defaults.

Each class's field ``x_y`` is run-config key ``<prefix>-x-y`` (for example
``fedgen-generator-lr``). Defaults are the reference implementations' values;
a comment names each one's source and says where this project differs and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from ..kd.settings import GeneratorSettings
from ..method_settings import MethodSettings

#: Where FedDF's unlabelled distillation inputs come from.
FEDDF_INPUTS = ("generators", "proxy")
#: DENSE's student before distillation: the FedAvg of the uploads or a new model.
DENSE_STUDENT_INITS = ("fresh", "average")
#: Where FedLGD's local virtual images start: class pixel statistics or real images.
FEDLGD_INITS = ("normal", "real")


@dataclass(frozen=True)
class FedGenSettings(MethodSettings):
    """FedGen (zhuangdizhu/FedGen, MNIST configuration)."""

    PREFIX: ClassVar[str] = "fedgen"
    POSITIVE: ClassVar[tuple[str, ...]] = ("generator_lr", "generator_lr_decay", "decay")
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (
        "noise_dim", "hidden_dim", "generator_batch_size", "sample_batch_size")

    # Server generator: (uniform noise, one-hot label) -> feature vector for the heads.
    noise_dim: int = 32
    hidden_dim: int = 256
    generator_steps: int = 50  # per round: 5 teacher iterations x 10 epochs
    generator_batch_size: int = 32
    generator_lr: float = 3e-4  # Adam, weight decay 1e-2
    generator_lr_decay: float = 0.98  # per round (ExponentialLR)
    diversity_weight: float = 1.0
    # Client regularisation, from round 2 on, each weight decayed by `decay` per round.
    # The reference's 10 and 10 go with plain SGD at lr 0.01. With this project's
    # client optimiser (SGD lr 0.05, momentum 0.9: a ~50x larger effective step)
    # 10 made clients diverge (NaN weights in round 2) and 3 collapsed the global
    # model to chance on digits-few-rounds; 1 was the first stable value tried.
    alpha: float = 1.0  # CE of the head on generated features of sampled labels
    beta: float = 1.0  # KL between the model on real data and on generated features
    decay: float = 0.98
    sample_batch_size: int = 32


@dataclass(frozen=True)
class FedFTGSettings(MethodSettings):
    """FedFTG (ZhangLin-PKU/FedFTG): server fine-tuning after every aggregation."""

    PREFIX: ClassVar[str] = "fedftg"
    POSITIVE: ClassVar[tuple[str, ...]] = ("generator_lr", "distill_lr", "lr_decay")
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (
        "batch_size", "latent_dim")

    iterations: int = 10  # per round; each: one generator step per client, then distillation
    distill_steps: int = 5  # per iteration, on that iteration's batch
    batch_size: int = 50
    latent_dim: int = 100
    generator_width: int = 0  # 0: sized to the image (kd.generator.sized_width; 64 at 3x32x32)
    generator_lr: float = 0.01  # Adam; the generator persists across rounds
    # SGD (weight decay 1e-3). The reference uses 0.1 on a loss averaged over
    # classes as well as samples (1/C of the soft cross-entropy used here).
    distill_lr: float = 0.01
    lr_decay: float = 0.998  # both learning rates, per round
    ce_weight: float = 1.0
    hard_weight: float = 1.0  # maximise |global - client| logit disagreement (hard samples)
    diversity_weight: float = 1.0  # divided by the number of clients, as in the reference


@dataclass(frozen=True)
class DenseSettings(MethodSettings):
    """DENSE (zj-jayzhang/DENSE, README settings): one-shot, then synthesis + distillation."""

    PREFIX: ClassVar[str] = "dense"
    POSITIVE: ClassVar[tuple[str, ...]] = ("generator_lr", "distill_lr", "temperature")
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (
        "epochs", "generator_steps", "synthesis_batch_size", "latent_dim", "distill_batch_size")
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"student_init": DENSE_STUDENT_INITS}

    # The one communication round: 0 = local-epochs x num-server-rounds, so clients
    # train as many epochs as in the multi-round methods (the README uses 400).
    local_epochs: int = 0
    epochs: int = 200  # server epochs: a fresh generator is synthesised, then the student distils
    generator_steps: int = 30  # Adam on generator and latents together, betas (0.5, 0.999)
    generator_lr: float = 1e-3
    synthesis_batch_size: int = 256
    latent_dim: int = 256
    generator_width: int = 0  # 0: sized to the image (kd.generator.sized_width; 64 at 3x32x32)
    ce_weight: float = 1.0
    bn_weight: float = 1.0
    adv_weight: float = 1.0
    distill_lr: float = 0.005  # SGD, momentum 0.9, one pass over the pool of samples per epoch
    distill_batch_size: int = 256
    temperature: float = 20.0
    student_init: str = "fresh"


@dataclass(frozen=True)
class FedDFSettings(GeneratorSettings, MethodSettings):
    """FedDF (epfml federated-learning-public-code, FedDF-code): ensemble distillation.

    The clients' generators take the fields of :class:`GeneratorSettings`
    (keys ``feddf-generator-steps``, ..., with Mosaic's defaults)."""

    PREFIX: ClassVar[str] = "feddf"
    POSITIVE: ClassVar[tuple[str, ...]] = ("lr", "temperature", "generator_lr")
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (
        "batch_size", "generator_steps", "generator_batch_size", "generator_latent_dim")
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"inputs": FEDDF_INPUTS}

    # generators: every client also trains Mosaic's kind of generator (the
    # inherited generator fields) each round, so distillation stays data-free; proxy:
    # the server holds an unlabelled split of the training data (proxy-fraction > 0).
    inputs: str = "generators"
    # Adam with a cosine schedule, gradients clipped to norm 5. The reference
    # runs up to 10,000 steps with early stopping on labelled validation data,
    # which a data-free server does not have; here a fixed number of steps.
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 64
    temperature: float = 1.0

    def check_run(self, config: Any) -> None:
        """Proxy inputs need a held-out proxy split."""
        if self.inputs == "proxy" and config.proxy_fraction == 0:
            raise ConfigError(self.key("inputs"), self.inputs,
                              "'proxy' needs proxy-fraction > 0 (the held-out unlabelled split)")


@dataclass(frozen=True)
class FedCOGSettings(MethodSettings):
    """FedCOG (rui-ye/FedCOG): complementary data synthesised by each client."""

    PREFIX: ClassVar[str] = "fedcog"
    POSITIVE: ClassVar[tuple[str, ...]] = ("generation_lr", "temperature")
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = ("start_round", "num_samples")

    # Rounds before this one are plain FedAvg (the reference: 50 of 70 rounds);
    # 16 is the round of Mosaic's distillation in the default 20-round budget.
    start_round: int = 16
    num_samples: int = 256  # spread over the classes the client lacks
    generation_steps: int = 500  # Adam on the inputs themselves, betas (0.5, 0.9)
    generation_lr: float = 0.01
    ce_weight: float = 1.0  # the global model should predict the targeted classes
    disagreement_weight: float = 0.1  # ... where the previous local model disagrees
    temperature: float = 1.0  # distillation from the global model on the synthetic data

    def check_run(self, config: Any) -> None:
        """FedCOG must reach its start round within the run."""
        if self.start_round > config.num_server_rounds:
            raise ConfigError(self.key("start_round"), self.start_round,
                              f"must be <= num-server-rounds ({config.num_server_rounds}); "
                              "FedCOG would never synthesise data")


@dataclass(frozen=True)
class FedLGDSettings(MethodSettings):
    """FedLGD (ubc-tea/FedLGD, ``fedlgd_main.py``): training on local and global virtual data.

    Round ``r`` here is the reference's iteration ``a_iter = r - 1``.
    """

    PREFIX: ClassVar[str] = "fedlgd"
    POSITIVE: ClassVar[tuple[str, ...]] = ("image_lr", "global_image_lr", "temperature")
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"init": FEDLGD_INITS}
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = (
        "images_per_class", "global_images_per_class", "real_batch_size", "client_gap",
        "server_gap")

    images_per_class: int = 50  # local virtual images per class (--ipc); a client holding
    # fewer real images of a class gets that many (the reference's clients hold every class)
    global_images_per_class: int = 10  # the server's global virtual set (--server_ipc)
    init: str = "normal"  # local virtual images start from class statistics, or 'real'
    # images of the class (--init; both stay on the client)
    # Distribution matching before the first local training, each step under a freshly
    # initialised network. The reference runs 10,000 steps at image learning rate 1 (SGD,
    # momentum 0.5, --lr_img). Here 200 steps took 72 s on the largest of 10 MNIST clients
    # (330 s summed over them) in the MNIST table's run, so 10,000 would take about an
    # hour per client. 200 steps at 10: at 1 the images barely move in 200 steps (a CNN
    # trained on one IID client's 500 virtual MNIST images scores 0.214 after 200 steps
    # at 1 and 0.625 at 10; its 1,200 real images teach 0.906; docs/results/fedlgd.md).
    warmup_steps: int = 200
    image_lr: float = 10.0  # local distribution matching (warm-up and refinement)
    global_image_lr: float = 1.0  # the server's gradient matching (--lr_img)
    real_batch_size: int = 256  # real images per class in one matching step (image_batch)
    client_steps: int = 100  # iterative distribution matching under the global model (--ci_iter)
    server_steps: int = 500  # federated gradient matching steps per update (--si_iter)
    client_gap: int = 5  # local virtual data refined every this many rounds (--ci_tgap)
    server_gap: int = 5  # global virtual data updated every this many rounds (--si_tgap)
    image_updates: int = 10  # ... up to this many times each (--image_update_times)
    # The anchor: supervised contrastive loss between a batch's features and the global
    # virtual set's (--reg_loss contrastive), weight --lambda_sim (its default; the README's
    # digits command uses 10), temperature 0.07 as in its loss.
    anchor_weight: float = 1.0
    temperature: float = 0.07

    def server_update(self, server_round: int) -> bool:
        """Whether the server updates its global virtual data after this round (and clients
        train without the anchor in it): rounds 1, 1 + gap, ..., 1 + gap * updates."""
        it = server_round - 1
        return it % self.server_gap == 0 and it <= self.server_gap * self.image_updates

    def client_refine(self, server_round: int) -> bool:
        """Whether clients refine their local virtual data under the received global model
        before training in this round: rounds 1 + gap, ..., 1 + gap * updates."""
        it = server_round - 1
        return 0 < it <= self.client_gap * self.image_updates and it % self.client_gap == 0


@dataclass(frozen=True)
class SpectralSettings(MethodSettings):
    """Spectral Co-Distillation (jimmyc96/spectral-dis-FL, ``options.py``): personalised
    models next to the generic one, each regularised towards the other's weight spectrum.

    With both weights and ``proximal`` at 0 and ``keep_personal`` false it is FedAvg
    followed by local fine-tuning (FedAvg-FT): the personalised model is the received
    global model trained on the local data each round.
    """

    PREFIX: ClassVar[str] = "spectral"
    POSITIVE: ClassVar[tuple[str, ...]] = ("ratio",)

    ratio: float = 0.4  # the leading share of the generic model's spectrum compared (--ratio)
    generic_weight: float = 0.3  # generic model <- personalised spectrum (--lambda_g)
    personal_weight: float = 0.4  # personalised model <- generic spectrum (--lambda_l)
    proximal: float = 0.2  # personalised model: + proximal * ||w_p - w_g|| (--beta)
    personal_epochs: int = 0  # personalised model's epochs per round (0: as the generic one)
    keep_personal: bool = True  # the personalised model persists across rounds (False: FedAvg-FT)

    def validate(self) -> None:
        super().validate()
        if self.ratio > 1:
            raise ConfigError(self.key("ratio"), self.ratio, "must be in (0, 1]")


@dataclass(frozen=True)
class DittoSettings(MethodSettings):
    """Ditto (Li et al. 2021, litian96/ditto): a personalised model per client, trained
    with ``(proximal / 2) ||v - w||^2`` towards the received global model."""

    PREFIX: ClassVar[str] = "ditto"

    proximal: float = 0.1  # the paper's lambda (its grid: 0.01, 0.1, 1, 2)
    personal_epochs: int = 0  # personalised model's epochs per round (0: as the global one)
