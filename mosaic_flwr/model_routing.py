"""Heterogeneous client models on the server: which model each node gets, how replies combine.

Clients may train different models (:mod:`mosaic_flwr.client_models`); each
reply names its model. A strategy says which it can combine in
``MIXED_MODELS``. Replies of the global model are averaged into the global
model. Width sub-models of the global architecture are cut from it and
averaged back slice by slice when the strategy has a ``SLICING``
(:mod:`mosaic_flwr.submodels`: HeteroFL, FedRolex, Mosaic). Every other model
is averaged with the clients that train the same model (its group), and each
client gets its group's average back the next round; a server step sees every
reply's own model through :meth:`ModelRouting.client_models`.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from .aggregation import array_signature, average_arrays
from .models import Classifier, ModelSpec
from .records import CLIENT_RECORD, GLOBAL_MODEL_RECORD, GROUP_MODEL_PREFIX, ClientUpload
from .submodels import aggregate_submodels, submodel_indices
from .training import frozen


class ModelRouting:
    """Mixin for a :class:`~mosaic_flwr.aggregation.TolerantAggregation` strategy whose
    clients may train other models than the global one.

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global model (``features(x)`` and a linear ``head``).
    global_name : str (default: "")
        The global model's name as clients report it (``name@width``).
    model_factory : Callable[[str], Classifier], optional
        Builds a client model from its name (``resnet8@0.5``). Without it every
        reply counts as the global model (a homogeneous federation).
    **kwargs
        Passed on to the next class (the aggregation mixin and Flower's strategy).
    """

    #: Which client models the strategy combines with the global one: ``""`` (none),
    #: ``"width"`` (width sub-models of the global architecture) or ``"any"``.
    MIXED_MODELS: ClassVar[str] = ""
    #: How width sub-models are cut from the global model and averaged back:
    #: ``"static"`` (HeteroFL), ``"rolling"`` (FedRolex), or ``""`` (they form groups).
    SLICING: ClassVar[str] = ""

    arrayrecord_key: str
    #: Where :meth:`client_models` and :meth:`global_model` put models (set by the strategy).
    device: torch.device

    def __init__(self, model_fn: Callable[[], Classifier], *, global_name: str = "",
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

    def remember_global(self, server_round: int, arrays: ArrayRecord) -> None:
        """The global model this round starts from (slices are cut from it)."""
        self._global_arrays, self._round = arrays, server_round

    @property
    def round_start(self) -> ArrayRecord:
        """The global model the current round started from (what its instructions carried)."""
        return self._global_arrays

    def route(self, msg: Message, arrays: ArrayRecord, with_global: bool) -> str:
        """Put the model its node trains into an instruction; the name of what was put.

        A node known to train a non-global model that is not cut from the global
        one gets its group's latest average instead of the global model (and the
        global model as well under ``global-model`` when ``with_global``). A node
        not heard from yet (new, or renumbered by a restart) gets the global model
        and every such group's average (``group-model:<name>``), to train from
        its own.
        """
        node = msg.metadata.dst_node_id
        if node not in self.node_models:  # not heard from yet: send every group's average
            for name, group in self.group_arrays.items():
                if not self.sliced(name):
                    msg.content[GROUP_MODEL_PREFIX + name] = group
        model = self.node_models.get(node, self.global_name)
        if model in self.group_arrays and not self.sliced(model):
            msg.content[self.arrayrecord_key] = self.group_arrays[model]
            if with_global:
                msg.content[GLOBAL_MODEL_RECORD] = arrays
            return model
        return self.global_name

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

    def mixed(self, uploads: list[ClientUpload]) -> bool:
        """True when some upload trained another model than the global one."""
        return any(u.model != self.global_name for u in uploads)

    def client_models(self, uploads: list[ClientUpload]) -> list[Classifier]:
        """The uploads' trained models (each its own architecture), frozen, in eval mode,
        in channels-last layout (:func:`~mosaic_flwr.training.fast_layout`), on the
        server's device."""
        models = []
        for upload in uploads:
            model = self.build_model(upload.model)
            model.load_state_dict(upload.arrays.to_torch_state_dict())
            models.append(frozen(model, self.device))
        return models

    def global_model(self, arrays: ArrayRecord) -> Classifier:
        """A trainable global model holding ``arrays``, on the server's device."""
        model = self.model_fn()
        model.load_state_dict(arrays.to_torch_state_dict())
        return model.to(self.device)
