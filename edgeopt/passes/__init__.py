"""ONNX -> ONNX compression passes, one technique per module.

Every pass module defines:

* ``Config``: a :class:`PassConfig` subclass (frozen pydantic, ``extra="forbid"``);
  its ``nodes``/``exclude`` fields scope the pass to a list of node names or
  regular expressions, so the planner can mix techniques per layer;
* ``apply(model, config, calib) -> PassOutcome``: transforms a copy of the model.
  A node the pass cannot handle is left untouched and listed in ``skipped`` with
  the reason.

:func:`run_pass` wraps a pass with the common report: sizes before/after and the
output fidelity (SNR, cosine, top-1 agreement, accuracy delta with labels) on the
calibration data.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import EdgeoptError
from ..fidelity import Fidelity

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData

#: name -> module under edgeopt.passes
REGISTRY: dict[str, str] = {
    "cleanup": "cleanup",
    "fp16": "fp16",
    "bf16": "fp16",
    "int8": "int8",
    "weight_only": "weight_only",
    "prune": "prune",
    "channel_prune": "channel_prune",
    "lowrank": "lowrank",
    "palettize": "palettize",
}


class PassConfig(BaseModel):
    """Scoping shared by every pass: which nodes it may touch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: list[str] | None = Field(
        default=None, description="node names or regexes (full match) the pass may touch; None: all eligible nodes"
    )
    exclude: list[str] = Field(default_factory=list, description="node names or regexes never touched")

    def selects(self, name: str) -> bool:
        """Whether the pass may touch node ``name``.

        Args:
            name: a node name.

        Returns:
            False when it equals or fully matches an ``exclude`` pattern; otherwise True when ``nodes``
            is None or it equals or fully matches one of ``nodes``.
        """
        def hit(patterns: list[str]) -> bool:
            return any(p == name or re.fullmatch(p, name) for p in patterns)

        if hit(self.exclude):
            return False
        return self.nodes is None or hit(self.nodes)


class Skip(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str
    reason: str


@dataclass
class PassOutcome:
    model: onnx.ModelProto
    applied: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip(self, node: str, reason: str) -> None:
        """Record a node the pass left untouched.

        Args:
            node: the node's name.
            reason: why the pass could not handle it.
        """
        self.skipped.append(Skip(node=node, reason=reason))


class PassReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    config: dict[str, Any]
    applied: list[str]
    skipped: list[Skip]
    notes: list[str]
    size_before: int
    size_after: int
    fidelity: Fidelity | None = None

    def summary(self) -> str:
        """A one-line human-readable summary of the pass's effect.

        Returns:
            Nodes changed and skipped, size before -> after, and the fidelity (SNR, cosine, top-1
            agreement and accuracy where measured).
        """
        fid = ""
        if self.fidelity is not None:
            f = self.fidelity
            fid = f", SNR {f.snr_db:.1f} dB, cosine {f.cosine:.4f}"
            if f.top1_agreement is not None:
                fid += f", top-1 agreement {f.top1_agreement:.3f}"
            if f.accuracy_delta is not None:
                fid += f", accuracy {f.accuracy:.4f} ({f.accuracy_delta:+.4f})"
        return (f"{self.name}: {len(self.applied)} node(s) changed, {len(self.skipped)} skipped, "
                f"size {self.size_before} -> {self.size_after} bytes{fid}")


@dataclass
class PassResult:
    model: onnx.ModelProto
    report: PassReport


class PassError(EdgeoptError):
    """A pass that cannot run at all (bad configuration, missing calibration data)."""


def get(name: str):
    """The module implementing pass ``name``.

    Args:
        name: a pass name (a key of :data:`REGISTRY`).

    Returns:
        The imported ``edgeopt.passes`` module (with ``Config`` or ``CONFIGS`` and ``apply``).

    Raises:
        PassError: ``name`` is not a known pass.
    """
    if name not in REGISTRY:
        raise PassError(f"unknown pass '{name}'; valid passes: {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(f"{__name__}.{REGISTRY[name]}")


def make_config(name: str, config: PassConfig | dict[str, Any] | None = None) -> PassConfig:
    """Validate a configuration for pass ``name``.

    Args:
        name: a pass name.
        config: an instance of the pass's config class (returned as is), a dict or another
            pydantic model to validate into it, or None for the defaults.

    Returns:
        The pass's config (the module's ``CONFIGS[name]`` class where it has several, else its ``Config``).

    Raises:
        PassError: ``name`` is unknown, or ``config`` does not validate.
    """
    from pydantic import ValidationError

    mod = get(name)
    cls = mod.CONFIGS[name] if hasattr(mod, "CONFIGS") else mod.Config
    if isinstance(config, cls):
        return config
    try:
        return cls.model_validate(dict(config or {}) if not isinstance(config, BaseModel) else config.model_dump())
    except ValidationError as e:
        first = e.errors()[0]
        raise PassError(f"bad config for pass {name}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from e


def model_size(model: onnx.ModelProto) -> int:
    """Serialized bytes (external data included when it is loaded into the proto).

    Args:
        model: the model.

    Returns:
        ``model.ByteSize()``.
    """
    return model.ByteSize()


def run_pass(name: str, model: onnx.ModelProto, config: PassConfig | dict[str, Any] | None = None,
             calib: CalibrationData | None = None, *, evaluate: bool = True, eval_limit: int | None = 256) -> PassResult:
    """Apply one pass to a copy of ``model`` and report its effect.

    Args:
        name: a pass name.
        model: the input model (not modified).
        config: the pass's configuration (see :func:`make_config`).
        calib: calibration data; required by passes that need it, also used to measure fidelity.
        evaluate: compare the outputs of the input and transformed models on ``calib``.
        eval_limit: at most this many samples for that comparison (None: all).

    Returns:
        The transformed model and a report (nodes applied/skipped, notes, sizes before/after, and
        fidelity when evaluated).

    Raises:
        PassError: the pass is unknown, its config is invalid, or it needs calibration data and
            ``calib`` is None.
    """
    import onnx

    cfg = make_config(name, config)
    mod = get(name)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    needs = mod.needs_calibration(cfg) if hasattr(mod, "needs_calibration") else getattr(mod, "NEEDS_CALIBRATION", False)
    if needs and calib is None:
        raise PassError(f"pass {name} needs calibration data")
    outcome: PassOutcome = mod.apply(work, cfg, calib) if needs or calib is not None else mod.apply(work, cfg, None)
    fidelity = None
    if evaluate and calib is not None:
        from ..fidelity import compare

        fidelity = compare(model, outcome.model, calib, limit=eval_limit)
    report = PassReport(name=name, config=cfg.model_dump(mode="json"), applied=outcome.applied, skipped=outcome.skipped,
                        notes=outcome.notes, size_before=model_size(model), size_after=model_size(outcome.model),
                        fidelity=fidelity)
    return PassResult(outcome.model, report)
