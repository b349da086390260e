"""Configuration that cannot be mistyped: a config section (a dict from YAML, JSON or a Ray actor's
arguments) becomes its dataclass only if every key is one of the dataclass's fields; an unknown key is
refused with its name, never dropped without a word (a misspelt `cache_per_token` would silently keep
the default)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def check_keys(values: Mapping[str, Any], known: set[str] | frozenset[str], where: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(known))}")


def from_mapping(cls: type[T], values: Mapping[str, Any] | T | None, where: str) -> T:
    """`cls(**values)` with every key checked first; an instance of `cls` passes through, None is the default."""
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    check_keys(values, {f.name for f in dataclasses.fields(cls)}, where)
    return cls(**values)
