"""Registries: the named things a config key can choose (losses, optimisers, schedulers, ...).

A :class:`Registry` is a dict of name -> factory that knows which config key picks from it, so an
unknown name is refused where the registry lives, in the words users see for every config key:
``config key 'optim.name' must be one of adamw, adam, sgd; got 'adamx' (did you mean 'adamw'?)``.
"""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Name -> ``T`` for config key ``key``; ``also`` are names the key accepts besides the entries
    (e.g. ``auto``), resolved by the caller."""

    def __init__(self, key: str, entries: dict[str, T], also: tuple[str, ...] = ()):
        super().__init__(entries)
        self.key, self.also = key, tuple(also)

    @property
    def names(self) -> tuple[str, ...]:
        """Every accepted value: ``also`` first, then the entries in registration order."""
        return (*self.also, *self)

    def check(self, name: str) -> str:
        """``name`` if this key accepts it, else a UserError naming the key, the choices and the nearest."""
        if name in self.names:
            return name
        near = difflib.get_close_matches(str(name), self.names, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"config key '{self.key}' must be one of {', '.join(self.names)}; got '{name}'{hint}")

    def pick(self, name: str) -> T:
        """The entry registered as ``name`` (checked as :meth:`check` does)."""
        return self[self.check(name)]
