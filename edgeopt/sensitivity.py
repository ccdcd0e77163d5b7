"""Per-layer sensitivity: how much the model's output moves when one layer alone is
quantized or pruned, measured on calibration data.

Each technique of the registry (:mod:`edgeopt.technique`) with a simulator is applied
to one layer at a time of a cleaned copy of the model (weights as initializers,
BatchNorm folded), by the technique's own pass or that pass's public numerics with
the same calibration method, so the planner ranks layers with the quantizer it ships.
``configs`` overrides a technique's pass settings (e.g. ``{"int8": {"weight_bits": 7}}``
for a CPU without VNNI).

The result per (layer, technique) is the output noise power relative to the signal
(``noise``, additive across layers to first order) and the fraction of samples
whose top-1 class changes (``flips``).  Results are cached on disk by model hash,
calibration hash, settings and technique, so a fleet measures each once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from . import technique as techniques
from .technique import WEIGHTED, NotApplicable

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from .calibration import CalibrationData
    from .types import ModelAnalysis

__all__ = ["WEIGHTED", "NotApplicable", "Sensitivity", "measure", "measured_techniques", "quantizable_layers"]

#: Run every simulated model whole (the reference path the fast one is checked against; see :mod:`edgeopt._suffix`).
_WHOLE_MODEL = False
#: The fast path's counters of the last :func:`measure` (runs, fallbacks and why), for tests and benchmarks.
_last_stats: dict[str, int] = {}


def measured_techniques() -> tuple[str, ...]:
    """The techniques sensitivity measures: every registered one with a simulator."""
    return tuple(t.name for t in techniques.all_techniques() if t.simulate is not None)


class Sensitivity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: str
    option: str
    noise: float  # ||y - y_ref||^2 / ||y_ref||^2 on the calibration samples
    flips: float | None  # fraction of samples whose top-1 changes (classification outputs)
    applicable: bool = True
    reason: str = ""


def _compare(ref: np.ndarray, out: np.ndarray) -> tuple[float, float | None]:
    from .fidelity import relative_noise

    noise = relative_noise(ref, out)
    if ref.ndim == 2 and ref.shape[1] > 1:  # a sample with NaN/Inf outputs counts as flipped
        flips = float(np.mean((ref.argmax(1) != out.argmax(1)) | ~np.isfinite(out).all(axis=1)))
    else:
        flips = None
    return noise, flips


def _cache_key(model: onnx.ModelProto, calib: CalibrationData, samples: int,
               configs: Mapping[str, Mapping[str, Any]]) -> str:
    from .calibration import fingerprint

    return fingerprint(model, calib, {"v": 6, "samples": samples, "configs": configs})[:24]


def measure(model: onnx.ModelProto, calib: CalibrationData, options: Iterable[str] | None = None,
            layers: Iterable[str] | None = None, samples: int = 32, cache: bool = True,
            progress: Callable[[str], None] | None = None,
            configs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[tuple[str, str], Sensitivity]:
    """Sensitivity of every weighted layer (Conv/Gemm/MatMul with a constant weight) to each technique.

    Args:
        model: the float ONNX model.
        calib: calibration data; outputs are compared on its first ``samples`` samples, passes calibrate on all of
            it (as in a build) and passes that fit weights fit on the others where there are enough.
        options: technique names (default: every registered technique with a simulator).
        layers: layer names to measure (default: all weighted layers).
        samples: samples the outputs are compared on.
        cache: read and write the on-disk cache (``~/.cache/edgeopt/sensitivity``).
        progress: called with one line per measurement.
        configs: per-technique pass settings (e.g. ``{"int8": {"weight_bits": 7}}``).

    Returns:
        ``(layer, technique) -> Sensitivity``; a technique that cannot apply to a layer is recorded with
        ``applicable=False`` and the reason.
    """
    import onnx

    from .fidelity import check_finite_reference, run_feeds, session
    from .passes import PassError
    from .passes._util import Graph
    from .passes.cleanup import Config as CleanupConfig
    from .passes.cleanup import apply as cleanup

    configs = {k: dict(v) for k, v in (configs or {}).items()}
    options = tuple(options) if options is not None else measured_techniques()
    clean = onnx.ModelProto()
    clean.CopyFrom(model)
    cleanup(clean, CleanupConfig(remove_identity=False))
    sub = calib.subset(min(samples, len(calib)))
    fit = calib.subset(len(calib) - samples, start=samples) if len(calib) >= 2 * samples else sub
    ctx = techniques.SimContext(model=clean, data=calib, fit=fit, configs=configs)
    key = _cache_key(model, calib, samples, configs)
    store = None
    results: dict[tuple[str, str], Sensitivity] = {}
    if cache:
        from .zoo import cache_dir

        store = cache_dir() / "sensitivity" / f"{key}.json"
        if store.is_file():
            for row in json.loads(store.read_text()):
                s = Sensitivity.model_validate(row)
                results[(s.layer, s.option)] = s
    feeds = sub.feeds()
    ref = run_feeds(session(clean), feeds)[0]
    check_finite_reference([ref])
    g = Graph(clean)
    wanted = set(layers) if layers is not None else None
    targets = [n for n in clean.graph.node if n.op_type in WEIGHTED and len(n.input) > 1 and g.array(n.input[1]) is not None
               and g.array(n.input[0]) is None and (wanted is None or n.name in wanted)]
    todo = [(n, o) for n in targets for o in options if (n.name, o) not in results]
    _last_stats.clear()
    fast = None if _WHOLE_MODEL or not todo else _suffix_runner(clean, feeds, [n.name for n in targets])
    for i, (node, option) in enumerate(todo):
        name = node.name
        if progress:
            progress(f"sensitivity {i + 1}/{len(todo)}: {name} {option}")
        t = techniques.get(option)
        try:
            if t.simulate is None:
                raise NotApplicable(f"{option} has no simulator")
            if not t.applies_to(node.op_type):
                raise NotApplicable(f"{option} applies to {', '.join(sorted(t.ops or ()))}, not {node.op_type}")
            sim = t.simulate(ctx, name)
            # QDQ graphs run as written: onnxruntime's optimizer rewrites a Q/DQ island around a float-weight conv
            # into other numerics (MobileNetV2: 2.3x the noise of the int8 pass on that layer) and fuses the rest
            # into this CPU's integer kernels; float graphs run optimized (same numbers, ~3x faster)
            exact = any(n.op_type == "QuantizeLinear" for n in sim.graph.node)
            # only the edited span and what follows it, from the reference's activations (None: run it whole)
            out = fast.run(sim, name, exact) if fast is not None else None
            if out is None:
                out = run_feeds(session(sim, optimize=not exact), feeds)[0]
        except (NotApplicable, PassError, *_ort_errors()) as e:  # cannot apply / cannot run here: a finding, not a crash
            why = str(e).splitlines()[0] if str(e) else ""
            reason = why if isinstance(e, NotApplicable) else f"{type(e).__name__}: {why}"
            results[(name, option)] = Sensitivity(layer=name, option=option, noise=0.0, flips=None, applicable=False,
                                                  reason=reason)
            continue
        noise, flips = _compare(ref, out)
        results[(name, option)] = Sensitivity(layer=name, option=option, noise=noise, flips=flips)
    if fast is not None:
        _last_stats.update(fast.stats)
    if store is not None and todo:
        from .io import atomic_write_text

        atomic_write_text(store, json.dumps([s.model_dump() for s in results.values()]))
    return results


def _suffix_runner(clean: onnx.ModelProto, feeds: dict[str, np.ndarray], targets: list[str]):
    """The fast path's runner for this model, or None where it does not apply (every model then runs whole)."""
    from ._suffix import SuffixRunner, Unsupported

    try:
        return SuffixRunner(clean, feeds, targets)
    except Exception as e:  # noqa: BLE001 - the shortcut never changes a result or crashes
        _last_stats[f"whole model ({e if isinstance(e, Unsupported) else repr(e)})"] = 1
        return None


def _ort_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's own failures (an op or type its CPU provider does not run): the option cannot run here."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    return tuple(getattr(st, n) for n in ("Fail", "InvalidArgument", "InvalidGraph", "NotImplemented", "RuntimeException")
                 if hasattr(st, n))


def quantizable_layers(analysis: ModelAnalysis) -> list[str]:
    """Names of the layers sensitivity measures (weighted ops with weights)."""
    return [ly.name for ly in analysis.layers if ly.quantizable and ly.op_type in WEIGHTED]
