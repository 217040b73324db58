"""Declared options of methods and selection strategies: typed, bounded, and named in every error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import InvalidOption, shown


def is_positive_int(value: Any) -> bool:
    """An integer of at least 1, and not a bool (JSON's ``true`` is an ``int`` in Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class OptionSpec:
    """One option a method or selection strategy accepts (``steps``, ``baseline``, ``signed``...)."""

    type: type
    default: Any
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Optional[tuple] = None
    help: str = ""
    #: Forward + backward passes one unit of this option adds to an explanation (an integrated-gradients
    #: step: 1); the per-request pass budget is computed from these, whatever the option is called.
    passes: int = 0
    #: The most a server allows by default (the archive's ``method_caps``); ``None``: the bounds alone.
    server_cap: Optional[float] = None

    def coerce(self, name: str, value: Any) -> Any:
        """Turn a JSON value or text (multipart, header, CLI flag) into this option's type, or say why not."""
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        if isinstance(value, str):
            value = value.strip()
        try:
            if self.type is bool:
                if isinstance(value, bool):
                    out = value
                elif isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                    out = True
                elif isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                    out = False
                else:
                    raise ValueError
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
                if out != out or out in (float("inf"), float("-inf")):
                    raise ValueError
            else:
                if not isinstance(value, str):
                    raise ValueError
                out = value
        except (TypeError, ValueError):
            raise InvalidOption(f"{name} must be {_article(self.type)}, not {shown(value)}") from None
        if self.choices is not None and out not in self.choices:
            raise InvalidOption(f"{name} must be one of {', '.join(map(str, self.choices))}, not {out!r}")
        if self.minimum is not None and out < self.minimum:
            raise InvalidOption(f"{name} must be at least {self.minimum}, got {out}")
        if self.maximum is not None and out > self.maximum:
            raise InvalidOption(f"{name} must be at most {self.maximum}, got {out}")
        return out


def check_sparsity(value: Any) -> float:
    """The one sparsity rule (a request's, a model spec's default's): a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOption(f"sparsity must be a number in [0, 1), not {shown(value)}", code="invalid_sparsity")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise InvalidOption(f"sparsity must be in [0, 1), got {value}", code="invalid_sparsity")
    return value


def _article(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)
