"""Registries of named classes: the train objectives (`jobs.objectives`) and the model backends
(`jobs.backends`). A registry is the one list that the config's validation, the command lines' choices, the
Makefile and the DAG read; a new objective or backend is a module of its own and one line in its registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import ClassVar, Generic, Protocol, TypeVar


class Named(Protocol):
    name: ClassVar[str]


C = TypeVar("C", bound=Named)


class Registry(Generic[C]):
    """Classes by their `name`, in the order registered; iterating yields the names."""

    def __init__(self, kind: str, classes: Iterable[type[C]] = ()):
        self.kind = kind
        self._classes: dict[str, type[C]] = {}
        for cls in classes:
            self.register(cls)

    def register(self, cls: type[C]) -> type[C]:
        if not cls.name or cls.name in self._classes:
            raise ValueError(f"{self.kind} {cls.name!r}: {'registered already' if cls.name else 'has no name'}")
        self._classes[cls.name] = cls
        return cls

    @contextmanager
    def registered(self, cls: type[C]) -> Iterator[type[C]]:
        """`cls` registered for the block only (a test's own objective or backend)."""
        self.register(cls)
        try:
            yield cls
        finally:
            del self._classes[cls.name]

    def get(self, name: str) -> type[C]:
        """The class registered as `name`; ValueError (one line, naming the choices) for an unknown name."""
        try:
            return self._classes[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self._classes)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._classes))

    def __contains__(self, name: object) -> bool:
        return name in self._classes
