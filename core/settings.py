"""Settings declared once: a schema field carries its default and its allowed range.

A config dataclass writes each numeric setting as ``name: float = bounded(0.01, ge=0)``; the
range then serves the optimizer (``check_settings`` in the dataclass's ``__post_init__``), the
run-config validation (`suite.validate`) and the error messages alike, and `numeric_fields`
lists every numeric setting with its range (tests generate invalid inputs from it). Enum-typed
fields given as strings are parsed once, in ``check_settings``.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from functools import cache
from typing import Any, TypeVar

from core.errors import ConfigError

RANGE_KEY = "range"
CHOICES_KEY = "choices"

E = TypeVar("E", bound=Enum)
T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric setting (always finite; ``None`` only if ``null`` says)."""

    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    lt: float | None = None  # value < lt
    integer: bool = False  # whole numbers only
    null: str | None = None  # what None means when allowed; None: not allowed

    def admits(self, value: object) -> bool:
        """Whether ``value`` is allowed."""
        if value is None:
            return self.null is not None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value) or (self.integer and int(value) != value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        """What is allowed, in the words of the one-line error messages."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        kind = "an integer" if self.integer else "a number"
        if low is not None and high is not None:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            text = f"{kind} in {left}{low:g}, {high:g}{right}"
        elif low is not None:
            text = f"{kind} {'>=' if self.ge is not None else '>'} {low:g}"
        elif high is not None:
            text = f"{kind} {'<=' if self.le is not None else '<'} {high:g}"
        else:
            text = kind
        return text if self.null is None else f"null ({self.null}) or {text}"

    def invalid_examples(self) -> list[object]:
        """Values this range rejects, one per edge (for generated invalid-input tests)."""
        out: list[object] = [math.nan, math.inf]
        if self.null is None:
            out.append(None)
        step = 1 if self.integer else 0.5
        if self.ge is not None:
            out.append(self.ge - step)
        if self.gt is not None:
            out.append(self.gt)
        if self.le is not None:
            out.append(self.le + step)
        if self.lt is not None:
            out.append(self.lt)
        if self.integer:
            anchor = next((b for b in (self.ge, self.gt, self.le, self.lt) if b is not None), 0)
            out.append(anchor + 1.5)
        return out


def bounded(
    default: T,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    integer: bool = False,
    null: str | None = None,
) -> T:
    """A dataclass field with ``default`` whose values must lie in the stated range.

    ``dataclasses.MISSING`` as the default makes the setting required (see `required`)."""
    rng = Range(ge=ge, gt=gt, le=le, lt=lt, integer=integer, null=null)
    if default is not MISSING and not rng.admits(default):
        raise ValueError(f"bounded: default {default!r} outside {rng.describe()}")
    return field(default=default, metadata={RANGE_KEY: rng})  # type: ignore[no-any-return]


def one_of(default: str, *others: str) -> str:
    """A string field with ``default`` whose value must be ``default`` or one of ``others``."""
    return field(  # type: ignore[no-any-return]
        default=default, metadata={CHOICES_KEY: (default, *others)}
    )


def required(*, ge: float | None = None, gt: float | None = None, integer: bool = False) -> Any:
    """A bounded setting without a default: a preset must state it (``???`` until then)."""
    return bounded(MISSING, ge=ge, gt=gt, integer=integer)


@dataclass(frozen=True)
class NumericField:
    """One numeric setting of a schema: its name, default and allowed range."""

    name: str
    default: Any
    range: Range


def numeric_fields(schema: type) -> list[NumericField]:
    """Every numeric setting of a config dataclass with its default and range, in field order."""
    out = []
    for f in fields(schema):
        rng = f.metadata.get(RANGE_KEY)
        if rng is not None:
            default = f.default if f.default is not MISSING else None
            out.append(NumericField(name=f.name, default=default, range=rng))
    return out


@cache
def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def enum_type(annotation: Any) -> type[Enum] | None:
    """The Enum class of an annotation like ``Mode`` or ``Mode | None``; None otherwise."""
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, Enum):
            return arg
    return None


def parse_enum(enum: type[E], value: object, *, setting: str) -> E:
    """Turn a member or its value into a member; a one-line error names the setting otherwise."""
    if isinstance(value, enum):
        return value
    raw = getattr(value, "value", value)
    try:
        return enum(raw)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum)
        raise ConfigError(setting, f"got {raw!r}; allowed: {allowed}") from None


def check_value(rng: Range, value: object, *, setting: str) -> None:
    """ConfigError naming ``setting`` unless ``value`` lies in ``rng``."""
    if not rng.admits(value):
        raise ConfigError(setting, f"got {value!r}; allowed: {rng.describe()}")


def check_settings(obj: Any) -> None:
    """Parse the enum fields of a config dataclass and check every bounded field's range.

    Called from ``__post_init__``; integers given as whole floats become ints.
    """
    if not is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"check_settings: {obj!r} is not a dataclass instance")
    hints = _hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        enum = enum_type(hints.get(f.name))
        if enum is not None and value is not None:
            setattr(obj, f.name, parse_enum(enum, value, setting=f.name))
            continue
        choices = f.metadata.get(CHOICES_KEY)
        if choices is not None and value not in choices:
            allowed = ", ".join(sorted(choices))
            raise ConfigError(f.name, f"got {value!r}; allowed: one of: {allowed}")
        rng = f.metadata.get(RANGE_KEY)
        if rng is None:
            continue
        check_value(rng, value, setting=f.name)
        if rng.integer and value is not None:
            setattr(obj, f.name, int(value))


def settings_from(schema: type[T], source: Any) -> T:
    """An instance of ``schema`` from any object with its fields as attributes (a DictConfig)."""
    if isinstance(source, schema):
        return source
    names = [f.name for f in fields(schema)]  # type: ignore[arg-type]
    return schema(**{name: getattr(source, name) for name in names if hasattr(source, name)})
