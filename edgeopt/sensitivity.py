"""Per-layer sensitivity: how much the model's output moves when one layer alone is
quantized or pruned, measured on calibration data.

Each option is simulated in float32 on a cleaned copy of the model (weights as
initializers, BatchNorm folded), one layer at a time:

* ``fp16`` / ``bf16``: weights and the layer's output rounded through the format;
* ``int8``: weights fake-quantized per output channel (symmetric, as the int8 pass
  does), the layer's input and output through uint8 QuantizeLinear/DequantizeLinear
  with ranges from calibration;
* ``wint8`` / ``wint4``: weights only, per output channel / blocks of 32 along K;
* ``2:4`` / ``unstructured``: magnitude pruning of the weights (50% for unstructured);
* ``channel``: the channel-pruning pass (with reconstruction) scoped to the layer.

The result per (layer, option) is the output noise power relative to the signal
(``noise``, additive across layers to first order) and the fraction of samples
whose top-1 class changes (``flips``).  Results are cached on disk by model hash,
calibration hash and option, so a fleet measures each once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from .errors import InternalError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from .calibration import CalibrationData
    from .types import ModelAnalysis

OPTIONS = ("fp16", "bf16", "int8", "wint8", "wint4", "2:4", "unstructured", "channel")
WEIGHTED = ("Conv", "Gemm", "MatMul")
CHANNEL_RATIO = 0.3
UNSTRUCTURED_RATIO = 0.5


class Sensitivity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: str
    option: str
    noise: float  # ||y - y_ref||^2 / ||y_ref||^2 on the calibration samples
    flips: float | None  # fraction of samples whose top-1 changes (classification outputs)
    applicable: bool = True
    reason: str = ""


def _out_axis(node: onnx.NodeProto, w: np.ndarray) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 0 if node.op_type == "Conv" else w.ndim - 1


def _round_fp16(w: np.ndarray) -> np.ndarray:
    return w.astype(np.float16).astype(np.float32)


def _round_bf16(w: np.ndarray) -> np.ndarray:
    from .passes.fp16 import _to_bf16_bits

    return (_to_bf16_bits(w).astype(np.uint32) << 16).view(np.float32).reshape(w.shape)


def _blockwise(w: np.ndarray, k_axis: int, bits: int, block: int = 32) -> np.ndarray:
    a = np.moveaxis(w.astype(np.float32), k_axis, -1)
    k = a.shape[-1]
    pad = (-k) % block
    padded = np.concatenate([a, np.zeros((*a.shape[:-1], pad), np.float32)], -1) if pad else a
    blocks = padded.reshape(*a.shape[:-1], -1, block)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(blocks).max(-1, keepdims=True) / qmax
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round(blocks / safe), -qmax - 1, qmax) * safe
    return np.moveaxis(q.reshape(padded.shape)[..., :k], -1, k_axis)


def _qdq(graph, tensor: str, lo: float, hi: float, tag: str) -> str:
    """Insert uint8 QuantizeLinear/DequantizeLinear on ``tensor``; returns the new tensor name."""
    from onnx import helper, numpy_helper

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32(max(hi - lo, 1e-8) / 255)
    zp = np.uint8(np.clip(round(-lo / scale), 0, 255))
    s_name, z_name = f"{tag}/scale", f"{tag}/zp"
    graph.initializer.extend([numpy_helper.from_array(np.array(scale), s_name), numpy_helper.from_array(np.array(zp), z_name)])
    q, dq = f"{tag}/q", f"{tag}/dq"
    graph.node.extend([helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q], name=f"{tag}/Q"),
                       helper.make_node("DequantizeLinear", [q, s_name, z_name], [dq], name=f"{tag}/DQ")])
    return dq


def _round_output(model: onnx.ModelProto, node: onnx.NodeProto, to: int, tag: str) -> None:
    """Route ``node``'s output through a Cast to ``to`` and back to float32."""
    from onnx import TensorProto, helper

    y = node.output[0]
    raw = f"{tag}/raw"
    node.output[0] = raw
    model.graph.node.extend([helper.make_node("Cast", [raw], [f"{tag}/mid"], name=f"{tag}/c1", to=to),
                             helper.make_node("Cast", [f"{tag}/mid"], [y], name=f"{tag}/c2", to=TensorProto.FLOAT)])


class NotApplicable(ValueError):
    """The option cannot apply to this layer: recorded as a finding, not raised."""


def simulate(model: onnx.ModelProto, layer: str, option: str, ranges: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """A copy of the (cleaned) model with only ``layer`` in ``option``'s numerics (:class:`NotApplicable` where the
    option cannot apply to the layer)."""
    import onnx
    from onnx import TensorProto

    from .passes._util import Graph
    from .passes.int8 import fake_quant_weight
    from .passes.prune import _nm_mask, _reduction_axis, _smallest_mask

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    node = next(n for n in m.graph.node if n.name == layer)
    w = g.array(node.input[1])
    if w is None:
        raise NotApplicable(f"{layer}: weight is not constant")
    axis = _out_axis(node, w)
    k_axis, why = _reduction_axis(node, w)
    if option in ("wint8", "wint4") and node.op_type == "Conv":
        raise NotApplicable("weight-only kernels exist for MatMul/Gemm, not Conv")
    if option == "2:4" and (k_axis is None or w.shape[k_axis] % 4 or w.shape[k_axis] == 1):
        raise NotApplicable(why or f"reduction dim {w.shape[k_axis]} is not a multiple of 4")
    if option == "fp16":
        new_w = _round_fp16(w)
        _round_output(m, node, TensorProto.FLOAT16, f"{layer}/sens")
    elif option == "bf16":
        new_w = _round_bf16(w)
        _round_output(m, node, TensorProto.BFLOAT16, f"{layer}/sens")
    elif option == "int8":
        new_w = fake_quant_weight(w, axis)
        x = node.input[0]
        if x in ranges:
            node.input[0] = _qdq(m.graph, x, *ranges[x], f"{layer}/sens_in")
        y = node.output[0]
        if y in ranges:
            raw = f"{layer}/sens_raw"
            node.output[0] = raw
            dq = _qdq(m.graph, raw, *ranges[y], f"{layer}/sens_out")
            m.graph.node.append(onnx.helper.make_node("Identity", [dq], [y], name=f"{layer}/sens_id"))
    elif option == "wint8":
        new_w = fake_quant_weight(w, axis)
    elif option == "wint4":
        new_w = _blockwise(w, k_axis if k_axis is not None else 0, 4)
    elif option == "2:4":
        new_w = np.where(_nm_mask(w, k_axis, 2, 4), w, 0).astype(w.dtype)
    elif option == "unstructured":
        mags = np.abs(w).ravel()
        new_w = np.where(_smallest_mask(mags, int(UNSTRUCTURED_RATIO * mags.size)).reshape(w.shape), w, 0).astype(w.dtype)
    else:
        raise InternalError(f"sensitivity: unknown option {option}")
    g.set_initializer(node.input[1], new_w.astype(w.dtype))
    _toposort(m)
    return m


def _toposort(model: onnx.ModelProto) -> None:
    produced = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in produced for i in n.input):
                ordered.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            ordered.extend(rest)
            break
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _compare(ref: np.ndarray, out: np.ndarray) -> tuple[float, float | None]:
    noise = float(np.sum((ref.astype(np.float64) - out) ** 2) / max(np.sum(ref.astype(np.float64) ** 2), 1e-30))
    flips = float(np.mean(ref.argmax(1) != out.argmax(1))) if ref.ndim == 2 and ref.shape[1] > 1 else None
    return noise, flips


def _cache_key(model: onnx.ModelProto, calib: CalibrationData, samples: int) -> str:
    h = hashlib.sha256(model.SerializeToString())
    for k, v in sorted(calib.feeds().items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v[:samples]).tobytes())
    h.update(f"v2:{samples}".encode())
    return h.hexdigest()[:24]


def measure(model: onnx.ModelProto, calib: CalibrationData, options: Iterable[str] = OPTIONS,
            layers: Iterable[str] | None = None, samples: int = 32, cache: bool = True,
            progress: Callable[[str], None] | None = None) -> dict[tuple[str, str], Sensitivity]:
    """Sensitivity of every weighted layer (Conv/Gemm/MatMul with a constant weight) to each option."""
    import onnx

    from .fidelity import session
    from .passes import PassError, run_pass
    from .passes._util import collect_activations
    from .passes.cleanup import Config as CleanupConfig
    from .passes.cleanup import apply as cleanup

    clean = onnx.ModelProto()
    clean.CopyFrom(model)
    cleanup(clean, CleanupConfig(remove_identity=False))
    sub = calib.subset(min(samples, len(calib)))
    # channel pruning re-fits layers on data: fit on other samples than those it is judged on, or it looks perfect
    fit = calib.subset(len(calib) - samples, start=samples) if len(calib) >= 2 * samples else sub
    key = _cache_key(model, calib, samples)
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
    ref = session(clean).run(None, feeds)[0]
    from .passes._util import Graph

    g = Graph(clean)
    wanted = set(layers) if layers is not None else None
    targets = [n for n in clean.graph.node if n.op_type in WEIGHTED and len(n.input) > 1 and g.array(n.input[1]) is not None
               and g.array(n.input[0]) is None and (wanted is None or n.name in wanted)]
    act_names = sorted({t for n in targets for t in (n.input[0], n.output[0])})
    acts = collect_activations(clean, act_names, sub)
    ranges = {t: (float(v.min()), float(v.max())) for t, v in acts.items()}
    todo = [(n.name, o) for n in targets for o in options if (n.name, o) not in results]
    for i, (name, option) in enumerate(todo):
        if progress:
            progress(f"sensitivity {i + 1}/{len(todo)}: {name} {option}")
        try:
            if option == "channel":
                res = run_pass("channel_prune", clean, {"nodes": [name], "ratio": CHANNEL_RATIO, "calib_samples": len(fit)},
                               fit, evaluate=False)
                if name not in res.report.applied:
                    why = next((s.reason for s in res.report.skipped if s.node == name), "not prunable")
                    results[(name, option)] = Sensitivity(layer=name, option=option, noise=0.0, flips=None,
                                                          applicable=False, reason=why)
                    continue
                sim = res.model
            else:
                sim = simulate(clean, name, option, ranges)
            out = session(sim).run(None, feeds)[0]
        except (NotApplicable, PassError, *_ort_errors()) as e:  # cannot apply / cannot run here: a finding, not a crash
            results[(name, option)] = Sensitivity(layer=name, option=option, noise=0.0, flips=None, applicable=False,
                                                  reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        noise, flips = _compare(ref, out)
        results[(name, option)] = Sensitivity(layer=name, option=option, noise=noise, flips=flips)
    if store is not None and todo:
        from .io import atomic_write_text

        atomic_write_text(store, json.dumps([s.model_dump() for s in results.values()]))
    return results


def _ort_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's own failures (an op or type its CPU provider does not run): the option cannot run here."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    return tuple(getattr(st, n) for n in ("Fail", "InvalidArgument", "InvalidGraph", "NotImplemented", "RuntimeException")
                 if hasattr(st, n))


def quantizable_layers(analysis: ModelAnalysis) -> list[str]:
    return [ly.name for ly in analysis.layers if ly.quantizable and ly.op_type in WEIGHTED]
