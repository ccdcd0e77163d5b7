"""Errors a user can act on (:class:`EdgeoptError`: the CLI prints ``error: <message>`` and exits 2) and bugs
(:class:`InternalError`, or any other exception: ``internal error: ...`` with a hint, exit 1, the traceback
with ``edgeopt --debug``)."""

from __future__ import annotations

from collections.abc import Iterable


class EdgeoptError(Exception):
    """Base class: a one-line message naming what was wrong and, where it helps, the valid choices."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always one line

    @property
    def message(self) -> str:
        return str(self)


class InternalError(Exception):
    """A bug in edgeopt: an invariant that should hold did not.  Nothing the user changes fixes it."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def _choices(valid: Iterable[str]) -> str:
    return ", ".join(sorted(valid))


class UnknownTargetError(EdgeoptError):
    def __init__(self, name: str, valid: Iterable[str]):
        super().__init__(f"unknown target '{name}'; valid targets: {_choices(valid)} (or a path to a .yaml file)")


class TargetFileError(EdgeoptError):
    """A target definition that does not parse or validate."""


class ModelLoadError(EdgeoptError):
    """Missing, unreadable, truncated, corrupt or non-ONNX model file."""


class InputShapeError(EdgeoptError):
    """Model inputs whose shape is not known and was not given."""


class UnsupportedOpError(EdgeoptError):
    """Ops the chosen backend cannot run."""


class BudgetError(EdgeoptError):
    """No plan meets the target's budgets."""


class BackendNotInstalledError(EdgeoptError):
    def __init__(self, backend: str, module: str | None = None):
        what = module or backend
        super().__init__(f"{what} is not installed; pip install 'edgeopt[{backend}]'")


class PlanError(EdgeoptError):
    """A plan file that does not load or does not match the model/target it is replayed on."""
