"""The vocabulary of compression techniques, declared once.

A :class:`Technique` says everything the rest of edgeopt needs to know about one
numeric format (``kind="precision"``: fp16, int8, wint4, ...) or one pruning
pattern (``kind="sparsity"``: 2:4, unstructured, channel):

* what it stores and computes: weight bits, activation bits (None: weight-only,
  computing in the backend's float), the float bits of what it leaves unquantized,
  quantization metadata per layer, the ops it applies to;
* where the planner tries it (``fidelity``: higher-fidelity recipes first) and
  whether :mod:`edgeopt.latency_table` profiles it;
* ``simulate``: one layer in its numerics on a copy of the model, for
  :mod:`edgeopt.sensitivity`; it calls the technique's own pass (or that pass's
  public numerics, with the same calibration method), so the planner ranks layers
  with the quantizer it ships;
* ``apply``: writes it into an ONNX graph with edgeopt's passes (what the
  onnxruntime backend, TensorRT's QDQ path and the build's structural step run).

The planner, sensitivity, cost model, latency table, target validation, backends
and CLI derive from this registry.  Adding a technique is one module under
``edgeopt/techniques/`` defining ``TECHNIQUES`` and one line in :data:`BUILTIN`;
:func:`register` adds one at run time (a plug-in, or a test).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from .calibration import CalibrationData

#: Modules under ``edgeopt.techniques`` whose ``TECHNIQUES`` are registered on first use (the registration lines).
BUILTIN: tuple[str, ...] = ("floats", "int8", "weight_only", "sparsity")

#: The format models arrive in: what every other technique is measured against.
REFERENCE = "fp32"

#: Layer ops whose constant weight the techniques quantize or prune (what sensitivity measures).
WEIGHTED: frozenset[str] = frozenset({"Conv", "Gemm", "MatMul"})


class NotApplicable(ValueError):
    """The technique cannot apply to this layer: recorded as a finding, not raised."""


@dataclass
class SimContext:
    """What simulators share while sensitivity measures one model: the cleaned float model, the calibration data
    (what a pass calibrates on, as in a build), the samples a pass that fits weights may fit on (disjoint from those
    outputs are compared on where there are enough), per-technique pass settings, and a memo for work done once per
    model (activation ranges)."""

    model: onnx.ModelProto
    data: CalibrationData
    fit: CalibrationData
    configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)

    def config(self, technique: str) -> dict[str, Any]:
        return dict(self.configs.get(technique, {}))

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


@dataclass(frozen=True)
class ApplyContext:
    """What ``apply`` hooks get besides the model and the layer names: calibration data, the pass settings the
    backend wants per technique (e.g. the int8 layout its target CPU runs exactly), the backend options of the plan,
    and the fraction removed (sparsity)."""

    calib: CalibrationData | None = None
    configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    ratio: float = 0.0

    def config(self, technique: str) -> dict[str, Any]:
        return dict(self.configs.get(technique, {}))


#: ``simulate(ctx, layer) -> model``: a copy of ``ctx.model`` with only ``layer`` in the technique's numerics
Simulator = Callable[[SimContext, str], "onnx.ModelProto"]
#: ``apply(model, layers, ctx) -> (model, note)``: the technique written into the graph for those layers
Applier = Callable[["onnx.ModelProto", list[str], ApplyContext], "tuple[onnx.ModelProto, str | None]"]


def _no_metadata(weights: float, channels: float) -> float:
    return 0.0


def _dense(n_weights: int, ratio: float, compresses: bool) -> tuple[float, float]:
    return 1.0, 0.0


@dataclass(frozen=True)
class Technique:
    """One numeric format or pruning pattern (see the module docstring)."""

    name: str
    kind: Literal["precision", "sparsity"]
    description: str
    # -- precisions
    fidelity: int = 0  # the planner tries recipes in ascending order: fp32 (0) first
    weight_bits: int = 32  # bits per stored weight element
    activation_bits: int | None = 32  # bits of activations and arithmetic; None: weight-only (the option's float)
    float_bits: int = 32  # bits of the float constants it leaves unquantized (biases, norm parameters)
    metadata_bytes: Callable[[float, float], float] = _no_metadata  # (weights, output channels) -> scales/zero points
    ops: frozenset[str] | None = None  # op types it applies to (None: every layer); weight-only formats name theirs
    profiled: bool = False  # edgeopt.latency_table profiles a uniform build of it on this host
    presumed_faithful: bool = False  # chosen without data to measure it (fp16: 11-bit mantissa, fp32 range of a net)
    # -- sparsity
    ratio: float = 0.0  # fraction removed when planned (2:4: 0.5)
    removes_channels: bool = False  # whole output channels go: the layer, its outputs and metadata shrink
    # -- recovery (edgeopt.recover): the planner's prior for the share of the post-training noise sensitivity
    #    measured that is left after distillation fine-tuning (1.0: recovery does not help, e.g. activation formats);
    #    accuracy control then measures the recovered artifact
    recovered_noise: float = 1.0
    storage: Callable[[int, float, bool], tuple[float, float]] = _dense  # (weights, ratio, compresses) -> (kept, index B)
    # -- hooks
    simulate: Simulator | None = None
    apply: Applier | None = None
    apply_order: int = 0  # order in which apply hooks run on one graph (weight-only before int8 before fp16)

    @property
    def weight_only(self) -> bool:
        return self.kind == "precision" and self.activation_bits is None

    @property
    def needs_calibration(self) -> bool:
        """Whether a build needs calibration data (static activation ranges) to write it."""
        return self.kind == "precision" and self.activation_bits is not None and self.activation_bits <= 8

    def applies_to(self, op_type: str) -> bool:
        return self.ops is None or op_type in self.ops


_REGISTRY: dict[str, Technique] = {}
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN:
        for t in importlib.import_module(f"edgeopt.techniques.{mod}").TECHNIQUES:
            register(t)


def register(technique: Technique, *, replace: bool = False) -> Technique:
    """Add a technique (``replace``: redefine one of that name).  Returns it."""
    _load_builtin()
    if technique.name in _REGISTRY and not replace:
        raise ValueError(f"technique {technique.name!r} is already registered")
    if technique.name == "none":
        raise ValueError("'none' means no sparsity; pick another name")
    _REGISTRY[technique.name] = technique
    return technique


def unregister(name: str) -> None:
    """Remove a technique registered at run time (tests, plug-ins)."""
    _REGISTRY.pop(name, None)


def all_techniques() -> list[Technique]:
    _load_builtin()
    return list(_REGISTRY.values())


def get(name: str) -> Technique:
    _load_builtin()
    t = _REGISTRY.get(name)
    if t is None:
        raise KeyError(f"unknown technique {name!r}; valid: {', '.join(_REGISTRY)}")
    return t


def precisions() -> list[Technique]:
    """Numeric formats, highest fidelity first."""
    return sorted((t for t in all_techniques() if t.kind == "precision"), key=lambda t: t.fidelity)


def precision_names() -> tuple[str, ...]:
    return tuple(t.name for t in precisions())


def sparsity_names() -> tuple[str, ...]:
    return tuple(t.name for t in all_techniques() if t.kind == "sparsity")


def check_precision(name: str) -> str:
    """``name`` if it is a registered numeric format (pydantic validator for ``Precision`` fields)."""
    if name not in precision_names():
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(precision_names())}")
    return name


def check_sparsity(name: str) -> str:
    """``name`` if it is ``none`` or a registered pruning pattern."""
    if name != "none" and name not in sparsity_names():
        raise ValueError(f"unknown sparsity {name!r}; valid: none, {', '.join(sparsity_names())}")
    return name
