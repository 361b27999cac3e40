"""Typed records read from YAML or JSON, every key and value checked.

A record is a frozen dataclass (:class:`Checked`) that checks each field against its type
when it is built: from a mapping by :meth:`Schema.build` (a config preset, a sweep spec,
a sweep plan), directly, or by ``dataclasses.replace``; then the rules between its fields
(``_check``). So a record that exists is valid, and it cannot change after. An unknown key
gets a did-you-mean, a wrong type or choice names the key and what is allowed, each as the
:class:`Schema`'s own error class (``ConfigError``, ``SweepSpecError``), so that every
command reports it as a problem the user can fix.

Coercions are those of YAML and the command line: a list becomes a tuple, an integer a
float, ``1e-3`` (a string to YAML, it has no dot) a float, ``null`` an empty string, ``"2"``
the integer choice 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


@dataclass(frozen=True)
class Schema:
    """One kind of record file: what messages call it and the error it raises.

    ``package``: where named YAML files of this kind ship (``scalejepa.configs``), each
    called a ``named`` in messages (``preset``)."""

    noun: str  # "config", "sweep spec"
    error: type[ValueError]
    package: str = ""
    named: str = ""

    # ------------------------------------------------------------------ shipped YAML files

    def names(self) -> list[str]:
        folder = resources.files(self.package)
        return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))

    def path(self, name_or_path: str) -> Path:
        """A shipped file's name (``debug_cpu``) or a path to a YAML file."""
        candidate = Path(name_or_path)
        if candidate.suffix in (".yaml", ".yml") or candidate.exists():
            if not candidate.is_file():
                raise self.error(f"{self.noun} file {name_or_path!r} does not exist")
            return candidate
        path = Path(str(resources.files(self.package) / f"{name_or_path}.yaml"))
        if not path.is_file():
            raise self.error(f"unknown {self.named} {name_or_path!r}; shipped {self.named}s: "
                             f"{', '.join(self.names())} (or pass a path to a YAML file)")
        return path

    def read_yaml(self, path: Path) -> Any:
        try:
            return yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise self.error(f"{path}: not valid YAML: {exc}") from None

    # ------------------------------------------------------------------ mappings to records

    def build(self, cls: type, raw: Any, prefix: str = "") -> Any:
        """``cls(**raw)``, each key known to ``cls`` and each value coerced to its field's type."""
        where = prefix.rstrip(".") or f"the {self.noun}"
        if not isinstance(raw, dict):
            raise self.error(f"{where} must be a mapping, got {raw!r}")
        fields = field_types(cls)
        kwargs = {}
        for key, value in raw.items():
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
                raise self.error(f"unknown {self.noun} key {prefix}{key}{hint}; keys of {where}: {', '.join(fields)}")
            kwargs[key] = self.coerce(value, fields[key], f"{prefix}{key}")
        return cls(**kwargs)

    def coerce(self, value: Any, tp: Any, key: str) -> Any:
        """``value`` as type ``tp`` (see the module docstring), or this schema's error naming ``key``."""
        error = self.error
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            return getattr(tp, "SCHEMA", self).build(tp, value, f"{key}.")
        if origin is Literal:
            choices = typing.get_args(tp)
            for choice in choices:
                if value == choice and type(value) is type(choice):
                    return choice
                if isinstance(choice, int) and isinstance(value, str) and value == str(choice):
                    return choice
            raise error(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
        if origin is tuple:
            args = typing.get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
                if not isinstance(value, (list, tuple)):
                    raise error(f"{key} must be a list, got {value!r}")
                return tuple(self.coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if isinstance(value, str):  # a command-line override: "(0.3, 1.0)" or "0.3,1.0"
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
                value = [yaml.safe_load(v) for v in value]
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                raise error(f"{key} needs {len(args)} values like [{', '.join(a.__name__ for a in args)}], "
                            f"got {value!r}")
            return tuple(self.coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        if origin is dict:
            if not isinstance(value, dict):
                raise error(f"{key} must be a mapping, got {value!r}")
            key_type, value_type = typing.get_args(tp)
            return {self.coerce(k, key_type, f"{key} key"): self.coerce(v, value_type, f"{key}.{k}")
                    for k, v in value.items()}
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in typing.get_args(tp):
                return None  # not "" (a str field's null)
            errors = []
            for arg in typing.get_args(tp):
                try:
                    return self.coerce(value, arg, key)
                except error as exc:
                    errors.append(str(exc))
            raise error(f"{key}={value!r}: " + "; ".join(errors))
        if tp is Any:
            return value
        if tp is type(None):
            if value is None:
                return None
            raise error(f"{key}={value!r} must be null")
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise error(f"{key}={value!r} must be true or false")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise error(f"{key}={value!r} must be an integer")
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads 1e-3 (no dot) as a string
                except ValueError:
                    pass
            raise error(f"{key}={value!r} must be a number")
        if tp is str:
            if value is None:
                return ""
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            raise error(f"{key}={value!r} must be a string")
        raise TypeError(f"{self.noun} field {key} has an unsupported type {tp}")


class Checked:
    """Base of a frozen dataclass record: building one checks every field against its type
    (coerced as from YAML, see :meth:`Schema.coerce`), then the rules between its fields
    (:meth:`_check`). ``SCHEMA``: its kind, for the error class and messages; ``SECTION``:
    its key in the record that holds it (``model``, ``budgets``), for messages."""

    SCHEMA: ClassVar[Schema]
    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        prefix = f"{self.SECTION}." if self.SECTION else ""
        for key, tp in field_types(type(self)).items():
            value = getattr(self, key)
            checked = self.SCHEMA.coerce(value, tp, prefix + key)
            if checked is not value:  # e.g. a YAML list made a tuple, an int made a float
                object.__setattr__(self, key, checked)  # frozen: set once, here
        self._check()

    def _check(self) -> None:
        """Rules between this record's fields."""

    def _at_least(self, minimum: int, *names: str) -> None:
        prefix = f"{self.SECTION}." if self.SECTION else ""
        for name in names:
            if getattr(self, name) < minimum:
                raise self.SCHEMA.error(f"{prefix}{name}={getattr(self, name)} must be >= {minimum}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their resolved types, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def to_plain(record: Any) -> Any:
    """A record as plain dicts and lists (for YAML and JSON)."""
    return _plain(dataclasses.asdict(record))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
