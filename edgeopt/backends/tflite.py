"""LiteRT / TFLite (Android): .tflite written from our ONNX, run by ai-edge-litert.

``convert`` translates the ONNX graph itself (:mod:`._tflite_writer`, LiteRT's
flatbuffer schema; no converter, no download) into ``model.tflite`` with the plan's
per-layer precisions: fp32, fp16 (fp16 weights + DEQUANTIZE) and int8 (per-channel
int8 weights, int8 activations calibrated on the calibration data); QUANTIZE /
DEQUANTIZE join int8 and float layers.  Options that require full-integer models
(NNAPI) get int8 inputs/outputs, the others keep float I/O.  Rank-4 inputs/outputs
are NHWC in the .tflite (TFLite's native layout); ``tflite.json`` records the layouts
and int8 I/O parameters, and the runner transposes and (de)quantizes so callers feed
and read arrays in the ONNX model's layout, in float.  Integer inputs (token ids for an
embedding Gather) are int32 in the .tflite; the runner casts them.

The op pre-flight (:func:`check_ops`) passes what the writer translates (its
``SUPPORTED_OPS``, within the op tables of :mod:`._ops`), refuses what the writer refuses
from attributes alone (``attribute_refusal``) and an Erf outside a GELU, and skips the
single ops of subgraphs the writer replaces as a whole (:func:`without_patterns`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EdgeoptError
from ..types import Artifact, BackendOption, LayerInfo, ModelAnalysis, Plan
from . import _ops
from .base import Backend, Runner, make_artifact, tool_versions

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData

SDK_MODULES = ("ai_edge_litert",)
SDK_LABEL = "ai-edge-litert"

#: NNAPI accelerators take a narrower int8 set than the XNNPACK CPU path.
NNAPI_OPS = _ops.TFLM_OPS | frozenset({"Exp", "Log", "Sqrt", "Pow", "Neg", "Abs", "Gather", "Cast", "Tile", "Expand"})


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    from ._tflite_writer import SUPPORTED_OPS as WRITER_OPS  # what the .tflite writer translates

    analysis = without_patterns(analysis)
    if option.settings.delegate == "nnapi":
        return _ops.check_layers(analysis, option, (NNAPI_OPS & WRITER_OPS) | UNROLLED,
                                 [_ops.static_shapes, _ops.div_by_constant, _ops.max_rank(4), _ops.grouped_conv, writer_limits,
                                  unrollable]) \
            + lone_erfs(analysis, option.backend)
    return _ops.check_layers(analysis, option, (_ops.TFLITE_OPS & WRITER_OPS) | UNROLLED,
                             [_ops.static_shapes, _ops.max_rank(5), _ops.grouped_conv, writer_limits, unrollable]) \
        + lone_erfs(analysis, option.backend)


#: recurrent ops the writer runs as plain ops (:mod:`edgeopt.passes.unroll_rnn`)
UNROLLED = frozenset({"GRU", "LSTM"})


def unrollable(layer: LayerInfo, option: BackendOption, analysis: ModelAnalysis) -> str | None:
    """GRU/LSTM go to TFLite as their unrolled steps: refused where they cannot be unrolled."""
    if layer.op_type not in UNROLLED:
        return None
    from ..passes.unroll_rnn import why_not_layer

    x = next((t for t in analysis.tensors if t.name == layer.inputs[0]), None) if layer.inputs else None
    why = why_not_layer(layer.op_type, layer.attributes, layer.inputs, x.shape if x is not None else None)
    if why is None and not {n for n in layer.inputs[1:4] if n} <= set(layer.weights):
        why = "its weights are not constant"
    return f"is run unrolled (TFLite has no kernel for ONNX's GRU/LSTM), which needs: {why}" if why else None


def writer_limits(layer: LayerInfo, option: BackendOption, analysis: ModelAnalysis) -> str | None:
    """What the .tflite writer refuses from a node's attributes (cubic Resize, TopK largest=0, a non-matmul
    Einsum, ...), in the writer's words."""
    from ._tflite_writer import attribute_refusal

    return attribute_refusal(layer.op_type, layer.attributes)


def _graph(analysis: ModelAnalysis):
    producer = {o: ly for ly in analysis.layers for o in ly.outputs}
    consumers: dict[str, list] = {}
    for ly in analysis.layers:
        for i in dict.fromkeys(ly.inputs):
            consumers.setdefault(i, []).append(ly)
    return producer, consumers


def without_patterns(analysis: ModelAnalysis) -> ModelAnalysis:
    """``analysis`` less the layers the writer replaces as a whole, whose own ops need not have kernels: a decomposed
    layer norm's Pow/Mul, Sqrt and Div by an activation (written as MEAN/SQUARED_DIFFERENCE/RSQRT), a tanh-GELU's
    x**3 (written as GELU).  Matched on the graph's structure; the writer checks the constants too."""
    producer, consumers = _graph(analysis)

    def only(tensor: str, op_type: str):
        c = consumers.get(tensor, [])
        return c[0] if len(c) == 1 and c[0].op_type == op_type else None

    drop: set[str] = set()
    for ly in analysis.layers:
        if ly.op_type == "ReduceMean" and ly.outputs:  # ReduceMean, Sub, Pow|Mul, ReduceMean, Add, Sqrt, Div
            sub = only(ly.outputs[0], "Sub")
            uses = consumers.get(sub.outputs[0], []) if sub is not None and sub.inputs[:1] == ly.inputs[:1] else []
            sq = next((n for n in uses if n.op_type in ("Pow", "Mul")), None)
            div = next((n for n in uses if n.op_type == "Div"), None)
            r2 = only(sq.outputs[0], "ReduceMean") if sq is not None and len(uses) == 2 else None
            add = only(r2.outputs[0], "Add") if r2 is not None else None
            sqrt = only(add.outputs[0], "Sqrt") if add is not None else None
            if sqrt is not None and div is not None and div.inputs[1:2] == sqrt.outputs[:1]:
                drop.update(n.name for n in (ly, sub, sq, r2, add, sqrt, div))
        if ly.op_type == "Pow" and ly.outputs:  # x**3 -> Mul kappa -> Add x -> Mul beta -> Tanh
            k = only(ly.outputs[0], "Mul")
            a = only(k.outputs[0], "Add") if k is not None else None
            m = only(a.outputs[0], "Mul") if a is not None and ly.inputs[0] in a.inputs else None
            if m is not None and only(m.outputs[0], "Tanh") is not None:
                drop.add(ly.name)
    if not drop:
        return analysis
    return analysis.model_copy(update={"layers": [ly for ly in analysis.layers if ly.name not in drop]})


def lone_erfs(analysis: ModelAnalysis, backend: str) -> list[str]:
    """Erf layers outside a GELU: TFLite has no ERF builtin; the writer turns only
    ``x * 0.5 * (1 + Erf(x / sqrt(2)))`` into GELU.  Checked on the graph's structure (Div or Mul before the Erf,
    Add then Mul or Div after it); the writer also checks the constants and refuses a near-miss by name."""
    producer, consumers = _graph(analysis)
    reasons = []
    for ly in analysis.layers:
        if ly.op_type != "Erf" or ly.domain not in ("", "ai.onnx"):
            continue
        src = producer.get(ly.inputs[0]) if ly.inputs else None
        after = consumers.get(ly.outputs[0], []) if ly.outputs else []
        gelu = (src is not None and src.op_type in ("Div", "Mul") and len(after) == 1 and after[0].op_type == "Add"
                and any(c.op_type in ("Mul", "Div") for c in consumers.get(after[0].outputs[0], [])))
        if not gelu:
            reasons.append(f"{ly.name}: op Erf is not supported by {backend}: TFLite has no ERF builtin; only Erf inside "
                           "GELU (x * 0.5 * (1 + Erf(x / sqrt(2)))) converts, to GELU")
    return reasons


# --------------------------------------------------------------------------- building

MODEL_FILE = "model.tflite"
RECORD = "tflite.json"
TFLITE_PRECISIONS = frozenset({"fp32", "fp16", "int8"})


def plan_precisions(plan: Plan, backend: str) -> tuple[dict[str, str], str]:
    """Per-layer precisions of a plan (layer name -> fp32/fp16/int8) and its dominant one."""
    bad = sorted({lp.precision for lp in plan.layers} - set(TFLITE_PRECISIONS))
    if bad:
        raise EdgeoptError(f"{backend} builds fp32, fp16 and int8 layers; the plan has {', '.join(bad)}")
    counts = Counter(lp.precision for lp in plan.layers)
    default = counts.most_common(1)[0][0] if counts else "fp32"
    return {lp.name: lp.precision for lp in plan.layers}, default


def requires_full_integer(plan: Plan) -> bool:
    """Whether the plan's backend option runs full-integer models only (int8 I/O)."""
    from .base import _option_for

    return _option_for(plan).requires_full_integer


def convert_plan(model: onnx.ModelProto, plan: Plan, calib: CalibrationData | None, *, full_integer: bool,
                 backend: str, calib_limit: int = 256):
    from . import _tflite_writer

    precision_of, default = plan_precisions(plan, backend)
    if full_integer:
        precision_of, default = {k: "int8" for k in precision_of}, "int8"
    if calib is None and "int8" in {default, *precision_of.values()}:
        n = sum(p == "int8" for p in precision_of.values())
        raise EdgeoptError(f"the plan quantizes {n} layer(s) to int8: give calibration data")
    return _tflite_writer.convert(model, input_shapes=plan.input_shapes, precision_of=precision_of, default=default,
                                  calib=calib, full_integer=full_integer, calib_limit=calib_limit, micro=backend == "tflm")


# --------------------------------------------------------------------------- running


class TfliteRunner(Runner):
    """Runs a .tflite written by :mod:`._tflite_writer` in LiteRT's interpreter (or TFLite Micro's, ``micro_arena``).

    Takes and returns float arrays in the ONNX layout: rank-4 NCHW inputs are
    transposed to the model's NHWC, int8 inputs/outputs are (de)quantized with the
    parameters in the record; a batch larger than the model's runs chunk by chunk.
    """

    def __init__(self, model_path: Path, record: Mapping[str, Any], threads: int | None = None,
                 micro_arena: int | None = None):
        self.record = record
        self.inputs = list(record["inputs"])
        self.outputs = list(record["outputs"])
        self.input_names = [d["name"] for d in self.inputs]
        self.output_names = [d["name"] for d in self.outputs]
        data = Path(model_path).read_bytes()
        self.engine = "tflite-micro" if micro_arena is not None else "litert"
        if micro_arena is not None:
            from tflite_micro import runtime as micro

            self._micro = micro.Interpreter.from_bytes(data, arena_size=int(micro_arena))
        else:
            from ai_edge_litert.interpreter import Interpreter

            from .._quiet import quiet_native_stderr

            with quiet_native_stderr():  # LiteRT's one-time "Created TensorFlow Lite XNNPACK delegate" INFO line
                self._interp = Interpreter(model_content=data, num_threads=int(threads) if threads else None)
                self._interp.allocate_tensors()
            self._in_idx = [d["index"] for d in self._interp.get_input_details()]
            self._out_idx = [d["index"] for d in self._interp.get_output_details()]

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.engine == "tflite-micro":
            for i, a in enumerate(arrays):
                self._micro.set_input(a, i)
            self._micro.invoke()
            return [np.asarray(self._micro.get_output(j)) for j in range(len(self.outputs))]
        for idx, a in zip(self._in_idx, arrays):
            self._interp.set_tensor(idx, a)
        self._interp.invoke()
        return [self._interp.get_tensor(idx) for idx in self._out_idx]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from ._tflite_writer import from_tflite_layout, to_tflite_layout

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise EdgeoptError(f"missing input(s) {missing}; the model takes {self.input_names}")
        arrays = [np.asarray(feeds[d["name"]]).astype(np.int32 if d["dtype"] == "int32" else np.float32, copy=False)
                  for d in self.inputs]  # int32: index inputs (token ids); the rest float, int8 quantized below
        exact = all(list(a.shape) == list(d["onnx_shape"]) for d, a in zip(self.inputs, arrays))
        # exactly the model's shapes (always so for scalars and states whose batch is not on axis 0): one run;
        # else every input batched on axis 0, in slices of the model's batch
        n = arrays[0].shape[0] if arrays and arrays[0].ndim and not exact else 1
        b = self.inputs[0]["onnx_shape"][0] if self.inputs and self.inputs[0]["onnx_shape"] and not exact else 1
        for d, a in zip(self.inputs, arrays):
            if not exact and (a.ndim == 0 or list(a.shape[1:]) != list(d["onnx_shape"][1:]) or a.shape[0] % max(b, 1)):
                raise EdgeoptError(f"input '{d['name']}' has shape {list(a.shape)}; the .tflite takes {d['onnx_shape']} "
                                   f"(any multiple of the batch {b})")
        outs: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for start in range(0, n, b):
            chunk = []
            for d, a in zip(self.inputs, arrays):
                x = to_tflite_layout(a if exact else a[start:start + b], d)
                if d["dtype"] == "int8":
                    x = np.clip(np.round(x / d["scale"]) + d["zero_point"], -128, 127).astype(np.int8)
                chunk.append(x)
            for acc, d, y in zip(outs, self.outputs, self._invoke(chunk)):
                y = np.asarray(y)
                if d["dtype"] == "int8":
                    y = (y.astype(np.float32) - d["zero_point"]) * np.float32(d["scale"])
                acc.append(from_tflite_layout(y.astype(np.float32, copy=False), d))
        return [np.concatenate(o) for o in outs]


class TfliteBackend(Backend):
    precisions = TFLITE_PRECISIONS
    name = "tflite"
    runtime_dist = "ai-edge-litert"
    threaded = True
    sdk_modules = SDK_MODULES
    sdk_label = SDK_LABEL

    def convert(self, model: onnx.ModelProto, plan: Plan, out_dir: Path,
                calib: CalibrationData | None = None) -> Artifact:
        self.require()
        conv = convert_plan(model, plan, calib, full_integer=requires_full_integer(plan), backend=self.name,
                            calib_limit=int(plan.backend_options.get("calibration_samples", 256)))
        out_dir = Path(out_dir)
        (out_dir / MODEL_FILE).write_bytes(conv.data)
        opts = plan.backend_options
        record = {**conv.info, "threads": opts.get("threads"), "delegate": opts.get("delegate", "xnnpack"),
                  "size_bytes": len(conv.data)}
        if opts.get("delegate") == "nnapi":
            record["notes"] = [*record["notes"], "NNAPI is an Android delegate; elsewhere the model runs on LiteRT's CPU kernels"]
        (out_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return make_artifact(out_dir, MODEL_FILE, plan, self.name, tool_versions("ai-edge-litert", "flatbuffers"))

    def load(self, artifact: Artifact, artifact_dir: Path, threads: int | None = None) -> Runner:
        self.require()
        artifact_dir = Path(artifact_dir)
        record = json.loads((artifact_dir / RECORD).read_text())
        return TfliteRunner(artifact_dir / artifact.primary, record, threads=threads or record.get("threads"))

    def artifact_threads(self, artifact: Artifact, artifact_dir: Path) -> int | None:
        return json.loads((Path(artifact_dir) / RECORD).read_text()).get("threads")


BACKEND = TfliteBackend()
