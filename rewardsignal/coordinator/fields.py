"""Typed reading of JSON request bodies: each problem is a ``ValidationError``
naming the field, and unknown fields are refused rather than ignored."""

from __future__ import annotations

import builtins
import math
from typing import Any

from rewardsignal.errors import ValidationError

_MISSING = object()


class Body:
    def __init__(self, data: Any, where: str = "body") -> None:
        if not isinstance(data, dict):
            raise ValidationError(f"{where} must be a JSON object")
        self.data = data
        self.where = where
        self.seen: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        value = self.data.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise ValidationError(f"missing field {key!r}")
            return default
        return value

    def str(self, key: builtins.str, default: Any = _MISSING, *, choices: tuple[builtins.str, ...] | None = None,
            max_len: builtins.int = 256) -> Any:
        v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str) or not v or len(v) > max_len:
            raise ValidationError(f"field {key!r} must be a non-empty string of at most "
                                  f"{max_len} characters")
        if choices is not None and v not in choices:
            raise ValidationError(f"field {key!r} must be one of {list(choices)}, got {v!r}")
        return v

    def int(self, key: builtins.str, default: Any = _MISSING, *, lo: builtins.int | None = None,
            hi: builtins.int | None = None) -> Any:
        v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValidationError(f"field {key!r} must be an integer, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValidationError(f"field {key!r} must be in [{lo}, {hi}], got {v}")
        return v

    def float(self, key: builtins.str, default: Any = _MISSING, *, lo: builtins.float | None = None,
              hi: builtins.float | None = None, lo_open: bool = False) -> Any:
        v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, int | builtins.float) or not math.isfinite(v):
            raise ValidationError(f"field {key!r} must be a finite number, got {v!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise ValidationError(f"field {key!r} must be {'>' if lo_open else '>='} {lo}, "
                                  f"got {v}")
        if hi is not None and v > hi:
            raise ValidationError(f"field {key!r} must be <= {hi}, got {v}")
        return float(v)

    def bool(self, key: builtins.str, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, builtins.bool):
            raise ValidationError(f"field {key!r} must be true or false, got {v!r}")
        return v

    def list(self, key: builtins.str, default: Any = _MISSING, *, max_len: builtins.int = 1 << 20) -> Any:
        v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, list):
            raise ValidationError(f"field {key!r} must be a list")
        if len(v) > max_len:
            raise ValidationError(f"field {key!r} has {len(v)} items; at most {max_len} allowed")
        return v

    def dict(self, key: builtins.str, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, dict):
            raise ValidationError(f"field {key!r} must be an object")
        return v

    def raw(self, key: builtins.str, default: Any = _MISSING) -> Any:
        """The value as sent, unchecked (the caller checks its type)."""
        return self._get(key, default)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ValidationError(f"unknown field(s) {unknown}")
