"""Mosaic's hyper-parameters and round schedule, with the reference code's values.

Each field ``x_y`` is the run-config key ``mosaic-x-y``; the run config holds
these settings as its section ``config.mosaic``. Defaults follow the reference code where they are sound;
where this project differs (shorter generator training and distillation, a
larger distillation learning rate) the comment says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from ..kd.settings import GeneratorSettings
from ..method_settings import MethodSettings

#: Ways to mix client models into per-class experts.
EXPERT_WEIGHTINGS = ("counts", "uniform")

#: Round phases of a Mosaic run.
WARMUP, DISTILL, FINETUNE = "warmup", "distill", "finetune"


@dataclass(frozen=True)
class MosaicSettings(GeneratorSettings, MethodSettings):  # pylint: disable=too-many-instance-attributes
    """Everything Mosaic needs beyond a FedAvg run; see the README's key table.

    The client generators take the fields of :class:`GeneratorSettings` (keys
    ``mosaic-generator-steps``, ...; reference: DCGAN, z = 100, ngf = 64, Adam
    2e-4, betas 0.5/0.999)."""

    PREFIX: ClassVar[str] = "mosaic"

    # Schedule: warm-up FedAvg rounds, one distillation round, fine-tuning rounds.
    # -1 fine-tuning rounds means "every round left in num-server-rounds".
    warmup_rounds: int = 15
    finetune_rounds: int = -1
    finetune_lr_scale: float = 0.1  # reference: client lr 0.01 -> 1e-4 after distillation
    # Not in the reference: fine-tuning also distils the received model on each sample's
    # not-true classes (FedNTD's term, its default weight 1), so it keeps the distilled gain.
    finetune_anchor: float = 1.0
    # Prototypes: k-means centres per class of the global model's features.
    prototypes_per_class: int = 10
    prototype_min_cluster: int = 2  # a centre averages at least this many samples
    # Meta model (reference: Adam 1e-3, EMA 0.99, batches of 128, d_model C*C, 10 heads).
    meta_model: bool = True
    meta_epochs: int = 100
    meta_lr: float = 1e-3
    meta_batch_size: int = 128
    meta_ema: float = 0.99
    meta_dim: int = 100
    meta_heads: int = 10
    meta_dropout: float = 0.2
    # Experts and distillation (reference: 32 samples per generator, T = 1,
    # 0.8 KL + 0.2 CE + 1.0 JSD, 1500 Adam steps at 1e-4 on ResNet-18).
    expert_weighting: str = "counts"
    generators: bool = True
    distill_steps: int = 300
    distill_lr: float = 1e-3  # small models from few rounds move further than a converged ResNet
    # 0: fresh generator samples and teacher outputs every step (the reference);
    # P > 0: the teacher labels P batches once and every step draws from that pool.
    distill_pool_batches: int = 30
    samples_per_generator: int = 32
    temperature: float = 1.0
    kl_weight: float = 0.8
    ce_weight: float = 0.2
    jsd_weight: float = 1.0
    # The distillation round asks this share of the connected clients, at least
    # fraction-train's: the teacher is built once, from that round's clients only.
    distill_fraction: float = 1.0
    # Trust checks (not in the reference; mosaic/trust.py): the meta model must match
    # the count-weighted ensemble on held-out prototypes, and the round's clients must
    # score the distilled student (or a mix of it with the student before) and each
    # fine-tuning average at least as high as the model it would replace, on their own data.
    trust: bool = True
    trust_holdout: float = 0.2  # share of each (client, class) group of prototypes held out
    # The clients also score the student moved k/n of the way from before to after
    # distillation (k = 1..n; weights interpolated), and the best of these and the
    # student before is kept; 1 = only the distilled student (docs/results/quality.md).
    trust_mixes: int = 4

    # ------------------------------------------------------------------ schedule
    @property
    def distill_round(self) -> int:
        """The round in which generators and prototypes are collected and the teacher distilled."""
        return self.warmup_rounds + 1

    def phase(self, server_round: int) -> str:
        """``warmup``, ``distill`` or ``finetune`` for a round (1-based)."""
        if server_round < self.distill_round:
            return WARMUP
        return DISTILL if server_round == self.distill_round else FINETUNE

    def schedule_problem(self, num_rounds: int, python: bool = False) -> str:
        """Why the schedule does not fit ``num_rounds`` rounds ('' when it fits), in
        run-config keys, or with ``python`` in the Python names (``start(num_rounds=...)``)."""
        needed = self.warmup_rounds + 1 + max(self.finetune_rounds, 0)
        if self.finetune_rounds == -1 and needed <= num_rounds:
            return ""
        if self.finetune_rounds >= 0 and needed == num_rounds:
            return ""
        finetune = "the rest" if self.finetune_rounds == -1 else self.finetune_rounds
        rounds, warmup, finetune_key = (("num_rounds", "warmup_rounds", "finetune_rounds")
                                        if python else ("num-server-rounds",
                                                        "mosaic-warmup-rounds",
                                                        "mosaic-finetune-rounds"))
        return (f"Mosaic's schedule is {self.warmup_rounds} warm-up + 1 distillation + "
                f"{finetune} fine-tuning rounds but {rounds}={num_rounds}; every Mosaic "
                f"round counts within {rounds}, so set {warmup} <= "
                f"{num_rounds - 1} and {finetune_key} to the rest (or -1)")

    def check_run(self, config: Any) -> None:
        """The schedule must fit the run's ``num-server-rounds``."""
        problem = self.schedule_problem(config.num_server_rounds)
        if problem:
            raise ConfigError(self.key("warmup_rounds"), self.warmup_rounds, problem)

    def validate(self) -> None:
        """Raise ``ConfigError`` (naming the ``mosaic-*`` key) for the first bad value
        (Mosaic's rules are its own: -1 fine-tuning rounds, head-divisible meta dim, ...)."""
        key = self.key
        for name in ("prototypes_per_class", "prototype_min_cluster", "generator_steps",
                     "generator_batch_size", "generator_latent_dim",
                     "meta_batch_size", "meta_dim", "meta_heads", "samples_per_generator"):
            if getattr(self, name) < 1:
                raise ConfigError(key(name), getattr(self, name), "must be an integer >= 1")
        for name in ("warmup_rounds", "meta_epochs", "distill_steps", "inversion_max_samples",
                     "distill_pool_batches", "generator_width"):
            if getattr(self, name) < 0:
                raise ConfigError(key(name), getattr(self, name), "must be an integer >= 0")
        if self.finetune_rounds < -1:
            raise ConfigError(key("finetune_rounds"), self.finetune_rounds,
                              "must be >= 0, or -1 for the rounds left")
        for name in ("finetune_lr_scale", "generator_lr", "meta_lr", "distill_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(key(name), getattr(self, name), "must be > 0")
        for name in ("finetune_anchor", "adversarial_weight", "entropy_weight", "diversity_weight",
                     "inversion_weight", "kl_weight", "ce_weight", "jsd_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(key(name), getattr(self, name), "must be >= 0")
        if self.kl_weight + self.ce_weight + self.jsd_weight == 0:
            raise ConfigError(key("kl_weight"), self.kl_weight,
                              "kl, ce and jsd weights are all 0: distillation would learn nothing")
        if not 0 < self.distill_fraction <= 1:
            raise ConfigError(key("distill_fraction"), self.distill_fraction, "must be in (0, 1]")
        if not 1 <= self.trust_mixes <= 100:  # each is a round of evaluate messages
            raise ConfigError(key("trust_mixes"), self.trust_mixes, "must be an integer in 1..100")
        if not 0 <= self.trust_holdout < 1:
            raise ConfigError(key("trust_holdout"), self.trust_holdout, "must be in [0, 1)")
        if not 0 <= self.meta_ema < 1:
            raise ConfigError(key("meta_ema"), self.meta_ema, "must be in [0, 1)")
        if not 0 <= self.meta_dropout < 1:
            raise ConfigError(key("meta_dropout"), self.meta_dropout, "must be in [0, 1)")
        if self.meta_dim % self.meta_heads:
            raise ConfigError(key("meta_dim"), self.meta_dim,
                              f"must be divisible by mosaic-meta-heads ({self.meta_heads})")
        if self.expert_weighting not in EXPERT_WEIGHTINGS:
            raise ConfigError(key("expert_weighting"), self.expert_weighting,
                              f"must be one of {', '.join(EXPERT_WEIGHTINGS)}")
