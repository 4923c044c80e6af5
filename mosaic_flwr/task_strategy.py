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

Clients may train different models (:mod:`mosaic_flwr.client_models`); each
reply names its model. A strategy says which it can combine in
``MIXED_MODELS``. Replies of the global model are averaged into the global
model. Width sub-models of the global architecture are cut from it and
averaged back slice by slice when the strategy has a ``SLICING``
(:mod:`mosaic_flwr.submodels`: HeteroFL, FedRolex, Mosaic). Every other model
is averaged with the clients that train the same model (its group), and each
client gets its group's average back the next round; the server step sees
every reply's own model through :meth:`~TaskStrategy.client_models`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, ClassVar, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from .client_models import global_model_spec
from .config import RunConfig
from .data.datasets import DATASETS
from .models import Classifier, ModelSpec
from .records import (CLIENT_RECORD, GENERATOR_RECORD, GLOBAL_MODEL_RECORD, LABEL_COUNTS,
                      PROBE_BIAS, PROBE_WEIGHT, PROTOTYPE_LABELS, PROTOTYPES, STATS_RECORD,
                      TASK_RECORD, TrainTask)
from .strategies import (ScoreFn, TolerantAggregation, array_signature, arrays_problem,
                         average_arrays, train_reply_problem)
from .submodels import aggregate_submodels, submodel_indices
from .training import select_device


def model_fn_for(config: RunConfig) -> Callable[[], Classifier]:
    """Builds the run's global model (the ``model_fn`` of every strategy's ``from_config``)."""
    spec, model = DATASETS[config.dataset], global_model_spec(config)
    return lambda: model.build(spec)


def server_options(config: RunConfig, score_fn: ScoreFn | None) -> dict:
    """The :class:`TaskStrategy` keyword arguments a run config sets."""
    spec = DATASETS[config.dataset]
    return {"device": select_device(config.device), "amp": config.amp, "seed": config.seed,
            "score_fn": score_fn, "global_name": str(global_model_spec(config)),
            "model_factory": lambda name: ModelSpec.parse(name).build(spec)}


class TaskStrategy(TolerantAggregation, FedAvg):
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
    seed : int (default: 0)
        Seeds the server step's random draws.
    score_fn : ScoreFn, optional
        Scores a predictor on held-out data, for diagnostics only (never training).
    global_name : str (default: "")
        The global model's name as clients report it (``name@width``).
    model_factory : Callable[[str], Classifier], optional
        Builds a client model from its name (``resnet8@0.5``). Without it every
        reply counts as the global model (a homogeneous federation).
    **kwargs
        Passed to :class:`~mosaic_flwr.strategies.TolerantAggregation` and FedAvg.
    """

    #: Which client models the strategy combines with the global one: ``""`` (none),
    #: ``"width"`` (width sub-models of the global architecture) or ``"any"``.
    MIXED_MODELS: ClassVar[str] = ""
    #: How width sub-models are cut from the global model and averaged back:
    #: ``"static"`` (HeteroFL), ``"rolling"`` (FedRolex), or ``""`` (they form groups).
    SLICING: ClassVar[str] = ""

    def __init__(self, model_fn: Callable[[], Classifier], *,
                 generator_fn: Callable[[], nn.Module] | None = None,
                 device: str | torch.device = "cpu", amp: bool = True, seed: int = 0,
                 score_fn: ScoreFn | None = None, global_name: str = "",
                 model_factory: Callable[[str], Classifier] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_fn = model_fn
        self.global_name = global_name
        self.model_factory = model_factory
        #: Each node's model, from its last usable reply.
        self.node_models: dict[int, str] = {}
        #: The latest average of each group of clients that train one non-global model.
        self.group_arrays: dict[str, ArrayRecord] = {}
        self._templates: dict[str, Classifier] = {}
        self._signatures: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
        self._global_arrays = ArrayRecord()
        self._round = 0
        self.generator_fn = generator_fn
        self.device = torch.device(device)
        self.amp = amp
        self.seed = seed
        self.score_fn = score_fn
        #: The server step's random draws, one stream for the whole run.
        self.rng = torch.Generator().manual_seed(seed)
        template = model_fn()
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

    def server_step(self, server_round: int, replies: list[Message],  # pylint: disable=unused-argument
                    arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        """Turn the average of the usable replies into the new global model; stats to record."""
        return arrays, {}

    # ------------------------------------------------------------ Flower API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's instructions plus this round's ``task`` and extra records.

        A node known to train a non-global model that is not cut from the global
        one gets its group's latest average instead of the global model (and
        the global model as well when the task needs it for prototypes).
        """
        self._global_arrays, self._round = arrays, server_round
        messages = list(super().configure_train(server_round, arrays, config, grid))
        task = replace(self.task_for(server_round), slicing=self.SLICING)
        extra = self.instruction_records(server_round)
        for msg in messages:
            msg.content = RecordDict(dict(msg.content.items()))  # FedAvg shares one between messages
            model = self.node_models.get(msg.metadata.dst_node_id, self.global_name)
            sent = self.global_name
            if model in self.group_arrays and not self.sliced(model):
                msg.content[self.arrayrecord_key] = self.group_arrays[model]
                sent = model
                if task.upload_stats:
                    msg.content[GLOBAL_MODEL_RECORD] = arrays
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
        return self.stats_problem(records[STATS_RECORD], task.upload_stats,
                                  probe=model != self.global_name)

    def stats_problem(self, stats: ArrayRecord, prototypes: bool, probe: bool = False) -> str:
        """Why an uploaded ``stats`` record is malformed ('' when it is fine).

        With prototypes, a probe head may come too; ``probe`` says it must
        (the client trained another model than the global one).
        """
        keys = {LABEL_COUNTS, PROTOTYPES, PROTOTYPE_LABELS} if prototypes else {LABEL_COUNTS}
        if prototypes and (probe or PROBE_WEIGHT in stats.keys()):
            keys |= {PROBE_WEIGHT, PROBE_BIAS}
        if set(stats.keys()) != keys:
            return f"stats must hold {', '.join(sorted(keys))}; got {sorted(stats.keys())}"
        counts = stats[LABEL_COUNTS].numpy()
        if counts.shape != (self.num_classes,) or counts.dtype.kind not in "iu" or (counts < 0).any():
            return f"{LABEL_COUNTS} must be {self.num_classes} non-negative integers"
        if not prototypes:
            return ""
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

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, average, then the method's server step on the usable replies."""
        usable = self.screen_train(server_round, replies)
        arrays, metrics = self.average(usable)
        stats = self.round_stats[server_round]
        stats["phase"] = self.task_for(server_round).phase
        arrays, step_stats = self.server_step(server_round, usable, arrays)
        stats.update(step_stats)
        return arrays, metrics

    def average(self, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """The new global model, and each group's average (see the module doc).

        With every reply on the global model this is FedAvg. Width sub-models
        (when the strategy slices) and global-model replies are averaged slice
        by slice into the global model; without either, the global model stays
        as it was sent.
        """
        groups: dict[str, list[Message]] = {}
        for msg in replies:
            model = self.reply_model(msg)
            self.node_models[msg.metadata.src_node_id] = model
            groups.setdefault(model, []).append(msg)
        if set(groups) == {self.global_name}:
            return super().average(replies)
        for model, members in groups.items():
            if model != self.global_name and not self.sliced(model):
                self.group_arrays[model] = average_arrays(
                    [m.content.array_records[self.arrayrecord_key] for m in members],
                    self.reply_weights(members))
        into_global = [m for m in replies
                       if self.reply_model(m) == self.global_name or self.sliced(self.reply_model(m))]
        arrays = self._aggregate_slices(into_global) if into_global else self._global_arrays
        return arrays, self.average_metrics(replies)

    def _aggregate_slices(self, replies: list[Message]) -> ArrayRecord:
        """Slice-wise average of global-model replies and width sub-models into the global model."""
        global_state = self._global_arrays.to_torch_state_dict()
        full_shapes = {k: tuple(v.shape) for k, v in global_state.items()}
        states, indices = [], []
        for msg in replies:
            state = msg.content.array_records[self.arrayrecord_key].to_torch_state_dict()
            units = self.template(self.reply_model(msg)).flatten_units
            indices.append(submodel_indices(full_shapes, {k: tuple(v.shape) for k, v in state.items()},
                                            self.SLICING or "static", self._round, units))
            states.append(state)
        return ArrayRecord(aggregate_submodels(global_state, states, indices,
                                               self.reply_weights(replies)))

    # ------------------------------------------------------------ client models
    def reply_model(self, msg: Message) -> str:
        """The model a reply says it trained (the global model when it does not say)."""
        record = msg.content.config_records.get(CLIENT_RECORD) if not msg.has_error() else None
        if self.model_factory is None or record is None:
            return self.global_name
        return str(record.get("model", self.global_name))

    def model_problem(self, model: str) -> str:
        """Why this strategy cannot combine a client model with the global one ('' if it can)."""
        if model == self.global_name:
            return ""
        if not self.MIXED_MODELS or self.model_factory is None:
            return (f"the client trained {model}, but this strategy needs every client to train "
                    f"the global model {self.global_name}")
        try:
            spec = ModelSpec.parse(model)
        except ValueError as err:
            return f"client model: {err}"
        if self.MIXED_MODELS == "width" and not spec.holds_slice_of(ModelSpec.parse(self.global_name)):
            return f"the client trained {model}, not a width sub-model of {self.global_name}"
        return ""

    def sliced(self, model: str) -> bool:
        """True when ``model`` is cut from the global model and averaged back into it."""
        return (bool(self.SLICING) and model != self.global_name
                and ModelSpec.parse(model).holds_slice_of(ModelSpec.parse(self.global_name)))

    def build_model(self, model: str) -> Classifier:
        """A new instance of a client model, by name (the global model by ``model_fn``)."""
        if model == self.global_name or self.model_factory is None:
            return self.model_fn()
        return self.model_factory(model)

    def template(self, model: str) -> Classifier:
        """One cached instance of a model, for its array names, shapes and slicing units."""
        if model not in self._templates:
            self._templates[model] = self.build_model(model)
        return self._templates[model]

    def signature(self, model: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """The array names, shapes and dtypes a reply of ``model`` must carry (cached)."""
        if model not in self._signatures:
            self._signatures[model] = array_signature(ArrayRecord(self.template(model).state_dict()))
        return self._signatures[model]

    def mixed(self, replies: list[Message]) -> bool:
        """True when some reply trained another model than the global one."""
        return any(self.reply_model(m) != self.global_name for m in replies)

    # ------------------------------------------------------------ helpers for methods
    def label_counts(self, replies: list[Message]) -> torch.Tensor:
        """(K, C) label counts of the replies (their tasks asked for counts)."""
        return torch.stack([torch.from_numpy(m.content[STATS_RECORD][LABEL_COUNTS].numpy())
                            for m in replies])

    def client_models(self, replies: list[Message]) -> list[Classifier]:
        """The replies' trained models (each its own architecture), frozen, in eval mode,
        on the server's device."""
        models = []
        for msg in replies:
            model = self.build_model(self.reply_model(msg))
            model.load_state_dict(msg.content[self.arrayrecord_key].to_torch_state_dict())
            models.append(model.to(self.device).eval().requires_grad_(False))
        return models

    def global_model(self, arrays: ArrayRecord) -> Classifier:
        """A trainable global model holding ``arrays``, on the server's device."""
        model = self.model_fn()
        model.load_state_dict(arrays.to_torch_state_dict())
        return model.to(self.device)

    def client_generators(self, replies: list[Message]) -> list[nn.Module]:
        """The replies' uploaded generators, in eval mode, on the server's device."""
        assert self.generator_fn is not None
        generators = []
        for msg in replies:
            generator = self.generator_fn()
            generator.load_state_dict(msg.content[GENERATOR_RECORD].to_torch_state_dict())
            generators.append(generator.to(self.device).eval())
        return generators
