"""Static int8 quantization in QDQ form (onnxruntime ``quantize_static``).

Steps, on the model handed in (already a copy):

1. normalise the graph: ``Constant`` nodes become initializers (PP-OCR stores its
   weights that way and ORT's quantizer then leaves the convs float), constant
   folding, Conv+BatchNormalization fusion;
2. optionally cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization")
   of ``Conv -> [Relu|LeakyRelu] -> Conv`` pairs, depthwise convs included: output
   channel ``c`` of the first conv is divided by ``s_c`` and input channel ``c`` of
   the second multiplied by it, ``s_c = sqrt(r1_c / r2_c)``, which equalizes the
   per-channel weight ranges and keeps the float function (ReLU is positively
   homogeneous).  Clip/ReLU6 is not: such pairs are skipped unless
   ``relu6_to_relu`` replaces their ``Clip(0, 6)`` by ``Relu`` first (which changes
   the float function for activations above 6);
3. empirical bias correction (by default with 7-bit weights only): ``b' = b - (W_q - W) E[x]`` with ``E[x]``
   the per-input-channel mean over the calibration data and ``W_q`` the weight
   fake-quantized the way ORT will (symmetric int8, per output channel when
   ``per_channel``), so the expected output of each layer is unbiased;
4. ``quantize_static`` (QDQ, int8 weights, per-channel by default, uint8
   activations by default) calibrated on at most ``calib_samples`` samples, batch
   by batch so histogram calibration does not hold every activation in memory.

The weight range follows the CPU's int8 kernels (``weight_bits``, default: this host's, see
:func:`edgeopt.hostinfo.int8_scheme`): on x86 without VNNI onnxruntime's u8s8 kernels sum
pairs of products in int16 (``vpmaddubsw``), which saturates with full-range weights (the
digits CNN with signed activations fell from 0.99 to 0.51 accuracy on an AVX2-only CPU);
7-bit weights (onnxruntime's ``reduce_range``, [-64, 64]) keep every pair in range.
Backends pass the target's scheme explicitly.

Defaults were tuned on this project's references on an AVX-512 VNNI x86 CPU (held-out
inputs, 1 thread): uint8 activations run ORT's U8S8 int8 kernels where its default int8
activations leave depthwise convs and Adds in float (MobileNetV2 batch 1: 1.8x over
fp32 vs 1.1x for ``quantize_static`` defaults); per-channel weights and percentile
(99.99) calibration give MobileNetV2 0.88 top-1 agreement with fp32 (min-max 0.81,
entropy 0.84-0.86, ORT defaults 0.67).  Cross-layer equalization did not improve
MobileNetV2 (its conv pairs sit across ReLU6), so it is opt-in; bias correction is neutral
with 8-bit weights and worth 4 points of agreement with 7-bit ones, so it follows the weights.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from .._quiet import quiet_stdout
from . import PassConfig, PassError, PassOutcome
from ._util import Graph
from .cleanup import STEPS, normalize

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any

    import onnx

    from ..calibration import CalibrationData

NEEDS_CALIBRATION = True

_HOMOGENEOUS = {"Relu", "LeakyRelu"}  # f(x / s) = f(x) / s for s > 0
_NOT_HOMOGENEOUS = {"Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Gelu", "Mish",
                    "ThresholdedRelu", "Celu"}


class Config(PassConfig):
    calibration: Literal["minmax", "percentile", "entropy"] = Field(
        default="percentile", description="activation range calibration (onnxruntime CalibrationMethod)")
    percentile: float = Field(default=99.99, gt=0, le=100, description="percentile of |x| kept by calibration='percentile'")
    per_channel: bool = Field(default=True, description="one weight scale per output channel")
    activation_symmetric: bool = Field(default=False, description="symmetric activation ranges (zero point at the middle)")
    activation_type: Literal["uint8", "int8"] = Field(
        default="uint8", description="uint8 runs ORT's U8S8 int8 kernels on x86; int8 (ORT's default) suits ARM/GPU EPs")
    weight_bits: Literal[7, 8] | None = Field(
        default=None, description="8: full-range int8 weights; 7: [-64, 64] (reduce_range), exact on x86 CPUs without VNNI; "
                                  "None: what this host's CPU runs exactly (edgeopt.hostinfo.int8_scheme)")
    quantize_bias: bool = Field(default=True, description="int32 biases, which ORT's CPU int8 kernels need; False keeps them "
                                                          "float, as TensorRT's explicit quantization wants")
    bias_correction: bool | None = Field(
        default=None, description="empirical bias correction of the weight quantization error; None: on with 7-bit "
                                  "weights, whose coarser grid shifts layer means (MobileNetV2, 256 held-out crops: "
                                  "agreement 0.777 -> 0.816), off with 8-bit ones (0.891 vs 0.883)")
    cross_layer_equalization: bool = Field(default=False, description="equalize Conv->[Relu]->Conv weight ranges first")
    relu6_to_relu: bool = Field(default=False, description="with cross_layer_equalization: Clip(0,6) between two convs becomes Relu"
                                                           " (not exact: changes the float model for activations > 6)")
    range_overrides: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="activation tensor -> (min, max) replacing the calibrated range (chosen per "
                                          "tensor by measurement: edgeopt.techniques.int8.refine_ranges)")
    exclude_output_quantization: list[str] = Field(
        default_factory=list, description="op types whose outputs get no Q/DQ (the next layer's input quantizes them): "
                                          "TensorRT's placement, which fuses Conv+activation before quantizing")
    calib_samples: int = Field(default=128, ge=1, description="calibration samples read")
    op_types: list[str] | None = Field(default=None, description="op types to quantize; None: onnxruntime's defaults")


# --------------------------------------------------------------------------- helpers


def _attrs(node: onnx.NodeProto) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _clip_bounds(node: onnx.NodeProto, g: Graph) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip (None for an absent bound), or None when a bound is not constant."""
    a = _attrs(node)
    if "min" in a or "max" in a or len(node.input) == 1:
        return a.get("min"), a.get("max")
    bounds: list[float | None] = []
    for i in (1, 2):
        if len(node.input) <= i or not node.input[i]:
            bounds.append(None)
            continue
        v = g.array(node.input[i])
        if v is None:
            return None
        bounds.append(float(np.asarray(v).reshape(-1)[0]))
    return bounds[0], bounds[1]


def _const_weight(g: Graph, name: str) -> np.ndarray | None:
    """An initializer used by exactly one node, as a float array."""
    if name not in g.inits or name in g.outputs or len(g.consumers.get(name, [])) != 1:
        return None
    w = g.array(name)
    return w if w is not None and np.issubdtype(w.dtype, np.floating) else None


def _in_channel_view(w: np.ndarray, group: int) -> np.ndarray:
    """Conv weight ``[O, C/group, ...]`` as ``[C, O/group * k]``: row c holds every weight reading input channel c."""
    o, cg = w.shape[:2]
    return w.reshape(group, o // group, cg, -1).transpose(0, 2, 1, 3).reshape(group * cg, -1)


def _from_in_channel_view(v: np.ndarray, shape: tuple[int, ...], group: int) -> np.ndarray:
    o, cg = shape[:2]
    return v.reshape(group, cg, o // group, -1).transpose(0, 2, 1, 3).reshape(shape)


def fake_quant_weight(w: np.ndarray, axis: int | None, weight_bits: int = 8) -> np.ndarray:
    """``w`` after symmetric int8 quantization as onnxruntime does it: range [-127, 127] and scale ``max|w| / 127``
    (``weight_bits=7``, reduce_range: [-64, 64], ``max|w| / 64``); one scale per slice along ``axis``
    (None: per tensor).

    Args:
        w: the float weight.
        axis: the axis with one scale per slice (output channels), or None for one scale for the whole tensor.
        weight_bits: 8 for [-127, 127]; any other value gives the 7-bit range [-64, 64].

    Returns:
        The dequantized weight (float32, same shape); all-zero slices stay zero.
    """
    w32 = w.astype(np.float32)
    if axis is None:
        amax = np.abs(w32).max(keepdims=True) if w32.size else np.zeros((1,) * w32.ndim, np.float32)
    else:
        red = tuple(i for i in range(w32.ndim) if i != axis)
        amax = np.abs(w32).max(axis=red, keepdims=True)
    qmax = 127 if weight_bits == 8 else 64
    scale = (amax.astype(np.float64) * 2 / (2 * qmax)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round(w32 / safe), -qmax, qmax)
    return (q * safe).astype(np.float32)


# --------------------------------------------------------------------------- cross-layer equalization


def _cle_pairs(model: onnx.ModelProto, g: Graph, config: Config, outcome: PassOutcome):
    """``(conv1, activation | None, conv2)`` chains eligible for equalization (Clip made Relu when asked)."""
    pairs = []
    relu6_count = 0
    for c1 in model.graph.node:
        if c1.op_type != "Conv" or not config.selects(c1.name):
            continue
        nxt = g.only_consumer(c1.output[0])
        act = None
        if nxt is not None and (nxt.op_type in _HOMOGENEOUS or nxt.op_type in _NOT_HOMOGENEOUS):
            act = nxt
            nxt = g.only_consumer(act.output[0])
        if nxt is None or nxt.op_type != "Conv" or nxt.input[0] != (act if act is not None else c1).output[0]:
            continue
        c2 = nxt
        if not config.selects(c2.name):
            outcome.skip(c1.name, f"cross-layer equalization: next conv {c2.name} is excluded by node scoping")
            continue
        if act is not None and act.op_type == "LeakyRelu" and _attrs(act).get("alpha", 0.01) < 0:
            outcome.skip(c1.name, f"cross-layer equalization: {act.name} has a negative slope")
            continue
        if act is not None and act.op_type not in _HOMOGENEOUS:
            bounds = _clip_bounds(act, g) if act.op_type == "Clip" else None
            relu6 = bounds is not None and bounds[0] == 0 and bounds[1] == 6
            if relu6 and config.relu6_to_relu:
                x = act.input[0]
                del act.input[:]
                act.input.append(x)
                del act.attribute[:]
                act.op_type = "Relu"
                relu6_count += 1
            else:
                what = "Clip/ReLU6" if act.op_type == "Clip" else act.op_type
                hint = " (set relu6_to_relu=True to replace it by Relu)" if relu6 else ""
                outcome.skip(c1.name, f"cross-layer equalization with {c2.name} is not exact across {what} {act.name}{hint}")
                continue
        w1, w2 = _const_weight(g, c1.input[1]), _const_weight(g, c2.input[1])
        b1 = c1.input[2] if len(c1.input) > 2 and c1.input[2] else None
        if w1 is None or w2 is None or (b1 is not None and _const_weight(g, b1) is None):
            outcome.skip(c1.name, f"cross-layer equalization with {c2.name}: weights/bias are not constant or are shared")
            continue
        g2 = int(_attrs(c2).get("group", 1))
        if w2.shape[1] * g2 != w1.shape[0]:
            outcome.skip(c1.name, f"cross-layer equalization with {c2.name}: channel counts do not match")
            continue
        pairs.append((c1, act, c2))
    if relu6_count:
        outcome.notes.append(f"{relu6_count} Clip(0, 6) between convs replaced by Relu for cross-layer equalization "
                             "(not exact: activations above 6 are no longer clipped)")
    return pairs


def cross_layer_equalize(model: onnx.ModelProto, config: Config, outcome: PassOutcome, iterations: int = 20) -> list[str]:
    """Equalize weight ranges of consecutive convs in place; returns the names of the equalized pairs' convs.

    Args:
        model: the model, modified in place (initializers rescaled; ``Clip(0, 6)`` made ``Relu`` with
            ``relu6_to_relu``).
        config: the pass config (node scoping and ``relu6_to_relu``).
        outcome: receives skipped pairs (with reasons) and notes.
        iterations: equalization sweeps over all pairs.

    Returns:
        The names of the convs in equalized pairs, each once, in pair order.
    """
    g = Graph(model)
    pairs = _cle_pairs(model, g, config, outcome)
    if not pairs:
        return []
    g = Graph(model)  # Clip nodes may have become Relu
    weights = {}
    for c1, _, c2 in pairs:
        for n in (c1, c2):
            weights.setdefault(n.input[1], g.array(n.input[1]).astype(np.float64))
            if len(n.input) > 2 and n.input[2]:
                weights.setdefault(n.input[2], g.array(n.input[2]).astype(np.float64))
    for _ in range(iterations):
        for c1, _, c2 in pairs:
            w1, w2 = weights[c1.input[1]], weights[c2.input[1]]
            g2 = int(_attrs(c2).get("group", 1))
            v2 = _in_channel_view(w2, g2)
            r1 = np.abs(w1.reshape(len(w1), -1)).max(1)
            r2 = np.abs(v2).max(1)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            weights[c1.input[1]] = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
            if len(c1.input) > 2 and c1.input[2]:
                weights[c1.input[2]] = weights[c1.input[2]] / s
            weights[c2.input[1]] = _from_in_channel_view(v2 * s[:, None], w2.shape, g2)
    for name, v in weights.items():
        g.set_initializer(name, v.astype(g.array(name).dtype))
    done = []
    for c1, _, c2 in pairs:
        done += [n for n in (c1.name, c2.name) if n not in done]
    return done


# --------------------------------------------------------------------------- bias correction


def _channel_means(model: onnx.ModelProto, tensors: list[str], calib: CalibrationData, limit: int) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of intermediate tensors over the calibration data, streamed batch by batch."""
    from ..fidelity import session
    from ..graph import expose_outputs

    sess = session(expose_outputs(model, tensors), optimize=False)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed in calib.batches(batch_size=min(calib.batch_size, 16), limit=limit):
        for t, v in zip(tensors, sess.run(tensors, feed)):
            v = np.asarray(v, np.float64)
            v2 = np.moveaxis(v, 1, -1).reshape(-1, v.shape[1]) if v.ndim > 2 else v.reshape(-1, v.shape[-1])
            sums[t] = sums.get(t, 0) + v2.sum(0)
            counts[t] = counts.get(t, 0) + len(v2)
    return {t: sums[t] / max(counts[t], 1) for t in tensors}


def bias_correct(model: onnx.ModelProto, names: set[str], config: Config, calib: CalibrationData,
                 outcome: PassOutcome) -> list[str]:
    """Empirical bias correction of Conv/Gemm nodes in ``names``; returns the nodes corrected.

    Args:
        model: the model, modified in place (each corrected node gets a new bias initializer).
        names: the nodes that will be quantized; MatMul and ineligible nodes are skipped with a reason.
        config: the pass config (``per_channel``, weight bits, ``calib_samples``).
        calib: calibration data for the per-channel input means ``E[x]``.
        outcome: receives the skipped nodes.

    Returns:
        The names of the nodes whose bias was corrected.
    """
    g = Graph(model)
    targets = []
    for n in model.graph.node:
        if n.name not in names or n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if n.op_type == "MatMul":
            outcome.skip(n.name, "bias correction: MatMul has no bias to correct")
            continue
        w = g.array(n.input[1]) if len(n.input) > 1 else None
        if w is None or not np.issubdtype(w.dtype, np.floating):
            outcome.skip(n.name, "bias correction: weight is not a constant float tensor")
            continue
        if g.array(n.input[0]) is not None:
            outcome.skip(n.name, "bias correction: input is constant")
            continue
        a = _attrs(n)
        if n.op_type == "Gemm" and a.get("transA", 0):
            outcome.skip(n.name, "bias correction: Gemm with transA=1")
            continue
        if n.op_type == "Gemm" and a.get("beta", 1.0) == 0 and len(n.input) > 2 and n.input[2]:
            outcome.skip(n.name, "bias correction: Gemm with beta=0")
            continue
        targets.append((n, w))
    if not targets:
        return []
    means = _channel_means(model, sorted({n.input[0] for n, _ in targets}), calib, config.calib_samples)
    done = []
    for n, w in targets:
        ex = means[n.input[0]]
        a = _attrs(n)
        if n.op_type == "Conv":
            group = int(a.get("group", 1))
            o, cg = w.shape[:2]
            if ex.shape[0] != cg * group:
                outcome.skip(n.name, "bias correction: input channels do not match the weight")
                continue
            dw = fake_quant_weight(w, 0 if config.per_channel else None, resolved_weight_bits(config)).astype(np.float64) - w
            ex_o = ex.reshape(group, cg)[np.arange(o) // (o // group)]  # [O, C/group]: E[x] of the inputs output o reads
            corr = np.einsum("ojk,oj->o", dw.reshape(o, cg, -1), ex_o)
            b_in = n.input[2] if len(n.input) > 2 and n.input[2] else None
            b = g.array(b_in).astype(np.float64) if b_in else np.zeros(o)
            new_b = (b - corr).astype(w.dtype)
        else:
            trans_b = bool(a.get("transB", 0))
            alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
            axis = (0 if trans_b else 1) if config.per_channel else None
            dw = fake_quant_weight(w, axis, resolved_weight_bits(config)).astype(np.float64) - w
            dmat = dw.T if trans_b else dw  # [K, N]
            if ex.shape[0] != dmat.shape[0]:
                outcome.skip(n.name, "bias correction: input features do not match the weight")
                continue
            corr = alpha * ex @ dmat
            b_in = n.input[2] if len(n.input) > 2 and n.input[2] else None
            if b_in is None:
                new_b = (-corr).astype(w.dtype)
                for at in list(n.attribute):
                    if at.name == "beta":
                        n.attribute.remove(at)
            else:
                c = g.array(b_in)
                if c is None:
                    outcome.skip(n.name, "bias correction: Gemm C is not constant")
                    continue
                new_b = (c.astype(np.float64) - corr / beta).astype(w.dtype)
        name = g.unique(f"{n.name}.bias_corrected")
        g.set_initializer(name, new_b)
        while len(n.input) < 3:
            n.input.append("")
        n.input[2] = name
        done.append(n.name)
    Graph(model).remove_unused_initializers()
    return done


# --------------------------------------------------------------------------- quantization


def resolved_weight_bits(config: Config) -> int:
    """The config's weight range; unset: the one this host's CPU runs exactly.

    Args:
        config: the pass config.

    Returns:
        ``config.weight_bits`` (7 or 8), or, when None, onnxruntime's int8 scheme's weight bits for this host's CPU.
    """
    if config.weight_bits is not None:
        return config.weight_bits
    from ..hostinfo import detect, int8_scheme

    cpu = detect()
    return int8_scheme("onnxruntime", cpu.arch, cpu.features).weight_bits


def default_op_types() -> set[str]:
    """The op types onnxruntime quantizes by default (used when ``op_types`` is None).

    Returns:
        The union of onnxruntime's QDQ and QLinear op registries.
    """
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def _chunk_reader(calib: CalibrationData, batch_size: int):
    """A calibration reader over ``calib`` that ORT can read a range of batches at a time (``CalibStridedMinMax``),
    so histogram calibrators merge batch by batch instead of holding every activation of every sample."""
    from onnxruntime.quantization import CalibrationDataReader

    batches = list(calib.batches(batch_size))

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(batches[start_index:end_index])

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self.set_range(0, len(batches))

    return _Reader()


class _QuietOrt(logging.Filter):
    """Drops onnxruntime.quantization's advisory warnings (pre-processing hints) logged on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname.replace("\\", "/")


def calibration_method(config: Config):
    """The onnxruntime ``CalibrationMethod`` the config asks for.

    Args:
        config: the pass config (its ``calibration``).

    Returns:
        ``CalibrationMethod.MinMax``, ``Percentile`` or ``Entropy``.
    """
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[config.calibration]


def quantizer_options(config: Config) -> dict:
    """``extra_options`` for ``quantize_static``: the calibrator's settings (range symmetry, percentile) and the
    quantizer's (symmetric weights, activation symmetry, int32 biases).

    Args:
        config: the pass config.

    Returns:
        A new dict of onnxruntime extra option name -> value.
    """
    extra: dict = {"ActivationSymmetric": config.activation_symmetric, "WeightSymmetric": True,
                   "QuantizeBias": config.quantize_bias}
    if config.activation_symmetric:
        extra["CalibTensorRangeSymmetric"] = True
    if config.calibration == "percentile":
        extra["CalibPercentile"] = config.percentile
    if config.exclude_output_quantization:
        extra["OpTypesToExcludeOutputQuantization"] = list(config.exclude_output_quantization)
    if config.range_overrides:
        extra["TensorQuantOverrides"] = {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                         for t, (lo, hi) in config.range_overrides.items()}
    return extra


#: quantize_static's names for the calibrator's settings (onnxruntime.quantization.quantize_static)
_CALIB_KEYS = {"CalibTensorRangeSymmetric": "symmetric", "CalibMovingAverage": "moving_average",
               "CalibMovingAverageConstant": "averaging_constant", "CalibPercentile": "percentile"}


def _calibration_data(calib: CalibrationData, config: Config):
    data = calib.subset(config.calib_samples) if len(calib) > config.calib_samples else calib
    bs = data.batch_size if config.calibration == "minmax" else min(data.batch_size, 16)
    return data, _chunk_reader(data, bs)


#: activation ranges already computed in this process (see :func:`activation_ranges`)
_RANGES: dict[str, dict[str, tuple[float, float]]] = {}


def activation_ranges(model: onnx.ModelProto, config: Config, calib: CalibrationData) -> dict[str, tuple[float, float]]:
    """The activation ranges ``quantize_static`` computes for ``model`` under ``config``: the same onnxruntime
    calibrator, method, settings and batching, for the inputs and outputs of the op types it quantizes.

    Args:
        model: the float model (not modified).
        config: the pass config (calibration method, settings, ``calib_samples``, ``op_types``).
        calib: calibration data.

    Returns:
        Tensor name -> (low, high) activation range.
    """
    import onnx
    from onnxruntime.quantization.calibrate import create_calibrator

    from ..calibration import fingerprint

    extra = quantizer_options(config)
    calib_extra = {_CALIB_KEYS[k]: v for k, v in extra.items() if k in _CALIB_KEYS}
    data_used, reader = _calibration_data(calib, config)
    # planning asks for the same ranges several times (settings choice, per-tensor refinement, sensitivity): memoized
    # per (model, data, calibrator settings) in this process
    key = fingerprint(model, data_used, [config.calibration, calib_extra, config.op_types, config.calib_samples])
    if key in _RANGES:
        cached = dict(_RANGES[key])
        cached.update({k: (float(lo), float(hi)) for k, (lo, hi) in config.range_overrides.items() if k in cached})
        return cached
    ops = sorted(set(config.op_types) if config.op_types else default_op_types())

    def collect(m: onnx.ModelProto):
        large = m.ByteSize() > 1_800_000_000
        with tempfile.TemporaryDirectory(prefix="edgeopt-calib-") as d:
            src = os.path.join(d, "float.onnx")
            if large:  # saving with external data rewrites the proto handed in: save a copy
                copy = onnx.ModelProto()
                copy.CopyFrom(m)
                onnx.save(copy, src, save_as_external_data=True, location="float.data")
            else:
                onnx.save(m, src)
            with quiet_stdout():
                cal = create_calibrator(src, ops, augmented_model_path=os.path.join(d, "augmented.onnx"),
                                        calibrate_method=calibration_method(config), use_external_data_format=large,
                                        extra_options=calib_extra)
                for start in range(len(reader)):
                    reader.set_range(start, start + 1)
                    cal.collect_data(reader)
                try:
                    return cal.compute_data()
                except ValueError as e:  # no tensor of the quantized op types in the main graph (all inside an If)
                    if "not been collected" not in str(e):
                        raise
                    return {}

    data = _shape_inference_retry(collect, model, "calibration")
    ranges = {k: (float(np.asarray(v.range_value[0]).reshape(-1)[0]), float(np.asarray(v.range_value[1]).reshape(-1)[0]))
              for k, v in data.items()}
    if len(_RANGES) >= 16:
        _RANGES.pop(next(iter(_RANGES)))
    _RANGES[key] = dict(ranges)
    ranges.update({k: (float(lo), float(hi)) for k, (lo, hi) in config.range_overrides.items() if k in ranges})
    return ranges


def activation_qparams(lo: float, hi: float, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of an activation with range ``[lo, hi]``, computed by onnxruntime's own
    ``compute_scale_zp`` for the config's activation type and symmetry (what the QDQ graph will hold).

    Args:
        lo: the range's low end.
        hi: the range's high end.
        config: the pass config (``activation_type`` and ``activation_symmetric``).

    Returns:
        (scale as float32, zero point as uint8 or int8 following ``activation_type``).
    """
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qtype = TensorProto.UINT8 if config.activation_type == "uint8" else TensorProto.INT8
    qmin, qmax = get_qmin_qmax_for_qType(qtype, symmetric=config.activation_symmetric)
    zero, scale = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), qmin, qmax,
                                   config.activation_symmetric)
    return np.asarray(scale, np.float32), np.asarray(zero, np.uint8 if config.activation_type == "uint8" else np.int8)


def _inference_errors() -> tuple[type[BaseException], ...]:
    """What ONNX shape inference raises (onnxruntime's quantizer and calibrator run it on the model they are given)."""
    import onnx

    errs = [getattr(onnx.shape_inference, "InferenceError", None)]
    try:
        from onnx.onnx_cpp2py_export.shape_inference import InferenceError
        errs.append(InferenceError)
    except ImportError:  # pragma: no cover - older onnx
        pass
    return tuple(e for e in errs if isinstance(e, type))


def _without_declared_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without ``value_info`` and without the outputs' declared dims: stale or conflicting declared shapes
    (common in exported recurrent models) are what ONNX shape inference most often refuses; inference recomputes them."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for o in m.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    return m


def _shape_inference_retry(run: Callable[[onnx.ModelProto], Any], model: onnx.ModelProto, what: str):
    """``run(model)``; where onnxruntime's quantizer fails in ONNX shape inference, once more without the model's
    declared intermediate and output shapes; a second failure is a :class:`PassError` naming the cause (one line)."""
    errs = _inference_errors()
    try:
        return run(model)
    except errs:
        pass
    try:
        return run(_without_declared_shapes(model))
    except errs as e:
        first = " ".join(str(e).split())[:240] or type(e).__name__
        raise PassError(f"int8 {what}: onnxruntime's quantizer fails in ONNX shape inference on this model ({first}); "
                        "build it without int8 (e.g. --precision fp16 or wint8) or fix the model's shapes") from None


def route_outer_reads(model: onnx.ModelProto) -> int:
    """Give every main-graph activation that an If/Loop/Scan body reads from the outer scope a main-graph consumer:
    ``t -> Identity -> t__outer``, the bodies reading ``t__outer``.  onnxruntime's quantizer rewires only main-graph
    consumers: when it folds a Relu into the next quantization range it renames the producer's output to the Relu's,
    and a body reading that name would see the tensor before the Relu.  Returns how many tensors were routed."""
    from onnx import helper

    from ..subgraphs import all_graphs

    produced = {o for n in model.graph.node for o in n.output if o}
    taken = {o for g in all_graphs(model.graph) for n in g.node for o in n.output} | \
        {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    new_nodes, renames = [], {}
    for node in model.graph.node:
        bodies = [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
        if not bodies:
            new_nodes.append(node)
            continue
        local = {o for b in bodies for g in all_graphs(b) for n in g.node for o in n.output} | \
            {i.name for b in bodies for g in all_graphs(b) for i in [*g.input, *g.initializer]}
        reads = {i for b in bodies for g in all_graphs(b) for n in g.node for i in n.input}
        for t in sorted(reads & produced - local):
            if t not in renames:
                alias, k = f"{t}__outer", 0
                while alias in taken:
                    k += 1
                    alias = f"{t}__outer{k}"
                taken.add(alias)
                renames[t] = alias
                new_nodes.append(helper.make_node("Identity", [t], [alias], name=f"{alias}_route"))
        for b in bodies:
            for g in all_graphs(b):
                for n in g.node:
                    for j, i in enumerate(n.input):
                        if i in renames:
                            n.input[j] = renames[i]
        new_nodes.append(node)
    if renames:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
    return len(renames)


def quantize(model: onnx.ModelProto, nodes: list[str], config: Config, calib: CalibrationData) -> onnx.ModelProto:
    """``quantize_static`` on a copy of ``model`` (written to a temp dir: ORT mutates protos it is handed).

    Args:
        model: the float model (not modified).
        nodes: the names of the nodes to quantize.
        config: the pass config (calibration, per-channel, activation type, weight bits, extra options).
        calib: calibration data (at most ``calib_samples`` samples are read).

    Returns:
        The QDQ model as loaded back from the quantizer's output.
    """
    method = calibration_method(config)
    extra = quantizer_options(config)
    extra["CalibStridedMinMax"] = 1  # one batch per collect call (any method)
    large = model.ByteSize() > 1_800_000_000
    root = logging.getLogger()
    quiet = _QuietOrt()
    root.addFilter(quiet)
    try:
        return _shape_inference_retry(lambda m: _quantize_once(m, nodes, config, calib, method, extra, large),
                                      model, "quantization")
    finally:
        root.removeFilter(quiet)


def _quantize_once(model: onnx.ModelProto, nodes: list[str], config: Config, calib: CalibrationData, method,
                   extra: dict, large: bool) -> onnx.ModelProto:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    _, reader = _calibration_data(calib, config)
    with tempfile.TemporaryDirectory(prefix="edgeopt-int8-") as d:
        src, dst = os.path.join(d, "float.onnx"), os.path.join(d, "int8.onnx")
        if large:
            onnx.save(model, src, save_as_external_data=True, location="float.data")
        else:
            onnx.save(model, src)
        with quiet_stdout():
            quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
                            activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=nodes, calibrate_method=method,
                            reduce_range=resolved_weight_bits(config) == 7,
                            use_external_data_format=large, extra_options=dict(extra))
        return onnx.load(dst)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _upgrade_opset(model: onnx.ModelProto, out: PassOutcome) -> onnx.ModelProto:
    """Per-channel DequantizeLinear (``axis``) needs opset 13; older models are converted."""
    import onnx

    before = _opset(model)
    if before >= 13:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, 13)
    except Exception as e:  # the converter lacks an adapter for some op
        raise PassError(f"per-channel int8 needs opset >= 13 and converting this opset-{before} model failed ({e}); "
                        "use per_channel=False") from e
    out.notes.append(f"opset {before} -> 13 (per-channel DequantizeLinear needs it)")
    return converted


def apply(model: onnx.ModelProto, config: Config, calib: CalibrationData | None) -> PassOutcome:
    """Quantize the selected nodes to int8 QDQ (see the module docstring for the steps).

    Args:
        model: the model (already a copy); normalised, equalized and bias-corrected in place.
        config: the pass config.
        calib: calibration data (required).

    Returns:
        The outcome: the QDQ model, the nodes quantized, the nodes left in float (with reasons) and notes.

    Raises:
        PassError: ``calib`` is None, or a per-channel model's opset cannot be converted to 13.
    """
    if calib is None:
        raise PassError("int8 quantization needs calibration data")
    out = PassOutcome(model)
    for key, names in normalize(model, identity=False).items():
        if names:
            out.notes.append(f"normalised: {STEPS[key]}: {len(names)}")
    if config.cross_layer_equalization:
        eq = cross_layer_equalize(model, config, out)
        out.notes.append(f"cross-layer equalization: {len(eq)} conv(s)")
    eligible = set(config.op_types) if config.op_types else default_op_types()
    selected = []
    for n in model.graph.node:
        if n.op_type in eligible:
            if config.selects(n.name):
                selected.append(n.name)
            else:
                out.skip(n.name, "excluded by node scoping: left in float")
    if not selected:
        out.notes.append("no node selected for quantization")
        Graph(model).remove_unused_initializers()
        return out
    if config.bias_correction if config.bias_correction is not None else resolved_weight_bits(config) == 7:
        bc = bias_correct(model, set(selected), config, calib, out)
        out.notes.append(f"bias correction: {len(bc)} layer(s)")
    Graph(model).remove_unused_initializers()
    if config.per_channel:
        model = _upgrade_opset(model, out)
    routed = route_outer_reads(model)
    if routed:
        out.notes.append(f"{routed} tensor(s) read inside If/Loop bodies routed through an Identity (so that they "
                         "see the quantized value, not a tensor whose Relu the quantizer folded away)")
    q = quantize(model, selected, config, calib)
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    present = {n.name: n for n in q.graph.node}
    removed = 0
    for name in selected:
        node = present.get(name)
        if node is None:  # a Relu/Clip absorbed by the activation quantization range
            out.applied.append(name)
            removed += 1
        elif any(producers.get(i) == "DequantizeLinear" for i in node.input):
            out.applied.append(name)
        else:
            out.skip(name, f"onnxruntime left this {node.op_type} in float (its input is not quantized: integer/shape data "
                           "or an unsupported pattern)")
    if removed:
        out.notes.append(f"{removed} activation(s) folded into the quantization ranges")
    bits = resolved_weight_bits(config)
    out.notes.append(f"int8 QDQ: {config.calibration} calibration on {min(len(calib), config.calib_samples)} samples, "
                     f"{'per-channel' if config.per_channel else 'per-tensor'} {bits}-bit weights"
                     f"{' (this host: no VNNI)' if config.weight_bits is None and bits == 7 else ''}, "
                     f"{config.activation_type} activations")
    out.model = q
    return out
