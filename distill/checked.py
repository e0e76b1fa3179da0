"""Checked dataclasses: every field declares its help text and its checks, every section checks all of its
fields when it is built, so a bad value fails at construction with its dotted key (`student.epochs: must be
>= 1, got 0`), never deep inside a loop. The recipe's schema (distill.config) is written in it.

Floats must be finite; a float field also accepts a string that reads as one (YAML 1.1 reads `1e-3` as a
string).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field

from distill.errors import ConfigError

INT_MAX = 2**31 - 1   # every int field: larger values overflow torch/numpy sizes long before they make sense
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds both accept [0, 2^32)


def option(text: str, default, **checks):
    """A field with help text and declarative checks, all run by `Section.__post_init__`:

    min / max: inclusive bounds; gt / lt: exclusive bounds; choices: allowed values;
    nonempty: a non-empty string or list; items: element type of a list (bounds and
    choices then apply to every element).
    """
    meta = {"help": text, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def require(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {why}")


def _show(value) -> str:
    """A value for a one-line message, shortened."""
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "..." + text[-10:]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _as_type(value, tp, key: str):
    """`value` checked against (and for floats converted to) the plain type `tp`."""
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected float, got str {_show(value)}") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"{key}: {_show(value)} is too large for a float") from None
        if not isinstance(value, float):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {_show(value)}")
        return value
    if tp is bool and isinstance(value, bool) or tp is not bool and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_show(value)}")


def _bounds(value, meta: dict, key: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: must be {' or '.join(map(str, meta['choices']))}, got {_show(value)}")
    if isinstance(value, str) or not isinstance(value, (int, float)):
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']}, got {_show(value)}")
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(f"{key}: must be > {meta['gt']}, got {_show(value)}")
    if "lt" in meta and not value < meta["lt"]:
        raise ConfigError(f"{key}: must be < {meta['lt']}, got {_show(value)}")
    top = meta.get("max", INT_MAX if isinstance(value, int) else None)
    if top is not None and value > top:
        raise ConfigError(f"{key}: must be <= {top}, got {_show(value)}")


class Section:
    """Base of every recipe section: checks each field's type and bounds, then `check()`."""

    key: typing.ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.key}.{f.name}" if self.key else f.name
            tp, value = hints[f.name], getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                continue
            if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X]
                if value is None:
                    continue
                tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            value = _as_type(value, tp, key)
            if f.metadata.get("nonempty") and not (value.strip() if isinstance(value, str) else value):
                raise ConfigError(f"{key}: must not be empty")
            if isinstance(value, list) and "items" in f.metadata:
                # ints stay ints in a float list (1 and 1.0 hash differently: no needless reruns)
                value = [v if isinstance(v, int) and not isinstance(v, bool) and f.metadata["items"] is float
                         else _as_type(v, f.metadata["items"], f"{key}[{i}]") for i, v in enumerate(value)]
                for i, v in enumerate(value):
                    _bounds(v, f.metadata, f"{key}[{i}]")
            else:
                _bounds(value, f.metadata, key)
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks that involve more than one field."""


def config_from_dict(cls, raw: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys name the dotted key, the section's
    `__post_init__` checks every value (type, bounds) and names its key."""
    if raw is None and prefix:  # `student:` with every line commented out: the defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {name: config_from_dict(hints[name], value, f"{prefix}{name}.") if dataclasses.is_dataclass(hints[name])
              else value for name, value in raw.items()}
    return cls(**kwargs)
