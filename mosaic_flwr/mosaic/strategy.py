"""MosaicStrategy: FedAvg warm-up, one distillation round, FedAvg fine-tuning.

Round by round, inside ``num_rounds`` (every Mosaic round counts):

1. warm-up rounds ``1 .. W``: FedAvg (clients train, the server averages);
2. the distillation round ``W + 1`` (every client by default): clients train as
   usual and also send their label counts, per-class feature prototypes and a
   freshly trained image generator. The server averages the classifiers (the
   student's start), builds one expert per class from the client models
   weighted by their counts of that class, trains the meta model on the
   prototypes through the experts' heads (kept only if it beats the
   count-weighted ensemble on held-out prototypes), and distils the teacher
   into the student on batches drawn from every generator; the clients then
   score the students before and after distillation, and mixes of the two, on
   their own data, and the best one is kept;
3. fine-tuning rounds: FedAvg at the learning rate scaled by
   ``finetune_lr_scale``, with the not-true-class anchor to the received model
   on the clients; an average replaces the model only if the clients score it
   no lower. The trust checks are in :mod:`.trust`.

Clients learn what to do from a ``task`` record in each instruction
(:class:`~mosaic_flwr.records.TrainTask`), so the strategy drops into any
ServerApp whose ClientApp calls :func:`mosaic_flwr.client.handle_train` (or the
tensor-level functions in :mod:`mosaic_flwr.mosaic.client`).
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any, Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log
from torch import nn

from ..config import RunConfig
from ..data.datasets import dataset_spec
from ..kd.distill import DistillWeights, distill_into
from ..kd.ensemble import client_logits, head_logits
from ..kd.generator import build_generator
from ..models import Classifier
from ..records import LABEL_COUNTS, ClientUpload, TrainTask
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options
from .client import PROBE_BIAS, PROBE_WEIGHT, PROTOTYPE_LABELS, PROTOTYPES
from .experts import (class_experts, ensemble_logits, expert_modules, expert_weights,
                      mixed_expert_logits, mixture_log_probs)
from .meta import MetaModel, train_meta_model
from .settings import DISTILL, FINETUNE, MosaicSettings
from .trust import holdout_split, interpolate, local_scores, pooled_accuracy


class MosaicStrategy(TaskStrategy):
    """Mosaic (Liu et al. 2025): mixture-of-experts teacher distilled with client generators.

    Clients may train different models (``client-models``): width sub-models of
    the global architecture are cut and averaged like HeteroFL's (static
    slices) in every round; other architectures are averaged within their
    group. In the distillation round each expert then mixes the client models'
    predictive distributions, and the meta model reads prototypes through the
    clients' probe heads (see :mod:`mosaic_flwr.mosaic.experts`).

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global model: a module with ``features(x)`` and a linear
        ``head`` (every :mod:`mosaic_flwr.models` model is one).
    generator_fn : Callable[[], nn.Module]
        Builds the clients' generator (to load the uploaded weights); it must
        have ``sample(n, generator)`` returning classifier inputs. See
        :func:`mosaic_flwr.kd.generator.build_generator`.
    settings : MosaicSettings (default: MosaicSettings())
        Schedule and hyper-parameters; sent to clients in each ``task`` record.
    device : str or torch.device (default: "cpu")
        Where the server builds experts, trains the meta model and distils.
    amp : bool (default: True)
        Mixed precision for distillation on CUDA.
    cpu_bf16 : bool (default: True)
        bfloat16 autocast for the frozen teacher and generators on CPUs that
        compute bfloat16 natively (the student trains in float32).
    seed : int (default: 0)
        Seeds the server's sampling (prototype batches, generator latents).
    score_fn : ScoreFn, optional
        Scores a predictor on held-out data; when given, the teacher's, the
        expert ensemble's and the student's accuracy before and after
        distillation are recorded. Never used for training.
    **kwargs
        Passed to :class:`~mosaic_flwr.task_strategy.TaskStrategy`,
        :class:`~mosaic_flwr.strategies.TolerantAggregation` and Flower's
        ``FedAvg`` (``min_replies``, ``fraction_train``, ``min_train_nodes``, ...).
    """

    MIXED_MODELS = "any"
    SLICING = "static"

    def __init__(self, model_fn: Callable[[], Classifier], generator_fn: Callable[[], nn.Module],
                 settings: MosaicSettings | None = None, **kwargs) -> None:
        super().__init__(model_fn, generator_fn=generator_fn, **kwargs)
        self.settings = settings or MosaicSettings()
        self.settings.check()
        # Where the distillation round's federated check sends its evaluate messages
        # (set by start() and configure_train()).
        self._grid: Grid | None = None
        self._evaluate_config = ConfigRecord()
        self._timeout: float | None = None
        #: The partitions whose clients judge the federated checks: the distillation
        #: round's clients.
        self._judges: list[int] = []
        #: The node each partition last replied from (a node id is not kept across a
        #: restart of the simulation or of a SuperNode; a partition is).
        self._node_of: dict[int, int] = {}
        #: Whether the distillation round kept the distilled student (None before that
        #: round): when its trust check discarded it there is no distilled model to
        #: anchor to, and the fine-tuning rounds train as FedAvg rounds (still checked).
        self._distilled: bool | None = None
        with torch.no_grad():
            self.input_shape = tuple(generator_fn().eval().sample(1).shape[1:])

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "MosaicStrategy":
        """The strategy for a run config: its data set, model, generator and settings."""
        spec = dataset_spec(config)
        settings = config.mosaic
        return cls(model_fn_for(config), lambda: build_generator(spec, settings.generator), settings,
                   **server_options(config, score_fn), **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the partitions that judge the fine-tuning checks and
        whether the distilled student was kept."""
        return {**super().state_dict(), "judges": list(self._judges), "distilled": self._distilled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; nodes are learned again from the next replies."""
        super().load_state_dict(state)
        self._judges = list(state["judges"])
        self._distilled = state["distilled"]

    # ------------------------------------------------------------------ Flower API
    def summary(self) -> None:
        """Log Mosaic's schedule and main settings, then FedAvg's summary."""
        s = self.settings
        finetune = "rest" if s.finetune_rounds == -1 else s.finetune_rounds
        log(INFO, "\t├──> Mosaic: %d warm-up rounds, distillation in round %d, fine-tuning: %s "
            "(lr x %g)", s.warmup_rounds, s.distill_round, finetune, s.finetune_lr_scale)
        log(INFO, "\t│\t├──Experts: weighting %s; meta model %s; inputs %s", s.expert_weighting,
            "on" if s.meta_model else "off (count-weighted ensemble)",
            "client generators" if s.generators else "Gaussian noise")
        log(INFO, "\t│\t└──Distillation: %d steps, Adam %g, %d samples per generator, T=%g, "
            "KL %g + CE %g + JSD %g", s.distill_steps, s.distill_lr, s.samples_per_generator,
            s.temperature, s.kl_weight, s.ce_weight, s.jsd_weight)
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              first_round: int = 1) -> Result:
        """Check that the schedule fits ``num_rounds``, then run Flower's round loop."""
        problem = self.settings.schedule_problem(num_rounds, python=True)
        if problem:
            raise ValueError(problem)
        self._evaluate_config = evaluate_config or ConfigRecord()
        self._timeout = timeout
        return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds,
                             timeout=timeout, train_config=train_config,
                             evaluate_config=evaluate_config, evaluate_fn=evaluate_fn,
                             first_round=first_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The round's instructions; the distillation round samples at least
        ``distill_fraction`` of the connected nodes (all of them by default): the teacher
        is built once, from that round's clients only."""
        self._grid = grid
        fraction = self.fraction_train
        if self.settings.phase(server_round) == DISTILL:
            self.fraction_train = max(fraction, self.settings.distill_fraction)
        try:
            return super().configure_train(server_round, arrays, config, grid)
        finally:
            self.fraction_train = fraction

    def task_for(self, server_round: int) -> TrainTask:
        """What clients are asked to do in a round (after a discarded distillation, the
        fine-tuning rounds train as FedAvg rounds: full learning rate, no anchor)."""
        phase = self.settings.phase(server_round)
        distill = phase == DISTILL
        finetune = phase == FINETUNE and self._distilled is not False
        anchor = finetune and self.settings.finetune_anchor > 0
        return TrainTask(
            phase="train" if phase == FINETUNE and not finetune else phase,
            learning_rate_scale=self.settings.finetune_lr_scale if finetune else 1.0,
            objective="mosaic-anchor" if anchor else "",
            # Label counts in round 1 cost nothing and show at once whether the ClientApp
            # follows the task (one that does not is told in round 1, not after warm-up).
            upload_counts=server_round == 1 and not distill,
            upload_stats=distill,
            upload_generator=distill and self.settings.generators,
            settings=self.settings.to_mapping() if distill or anchor else {})

    def server_step(self, server_round: int, uploads: list[ClientUpload], arrays: ArrayRecord
                    ) -> tuple[ArrayRecord, dict[str, float]]:
        """In the distillation round, distil the teacher into the average; in a fine-tuning
        round with the trust checks on, keep the average only if the clients prefer it
        (also after a discarded distillation: the model the distillation round left is
        protected either way)."""
        self._node_of.update({u.partition_id: u.node_id for u in uploads})
        phase = self.settings.phase(server_round)
        if phase == DISTILL:
            return self.distill_round(uploads, arrays, server_round)
        if phase == FINETUNE and self.settings.trust:
            return self.finetune_check(server_round, uploads, arrays)
        return arrays, {}

    def finetune_check(self, server_round: int, uploads: list[ClientUpload], average: ArrayRecord
                       ) -> tuple[ArrayRecord, dict[str, float]]:
        """A fine-tuning round's average replaces the global model only if the clients of
        the distillation round (all of them by default, not only this round's sample)
        score it at least as high as the model the round started from, so that
        fine-tuning cannot undo what the distillation round left, distilled or not
        (:meth:`_clients_choose`)."""
        stats: dict[str, float] = {}
        judges = self._judges or [u.partition_id for u in uploads]
        choice, verdict = self._clients_choose(server_round, judges, self._global_arrays,
                                               [average], ("start", "average"), stats)
        keep = choice == 1
        stats["finetune_kept"] = float(keep)
        log(INFO, "[mosaic] fine-tuning average %s: %s", "kept" if keep else "discarded", verdict)
        return (average if keep else self._global_arrays), stats

    def stats_problem(self, stats: ArrayRecord, task: TrainTask, model: str) -> str:
        """The distillation round's uploads: label counts, prototypes with their labels, and
        a probe head (required from a client that trained another model than the global one)."""
        if not task.upload_stats:
            return super().stats_problem(stats, task, model)
        keys = {LABEL_COUNTS, PROTOTYPES, PROTOTYPE_LABELS}
        if model != self.global_name or PROBE_WEIGHT in stats.keys():
            keys |= {PROBE_WEIGHT, PROBE_BIAS}
        if set(stats.keys()) != keys:
            return f"stats must hold {', '.join(sorted(keys))}; got {sorted(stats.keys())}"
        problem = self.counts_problem(stats)
        if problem:
            return problem
        if PROBE_WEIGHT in keys:
            probe_w, probe_b = stats[PROBE_WEIGHT].numpy(), stats[PROBE_BIAS].numpy()
            if probe_w.shape != (self.num_classes, self.feature_dim) \
                    or probe_b.shape != (self.num_classes,) \
                    or not (np.isfinite(probe_w).all() and np.isfinite(probe_b).all()):
                return (f"{PROBE_WEIGHT} and {PROBE_BIAS} must be finite, shaped "
                        f"({self.num_classes}, {self.feature_dim}) and ({self.num_classes},)")
        protos = stats[PROTOTYPES].numpy()
        proto_labels = stats[PROTOTYPE_LABELS].numpy()
        if protos.ndim != 2 or protos.shape[1] != self.feature_dim or protos.dtype.kind != "f":
            return f"{PROTOTYPES} must be float (P, {self.feature_dim}), got {protos.shape}"
        if not np.isfinite(protos).all():
            return f"{PROTOTYPES} hold NaN or infinite values"
        if proto_labels.shape != (len(protos),) or (proto_labels < 0).any() \
                or (proto_labels >= self.num_classes).any():
            return f"{PROTOTYPE_LABELS} must hold one class in 0..{self.num_classes - 1} per prototype"
        return ""

    # ------------------------------------------------------------ the Mosaic step
    def distill_round(self, uploads: list[ClientUpload], global_arrays: ArrayRecord,
                      server_round: int = 0) -> tuple[ArrayRecord, dict[str, float]]:
        """Experts, meta model and distillation from the distillation round's uploads,
        each step kept only as far as the trust checks support it (:mod:`.trust`)."""
        s, device = self.settings, self.device
        rng = torch.Generator().manual_seed(self.seed)
        stats: dict[str, float] = {}
        start = time.monotonic()

        counts = self.label_counts(uploads)
        weights = expert_weights(counts, s.expert_weighting)
        experts_on, on_features = self._experts(uploads, weights)
        class_share = counts.sum(0).double().to(device)
        held = torch.nonzero(class_share > 0).flatten()
        stats["classes_held"] = len(held)
        stats["experts_seconds"] = time.monotonic() - start

        start = time.monotonic()
        fuse = self._fuse(uploads, on_features, class_share, rng, stats)
        stats["meta_seconds"] = time.monotonic() - start

        def teacher(x: torch.Tensor) -> torch.Tensor:
            return fuse(experts_on(x))

        start = time.monotonic()
        student = self.global_model(global_arrays)
        generators = self.client_generators(uploads) if s.generators else []
        sample = self._sampler(generators, len(uploads), rng)
        if self.score_fn is not None:
            student.eval()
            stats["student_accuracy_before"] = self.score_fn(student)
            stats["teacher_accuracy"] = self.score_fn(teacher)
            stats["ensemble_accuracy"] = self.score_fn(
                lambda x: ensemble_logits(experts_on(x), class_share))
        self._distill(student, teacher, sample, len(uploads), held, rng, stats)
        stats["distilled"] = 1.0
        verdict = "kept (trust checks off)"
        if s.trust:
            if self.score_fn is not None:
                stats["student_accuracy_distilled"] = self.score_fn(student)
            distilled = ArrayRecord({k: v.detach().cpu() for k, v in student.state_dict().items()})
            self._judges = [u.partition_id for u in uploads]
            shares = [k / s.trust_mixes for k in range(1, s.trust_mixes + 1)]
            mixes = [interpolate(global_arrays, distilled, share) for share in shares[:-1]]
            names = ("before", *(f"mix{round(100 * share)}" for share in shares[:-1]), "distilled")
            if self.score_fn is not None:
                for name, mix in zip(names[1:-1], mixes):
                    stats[f"student_accuracy_{name}"] = self.score_fn(self.global_model(mix).eval())
            choice, verdict = self._clients_choose(server_round, self._judges, global_arrays,
                                                   [*mixes, distilled], names, stats)
            stats["distill_share"] = 0.0 if choice == 0 else shares[choice - 1]
            if choice == 0:
                student.load_state_dict(global_arrays.to_torch_state_dict())
                stats["distilled"] = 0.0
                verdict = f"discarded: {verdict}; the fine-tuning rounds run as FedAvg rounds"
            else:
                if choice < len(names) - 1:
                    student.load_state_dict(mixes[choice - 1].to_torch_state_dict())
                verdict = f"kept ({names[choice]}): {verdict}"
        self._distilled = bool(stats["distilled"])
        if self.score_fn is not None:
            student.eval()
            stats["student_accuracy_after"] = self.score_fn(student)
        stats["distill_seconds"] = time.monotonic() - start
        log(INFO, "[mosaic] distilled student %s", verdict)
        log(INFO, "[mosaic] distillation round: %s", ", ".join(
            f"{k} {v:.4f}" for k, v in stats.items() if isinstance(v, float)))
        return ArrayRecord(student.to("cpu").state_dict()), stats

    def _fuse(self, uploads: list[ClientUpload], on_features: Callable[[torch.Tensor], torch.Tensor],
              class_share: torch.Tensor, rng: torch.Generator, stats: dict[str, float]
              ) -> Callable[[torch.Tensor], torch.Tensor]:
        """How the teacher combines the experts: the meta model trained on the prototypes
        when it beats the count-weighted ensemble on held-out ones, else that ensemble."""
        s, device = self.settings, self.device
        protos = torch.cat([torch.from_numpy(u.stats[PROTOTYPES].numpy()) for u in uploads]).to(device)
        labels = torch.cat([torch.from_numpy(u.stats[PROTOTYPE_LABELS].numpy())
                            for u in uploads]).to(device)
        owners = torch.cat([torch.full((len(u.stats[PROTOTYPE_LABELS].numpy()),), k)
                            for k, u in enumerate(uploads)])
        stats["num_prototypes"] = len(protos)

        def ensemble(logits: torch.Tensor) -> torch.Tensor:
            return ensemble_logits(logits, class_share)

        stats["meta_used"] = 0.0
        if len(protos) == 0:
            return ensemble
        with torch.no_grad():
            proto_logits = on_features(protos).float()
        if not s.meta_model:
            stats["ensemble_prototype_accuracy"] = _accuracy(ensemble(proto_logits), labels)
            stats["meta_prototype_accuracy"] = stats["ensemble_prototype_accuracy"]
            return ensemble
        train, held_out = holdout_split(owners * self.num_classes + labels.cpu(),
                                        s.trust_holdout if s.trust else 0.0, rng)
        train, held_out = train.to(device), held_out.to(device)
        log(INFO, "[mosaic] training the meta model on %d prototypes from %d clients (%d held out)",
            len(train), len(uploads), len(held_out))
        meta = MetaModel(len(class_share), self.num_classes, s.meta_dim, s.meta_heads,
                         s.meta_dropout).to(device)
        meta = train_meta_model(meta, proto_logits[train], labels[train], epochs=s.meta_epochs,
                                lr=s.meta_lr, batch_size=s.meta_batch_size, ema_decay=s.meta_ema,
                                rng=rng, log_every=max(1, s.meta_epochs // 5))
        stats["ensemble_prototype_accuracy"] = _accuracy(ensemble(proto_logits[train]), labels[train])
        stats["meta_prototype_accuracy"] = _accuracy(meta(proto_logits[train]), labels[train])
        if len(held_out) == 0:
            stats["meta_used"] = 1.0
            return meta
        stats["ensemble_holdout_accuracy"] = _accuracy(ensemble(proto_logits[held_out]),
                                                       labels[held_out])
        stats["meta_holdout_accuracy"] = _accuracy(meta(proto_logits[held_out]), labels[held_out])
        if stats["meta_holdout_accuracy"] < stats["ensemble_holdout_accuracy"]:
            log(INFO, "[mosaic] meta model not used: %.4f on held-out prototypes, the "
                "count-weighted ensemble %.4f", stats["meta_holdout_accuracy"],
                stats["ensemble_holdout_accuracy"])
            return ensemble
        stats["meta_used"] = 1.0
        return meta

    def _clients_choose(self, server_round: int, judges: list[int], incumbent: ArrayRecord,
                        candidates: list[ArrayRecord], names: tuple[str, ...],
                        stats: dict[str, float]) -> tuple[int, str]:
        """Which of ``incumbent`` (0) and ``candidates`` (1, 2, ...) the clients of the
        partitions ``judges``, scoring every model on their own data (Flower evaluate
        messages, :mod:`.trust`), find the most accurate; among equal scores the last (a
        candidate, not the incumbent, wins a tie); and the verdict in words. ``names``
        names the incumbent and each candidate; records ``federated_accuracy_<name>`` for
        every one. Without a grid or without a client that scored them all, the last
        candidate wins.

        The judges are asked on the nodes they last replied from; when some judge's
        node is not connected (it left, or the run was resumed and node ids are new),
        every connected node is asked and only the judges' replies count."""
        last = len(candidates)
        if self._grid is None:
            return last, "unchecked: no grid to ask clients (the strategy runs outside a round)"
        connected = list(self._grid.get_node_ids())
        nodes = [self._node_of[p] for p in judges if self._node_of.get(p) in connected]
        if len(nodes) < len(judges):
            nodes = connected
        began = time.monotonic()
        scores = []
        for arrays in (incumbent, *candidates):
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord(
                {**dict(self._evaluate_config.items()), "server-round": server_round})})
            # Every one is a global model: every client scores it on its data, whatever
            # model it trains itself (as in federated evaluation).
            messages = list(self._construct_messages(record, nodes, MessageType.EVALUATE))
            scores.append(local_scores(self._grid.send_and_receive(messages, timeout=self._timeout)))
        common = sorted(set(judges).intersection(*scores))
        stats["federated_check_clients"] = len(common)
        stats["federated_check_seconds"] = time.monotonic() - began
        if not common:
            return last, "unchecked: no client scored every model"
        acc = [pooled_accuracy(score, common) for score in scores]
        for name, value in zip(names, acc):
            stats[f"federated_accuracy_{name}"] = value
        choice = max(range(len(acc)), key=lambda i: (acc[i], i))
        summary = f"{len(common)} clients score " + ", ".join(
            f"the {name} model {value:.4f}" for name, value in zip(names, acc)) + " on their data"
        return choice, summary

    def _distill(self, student: nn.Module, teacher: Callable[[torch.Tensor], torch.Tensor],
                 sample: Callable[[], torch.Tensor], num_clients: int, held: torch.Tensor,
                 rng: torch.Generator, stats: dict[str, float]) -> None:
        """Distil ``teacher`` into ``student`` on the classes some client of the round holds."""
        s = self.settings
        log(INFO, "[mosaic] distilling the teacher into the global model: %d steps, %d inputs "
            "per step, %d of %d classes", s.distill_steps,
            s.samples_per_generator * num_clients, len(held), self.num_classes)
        history = distill_into(
            student, teacher, sample, steps=s.distill_steps, lr=s.distill_lr,
            weights=DistillWeights(s.kl_weight, s.ce_weight, s.jsd_weight, s.temperature),
            device=self.device, amp=self.amp, cpu_bf16=self.cpu_bf16,
            pool_batches=s.distill_pool_batches, rng=rng,
            classes=held if len(held) < self.num_classes else None,
            log_every=max(1, s.distill_steps // 10))
        if history:
            tail = history[-max(1, len(history) // 10):]
            stats["distill_loss_first"] = history[0]["loss"]
            stats["distill_loss_last"] = sum(h["loss"] for h in tail) / len(tail)

    def _experts(self, uploads: list[ClientUpload], weights: torch.Tensor
                 ) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                            Callable[[torch.Tensor], torch.Tensor]]:
        """The experts' outputs, ``(batch, C_experts, classes)``, on classifier inputs and on
        global-model features (prototypes).

        When every reply trained the global model, experts mix the client
        parameters (and their heads read the features); otherwise each expert
        mixes the client models' predictive distributions, and on features the
        clients' probe heads' (a client of the global model that sent no probe
        is represented by its own head). See :mod:`mosaic_flwr.mosaic.experts`.
        """
        device = self.device
        if not self.mixed(uploads):
            states = [u.arrays.to_torch_state_dict() for u in uploads]
            experts = {k: v.to(device) for k, v in class_experts(states, weights).items()}
            modules = expert_modules(self.model_fn, experts, device)
            return (lambda x: client_logits(modules, x).permute(1, 0, 2),
                    lambda features: head_logits(experts, features))
        probe_w, probe_b = [], []
        for upload in uploads:
            stats, arrays = upload.stats, upload.arrays
            assert stats is not None
            weight, bias = ((stats[PROBE_WEIGHT], stats[PROBE_BIAS]) if PROBE_WEIGHT in stats
                            else (arrays["head.weight"], arrays["head.bias"]))
            probe_w.append(torch.from_numpy(weight.numpy()))
            probe_b.append(torch.from_numpy(bias.numpy()))
        w_stack, b_stack = torch.stack(probe_w).to(device), torch.stack(probe_b).to(device)
        clients = self.client_models(uploads)
        weights = weights.to(device)

        def on_features(features: torch.Tensor) -> torch.Tensor:
            logits = torch.einsum("pd,kcd->kpc", features.to(w_stack), w_stack) + b_stack[:, None]
            return mixture_log_probs(logits, weights)

        return (lambda x: mixed_expert_logits(clients, weights, x)), on_features

    def _sampler(self, generators: list[nn.Module], num_clients: int, rng: torch.Generator
                 ) -> Callable[[], torch.Tensor]:
        """Draws one distillation batch: ``samples_per_generator`` from every generator,
        or as many Gaussian-noise inputs per client when generators are off."""
        n = self.settings.samples_per_generator
        if not generators:
            shape = (n * num_clients, *self.input_shape)
            return lambda: torch.randn(shape, generator=rng).to(self.device)
        return lambda: torch.cat([g.sample(n, rng) for g in generators])


@torch.no_grad()
def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())

