"""Named registries: new selection strategies, attribution methods and reductions are registered, not special-cased."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from ..errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, unknown: str):
        """``what`` names an entry in messages ("explanation method"); ``unknown`` is the error code of a name
        that is not registered ("unknown_method")."""
        self.what = what
        self.unknown = unknown
        self._entries: dict = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = obj
            return obj
        return decorate

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.what} {name!r}; choose one of: {', '.join(sorted(self._entries))}",
                code=self.unknown) from None

    def names(self) -> list:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
