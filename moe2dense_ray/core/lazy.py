"""Stage functions importable from their package without importing the stage.

`from moe2dense_ray.convert import convert` should work, yet `moe2dense families` and a Ray
training worker must not pay for torch, transformers or the driver when they only need one light
module of the package. A package's `__getattr__` (PEP 562) imports the submodule on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def exports(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` of `package` that takes each of `names` (name -> submodule) from its
    submodule when it is first asked for."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
