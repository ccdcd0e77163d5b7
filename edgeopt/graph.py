"""Loading and analysing ONNX models: per-layer parameters, MACs, weight bytes,
activation sizes, tensor lifetimes and arena planning.

Only ``onnx`` and ``numpy`` are needed.  Weights may be initializers, ``Constant``
nodes (PaddlePaddle exports) or external-data files; sub-graphs of constants
(``DequantizeLinear`` of int8 weights, ``Shape``->``Gather`` chains on static
shapes) are folded for the analysis, so they count as weights, not as layers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputShapeError, ModelLoadError
from .types import LayerInfo, ModelAnalysis, TensorInfo

if TYPE_CHECKING:  # pragma: no cover
    import onnx

# --------------------------------------------------------------------------- loading

_MAGIC: list[tuple[int, bytes, str]] = [
    (4, b"TFL3", "a TFLite flatbuffer (.tflite)"),
    (0, b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth checkpoint, a .mlmodel package or a Keras file)"),
    (0, b"\x89HDF", "an HDF5 file (a Keras .h5 model)"),
    (0, b"\x80\x02", "a Python pickle (a PyTorch checkpoint)"),
    (0, b"GGUF", "a GGUF file"),
    (0, b"<?xml", "an XML file (an OpenVINO IR .xml?)"),
]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(16)
    for off, magic, what in _MAGIC:
        if head[off : off + len(magic)] == magic:
            return what
    if head[:1] == b"{":
        return "a JSON file"
    return None


def load_model(path: str | Path, *, load_external_data: bool = False) -> onnx.ModelProto:
    """Load an ONNX model, turning every way a file can be wrong into a one-line :class:`ModelLoadError`.

    External data is only checked (files exist and are long enough) unless
    ``load_external_data`` is set, so a multi-GB model analyses without reading its weights.
    """
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if p.is_dir():
        hint = " (a SavedModel or .mlpackage directory?)" if (p / "saved_model.pb").exists() or p.suffix == ".mlpackage" else ""
        raise ModelLoadError(f"{p} is a directory, not an ONNX model file{hint}")
    if not p.exists():
        raise ModelLoadError(f"model file {p} does not exist")
    try:
        size = p.stat().st_size
        if size == 0:
            raise ModelLoadError(f"model file {p} is empty")
        what = _sniff(p)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {p}: {e.strerror or e}") from e
    if what:
        raise ModelLoadError(f"{p} is {what}, not an ONNX model; edgeopt takes ONNX input (export to .onnx first)")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except DecodeError as e:
        raise ModelLoadError(f"{p} is not a valid ONNX model: protobuf parse failed ({e}); the file is truncated, corrupt or not ONNX") from e
    except Exception as e:  # onnx raises several types on junk
        raise ModelLoadError(f"{p} is not a valid ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if model.ir_version <= 0 or not model.opset_import or not model.graph.node:
        raise ModelLoadError(f"{p} does not hold an ONNX graph (no IR version, opset or nodes): truncated, corrupt or not ONNX")
    _check_external_data(model, p)
    try:
        onnx.checker.check_model(str(p), full_check=False)  # by path: resolves external data beside the model
    except onnx.checker.ValidationError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "invalid")
        raise ModelLoadError(f"{p} is not a valid ONNX model: {first}") from e
    if load_external_data and _has_external(model):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(p.parent))
    return model


def _all_tensors(graph: onnx.GraphProto):
    """Every TensorProto stored in a graph: initializers, Constant values, sub-graphs."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for g in a.graphs:
                yield from _all_tensors(g)


def _has_external(model: onnx.ModelProto) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph))


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    base = path.parent.resolve()
    for t in _all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = ExternalDataInfo(t)
        loc = (base / info.location).resolve()
        if base not in loc.parents and loc != base:
            raise ModelLoadError(f"tensor '{t.name}' points at external data outside the model's folder: {info.location}")
        if not loc.is_file():
            raise ModelLoadError(f"external data file '{info.location}' for tensor '{t.name}' not found next to {path.name}")
        need = (info.offset or 0) + (info.length or 0)
        have = loc.stat().st_size
        if need > have:
            raise ModelLoadError(f"external data file '{info.location}' is truncated: tensor '{t.name}' needs bytes up to {need}, file has {have}")


# --------------------------------------------------------------------------- dtypes


def _itemsize(elem_type: int) -> float:
    import onnx

    if elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or elem_type == getattr(onnx.TensorProto, "FLOAT4E2M1", -1):
        return 0.5
    if elem_type == onnx.TensorProto.STRING or elem_type == onnx.TensorProto.UNDEFINED:
        return 0
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def _dtype_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def _tensor_elems(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return int(round(_tensor_elems(t) * _itemsize(t.data_type)))


def _constant_value(node: onnx.NodeProto) -> tuple[list[int], int]:
    """(shape, elem_type) of a Constant node's output."""
    import onnx

    for a in node.attribute:
        if a.name == "value":
            return list(a.t.dims), a.t.data_type
        if a.name == "value_float":
            return [], onnx.TensorProto.FLOAT
        if a.name == "value_floats":
            return [len(a.floats)], onnx.TensorProto.FLOAT
        if a.name == "value_int":
            return [], onnx.TensorProto.INT64
        if a.name == "value_ints":
            return [len(a.ints)], onnx.TensorProto.INT64
        if a.name == "sparse_value":
            return list(a.sparse_tensor.dims), a.sparse_tensor.values.data_type
    return [], 0


# --------------------------------------------------------------------------- shapes


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """``["x=1x3x224x224", "mask=1,128"]`` -> ``{"x": [1,3,224,224], "mask": [1,128]}``."""
    out: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = [int(d) for d in dims.replace(",", "x").split("x")]
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputShapeError(f"bad --input-shape '{spec}'; expected NAME=DIMxDIMx... with positive dims, e.g. x=1x3x224x224") from None
        out[name] = shape
    return out


def fix_input_shapes(model: onnx.ModelProto, given: Mapping[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Make every graph input static, in place: given shapes win, an unknown leading (batch) dim becomes 1.

    Raises :class:`InputShapeError` naming the inputs whose other dims are unknown.
    """
    given = dict(given or {})
    inits = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in inits]
    unknown_names = sorted(set(given) - {i.name for i in real_inputs})
    if unknown_names:
        raise InputShapeError(f"--input-shape names unknown input(s) {unknown_names}; model inputs: {[i.name for i in real_inputs]}")
    shapes: dict[str, list[int]] = {}
    problems: list[str] = []
    for inp in real_inputs:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in given:
            shape = given[inp.name]
            if len(dims) and len(shape) != len(dims):
                raise InputShapeError(f"--input-shape {inp.name} has rank {len(shape)}, the model's input has rank {len(dims)}")
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != shape[i]:
                    raise InputShapeError(f"--input-shape {inp.name} dim {i} is {shape[i]}, the model fixes it to {d.dim_value}")
        else:
            shape = []
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(d.dim_value)
                elif i == 0:
                    shape.append(1)  # batch
                else:
                    shape.append(-1)
            if any(s < 0 for s in shape):
                shown = "x".join("?" if s < 0 else str(s) for s in shape)
                problems.append(f"{inp.name}={shown}")
                continue
        del inp.type.tensor_type.shape.dim[:]
        for s in shape:
            inp.type.tensor_type.shape.dim.add().dim_value = s
        shapes[inp.name] = list(shape)
    if problems:
        example = " ".join(f"--input-shape {p.replace('?', 'N')}" for p in problems)
        raise InputShapeError(f"model input(s) with dynamic dims: {', '.join(problems)}; give them, e.g. {example}")
    return shapes


# --------------------------------------------------------------------------- analysis


#: Ops that only move or relabel data: no arithmetic.
DATA_MOVEMENT = frozenset(
    "Reshape Flatten Squeeze Unsqueeze Identity Dropout Transpose Concat Split Slice Gather GatherElements "
    "GatherND Expand Tile Pad Cast CastLike DepthToSpace SpaceToDepth Shape Size ScatterND ScatterElements "
    "QuantizeLinear DequantizeLinear".split()
)

_NO_PARAM_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Reshape", "Slice", "Pad", "Expand", "Tile", "Resize", "Gather"})


@dataclass
class _Ctx:
    shapes: dict[str, list[int]]
    dtypes: dict[str, int]
    const: set[str]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _macs(node: onnx.NodeProto, ctx: _Ctx) -> int:
    s = ctx.shapes
    ins = [i for i in node.input]
    outs = node.output
    op = node.op_type

    def shp(name: str) -> list[int] | None:
        return s.get(name) if name else None

    out = shp(outs[0]) if outs else None
    if out is None:
        return 0
    out_elems = _prod(out)
    if op in ("Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv"):
        w = shp(ins[3] if op == "QLinearConv" else ins[1])
        return out_elems * _prod(w[1:]) if w else 0
    if op == "ConvTranspose":
        x, w = shp(ins[0]), shp(ins[1])
        return _prod(x) * _prod(w[1:]) if x and w else 0
    if op in ("Gemm", "QGemm"):
        a = shp(ins[0])
        if not a:
            return 0
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return out_elems * k
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "DynamicQuantizeMatMul"):
        a = shp(ins[0])
        return out_elems * a[-1] if a else 0
    if op == "MatMulNBits":
        return (out_elems // max(1, _attr(node, "N", 1))) * _attr(node, "N", 1) * _attr(node, "K", 0)
    if op in ("LSTM", "GRU", "RNN"):
        x, w, r = shp(ins[0]), shp(ins[1]), shp(ins[2])
        if not (x and w and r):
            return 0
        seq, batch = x[0], x[1]
        if _attr(node, "layout", 0):
            batch, seq = x[0], x[1]
        # W: [dirs, gates*hidden, input], R: [dirs, gates*hidden, hidden]
        return seq * batch * (_prod(w) + _prod(r))
    if op == "Einsum":
        eq = _attr(node, "equation", b"")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        lhs = eq.replace(" ", "").split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for term, name in zip(lhs, ins):
            sh = shp(name)
            if sh is None or "." in term:
                return 0
            for c, d in zip(term, sh):
                sizes[c] = max(sizes.get(c, 1), d)
        return _prod(sizes.values())
    if op == "Attention":  # com.microsoft packed attention: QKV projection + scores
        x, w = shp(ins[0]), shp(ins[1])
        if not (x and w):
            return 0
        b, sq, _ = x
        return b * sq * _prod(w) + 2 * b * sq * sq * w[1] // 3
    return 0


def _flops(node: onnx.NodeProto, macs: int, in_elems: int, out_elems: int) -> int:
    op = node.op_type
    if op in DATA_MOVEMENT:
        return 0
    if op in ("MaxPool", "AveragePool", "LpPool"):
        k = _attr(node, "kernel_shape", [1])
        return out_elems * _prod(k)
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ArgMax", "ArgMin"):
        return in_elems
    if op in ("Softmax", "LogSoftmax"):
        return 5 * in_elems
    if op in ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"):
        return 5 * out_elems
    if op in ("Resize", "Upsample"):
        return 4 * out_elems
    if op in ("Erf", "Gelu", "FastGelu", "Tanh", "Sigmoid", "Exp", "Log", "Pow", "Sqrt", "HardSwish", "HardSigmoid", "Elu", "Selu", "Softplus", "Mish"):
        return 4 * out_elems
    if macs:
        return out_elems if op in ("Conv", "Gemm", "ConvTranspose") else 0  # bias add
    return out_elems


def _simple_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """Scalar, string and number-list attributes (tensors and graphs left out)."""
    import onnx

    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS):
            v = onnx.helper.get_attribute_value(a)
            out[a.name] = list(v) if isinstance(v, (list, tuple)) else v
        elif a.type == onnx.AttributeProto.STRING:
            out[a.name] = a.s.decode(errors="replace")
    return out


def fold_constants(model: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> set[str]:
    """Names of tensors whose value does not depend on the graph inputs."""
    const = {i.name for i in model.graph.initializer}
    const.add("")
    for node in model.graph.node:
        if node.op_type == "Constant":
            const.update(node.output)
        elif node.op_type in ("Shape", "Size") and node.input[0] in shapes and all(d > 0 for d in shapes[node.input[0]]):
            const.update(node.output)
        elif node.input and all(i in const for i in node.input) and not node.op_type.startswith("Random"):
            const.update(node.output)
    const.discard("")
    return const


def _infer_shapes(model: onnx.ModelProto) -> tuple[dict[str, list[int]], dict[str, int]]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = model
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        if tt.elem_type:
            dtypes[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
            if all(d > 0 for d in dims) or vi.name not in shapes:
                shapes[vi.name] = dims
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
        dtypes[t.name] = t.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            shp, dt = _constant_value(node)
            shapes[node.output[0]] = shp
            dtypes[node.output[0]] = dt
    return shapes, dtypes


def expose_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the intermediate tensors ``names``."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.add().name = n
    return m


def _shapes_by_running(path: Path, model: onnx.ModelProto, names: list[str], input_shapes: Mapping[str, list[int]],
                       dtypes: Mapping[str, int]) -> dict[str, list[int]]:
    """Last resort for shapes that inference cannot derive: run the model once in onnxruntime."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
    except ImportError:
        return {}
    m = expose_outputs(model, names)
    try:
        if _has_external(m):
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(m, str(path.parent))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {}
        rng = np.random.default_rng(0)
        for i in sess.get_inputs():
            np_dt = onnx.helper.tensor_dtype_to_np_dtype(dtypes.get(i.name, onnx.TensorProto.FLOAT))
            shape = input_shapes[i.name]
            feeds[i.name] = (rng.random(shape) if np_dt.kind == "f" else np.zeros(shape)).astype(np_dt)
        res = sess.run(names, feeds)
        return {n: list(r.shape) for n, r in zip(names, res)}
    except Exception:
        return {}


def analyze(path: str | Path, input_shapes: Mapping[str, list[int]] | None = None,
            model: onnx.ModelProto | None = None) -> ModelAnalysis:
    """Analyse an ONNX model file (``model`` may pass the already-loaded proto of ``path``)."""
    import onnx

    p = Path(path)
    model = load_model(p) if model is None else model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    fixed = fix_input_shapes(work, input_shapes)
    shapes, dtypes = _infer_shapes(work)
    shapes.update(fixed)
    const = fold_constants(work, shapes)
    ctx = _Ctx(shapes, dtypes, const)
    notes: list[str] = []

    # roots: the stored tensors each constant depends on
    init_bytes = {t.name: _tensor_bytes(t) for t in work.graph.initializer}
    roots: dict[str, frozenset[str]] = {n: frozenset([n]) for n in init_bytes}
    for node in work.graph.node:
        if node.op_type == "Constant":
            shp, dt = _constant_value(node)
            init_bytes[node.output[0]] = int(round(_prod(shp) * _itemsize(dt)))
            roots[node.output[0]] = frozenset([node.output[0]])
        elif node.output and node.output[0] in const:
            r = frozenset().union(*(roots.get(i, frozenset()) for i in node.input if i))
            for o in node.output:
                roots[o] = r

    layer_nodes = [n for n in work.graph.node if not (n.output and all(o in const for o in n.output if o))]
    missing = sorted({o for n in layer_nodes for o in n.output if o and (o not in shapes or any(d < 0 for d in shapes[o]))})
    if missing:
        shapes.update(_shapes_by_running(p, work, missing, fixed, dtypes))
        still = [o for o in missing if o not in shapes or any(d < 0 for d in shapes[o])]
        if still:
            notes.append(f"{len(still)} tensor(s) have no static shape (e.g. {still[0]}); their sizes count as 0")

    seen_roots: set[str] = set()
    layers: list[LayerInfo] = []
    first_use: dict[str, int] = {}
    last_use: dict[str, int] = {}
    graph_inputs = [i.name for i in work.graph.input if i.name not in const]
    for g in graph_inputs:
        first_use[g] = -1
    for step, node in enumerate(layer_nodes):
        w_inputs = [i for i in node.input if i and i in const]
        act_inputs = [i for i in node.input if i and i not in const]
        params = 0
        if node.op_type not in _NO_PARAM_OPS:
            for i in w_inputs:
                dt = dtypes.get(i, 0)
                if dt in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                          onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                          onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                    shp = shapes.get(i, [])
                    if shp and _prod(shp) > 1:  # scalars (hard-swish's 3 and 6, eps) are not parameters
                        params += _prod(shp)
        wb = 0
        for i in w_inputs:
            for r in roots.get(i, ()):
                if r not in seen_roots:
                    seen_roots.add(r)
                    wb += init_bytes.get(r, 0)
        for sub in (a for a in node.attribute if a.HasField("g") or a.graphs):
            for g in ([sub.g] if sub.HasField("g") else list(sub.graphs)):
                wb += sum(_tensor_bytes(t) for t in _all_tensors(g))
                notes.append(f"{node.op_type} '{node.name}' has a sub-graph; it is analysed as one layer")
        in_elems = sum(_prod(shapes.get(i, [0])) for i in act_inputs)
        outs = [o for o in node.output if o]
        out_shapes = [shapes.get(o, []) for o in outs]
        out_elems = sum(_prod(s) if s and all(d > 0 for d in s) else 0 for s in out_shapes)
        macs = _macs(node, ctx)
        for i in act_inputs:
            last_use[i] = step
        for o in outs:
            first_use[o] = step
        is_weighted = params > 0 and node.op_type in QUANTIZABLE_OPS
        layers.append(LayerInfo(
            name=node.name or f"{node.op_type}_{step}", op_type=node.op_type, domain=node.domain,
            inputs=list(node.input), outputs=outs, weights=w_inputs, weight_shapes=[shapes.get(i, []) for i in w_inputs],
            attributes=_simple_attributes(node), params=params, weight_bytes=wb,
            macs=macs, flops=_flops(node, macs, in_elems, out_elems), input_elems=in_elems, output_elems=out_elems,
            output_shapes=out_shapes, quantizable=is_weighted,
        ))
    names = [ly.name for ly in layers]
    if len(set(names)) != len(names):
        notes.append("some nodes share a name; layers are listed under their first name")

    outputs = [o.name for o in work.graph.output]
    tensors: list[TensorInfo] = []
    for name, first in sorted(first_use.items(), key=lambda kv: kv[1]):
        shp = shapes.get(name, [])
        elems = _prod(shp) if shp and all(d > 0 for d in shp) else 0
        last = len(layers) if name in outputs else last_use.get(name, first)
        tensors.append(TensorInfo(name=name, shape=shp, dtype=_dtype_name(dtypes.get(name, 0)), elems=elems,
                                  first=first, last=max(last, first)))

    unused = set(init_bytes) - {r for ly in layers for i in ly.weights for r in roots.get(i, ())}
    unused_bytes = sum(init_bytes[u] for u in unused)
    if unused_bytes:
        notes.append(f"{len(unused)} constant(s) ({unused_bytes} bytes) are not used by any layer (shape computations or dead weights)")
    n_constant_nodes = sum(1 for n in work.graph.node if n.op_type == "Constant")
    if n_constant_nodes:
        notes.append(f"{n_constant_nodes} weights/constants are Constant nodes, not initializers")
    if _has_external(work):
        notes.append("weights are stored as external data")
    opset = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelAnalysis(
        path=str(p), sha256=sha256_file(p), opset=opset,
        producer=f"{work.producer_name} {work.producer_version}".strip(),
        inputs={n: shapes.get(n, []) for n in graph_inputs},
        outputs={n: shapes.get(n, []) for n in outputs},
        layers=layers, tensors=tensors,
        total_params=sum(ly.params for ly in layers),
        total_weight_bytes=sum(ly.weight_bytes for ly in layers),
        total_macs=sum(ly.macs for ly in layers), total_flops=sum(ly.flops for ly in layers),
        file_bytes=p.stat().st_size + _external_bytes(work, p), notes=notes,
    )


def _external_bytes(model: onnx.ModelProto, path: Path) -> int:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    files = {ExternalDataInfo(t).location for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL}
    return sum((path.parent / f).stat().st_size for f in files)


#: Ops whose constant inputs are weights a quantizer or pruner changes.
QUANTIZABLE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "Einsum", "Attention"})


# --------------------------------------------------------------------------- memory planning


@dataclass(frozen=True)
class ArenaPlan:
    """Where each activation tensor lives in one arena."""

    peak_live_bytes: int  # lower bound: the most bytes alive at one step
    arena_bytes: int  # what the greedy planner needs (>= peak_live_bytes)
    offsets: dict[str, int]
    sizes: dict[str, int]
    peak_step: int


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def plan_arena(tensors: list[TensorInfo], nbytes: Callable[[TensorInfo], int], *, alignment: int = 16) -> ArenaPlan:
    """Greedy-by-size arena planning, as TFLite Micro's GreedyMemoryPlanner does.

    Buffers are placed largest first, each at the lowest aligned offset where it
    overlaps no placed buffer whose lifetime [first, last] intersects its own.
    """
    bufs = [t for t in tensors if t.elems > 0]
    sizes = {t.name: _align(max(0, int(nbytes(t))), alignment) for t in bufs}
    life = {t.name: (max(t.first, 0), t.last) for t in bufs}
    steps = max((b for _, b in life.values()), default=0) + 1
    live = [0] * steps
    for name, (a, b) in life.items():
        for s in range(a, b + 1):
            live[s] += sizes[name]
    peak_step = max(range(steps), key=lambda s: live[s]) if steps else 0
    order = sorted(bufs, key=lambda t: (-sizes[t.name], life[t.name][0], t.name))
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first, last
    offsets: dict[str, int] = {}
    for t in order:
        size = sizes[t.name]
        a, b = life[t.name]
        clashes = sorted((o, e) for o, e, fa, fb in placed if not (fb < a or b < fa))
        offset = 0
        for o, e in clashes:
            if offset + size <= o:
                break
            offset = max(offset, _align(e, alignment))
        offsets[t.name] = offset
        placed.append((offset, offset + size, a, b))
    arena = max((e for _, e, _, _ in placed), default=0)
    return ArenaPlan(peak_live_bytes=max(live, default=0), arena_bytes=arena, offsets=offsets, sizes=sizes, peak_step=peak_step)


def model_size_on_disk(path: str | Path) -> int:
    return os.path.getsize(path)
