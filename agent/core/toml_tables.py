"""Strict, typed reads from parsed TOML tables. Every error names the key (``section.key``).

Used by the agent configuration and the customer policy: unknown keys are errors, values are
never coerced, so a typo is reported instead of silently changing behaviour.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any


class Table:
    def __init__(
        self, name: str, table: object, allowed: set[str], error: type[ValueError]
    ) -> None:
        self.error = error
        self.name = name
        if not isinstance(table, dict):
            raise error(f"[{name}] must be a table")
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise error(f"[{name}]: unknown key(s) {unknown}")
        self.table: dict[str, Any] = table

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def has(self, key: str) -> bool:
        return key in self.table

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self.error(f"{self.key(key)} must be true or false")
        return value

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self.table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(f"{self.key(key)} must be an integer")
        if not low <= value <= high:
            raise self.error(f"{self.key(key)} must be in {low}..{high}")
        return value

    def optional_integer(self, key: str, *, low: int, high: int) -> int | None:
        if self.table.get(key) is None:
            return None
        return self.integer(key, 0, low=low, high=high)

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"{self.key(key)} must be a number")
        # Range first: comparing a huge integer is exact, converting it to a float overflows.
        if not low <= value <= high or not math.isfinite(value):
            raise self.error(f"{self.key(key)} must be in [{low}, {high}]")
        return float(value)

    def string(self, key: str, default: str | None = None) -> str:
        value = self.table.get(key, default)
        if value is None:
            raise self.error(f"{self.key(key)} is required")
        if not isinstance(value, str):
            raise self.error(f"{self.key(key)} must be a string")
        return value

    def optional_string(self, key: str) -> str | None:
        if self.table.get(key) is None:
            return None
        return self.string(key)

    def strings(self, key: str, *, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
        value = self.table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"{self.key(key)} must be a list of strings")
        if pattern is not None:
            for item in value:
                if not pattern.fullmatch(item):
                    raise self.error(f"{self.key(key)}: {item!r} does not match {pattern.pattern}")
        return tuple(value)

    def mapping(self, key: str) -> Mapping[str, object]:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.error(f"[{self.key(key)}] must be a table")
        return value
