"""Backend registry.  One module per backend; the same name is the module, the
registry key, the ``--backend`` CLI value, the pip extra and the test file.

Modules import their vendor SDK lazily, so importing a backend module (to read
its op table) is cheap and works where the SDK is not installed.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import BackendNotInstalledError

BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino", "tflite", "tflm", "coreml", "tensorrt")


def get(name: str) -> ModuleType:
    if name not in BACKENDS:
        from ..errors import EdgeoptError

        raise EdgeoptError(f"unknown backend '{name}'; valid backends: {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{name}")


def is_available(name: str) -> bool:
    """Whether the backend's SDK can be imported here (found, not imported)."""
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in get(name).SDK_MODULES)


def require(name: str) -> None:
    mod = get(name)
    from importlib.util import find_spec

    for m in mod.SDK_MODULES:
        if find_spec(m) is None:
            raise BackendNotInstalledError(name, mod.SDK_LABEL)
