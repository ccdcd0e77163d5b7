"""edgeopt: hardware-aware deployment optimizer for ONNX models.

Importing this package is cheap: onnx, rich and every vendor SDK are imported
only by the functions that need them.  The Python API (:mod:`edgeopt.api`:
``edgeopt.analyze``, ``plan``, ``build``, ``fleet``, ``profile``) and the data
sources (:mod:`edgeopt.datasources`: ``Preprocess``, ``ImageFolder``,
``AudioFolder``, ``Samples``) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"analyze": "api", "plan": "api", "build": "api", "fleet": "api", "profile": "api",
         "Preprocess": "datasources", "ImageFolder": "datasources", "AudioFolder": "datasources",
         "Samples": "datasources", "EdgeoptError": "errors"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """The API's functions and classes, imported when first used (PEP 562; importlib: the modules they come from
    import this package for ``__version__``)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
