"""One plugin's `parameters` in an `EndpointPickerConfig`, read so a wrong key or value names
itself (`plugins[2].parameters.threshold`) through `ConfigError`.

The registry's factories (`registry.py`) read their parameters with `Params`; the config parser
(`profiles.py`) makes one per plugin and checks afterwards that no key went unread.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping

from extproc.config import ConfigError


def show(value: object) -> str:
    """`value` as a problem quotes it: short, whatever the user wrote."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def unknown_key_problem(key: str, known: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key (known: {', '.join(sorted(known)) or 'none'})"


class Params:
    """Reads one plugin's `parameters`; `check` then refuses the keys nothing read.

    Built-in strategies build their plugins from `Params(None, ...)`: every default."""

    def __init__(self, data: object, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a mapping, got {show(data)}")
        self._data: Mapping[object, object] = data
        self._path = path
        self._known: set[str] = set()

    @property
    def path(self) -> str:
        return self._path

    def number(
        self,
        key: str,
        default: float,
        *,
        minimum: float = 0.0,
        maximum: float = math.inf,
        integer: bool = False,
    ) -> float:
        self._known.add(key)
        if key not in self._data:
            return default
        value = self._data[key]
        number = (
            float(value)
            if isinstance(value, int | float) and not isinstance(value, bool)
            else math.nan
        )
        # nan fails every comparison, so a non-number lands here too.
        if not minimum <= number <= maximum or (integer and not number.is_integer()):
            kind = "an integer" if integer else "a number"
            upper = f" and <= {maximum:g}" if maximum < math.inf else ""
            raise ConfigError(
                f"{self._path}.{key}", f"expected {kind} >= {minimum:g}{upper}, got {show(value)}"
            )
        return number

    def text(self, key: str, default: str) -> str:
        self._known.add(key)
        value = self._data.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._path}.{key}", f"expected a string, got {show(value)}")
        return value

    def raw(self, key: str) -> object:
        """`key`'s value as given (None when absent), for a nested section read by hand."""
        self._known.add(key)
        return self._data.get(key)

    def ignored(self, *keys: str) -> None:
        """Keys the field's plugin takes that mean nothing here (documented per type)."""
        self._known.update(keys)

    def ignore_all(self) -> None:
        """Every key: a data plugin's parameters configure what our own settings configure."""
        self._known.update(str(k) for k in self._data)

    def unsupported_unless(self, key: str, default: object, plugin: str) -> None:
        """`key` may be given only at its default: other values mean a behaviour not built."""
        self._known.add(key)
        if key in self._data and self._data[key] != default:
            raise ConfigError(
                f"{self._path}.{key}",
                f"{plugin} with {key} other than {default!r} is not implemented here",
            )

    def check(self) -> None:
        unknown = sorted(str(k) for k in self._data if k not in self._known)
        if unknown:
            raise ConfigError(
                f"{self._path}.{unknown[0]}", unknown_key_problem(unknown[0], self._known)
            )
