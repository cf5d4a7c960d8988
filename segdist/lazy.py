"""Names of a package that load their module on first use (PEP 562), so a light import stays light.

``segdist.shards``, ``segdist.infer``, ``segdist.export`` and ``segdist.bench`` load their light modules at
once and the rest (OpenCV, PIL, torch, SMP/timm, the training stack) when a name of theirs is first read, so
``import segdist.cli`` loads no torch and ``segdist bench data`` forks its loader workers from a process
without the training stack (``tests/test_architecture.py`` checks both).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def attach(package: str, lazy: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: the names in ``lazy`` (``{submodule: names}``) are imported
    from ``package.submodule`` when first read, then kept in the package's namespace, so the hook runs once
    per name; ``dir()`` lists them with the package's ``__all__``."""
    module_of = {name: module for module, names in lazy.items() for name in names}

    def __getattr__(name: str):
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        namespace = vars(importlib.import_module(package))
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
