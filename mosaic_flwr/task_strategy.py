"""The base of every strategy that asks clients for more than local training.

:class:`TaskStrategy` is FedAvg with reply screening, plus three hooks a method
fills in:

- :meth:`~TaskStrategy.task_for`: the :class:`~mosaic_flwr.records.TrainTask`
  sent with each round's instructions (objective, epochs, what to upload);
- :meth:`~TaskStrategy.instruction_records`: extra records sent to clients
  (FedGen's generator);
- :meth:`~TaskStrategy.server_step`: what the server does after averaging
  (distillation for Mosaic, FedFTG, FedDF, DENSE; generator training for FedGen).

Replies are screened against the task: a reply that lacks the label counts,
prototypes or generator the task asked for, or whose uploads are malformed, is
left out like any other bad reply.

The concerns live apart: reply screening and averaging in
:mod:`mosaic_flwr.aggregation`, heterogeneous client models (groups, width
slices) in :mod:`mosaic_flwr.model_routing`, and here the hooks. A method whose
uploads need more checks than label counts and a generator (Mosaic's
prototypes) extends :meth:`~TaskStrategy.stats_problem`.
"""

from __future__ import annotations

from dataclasses import replace
from logging import WARNING
from typing import Any, Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import nn

from .aggregation import (TolerantAggregation, array_signature, arrays_problem, reply_partition_id,
                          train_reply_problem)
from .client_models import global_model_spec
from .config import RunConfig
from .data.datasets import dataset_spec
from .model_routing import ModelRouting
from .models import Classifier, ModelSpec, classifier_problem
from .records import (GENERATOR_RECORD, LABEL_COUNTS, STATS_RECORD, TASK_RECORD, ClientUpload,
                      TrainTask)
from .training import fast_layout, select_device


#: Scores a predictor (classifier inputs -> logits) on held-out data; for reporting only.
ScoreFn = Callable[[Callable[[torch.Tensor], torch.Tensor]], float]


def model_fn_for(config: RunConfig) -> Callable[[], Classifier]:
    """Builds the run's global model (the ``model_fn`` of every strategy's ``from_config``)."""
    spec, model = dataset_spec(config), global_model_spec(config)
    return lambda: model.build(spec)


def server_options(config: RunConfig, score_fn: ScoreFn | None) -> dict:
    """The :class:`TaskStrategy` keyword arguments a run config sets."""
    spec = dataset_spec(config)
    return {"device": select_device(config.device), "amp": config.amp,
            "cpu_bf16": config.cpu_bf16, "seed": config.seed,
            "score_fn": score_fn, "global_name": str(global_model_spec(config)),
            "model_factory": lambda name: ModelSpec.parse(name).build(spec)}


class TaskStrategy(ModelRouting, TolerantAggregation, FedAvg):
    """FedAvg whose instructions carry a task and whose aggregation ends with a server step.

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global model (``features(x)`` and a linear ``head``).
    generator_fn : Callable[[], nn.Module], optional
        Builds the generator clients upload when the task asks for one (to
        check and load uploads).
    device : str or torch.device (default: "cpu")
        Where the server step runs.
    amp : bool (default: True)
        Mixed precision for server-side training on CUDA.
    cpu_bf16 : bool (default: True)
        bfloat16 autocast for the server step's frozen forward passes (teachers,
        generators) on CPUs that compute it natively
        (:func:`mosaic_flwr.training.autocast`).
    seed : int (default: 0)
        Seeds the server step's random draws.
    score_fn : ScoreFn, optional
        Scores a predictor on held-out data, for diagnostics only (never training).
    global_name, model_factory
        See :class:`~mosaic_flwr.model_routing.ModelRouting`.
    **kwargs
        Passed to :class:`~mosaic_flwr.aggregation.TolerantAggregation` and FedAvg.
    """

    def __init__(self, model_fn: Callable[[], Classifier], *,
                 generator_fn: Callable[[], nn.Module] | None = None,
                 device: str | torch.device = "cpu", amp: bool = True,
                 cpu_bf16: bool = True, seed: int = 0,
                 score_fn: ScoreFn | None = None, global_name: str = "",
                 model_factory: Callable[[str], Classifier] | None = None, **kwargs) -> None:
        super().__init__(model_fn, global_name=global_name, model_factory=model_factory, **kwargs)
        self.generator_fn = generator_fn
        self.device = torch.device(device)
        self.amp = amp
        self.cpu_bf16 = cpu_bf16
        self.seed = seed
        self.score_fn = score_fn
        #: The server step's random draws, one stream for the whole run.
        self.rng = torch.Generator().manual_seed(seed)
        template = model_fn()
        problem = classifier_problem(template)
        if problem:
            raise TypeError(f"model_fn: {problem}")
        self.num_classes = int(template.head.out_features)
        self.feature_dim = int(template.head.in_features)
        self._generator_signature = (array_signature(ArrayRecord(generator_fn().state_dict()))
                                     if generator_fn is not None else {})

    # ------------------------------------------------------------ method hooks
    def task_for(self, server_round: int) -> TrainTask:  # pylint: disable=unused-argument
        """What clients are asked to do in a round (plain local training by default)."""
        return TrainTask()

    def instruction_records(self, server_round: int  # pylint: disable=unused-argument
                            ) -> dict[str, ArrayRecord]:
        """Extra ArrayRecords sent with this round's instructions."""
        return {}

    def server_step(self, server_round: int, uploads: list[ClientUpload],  # pylint: disable=unused-argument
                    arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        """Turn the average of the usable replies (``arrays``) into the new global model,
        reading the decoded replies (``uploads``, in partition order); stats to record."""
        return arrays, {}

    def state_dict(self) -> dict[str, Any]:
        """Every piece of server state a later round reads, for a checkpoint
        (:mod:`mosaic_flwr.checkpoint`); a method that keeps more extends it."""
        return {**super().state_dict(), "rng": self.rng.get_state(),
                "group_arrays": {name: arrays.to_torch_state_dict()
                                 for name, arrays in self.group_arrays.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self.rng.set_state(state["rng"])
        self.group_arrays = {name: ArrayRecord(arrays)
                             for name, arrays in state["group_arrays"].items()}

    # ------------------------------------------------------------ Flower API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's instructions plus this round's ``task`` and extra records.

        A node known to train a non-global model that is not cut from the global
        one gets its group's latest average instead of the global model (and
        the global model as well when the task needs it for prototypes).
        """
        self.remember_global(server_round, arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        task = replace(self.task_for(server_round), slicing=self.SLICING)
        extra = self.instruction_records(server_round)
        for msg in messages:
            msg.content = RecordDict(dict(msg.content.items()))  # FedAvg shares one between messages
            sent = self.route(msg, arrays, with_global=task.upload_stats)
            msg.content[TASK_RECORD] = replace(task, arrays_model=sent).to_record()
            for name, record in extra.items():
                msg.content[name] = record
        return messages

    def reply_problem(self, server_round: int, msg: Message) -> str:
        """A reply must carry a model this strategy combines and valid uploads for the task."""
        task = self.task_for(server_round)
        stats = task.upload_counts or task.upload_stats
        extra = frozenset(({STATS_RECORD} if stats else set())
                          | ({GENERATOR_RECORD} if task.upload_generator else set()))
        missing = extra - set(msg.content.array_records) if not msg.has_error() else set()
        if missing:
            return (f"no {', '.join(sorted(missing))} record, which the round's task asked for: "
                    f"the ClientApp does not do {type(self).__name__}'s client part (see "
                    f"mosaic_flwr.handle_train and TrainTask)")
        model = self.reply_model(msg)
        problem = self.model_problem(model)
        if problem:
            return problem
        expected = self._expected if model == self.global_name else self.signature(model)
        problem = train_reply_problem(msg, expected, self.arrayrecord_key,
                                      self.weighted_by_key, extra)
        if problem:
            return problem
        records = msg.content.array_records
        if task.upload_generator:
            problem = arrays_problem(records[GENERATOR_RECORD], self._generator_signature)
            if problem:
                return f"generator: {problem}"
        if not stats:
            return ""
        return self.stats_problem(records[STATS_RECORD], task, model)

    def stats_problem(self, stats: ArrayRecord, task: TrainTask, model: str) -> str:
        """Why an uploaded ``stats`` record is malformed ('' when it is fine).

        The base checks a counts-only upload (``label-counts``); a method that
        asks for more (``upload_stats``: Mosaic's prototypes) checks the rest.
        """
        if task.upload_stats:
            return f"strategy {type(self).__name__} asked for stats it does not check"
        if set(stats.keys()) != {LABEL_COUNTS}:
            return f"stats must hold {LABEL_COUNTS}; got {sorted(stats.keys())}"
        return self.counts_problem(stats)

    def counts_problem(self, stats: ArrayRecord) -> str:
        """Why the ``label-counts`` in ``stats`` are malformed ('' when they are fine)."""
        counts = stats[LABEL_COUNTS].numpy()
        if counts.shape != (self.num_classes,) or counts.dtype.kind not in "iu" or (counts < 0).any():
            return f"{LABEL_COUNTS} must be {self.num_classes} non-negative integers"
        return ""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, average, then the method's server step on the usable replies."""
        usable = self.screen_train(server_round, replies)
        arrays, metrics = self.average(usable)
        stats = self.round_stats[server_round]
        stats["phase"] = self.task_for(server_round).phase
        # The step's draws from the global torch RNG (model and meta-model initialisations)
        # follow from the seed and the round alone, not from what the process did before:
        # a resumed run, whose process did not run the earlier rounds, draws the same.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + server_round)
            averaged = arrays
            arrays, step_stats = self.server_step(server_round, [self.decode(m) for m in usable],
                                                  arrays)
        if averaged is not None and arrays is not averaged:
            problem = arrays_problem(arrays, array_signature(averaged))
            if problem:  # a diverged server step must not become every client's start
                log(WARNING, "round %d: the server step's model is refused (%s); the average "
                    "of the replies is the global model", server_round, problem)
                arrays, step_stats = averaged, {**step_stats, "server_step_refused": 1.0}
        stats.update(step_stats)
        return arrays, metrics

    # ------------------------------------------------------------ helpers for methods
    def decode(self, msg: Message) -> ClientUpload:
        """A usable reply as the typed upload a server step reads."""
        records = msg.content.array_records
        return ClientUpload(
            node_id=msg.metadata.src_node_id, partition_id=reply_partition_id(msg),
            model=self.reply_model(msg), arrays=records[self.arrayrecord_key],
            weight=self.reply_weights([msg])[0], stats=records.get(STATS_RECORD),
            generator=records.get(GENERATOR_RECORD),
            metrics=dict(next(iter(msg.content.metric_records.values()), {})))

    @staticmethod
    def label_counts(uploads: list[ClientUpload]) -> torch.Tensor:
        """(K, C) label counts of the uploads (their tasks asked for counts)."""
        return torch.stack([u.label_counts for u in uploads])

    def client_generators(self, uploads: list[ClientUpload]) -> list[nn.Module]:
        """The uploaded generators, frozen, in eval mode and channels-last layout, on the
        server's device."""
        assert self.generator_fn is not None
        generators = []
        for upload in uploads:
            assert upload.generator is not None, "the task asked for no generator"
            generator = self.generator_fn()
            generator.load_state_dict(upload.generator.to_torch_state_dict())
            generator.requires_grad_(False)
            generators.append(fast_layout(generator.to(self.device)).eval())
        return generators
