"""One typed, validated run configuration, built from Flower's run config.

Every key of ``[tool.flwr.app.config]`` in ``pyproject.toml`` is a field of
:class:`RunConfig`: a core key such as ``dirichlet-alpha`` is field
``dirichlet_alpha``, and a method's key such as ``mosaic-warmup-rounds`` is
field ``warmup_rounds`` of the method's section, ``config.mosaic`` (a
:class:`~mosaic_flwr.mosaic.settings.MosaicSettings`). The flat keys exist
only at the edge (:meth:`RunConfig.from_mapping` / :meth:`RunConfig.to_mapping`).
Values come, from lowest to highest precedence, from the dataclass defaults
(mirrored in ``pyproject.toml``), a YAML preset named by the ``preset`` key,
and the values a user passes explicitly with ``flwr run --run-config``.

Code below this module never reads raw dictionaries: the ServerApp builds and
validates a ``RunConfig`` once, before any training starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

from .baselines.settings import (DenseSettings, DittoSettings, FedCOGSettings, FedDFSettings,
                                 FedFTGSettings, FedGenSettings, FedLGDSettings,
                                 SpectralSettings)
from .client_models import assign_client_models, client_models_value, global_model_spec
from .data.datasets import DATASETS, FOLDER, is_hub_id
from .data.partition import PARTITIONERS
from .errors import ConfigError
from .faults import FAULT_KINDS
from .method_settings import MethodSettings
from .models import MODELS
from .mosaic.settings import MosaicSettings
from .registry import STRATEGIES

#: Folder of the named experiment presets shipped with the app.
PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"

DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("", "online", "offline", "disabled")
#: ``node-state``: also saved in the run folder, or kept in ``context.state`` only
#: (:mod:`mosaic_flwr.node_state`).
NODE_STATE_MODES = ("run-folder", "memory")


@dataclass(frozen=True)
class RunConfig:  # pylint: disable=too-many-instance-attributes
    """All settings of one run: the core keys, then one section per method.

    Field ``dirichlet_alpha`` is run-config key ``dirichlet-alpha``; section
    ``mosaic`` holds the ``mosaic-*`` keys (field ``warmup_rounds`` is key
    ``mosaic-warmup-rounds``), and likewise for every method in
    :attr:`SECTIONS`.
    """

    #: Each method's settings class, by the name of its section (= its key prefix).
    SECTIONS: ClassVar[dict[str, type[MethodSettings]]] = {
        cls.PREFIX: cls for cls in (MosaicSettings, FedGenSettings, FedFTGSettings,
                                    DenseSettings, FedDFSettings, FedCOGSettings,
                                    FedLGDSettings, SpectralSettings, DittoSettings)}

    preset: str = ""
    strategy: str = "fedavg"
    dataset: str = "digits"  # a registered name, a Hugging Face hub id (owner/name), or folder
    data_path: str = ""
    image_size: int = 0  # 0: the data's own (or the registered) size; N: resize to NxN
    channels: int = 0  # 0: the data's own (or the registered) channels; 1 or 3: convert
    image_column: str = ""  # '': as registered, else guessed from the data
    label_column: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 10
    classes_per_client: int = 2
    num_clients: int = 10
    min_clients: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    num_server_rounds: int = 20
    local_epochs: int = 5
    local_steps: int = 0
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    proximal_mu: float = 0.01
    model: str = "cnn"
    model_width: float = 1.0
    global_model: str = ""
    client_models: str = ""
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    num_threads: int = 1
    server_threads: int = 0  # torch threads of the ServerApp; 0: every core it may use
    amp: bool = True
    cpu_bf16: bool = True  # bf16 autocast for frozen forwards on CPUs that compute it natively
    round_timeout: float = 600.0
    fault_rate: float = 0.0
    fault_kinds: str = "raise,nan,timeout"
    node_wait_timeout: float = 120.0
    output_dir: str = ""
    run_name: str = ""
    checkpoint_keep: int = 2  # checkpoints kept in the run folder (newest first); 0: none
    resume_from: str = ""  # a run folder to continue from its last checkpoint
    node_state: str = "run-folder"  # where clients also save what they keep between rounds
    wandb: bool = False
    wandb_project: str = "mosaic-flwr"
    wandb_mode: str = ""
    # Share of the training split held out from every client, unlabelled, for
    # methods that distil on server-side proxy data (feddf-inputs='proxy').
    proxy_fraction: float = 0.0
    # One section per method (its ``<prefix>-*`` keys).
    mosaic: MosaicSettings = field(default_factory=MosaicSettings)
    fedgen: FedGenSettings = field(default_factory=FedGenSettings)
    fedftg: FedFTGSettings = field(default_factory=FedFTGSettings)
    dense: DenseSettings = field(default_factory=DenseSettings)
    feddf: FedDFSettings = field(default_factory=FedDFSettings)
    fedcog: FedCOGSettings = field(default_factory=FedCOGSettings)
    fedlgd: FedLGDSettings = field(default_factory=FedLGDSettings)
    spectral: SpectralSettings = field(default_factory=SpectralSettings)
    ditto: DittoSettings = field(default_factory=DittoSettings)

    # ------------------------------------------------------------------ building
    @classmethod
    def core_fields(cls) -> list[dataclasses.Field]:
        """The core fields (every field but the method sections), in declaration order."""
        return [f for f in fields(cls) if f.name not in cls.SECTIONS]

    @classmethod
    def core_keys(cls) -> list[str]:
        """Run-config keys of the core fields, in declaration order."""
        return [_key(f.name) for f in cls.core_fields()]

    @classmethod
    def keys(cls) -> list[str]:
        """Every run-config key: the core keys, then each section's prefixed keys."""
        return cls.core_keys() + [settings.key(f.name) for settings in cls.SECTIONS.values()
                                  for f in fields(settings)]  # type: ignore[arg-type]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, validate: bool = True) -> "RunConfig":
        """Build a config from run-config keys (unknown keys are errors) and validate it.

        ``validate=False`` is for values that were validated already (a client
        rebuilding the config the server checked).
        """
        by_key = {_key(f.name): f for f in cls.core_fields()}
        section_fields = {settings.key(f.name): (prefix, f)
                          for prefix, settings in cls.SECTIONS.items()
                          for f in fields(settings)}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {prefix: {} for prefix in cls.SECTIONS}
        for key, value in values.items():
            if key in by_key:
                kwargs[by_key[key].name] = _coerce(key, value, by_key[key].default)
            elif key in section_fields:
                prefix, f = section_fields[key]
                sections[prefix][f.name] = _coerce(key, value, f.default)
            else:
                raise ConfigError(key, value, f"unknown key; known keys: {', '.join(cls.keys())}")
        for prefix, settings in cls.SECTIONS.items():
            kwargs[prefix] = settings(**sections[prefix])
        config = cls(**kwargs)
        if validate:
            config.validate()
        return config

    def to_mapping(self) -> dict[str, Any]:
        """The config as run-config keys and plain values (fits a Flower ConfigRecord)."""
        values = self.core_mapping()
        for prefix in self.SECTIONS:
            section: MethodSettings = getattr(self, prefix)
            values.update({section.key(name): value
                           for name, value in section.to_mapping().items()})
        return values

    def core_mapping(self) -> dict[str, Any]:
        """The core keys only (what a client needs; each method sends its own settings)."""
        return {_key(f.name): getattr(self, f.name) for f in self.core_fields()}

    def replace(self, **changes: Any) -> "RunConfig":
        """A validated copy with some fields changed (a section is replaced whole)."""
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:  # pylint: disable=too-many-branches
        """Raise :class:`ConfigError` for the first value that is not allowed."""
        _one_of("strategy", self.strategy, STRATEGIES)
        self._validate_data()
        _one_of("partitioner", self.partitioner, PARTITIONERS)
        _one_of("model", self.model, MODELS)
        _one_of("wandb-mode", self.wandb_mode, WANDB_MODES)
        _one_of("node-state", self.node_state, NODE_STATE_MODES)
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ConfigError("device", self.device, "must be one of auto, cpu, cuda, cuda:N")
        _positive("dirichlet-alpha", self.dirichlet_alpha)
        _positive("learning-rate", self.learning_rate)
        _positive("model-width", self.model_width)
        _positive("round-timeout", self.round_timeout)
        _positive("node-wait-timeout", self.node_wait_timeout)
        for key in ("num-clients", "num-server-rounds", "local-epochs", "batch-size",
                    "classes-per-client", "num-threads", "min-clients"):
            if getattr(self, _field(key)) < 1:
                raise ConfigError(key, getattr(self, _field(key)), "must be an integer >= 1")
        if self.min_partition_size < 0:
            raise ConfigError("min-partition-size", self.min_partition_size, "must be >= 0")
        if self.server_threads < 0:
            raise ConfigError("server-threads", self.server_threads, "must be >= 0 (0: all cores)")
        if self.min_clients > self.num_clients:
            raise ConfigError("min-clients", self.min_clients,
                              f"must be <= num-clients ({self.num_clients})")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("fraction-train", self.fraction_train, "must be in (0, 1]")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError("fraction-evaluate", self.fraction_evaluate, "must be in [0, 1]")
        if math.ceil(self.fraction_train * self.num_clients) < self.min_clients:
            raise ConfigError("fraction-train", self.fraction_train,
                              f"samples fewer clients than min-clients ({self.min_clients})")
        for key in ("momentum", "weight-decay", "proximal-mu", "local-steps"):
            if getattr(self, _field(key)) < 0:
                raise ConfigError(key, getattr(self, _field(key)), "must be >= 0")
        if self.output_dir and not Path(self.output_dir).is_absolute():
            raise ConfigError("output-dir", self.output_dir,
                              "must be an absolute path (the SuperLink's working "
                              "directory is not yours), or empty for the default")
        if not 0.0 <= self.fault_rate < 1.0:
            raise ConfigError("fault-rate", self.fault_rate, "must be in [0, 1)")
        kinds = self.fault_kinds.split(",")
        if not kinds or any(kind not in FAULT_KINDS for kind in kinds):
            raise ConfigError("fault-kinds", self.fault_kinds,
                              f"must be a comma-separated list of {', '.join(FAULT_KINDS)}")
        if self.checkpoint_keep < 0:
            raise ConfigError("checkpoint-keep", self.checkpoint_keep,
                              "must be >= 0 (0: write no checkpoints)")
        if self.resume_from and not Path(self.resume_from).is_absolute():
            raise ConfigError("resume-from", self.resume_from,
                              "must be the absolute path of a run folder, or empty")
        if "/" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError("run-name", self.run_name, "must be a plain folder name")
        if not 0.0 <= self.proxy_fraction < 1.0:
            raise ConfigError("proxy-fraction", self.proxy_fraction, "must be in [0, 1)")
        self._validate_models()
        for prefix in self.SECTIONS:
            getattr(self, prefix).validate()
        section = STRATEGIES[self.strategy].section
        if section:
            getattr(self, section).check_run(self)

    def _validate_data(self) -> None:
        if self.dataset not in DATASETS and self.dataset != FOLDER and not is_hub_id(self.dataset):
            raise ConfigError("dataset", self.dataset,
                              f"must be one of {', '.join(sorted(DATASETS))}, a Hugging Face "
                              f"hub id (owner/name), or '{FOLDER}' with data-path")
        if self.dataset == FOLDER and not self.data_path:
            raise ConfigError("dataset", self.dataset, "'folder' needs data-path (the folder "
                              "that holds the data)")
        if self.image_size != 0 and not 4 <= self.image_size <= 1024:
            raise ConfigError("image-size", self.image_size,
                              "must be 0 (the data's own size) or in 4..1024")
        if self.channels not in (0, 1, 3):
            raise ConfigError("channels", self.channels,
                              "must be 0 (the data's own), 1 (grey) or 3 (RGB)")
        if self.dataset == "digits" and not self.data_path and (self.image_size or self.channels):
            raise ConfigError("image-size" if self.image_size else "channels",
                              self.image_size or self.channels,
                              "the embedded digits are 8x8 grey; image-size and channels apply "
                              "to data sets read from the hub or data-path")

    def _validate_models(self) -> None:
        """``global-model`` and ``client-models`` parse (whether the strategy can combine
        them is :func:`mosaic_flwr.strategies.check_strategy`'s to say)."""
        try:
            global_spec = global_model_spec(self)
        except ValueError as err:
            raise ConfigError("global-model", self.global_model, str(err)) from None
        try:
            assign_client_models(self.client_models, self.num_clients, self.seed, global_spec)
        except ValueError as err:
            raise ConfigError("client-models", self.client_models, str(err)) from None


def resolve_run_config(
    run_config: Mapping[str, Any], explicit: Mapping[str, Any] | None = None
) -> RunConfig:
    """Merge app defaults, the named preset and explicit overrides; validate.

    ``run_config`` is Flower's fused run config (``context.run_config``: app
    defaults with overrides applied). ``explicit`` holds the values the user
    passed with ``--run-config`` (``grid.run.override_config``); they win over
    the preset. Without it, every value that differs from the app default counts
    as explicit.
    """
    defaults = RunConfig().to_mapping()
    if explicit is None:
        explicit = {k: v for k, v in run_config.items() if defaults.get(k) != v}
    merged = dict(run_config)
    preset_name = str(explicit.get("preset", run_config.get("preset", "")))
    if preset_name:
        merged.update(load_preset(preset_name))
        merged["preset"] = preset_name
    merged.update(explicit)
    return RunConfig.from_mapping(merged)


def preset_path(name: str) -> Path:
    """Where preset ``name`` lives: a path to a YAML file, or a name in ``configs/``."""
    candidate = Path(name).expanduser()
    if candidate.suffix in (".yaml", ".yml") and candidate.is_absolute():
        return candidate
    return PRESETS_DIR / f"{name}.yaml"


def available_presets() -> list[str]:
    """Names of the presets shipped in ``configs/``."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a preset's run-config values; unknown keys are errors.

    A preset may start from another one: ``preset: <name>`` in its file loads that
    preset first and then applies the file's own values over it (a chain of any
    length; a preset that names itself, directly or through others, is an error)."""
    if name in _seen:
        raise ConfigError("preset", name, "presets name each other in a cycle: "
                          + " -> ".join((*_seen, name)))
    path = preset_path(name)
    if not path.is_file():
        raise ConfigError("preset", name,
                          f"no such preset file {path}; shipped presets: "
                          f"{', '.join(available_presets()) or 'none'}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("preset", name, f"{path} is not valid YAML{where}: "
                          f"{getattr(err, 'problem', None) or err}") from None
    if not isinstance(values, dict):
        raise ConfigError("preset", name, f"{path} must hold a mapping of run-config keys")
    if "client-models" in values:  # a mapping or per-partition list is allowed in YAML
        values["client-models"] = client_models_value(values["client-models"])
    known = set(RunConfig.keys())
    for key in values:
        if key not in known:
            raise ConfigError(key, values[key], f"unknown key in preset {path}")
    base = values.pop("preset", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ConfigError("preset", base, f"in {path}: must name the preset it starts from")
    return {**load_preset(base, (*_seen, name)), **values}


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _field(key: str) -> str:
    return key.replace("-", "_")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a TOML/YAML/ConfigRecord value to the field's type, or fail clearly."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "must be true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(key, value, "must be an integer")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "must be a number")
        if not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(key, value, "must be a string (quote it: key='value')")
    return value


def _one_of(key: str, value: str, allowed: Mapping[str, Any]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"must be one of {', '.join(sorted(allowed))}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(key, value, "must be > 0")
