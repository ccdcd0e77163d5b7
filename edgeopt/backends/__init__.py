"""Backend registry.  One module per backend; the same name is the module, the
registry key, the ``--backend`` CLI value, the pip extra and the test file.

Modules import their vendor SDK lazily, so importing a backend module (to read
its op table) is cheap and works where the SDK is not installed.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..types import BACKEND_SETTINGS

#: every backend: the keys of :data:`edgeopt.types.BACKEND_SETTINGS`, where a backend's name and typed options are
#: declared (with its module here, that is all a new backend needs)
BACKENDS: tuple[str, ...] = tuple(BACKEND_SETTINGS)


def get(name: str) -> ModuleType:
    """The backend module ``name`` (its op table, ``check_ops`` and ``BACKEND``, the :class:`~.base.Backend`)."""
    if name not in BACKENDS:
        from ..errors import EdgeoptError

        raise EdgeoptError(f"unknown backend '{name}'; valid backends: {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{name}")
