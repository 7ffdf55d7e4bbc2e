"""Typed configurations: one declaration per configuration, and everything derived from it.

Each experiment's configuration is a frozen pydantic dataclass decorated with
:func:`experiment_config`. Its fields declare the type, the constraints (``Field(ge=1)``,
``Literal`` choices, :class:`OneOf`, :class:`Distinct`) and the help text once; from that one
declaration come

* the validation (on construction; every error becomes one line, :class:`ConfigError`);
* the TOML keys of ``--config FILE.toml`` (the field names; unknown keys are refused);
* the command-line flags (``--field-name``; tuples take several values, booleans get
  ``--x/--no-x``, choices are listed, the presets' values are shown), added by
  :func:`sgdnoise.cli.build_parser`.

Precedence: the ``--profile`` preset < ``--config FILE.toml`` < explicit flags. Options common to
every experiment: ``--profile`` (default ``quick``), ``--config``, ``--out``, ``--device``
(default ``auto``), ``--no-progress``, ``--plot-only``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pydantic
from pydantic import ConfigDict, ValidationError
from pydantic_core import core_schema
from typing_extensions import dataclass_transform

from .runs import load_toml_config

__all__ = [
    "ConfigError",
    "Distinct",
    "ExperimentConfig",
    "OneOf",
    "configure",
    "experiment_config",
    "load_toml_config",
    "replace_config",
]

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line saying which, why and how to fix."""


@dataclasses.dataclass(frozen=True)
class OneOf:
    """``Annotated`` marker: the value is one of ``source()`` (checked, and offered as choices).

    ``source`` is called when validating and when building the parser, so names registered after
    import (e.g. a new noise structure) are accepted.
    """

    source: Callable[[], Sequence[str]]

    def __get_pydantic_core_schema__(self, tp: Any, handler: Any) -> Any:
        return core_schema.no_info_after_validator_function(self.check, handler(tp))

    def check(self, value: Any) -> Any:
        names = tuple(self.source())
        if value not in names:
            raise ValueError(f"must be one of {', '.join(names)}; got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Distinct:
    """``Annotated`` marker for a tuple field: its values must not repeat."""

    def __get_pydantic_core_schema__(self, tp: Any, handler: Any) -> Any:
        return core_schema.no_info_after_validator_function(self.check, handler(tp))

    @staticmethod
    def check(value: Any) -> Any:
        if len(set(value)) != len(value):
            raise ValueError(f"must not repeat values; got {list(value)}")
        return value


class ExperimentConfig:
    """Methods every experiment configuration shares (mixed into the pydantic dataclass)."""

    #: The experiment's name, used in messages ("toy config: ...").
    experiment: typing.ClassVar[str] = "experiment"

    def validate(self: C) -> C:
        """Check every value again (construction already did); returns ``self``.

        Raises:
            ConfigError: one line naming the field, what was expected and the value.
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        type(self)(**values)
        return self

    @classmethod
    def from_mapping(cls: type[C], base: C, values: Mapping[str, Any]) -> C:
        """``base`` with ``values`` replaced (TOML keys or flags; unknown keys raise)."""
        return replace_config(base, values)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (mappings as dicts)."""
        return {
            f.name: dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, pydantic.Field))
def experiment_config(name: str) -> Callable[[type[C]], type[C]]:
    """Class decorator: a frozen, strict pydantic dataclass whose errors are one line.

    Lists become tuples (TOML has no tuples); unknown keys, a bool for a number or ``1.5`` for an
    integer are refused.
    """

    def wrap(cls: type[C]) -> type[C]:
        cls.experiment = name  # type: ignore[attr-defined]
        config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
        pcls = pydantic.dataclasses.dataclass(frozen=True, config=config)(cls)
        init = pcls.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *map(_tupled, args), **{k: _tupled(v) for k, v in kwargs.items()})
            except ValidationError as exc:
                raise ConfigError(error_line(exc, name, pcls)) from None

        pcls.__init__ = __init__  # type: ignore[method-assign]
        return typing.cast("type[C]", pcls)

    return wrap


_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "finite_number": "must be a finite number",
    "too_short": "must have at least {min_length} value(s)",
    "too_long": "must have at most {max_length} value(s)",
}


def error_line(exc: ValidationError, what: str, cls: Any = None) -> str:
    """The first error of ``exc`` as one line: field, what was expected, the value, the fix."""
    errors = exc.errors()
    err = errors[0]
    loc = [p for p in err["loc"] if p != "__root__"]
    field = str(loc[0]) if loc else ""
    where = field + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    if "[key]" in loc:  # a mapping's key: "refresh_every key 'sgd'"
        where = f"{field} key {loc[1]!r}"
    kind, msg = err["type"], err["msg"]
    if kind == "unexpected_keyword_argument" and cls is not None:
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        return f"{what} config: unknown key(s) {field}; valid keys: {valid}"
    if msg.startswith("Value error, "):
        text = msg[len("Value error, ") :]
    else:
        text = _MESSAGES.get(kind, msg.replace("Input should be", "must be")).format(
            **(err.get("ctx") or {})
        )
        text += f", got {err['input']!r}"
    line = f"{what} config: " + (f"{where} {text}" if where else text)
    info = getattr(cls, "__pydantic_fields__", {}).get(field)
    if info is not None:
        about = f" ({info.description})" if info.description else ""
        line += f"{about}; set --{field.replace('_', '-')} or the TOML key {field}"
    others = {e["loc"][:1] for e in errors[1:]} - {err["loc"][:1]}
    if others:
        names = ", ".join(sorted(str(o[0]) for o in others if o))
        line += f"; also invalid: {names}"
    return line


def replace_config(base: C, values: Mapping[str, Any], *, what: str | None = None) -> C:
    """``base`` with ``values`` replaced; a partial table updates a mapping field of ``base``.

    Raises:
        ConfigError: an unknown key (the valid ones are listed) or an invalid value (one line).
    """
    fields = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    what = what or getattr(base, "experiment", "experiment")
    if unknown:
        raise ConfigError(
            f"{what} config: unknown key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    changes = {}
    for key, value in values.items():
        old = getattr(base, key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            value = {**old, **value}
        changes[key] = value
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]


def configure(
    presets: Mapping[str, C],
    profile: str,
    toml: Mapping[str, Any] | None,
    flags: Mapping[str, Any],
    *,
    what: str,
) -> C:
    """The ``profile`` preset < a TOML table < explicit flags (``None`` values: not given).

    Raises:
        ConfigError: an unknown profile or key, or an invalid value (one line).
    """
    if profile not in presets:
        raise ConfigError(f"unknown profile {profile!r}; valid profiles: {', '.join(presets)}")
    config = presets[profile]
    for layer in (dict(toml or {}), {k: v for k, v in flags.items() if v is not None}):
        if layer:
            config = replace_config(config, layer, what=what)
    return config.validate()  # type: ignore[attr-defined]
