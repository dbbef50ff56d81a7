"""Names -> implementations, one convention for every kind the params choose by name (timm's ``register_model``).

Datasets, architectures, training objectives, pruning methods, attacks and bound methods each have one
:class:`Registry`; adding one is adding a decorated function, and an unknown name is one line naming the field
and listing the choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from pipeline.errors import HydraPipeError

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind`` says what the names are ("dataset"); ``field`` where a user chose one ("data.name")."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind, self.field = kind, field
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register()`` under the function's own name, or ``register("crown-ibp")``."""

        def deco(item: T) -> T:
            key = name or item.__name__  # type: ignore[attr-defined]
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._items[key] = item
            return item

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise HydraPipeError(f"{self.field}: unknown {self.kind} {name!r}; expected one of {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
