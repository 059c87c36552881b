"""Public names that load on first use.

The `stackedtree` command converts checkpoints with numpy alone; importing jax would
dominate its start-up time. So each package's `__init__` lists where its names live
(`_SOURCES`, checked against its `TYPE_CHECKING` imports by the tests) and loads a
module only when one of its names is first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, sources: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module `__getattr__` and `__dir__` of `package`.

    Args:
        package: the package's `__name__`.
        sources: maps each public name to the module that defines it, relative to
            `package` (`"._stack"`).
        namespace: the package's `globals()`, where a loaded name is cached.
    """

    def getattr_(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name], package), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *sources})

    return getattr_, dir_
