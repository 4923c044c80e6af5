"""The shape every method's settings share: a frozen dataclass behind prefixed run-config keys.

A method's settings class sets :attr:`MethodSettings.PREFIX` (for example
``fedgen``); its field ``generator_lr`` is then run-config key
``fedgen-generator-lr``, held in the run config's section ``config.fedgen``
with the dataclass default. Settings travel to clients inside the ``task``
record as plain ``{field: value}`` mappings.

Validation is declarative: every numeric field must be >= 0, the fields named in
``POSITIVE`` must be > 0, those in ``AT_LEAST_ONE`` integers >= 1, those in
``FRACTIONS`` in [0, 1), and string fields with an entry in ``CHOICES`` one of
its values. A class with other rules extends :meth:`validate`; rules that
involve other keys of the run (the round budget, the proxy split) go in
:meth:`check_run`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any, ClassVar, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound="Settings")


class Settings:
    """Mixin for a frozen dataclass of settings that travel to clients as ``{field: value}``."""

    @classmethod
    def from_mapping(cls: type[T], values: Mapping[str, Any]) -> T:
        """Settings from ``{field: value}`` (as they travel to clients); unknown names ignored."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in values.items() if k in names})  # type: ignore[call-arg]

    def to_mapping(self) -> dict[str, Any]:
        """``{field: value}``, plain values only (fits a Flower ConfigRecord)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


class MethodSettings(Settings):
    """Mixin for a frozen dataclass of one method's hyper-parameters."""

    PREFIX: ClassVar[str] = ""
    POSITIVE: ClassVar[tuple[str, ...]] = ()
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = ()
    FRACTIONS: ClassVar[tuple[str, ...]] = ()
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def key(cls, name: str) -> str:
        """The run-config key of field ``name``."""
        return f"{cls.PREFIX}-{name.replace('_', '-')}"

    def check_run(self, config: Any) -> None:
        """Raise ``ConfigError`` when the rest of the run config cannot host this method
        (called only when the run's strategy is this method's; nothing by default)."""

    def check(self) -> None:
        """:meth:`validate` for settings built in Python (a strategy's constructor): the
        ``ValueError`` names the field (``MosaicSettings.warmup_rounds``), not the key."""
        try:
            self.validate()
        except ConfigError as err:
            prefix = f"{self.PREFIX}-"
            name = (err.key[len(prefix):].replace("-", "_") if err.key.startswith(prefix)
                    else err.key)
            raise ValueError(f"{type(self).__name__}.{name}={err.value!r}: {err.allowed}") from None

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the run-config key of the first bad value."""
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            key = self.key(f.name)
            if isinstance(value, str):
                allowed = self.CHOICES.get(f.name)
                if allowed is not None and value not in allowed:
                    raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")
            elif isinstance(value, bool):
                continue
            elif f.name in self.POSITIVE and not value > 0:
                raise ConfigError(key, value, "must be > 0")
            elif f.name in self.AT_LEAST_ONE and value < 1:
                raise ConfigError(key, value, "must be an integer >= 1")
            elif f.name in self.FRACTIONS and not 0 <= value < 1:
                raise ConfigError(key, value, "must be in [0, 1)")
            elif value < 0:
                raise ConfigError(key, value, "must be >= 0")
