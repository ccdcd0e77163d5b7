"""ONNX <-> MIL for the Core ML backend (imports coremltools; load it lazily).

* :func:`to_mil` walks a cleaned, static-shape ONNX graph and builds a MIL
  program with coremltools' builder (``mb.*``), NCHW as in ONNX.  Every ONNX
  node becomes one MIL op named after it (plus helper ops ``<name>__<k>``), so
  per-layer compression configs and fp32 islands address ops by ONNX node name.
  The MIL shape inference is checked against ONNX's, node by node.
* :func:`to_onnx` goes the other way on a *saved* program (after coremltools'
  graph passes, fp16 casts and weight compression): ``constexpr_*`` weights are
  decompressed with their own ``materialized_val_inference`` and fp16 tensors are
  rounded to fp16 after every op, so onnxruntime computes what the Core ML model
  computes, modulo fp16 arithmetic inside the ops.  This is how the package is
  checked where Core ML cannot run (off macOS).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EdgeoptError, InputShapeError, InternalError, UnsupportedOpError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

#: coremltools graph passes that rewrite or merge weight-carrying ops (conv+scale/bias/batchnorm
#: fusion, division -> multiplication, const dedup): dropped so every weight keeps its ONNX layer's
#: op name (what compression configs and fp32 islands address) and its value.  Our cleanup already
#: folds BatchNormalization and biases on the ONNX side.
SKIPPED_PASSES = (
    "common::divide_to_multiply", "common::fuse_matmul_weight_bias", "common::fuse_linear_bias",
    "common::fuse_conv_scale", "common::fuse_conv_bias", "common::fuse_conv_batchnorm",
    "common::fuse_elementwise_to_batchnorm", "common::const_deduplication", "common::fuse_transpose_matmul",
    "common::fuse_layernorm_or_instancenorm", "common::fuse_onehot_matmul_to_gather", "common::fuse_pad_conv",
    "common::fuse_prelu", "common::prelu_to_lrelu",
)

_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def sanitize(name: str) -> str:
    s = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return s if s and not s[0].isdigit() else f"_{s}"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    import onnx

    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


# --------------------------------------------------------------------------- ONNX side preparation


def static_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Input name -> fully static shape: ``shapes`` (e.g. a plan's) over the model's own dims;
    a non-positive batch dimension becomes 1, any other unknown dimension is an error."""
    out: dict[str, list[int]] = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = list(shapes.get(vi.name) or [d.dim_value if d.HasField("dim_value") else -1
                                           for d in vi.type.tensor_type.shape.dim])
        if dims and dims[0] <= 0:
            dims[0] = 1
        if any(d <= 0 for d in dims):
            raise InputShapeError(f"Core ML input {vi.name} needs a static shape, got {dims}: "
                                  "set the plan's input_shapes (e.g. [1, 3, 48, 192])")
        out[vi.name] = [int(d) for d in dims]
    return out


def prepare(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy with static input shapes, constants folded (static ``Shape`` included),
    BatchNormalization fused and Identity/Dropout removed, every node named."""
    import onnx

    from ..passes.cleanup import normalize

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inputs = static_shapes(m, shapes)
    for vi in m.graph.input:
        if vi.name in inputs:
            t = vi.type.tensor_type
            t.shape.Clear()
            for d in inputs[vi.name]:
                t.shape.dim.add().dim_value = d
    for vi in m.graph.output:  # let inference fill the (now static) output shapes
        vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    normalize(m)
    try:
        return onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # no ONNX shapes to check MIL's against; translation still works
        return m


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out = {}
    for vi in [*model.graph.value_info, *model.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    return out


# --------------------------------------------------------------------------- ONNX -> MIL


@dataclass
class Translation:
    program: Any
    inputs: dict[str, str]  # ONNX input name -> MIL input name
    outputs: dict[str, str]  # ONNX output name -> MIL output name
    layers: dict[str, list[str]] = field(default_factory=dict)  # ONNX node name -> MIL op names (first: main op)
    weights: dict[str, str] = field(default_factory=dict)  # MIL op name -> param holding its weight
    input_types: dict[str, str] = field(default_factory=dict)  # ONNX input name -> FLOAT32 or INT32 (Core ML's)


class _Translator:
    def __init__(self, model: onnx.ModelProto):
        import onnx

        self.model = model
        self.opset = _opset(model)
        self.consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        self.env: dict[str, Any] = {}
        self.shapes = _inferred_shapes(model)
        self.used: set[str] = set()
        self.layers: dict[str, list[str]] = {}
        self.weights: dict[str, str] = {}
        self.outputs = {o.name: sanitize(o.name) for o in model.graph.output}
        self.used.update(self.outputs.values())
        self._node_ops: list[str] = []
        self._base = ""
        self._k = 0

    # names
    def _unique(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def name(self, main: bool = False) -> str:
        """The next MIL op name of the current node: its own (sanitized) name first, then ``__k`` helpers."""
        if main and not any(n == self._base for n in self._node_ops):
            n = self._base
        else:
            self._k += 1
            n = self._unique(f"{self._base}__{self._k}")
        self._node_ops.append(n)
        return n

    # operands
    def value(self, name: str):
        if not name:
            return None
        if name in self.env:
            return self.env[name]
        if name in self.consts:
            return self.consts[name]
        raise InternalError(f"tensor {name} is neither computed nor constant")

    def const(self, name: str, what: str) -> np.ndarray:
        v = self.value(name)
        if not isinstance(v, np.ndarray):
            raise UnsupportedOpError(f"{self.node.name}: {self.node.op_type} needs a constant {what} for Core ML")
        return v

    def scalar(self, name: str, what: str) -> float:
        v = self.const(name, what)
        if v.size != 1:
            raise UnsupportedOpError(f"{self.node.name}: {self.node.op_type} {what} must be a scalar, got shape {list(v.shape)}")
        return float(v.reshape(-1)[0])

    @staticmethod
    def f32(v):
        return v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v

    def translate(self, shapes: dict[str, list[int]]) -> Translation:
        from .._quiet import import_quietly

        import_quietly("coremltools")  # its version notices on first import
        import coremltools as ct
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import Function, Program
        from coremltools.converters.mil.mil import types as mtypes

        scalar = next((n for n, s in shapes.items() if len(s) == 0), None)
        if scalar is not None:
            raise UnsupportedOpError(f"coreml: input '{scalar}' is a scalar (rank 0); Core ML model inputs have rank >= 1 "
                                     "(export it as a [1] tensor)")
        inputs = {name: sanitize(name) for name in shapes}
        self.used.update(inputs.values())
        elem = {vi.name: vi.type.tensor_type.elem_type for vi in self.model.graph.input}
        # integer (and bool) inputs, e.g. token ids: Core ML's int32 arrays; everything else fp32
        types = {n: "INT32" if elem.get(n) in _INT_TYPES else "FLOAT32" for n in shapes}
        specs = {inputs[n]: mb.TensorSpec(shape=tuple(s), dtype=mtypes.int32 if types[n] == "INT32" else mtypes.fp32)
                 for n, s in shapes.items()}
        with Function(specs, opset_version=ct.target.iOS17) as func:
            for onnx_name, mil_name in inputs.items():
                self.env[onnx_name] = func.inputs[mil_name]
                if elem.get(onnx_name) == 9:  # bool
                    self.env[onnx_name] = mb.cast(x=func.inputs[mil_name], dtype="bool", name=self._unique(f"{mil_name}__bool"))
            for node in self.model.graph.node:
                self._emit(node)
            outs = []
            for o in self.model.graph.output:
                v = self.value(o.name)
                if hasattr(v, "op") and not mtypes.is_float(v.dtype):  # Core ML outputs here are fp32 arrays
                    v = mb.cast(x=v, dtype="fp32", name=self.outputs[o.name])
                if not hasattr(v, "op") or v.name != self.outputs[o.name]:
                    v = mb.identity(x=v, name=self.outputs[o.name])
                outs.append(v)
            func.set_outputs(outs)
        prog = Program()
        prog.add_function("main", func)
        return Translation(prog, inputs, self.outputs, self.layers, self.weights, types)

    def _emit(self, node: onnx.NodeProto) -> None:
        handler = _HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if handler is None:
            dom = f"{node.domain}." if node.domain else ""
            raise UnsupportedOpError(f"node {node.name}: op {dom}{node.op_type} has no Core ML (MIL) translation")
        self.node = node
        self._base = self._unique(sanitize(node.name))
        self._k, self._node_ops = 0, []
        attrs = _attrs(node)
        why = refusal(node.op_type, attrs)
        if why:
            raise UnsupportedOpError(f"node {node.name}: {node.op_type} {why} for Core ML")
        try:
            res = handler(self, node, attrs, [self.value(i) for i in node.input])
        except (EdgeoptError, InternalError):
            raise
        except Exception as e:  # a MIL type/shape error: name the node
            raise UnsupportedOpError(f"node {node.name} ({node.op_type}) failed to translate to MIL: {e}") from e
        res = res if isinstance(res, (list, tuple)) else [res]
        for name, var in zip(node.output, res):
            if name:
                self.env[name] = var
                want = self.shapes.get(name)
                got = tuple(getattr(var, "shape", np.shape(var)))
                if want is not None and tuple(want) != got:
                    raise InternalError(f"node {node.name} ({node.op_type}): MIL infers shape {list(got)} for {name}, "
                                        f"ONNX {list(want)} (translation bug)")
        self.layers[node.name] = self._node_ops or []


# each handler: (translator, node, attrs, input values) -> output var(s)
_HANDLERS: dict[str, Callable] = {}


def _h(*ops: str):
    def deco(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return deco


def _mb():
    from coremltools.converters.mil import Builder as mb

    return mb


def _spatial_pads(t: _Translator, a: dict, x_shape, kernel, strides, dilations) -> list[int]:
    """MIL ``custom`` pads [b0, e0, b1, e1, ...] for ONNX pads / auto_pad on static shapes."""
    nd = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(nd):
            d_in = x_shape[2 + i]
            out = -(-d_in // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - d_in)
            small, big = total // 2, total - total // 2
            pads += [small, big] if auto == "SAME_UPPER" else [big, small]
        return pads
    if auto == "VALID":
        return [0] * (2 * nd)
    p = list(a.get("pads", [0] * (2 * nd)))
    return [v for i in range(nd) for v in (p[i], p[i + nd])]


@_h("Conv")
def _conv(t, node, a, ins):
    mb = _mb()
    x, w = ins[0], t.const(node.input[1], "weight")
    b = ins[2] if len(ins) > 2 else None
    kernel = list(w.shape[2:])
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    pad = _spatial_pads(t, a, x.shape, kernel, strides, dil)
    kw = dict(x=x, weight=t.f32(w), strides=strides, pad_type="custom", pad=pad, dilations=dil,
              groups=int(a.get("group", 1)))
    if b is not None:
        kw["bias"] = t.f32(t.const(node.input[2], "bias"))
    name = t.name(main=True)
    t.weights[name] = "weight"
    return mb.conv(**kw, name=name)


@_h("ConvTranspose")
def _conv_transpose(t, node, a, ins):
    mb = _mb()
    x, w = ins[0], t.const(node.input[1], "weight")
    kernel = list(w.shape[2:])
    nd = len(kernel)
    if a.get("auto_pad", "NOTSET") != "NOTSET":
        raise UnsupportedOpError(f"{node.name}: ConvTranspose with auto_pad is not translated to Core ML")
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    p = list(a.get("pads", [0] * (2 * nd)))
    kw = dict(x=x, weight=t.f32(w), strides=strides, pad_type="custom", pad=[v for i in range(nd) for v in (p[i], p[i + nd])],
              dilations=dil, groups=int(a.get("group", 1)))
    out_shape = t.shapes.get(node.output[0])
    if out_shape is not None:
        kw["output_shape"] = list(out_shape)
    if len(ins) > 2 and ins[2] is not None:
        kw["bias"] = t.f32(t.const(node.input[2], "bias"))
    name = t.name(main=True)
    t.weights[name] = "weight"
    return mb.conv_transpose(**kw, name=name)


def _linear(t, x, w_nk: np.ndarray, bias: np.ndarray | None):
    mb = _mb()
    name = t.name(main=True)
    t.weights[name] = "weight"
    kw = {"bias": t.f32(bias)} if bias is not None else {}
    return mb.linear(x=x, weight=t.f32(w_nk), name=name, **kw)


@_h("Gemm")
def _gemm(t, node, a, ins):
    mb = _mb()
    x, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if a.get("transA", 0):
        x = mb.transpose(x=x, perm=[1, 0], name=t.name()) if not isinstance(x, np.ndarray) else x.T
    if isinstance(b, np.ndarray) and not isinstance(x, np.ndarray):
        w = b if a.get("transB", 0) else b.T
        n = w.shape[0]
        if alpha == 1.0 and (c is None or (isinstance(c, np.ndarray) and c.size in (1, n) and c.ndim <= 2)):
            bias = None if c is None else np.broadcast_to(beta * c.reshape(-1).astype(np.float32), (n,)).copy()
            return _linear(t, x, w, bias)
        y = _linear(t, x, w, None)
    else:
        y = mb.matmul(x=t.f32(x), y=t.f32(b), transpose_y=bool(a.get("transB", 0)), name=t.name(main=True))
    if alpha != 1.0:
        y = mb.mul(x=y, y=np.float32(alpha), name=t.name())
    if c is not None:
        y = mb.add(x=y, y=t.f32(c * beta) if isinstance(c, np.ndarray) else mb.mul(x=c, y=np.float32(beta), name=t.name()),
                   name=t.name())
    return y


@_h("MatMul")
def _matmul(t, node, a, ins):
    mb = _mb()
    x, y = ins
    if isinstance(y, np.ndarray) and y.ndim == 2 and not isinstance(x, np.ndarray) and x.rank >= 1:
        return _linear(t, x, y.T, None)
    name = t.name(main=True)
    if isinstance(y, np.ndarray) or isinstance(x, np.ndarray):
        t.weights[name] = "y" if isinstance(y, np.ndarray) else "x"
    return mb.matmul(x=t.f32(x), y=t.f32(y), name=name)


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "real_div", "Pow": "pow", "Max": "maximum", "Min": "minimum"}


@_h(*_BINARY)
def _binary(t, node, a, ins):
    mb = _mb()
    fn = getattr(mb, _BINARY[node.op_type])
    vals = [t.f32(v) for v in ins if v is not None]
    if all(isinstance(v, np.ndarray) for v in vals):
        raise InternalError(f"{node.name}: all inputs are constant (constant folding should have removed it)")
    y = vals[0]
    for i, v in enumerate(vals[1:]):
        y = fn(x=y, y=v, name=t.name(main=(i == len(vals) - 2)))
    return y


_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Abs": "abs",
          "Erf": "erf", "Floor": "floor", "Ceil": "ceil", "Sin": "sin", "Cos": "cos", "Softplus": "softplus",
          "Softsign": "softsign", "Sign": "sign", "Atan": "atan", "Identity": "identity", "Dropout": "identity",
          "Round": "round"}  # MIL round: half to even, as ONNX


@_h(*_UNARY)
def _unary(t, node, a, ins):
    return getattr(_mb(), _UNARY[node.op_type])(x=ins[0], name=t.name(main=True))


@_h("Neg")
def _neg(t, node, a, ins):
    return _mb().mul(x=ins[0], y=np.float32(-1), name=t.name(main=True))


@_h("Reciprocal")
def _reciprocal(t, node, a, ins):
    return _mb().real_div(x=np.float32(1), y=ins[0], name=t.name(main=True))


#: ONNX integer/bool element types -> MIL dtype (MIL computes integers in int32)
_INT_TYPES = {9: "bool", 6: "int32", 7: "int32", 12: "int32", 13: "int32", 2: "int32", 3: "int32", 4: "int32", 5: "int32"}


@_h("Cast")
def _cast(t, node, a, ins):
    to = int(a["to"])
    x = ins[0]
    if to in _FLOAT_TYPES:
        if _is_float_var(x):
            return _mb().identity(x=x, name=t.name(main=True))
        return _mb().cast(x=x, dtype="fp32", name=t.name(main=True))
    if to not in _INT_TYPES:
        raise UnsupportedOpError(f"node {node.name}: Cast to type {to} is not translated to Core ML")
    return _mb().cast(x=x, dtype=_INT_TYPES[to], name=t.name(main=True))


@_h("Clip")
def _clip(t, node, a, ins):
    mb = _mb()
    if t.opset >= 11:
        lo = t.scalar(node.input[1], "min") if len(node.input) > 1 and node.input[1] else None
        hi = t.scalar(node.input[2], "max") if len(node.input) > 2 and node.input[2] else None
    else:
        lo, hi = a.get("min"), a.get("max")
    x = ins[0]
    if lo == 0.0 and hi == 6.0:
        return mb.relu6(x=x, name=t.name(main=True))
    if lo == 0.0 and hi is None:
        return mb.relu(x=x, name=t.name(main=True))
    if lo is not None and hi is not None:
        return mb.clip(x=x, alpha=np.float32(lo), beta=np.float32(hi), name=t.name(main=True))
    if lo is not None:
        x = mb.maximum(x=x, y=np.float32(lo), name=t.name(main=True))
    if hi is not None:
        x = mb.minimum(x=x, y=np.float32(hi), name=t.name(main=True))
    return x


@_h("HardSigmoid")
def _hard_sigmoid(t, node, a, ins):
    return _mb().sigmoid_hard(x=ins[0], alpha=np.float32(a.get("alpha", 0.2)), beta=np.float32(a.get("beta", 0.5)),
                              name=t.name(main=True))


@_h("HardSwish")
def _hard_swish(t, node, a, ins):
    mb = _mb()
    s = mb.sigmoid_hard(x=ins[0], alpha=np.float32(1 / 6), beta=np.float32(0.5), name=t.name())
    return mb.mul(x=ins[0], y=s, name=t.name(main=True))


@_h("LeakyRelu")
def _leaky_relu(t, node, a, ins):
    return _mb().leaky_relu(x=ins[0], alpha=np.float32(a.get("alpha", 0.01)), name=t.name(main=True))


@_h("Elu")
def _elu(t, node, a, ins):
    return _mb().elu(x=ins[0], alpha=np.float32(a.get("alpha", 1.0)), name=t.name(main=True))


@_h("PRelu")
def _prelu(t, node, a, ins):
    mb = _mb()
    x, slope = ins[0], t.f32(t.const(node.input[1], "slope"))
    pos = mb.relu(x=x, name=t.name())
    neg = mb.minimum(x=x, y=np.float32(0), name=t.name())
    return mb.add(x=pos, y=mb.mul(x=neg, y=slope, name=t.name(main=True)), name=t.name())


def _pool_args(t, a, x):
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = list(a.get("strides", [1] * nd))
    if any(d != 1 for d in a.get("dilations", [1] * nd)):
        raise UnsupportedOpError(f"node {t.node.name}: dilated pooling is not translated to Core ML")
    pad = _spatial_pads(t, a, x.shape, kernel, strides, [1] * nd)
    return dict(x=x, kernel_sizes=kernel, strides=strides, pad_type="custom", pad=pad, ceil_mode=bool(a.get("ceil_mode", 0)))


@_h("MaxPool")
def _max_pool(t, node, a, ins):
    if len(node.output) > 1 and node.output[1]:
        raise UnsupportedOpError(f"node {node.name}: MaxPool indices output is not translated to Core ML")
    return _mb().max_pool(**_pool_args(t, a, ins[0]), name=t.name(main=True))


@_h("AveragePool")
def _avg_pool(t, node, a, ins):
    return _mb().avg_pool(**_pool_args(t, a, ins[0]), exclude_padding_from_average=not a.get("count_include_pad", 0),
                          name=t.name(main=True))


@_h("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(t, node, a, ins):
    mb = _mb()
    fn = mb.reduce_mean if node.op_type == "GlobalAveragePool" else mb.reduce_max
    return fn(x=ins[0], axes=list(range(2, ins[0].rank)), keep_dims=True, name=t.name(main=True))


_REDUCE = {"ReduceMean": "reduce_mean", "ReduceMax": "reduce_max", "ReduceMin": "reduce_min", "ReduceSum": "reduce_sum",
           "ReduceProd": "reduce_prod", "ReduceL2": "reduce_l2_norm", "ReduceLogSumExp": "reduce_log_sum_exp",
           "ReduceL1": "reduce_l1_norm", "ReduceSumSquare": "reduce_sum_square", "ReduceLogSum": "reduce_log_sum"}


@_h(*_REDUCE)
def _reduce(t, node, a, ins):
    mb = _mb()
    x = ins[0]
    axes_in_input = t.opset >= 18 or (node.op_type == "ReduceSum" and t.opset >= 13)
    if axes_in_input:
        axes = t.const(node.input[1], "axes").tolist() if len(node.input) > 1 and node.input[1] else None
    else:
        axes = a.get("axes")
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return mb.identity(x=x, name=t.name(main=True))
        axes = list(range(x.rank))
    return getattr(mb, _REDUCE[node.op_type])(x=x, axes=[int(v) for v in axes], keep_dims=bool(a.get("keepdims", 1)),
                                              name=t.name(main=True))


@_h("Flatten")
def _flatten(t, node, a, ins):
    x = ins[0]
    axis = int(a.get("axis", 1))
    axis = axis + x.rank if axis < 0 else axis
    s = list(x.shape)
    return _mb().reshape(x=x, shape=[int(np.prod(s[:axis])), int(np.prod(s[axis:]))], name=t.name(main=True))


@_h("Reshape")
def _reshape(t, node, a, ins):
    x = ins[0]
    target = [int(v) for v in t.const(node.input[1], "shape")]
    if not a.get("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    if -1 in target:
        known = int(np.prod([v for v in target if v != -1]))
        target[target.index(-1)] = int(np.prod(x.shape)) // max(known, 1)
    return _mb().reshape(x=x, shape=target, name=t.name(main=True))


@_h("Transpose")
def _transpose(t, node, a, ins):
    x = ins[0]
    perm = list(a.get("perm", list(range(x.rank))[::-1]))
    return _mb().transpose(x=x, perm=perm, name=t.name(main=True))


@_h("Concat")
def _concat(t, node, a, ins):
    mb = _mb()
    vals = [mb.const(val=t.f32(v), name=t.name()) if isinstance(v, np.ndarray) else v for v in ins]
    return mb.concat(values=vals, axis=int(a["axis"]), name=t.name(main=True))


def _softmax_like(t, node, a, x, log: bool):
    mb = _mb()
    rank = x.rank
    axis = int(a.get("axis", -1 if t.opset >= 13 else 1)) % rank

    def core(v, ax, main_name):
        if log:
            lse = mb.reduce_log_sum_exp(x=v, axes=[ax], keep_dims=True, name=t.name())
            return mb.sub(x=v, y=lse, name=main_name)
        return mb.softmax(x=v, axis=ax, name=main_name)

    if t.opset >= 13 or axis == rank - 1:
        return core(x, axis, t.name(main=True))
    s = list(x.shape)  # opset < 13: softmax over the flattened trailing dims
    flat = mb.reshape(x=x, shape=[int(np.prod(s[:axis])), int(np.prod(s[axis:]))], name=t.name())
    y = core(flat, 1, t.name(main=True))
    return mb.reshape(x=y, shape=s, name=t.name())


@_h("Softmax")
def _softmax(t, node, a, ins):
    return _softmax_like(t, node, a, ins[0], log=False)


@_h("LogSoftmax")
def _log_softmax(t, node, a, ins):
    return _softmax_like(t, node, a, ins[0], log=True)


def _axes(t, node, a) -> list[int] | None:
    if t.opset >= 13:
        return t.const(node.input[1], "axes").astype(int).tolist() if len(node.input) > 1 and node.input[1] else None
    return list(a["axes"]) if "axes" in a else None


@_h("Squeeze")
def _squeeze(t, node, a, ins):
    x = ins[0]
    axes = _axes(t, node, a)
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    return _mb().squeeze(x=x, axes=axes, name=t.name(main=True))


@_h("Unsqueeze")
def _unsqueeze(t, node, a, ins):
    return _mb().expand_dims(x=ins[0], axes=_axes(t, node, a), name=t.name(main=True))


@_h("BatchNormalization")
def _batch_norm(t, node, a, ins):
    scale, bias, mean, var = (t.f32(t.const(n, "parameter")) for n in node.input[1:5])
    return _mb().batch_norm(x=ins[0], mean=mean, variance=var, gamma=scale, beta=bias,
                            epsilon=np.float32(a.get("epsilon", 1e-5)), name=t.name(main=True))


@_h("InstanceNormalization")
def _instance_norm(t, node, a, ins):
    scale, bias = (t.f32(t.const(n, "parameter")) for n in node.input[1:3])
    return _mb().instance_norm(x=ins[0], gamma=scale, beta=bias, epsilon=np.float32(a.get("epsilon", 1e-5)),
                               name=t.name(main=True))


@_h("LayerNormalization")
def _layer_norm(t, node, a, ins):
    x = ins[0]
    axis = int(a.get("axis", -1)) % x.rank
    axes = list(range(axis, x.rank))
    norm_shape = tuple(x.shape[axis:])
    gamma = np.broadcast_to(t.f32(t.const(node.input[1], "scale")), norm_shape).copy()
    beta = (np.broadcast_to(t.f32(t.const(node.input[2], "bias")), norm_shape).copy()
            if len(node.input) > 2 and node.input[2] else np.zeros(norm_shape, np.float32))
    if len(node.output) > 1 and any(node.output[1:]):
        raise UnsupportedOpError(f"node {node.name}: LayerNormalization mean/inv_std outputs are not translated")
    return _mb().layer_norm(x=x, axes=axes, gamma=gamma, beta=beta, epsilon=np.float32(a.get("epsilon", 1e-5)),
                            name=t.name(main=True))


@_h("Pad")
def _pad(t, node, a, ins):
    x = ins[0]
    if t.opset >= 11:
        pads = t.const(node.input[1], "pads").astype(int).tolist()
        value = t.scalar(node.input[2], "constant_value") if len(node.input) > 2 and node.input[2] else 0.0
        if len(node.input) > 3 and node.input[3]:
            raise UnsupportedOpError(f"node {node.name}: Pad with axes is not translated to Core ML")
    else:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
    r = x.rank
    if any(p < 0 for p in pads):
        raise UnsupportedOpError(f"node {node.name}: negative pads are not translated to Core ML")
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(a.get("mode", "constant"))
    if mode is None:
        raise UnsupportedOpError(f"node {node.name}: Pad mode {a.get('mode')} is not translated to Core ML")
    mil = [v for i in range(r) for v in (pads[i], pads[i + r])]
    if mode != "constant":  # reflect/replicate pad the trailing dims only
        first = next((i for i in range(r) if mil[2 * i] or mil[2 * i + 1]), r)
        first = min(first, r - 2) if r >= 2 else 0
        mil = mil[2 * first:]
    return _mb().pad(x=x, pad=mil, mode=mode, constant_val=np.float32(value), name=t.name(main=True))


@_h("Slice")
def _slice(t, node, a, ins):
    x = ins[0]
    r = x.rank
    if t.opset >= 10:
        starts = t.const(node.input[1], "starts").astype(np.int64).tolist()
        ends = t.const(node.input[2], "ends").astype(np.int64).tolist()
        axes = t.const(node.input[3], "axes").astype(int).tolist() if len(node.input) > 3 and node.input[3] else None
        steps = t.const(node.input[4], "steps").astype(int).tolist() if len(node.input) > 4 and node.input[4] else None
    else:
        starts, ends, axes, steps = list(a["starts"]), list(a["ends"]), a.get("axes"), None
    axes = [ax % r for ax in (axes if axes is not None else range(len(starts)))]
    steps = steps or [1] * len(starts)
    begin, end, stride = [0] * r, list(x.shape), [1] * r
    end_mask = [False] * r
    for ax, s, e, st in zip(axes, starts, ends, steps):
        b_, e_, st_ = slice(int(s), int(e), int(st)).indices(x.shape[ax])
        begin[ax], end[ax], stride[ax] = b_, e_, st_
        if st_ < 0 and e_ < 0:
            end[ax], end_mask[ax] = 0, True
    return _mb().slice_by_index(x=x, begin=np.array(begin, np.int32), end=np.array(end, np.int32), stride=stride,
                                end_mask=end_mask, name=t.name(main=True))


@_h("Split")
def _split(t, node, a, ins):
    x = ins[0]
    axis = int(a.get("axis", 0)) % x.rank
    if t.opset >= 13 and len(node.input) > 1 and node.input[1]:
        sizes = t.const(node.input[1], "split").astype(int).tolist()
    elif "split" in a:
        sizes = list(a["split"])
    else:
        n = len(node.output)
        d = x.shape[axis]
        each = -(-d // n)
        sizes = [each] * (n - 1) + [d - each * (n - 1)]
    return list(_mb().split(x=x, split_sizes=sizes, axis=axis, name=t.name(main=True)))


@_h("Gather")
def _gather(t, node, a, ins):
    mb = _mb()
    x = ins[0]
    axis = int(a.get("axis", 0)) % len(x.shape)
    if not isinstance(ins[1], np.ndarray):  # computed indices (token ids, ArgMax, TopK): int32 in MIL
        name = t.name(main=True)
        if isinstance(x, np.ndarray):  # an embedding table: the layer's weight
            x = _operand(x)
            t.weights[name] = "x"
        return mb.gather(x=x, indices=ins[1], axis=axis, name=name)
    idx = t.const(node.input[1], "indices").astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[axis], idx).astype(np.int32)
    if idx.ndim == 0:
        g = mb.gather(x=x, indices=idx.reshape(1), axis=axis, name=t.name())
        return mb.squeeze(x=g, axes=[axis], name=t.name(main=True))
    return mb.gather(x=x, indices=idx, axis=axis, name=t.name(main=True))


def _operand(v, like=None):
    """A constant operand in a MIL-friendly dtype (fp32, int32, bool); vars pass through."""
    if not isinstance(v, np.ndarray):
        return v
    if v.dtype.kind == "f":
        return v.astype(np.float32)
    if v.dtype.kind in "iu":
        if like is not None and hasattr(like, "dtype") and _is_float_var(like):
            return v.astype(np.float32)
        return v.astype(np.int32)
    return v


def _is_float_var(v) -> bool:
    from coremltools.converters.mil.mil import types as mtypes

    return mtypes.is_float(getattr(v, "dtype", None)) if hasattr(v, "op") else (
        isinstance(v, np.ndarray) and v.dtype.kind == "f")


def _pair(t, node, ins):
    x, y = ins[0], ins[1]
    if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
        raise InternalError(f"{node.name}: all inputs are constant (constant folding should have removed it)")
    return _operand(x, y), _operand(y, x)


_COMPARE = {"Equal": "equal", "Greater": "greater", "Less": "less", "GreaterOrEqual": "greater_equal",
            "LessOrEqual": "less_equal"}
_LOGICAL = {"And": "logical_and", "Or": "logical_or", "Xor": "logical_xor"}


@_h(*_COMPARE, *_LOGICAL)
def _compare(t, node, a, ins):
    x, y = _pair(t, node, ins)
    fn = getattr(_mb(), _COMPARE.get(node.op_type) or _LOGICAL[node.op_type])
    return fn(x=x, y=y, name=t.name(main=True))


@_h("Not")
def _not(t, node, a, ins):
    return _mb().logical_not(x=ins[0], name=t.name(main=True))


@_h("Where")
def _where(t, node, a, ins):
    c, x, y = ins
    x, y = _operand(x, y), _operand(y, x)
    return _mb().select(cond=c, a=x, b=y, name=t.name(main=True))


@_h("Gelu")
def _gelu(t, node, a, ins):
    mode = "TANH_APPROXIMATION" if a.get("approximate", "none") == "tanh" else "EXACT"
    return _mb().gelu(x=ins[0], mode=mode, name=t.name(main=True))


@_h("Selu")
def _selu(t, node, a, ins):
    mb = _mb()
    alpha, gamma = float(a.get("alpha", 1.67326319217681884765625)), float(a.get("gamma", 1.05070102214813232421875))
    e = mb.elu(x=ins[0], alpha=np.float32(alpha), name=t.name(main=True))
    return mb.mul(x=e, y=np.float32(gamma), name=t.name())


@_h("TopK")
def _topk(t, node, a, ins):
    x = ins[0]
    k = int(t.scalar(node.input[1], "k"))
    axis = int(a.get("axis", -1)) % x.rank
    if not a.get("sorted", 1):
        raise UnsupportedOpError(f"node {node.name}: unsorted TopK is not translated to Core ML")
    vals, idx = _mb().topk(x=x, k=k, axis=axis, ascending=not a.get("largest", 1), name=t.name(main=True))
    return [vals, idx]


@_h("ArgMax", "ArgMin")
def _argmax(t, node, a, ins):
    if a.get("select_last_index", 0):
        raise UnsupportedOpError(f"node {node.name}: {node.op_type} select_last_index is not translated to Core ML")
    mb = _mb()
    fn = mb.reduce_argmax if node.op_type == "ArgMax" else mb.reduce_argmin
    return fn(x=ins[0], axis=int(a.get("axis", 0)), keep_dims=bool(a.get("keepdims", 1)), name=t.name(main=True))


@_h("CumSum")
def _cumsum(t, node, a, ins):
    axis = int(t.scalar(node.input[1], "axis"))
    return _mb().cumsum(x=ins[0], axis=axis, exclusive=bool(a.get("exclusive", 0)), reverse=bool(a.get("reverse", 0)),
                        name=t.name(main=True))


@_h("GatherElements")
def _gather_elements(t, node, a, ins):
    x, idx = ins
    axis = int(a.get("axis", 0)) % x.rank
    if isinstance(idx, np.ndarray):
        idx = np.where(idx < 0, idx + x.shape[axis], idx).astype(np.int32)
    return _mb().gather_along_axis(x=x, indices=idx, axis=axis, name=t.name(main=True))


@_h("Tile")
def _tile(t, node, a, ins):
    reps = t.const(node.input[1], "repeats").astype(int).tolist()
    return _mb().tile(x=ins[0], reps=reps, name=t.name(main=True))


@_h("Expand")
def _expand(t, node, a, ins):
    mb = _mb()
    x = ins[0]
    shape = t.const(node.input[1], "shape").astype(int).tolist()
    out = list(np.broadcast_shapes(tuple(x.shape), tuple(shape)))
    if len(out) > x.rank:
        x = mb.reshape(x=x, shape=[1] * (len(out) - x.rank) + list(x.shape), name=t.name())
    reps = [o // i for o, i in zip(out, x.shape)]
    if all(r == 1 for r in reps):
        return mb.identity(x=x, name=t.name(main=True))
    return mb.tile(x=x, reps=reps, name=t.name(main=True))


@_h("DepthToSpace")
def _depth_to_space(t, node, a, ins):
    mb = _mb()
    b = int(a["blocksize"])
    if a.get("mode", "DCR") == "CRD":  # PyTorch's pixel shuffle
        return mb.pixel_shuffle(x=ins[0], upscale_factor=b, name=t.name(main=True))
    return mb.depth_to_space(x=ins[0], block_size=b, name=t.name(main=True))


@_h("SpaceToDepth")
def _space_to_depth(t, node, a, ins):
    return _mb().space_to_depth(x=ins[0], block_size=int(a["blocksize"]), name=t.name(main=True))


@_h("LRN")
def _lrn(t, node, a, ins):
    return _mb().local_response_norm(x=ins[0], size=int(a["size"]), alpha=np.float32(a.get("alpha", 1e-4)),
                                     beta=np.float32(a.get("beta", 0.75)), k=np.float32(a.get("bias", 1.0)),
                                     name=t.name(main=True))


@_h("LpNormalization")
def _lp_norm(t, node, a, ins):
    mb = _mb()
    x = ins[0]
    p = int(a.get("p", 2))
    if p not in (1, 2):
        raise UnsupportedOpError(f"node {node.name}: LpNormalization p={p} is not translated to Core ML")
    fn = mb.reduce_l2_norm if p == 2 else mb.reduce_l1_norm
    n = fn(x=x, axes=[int(a.get("axis", -1))], keep_dims=True, name=t.name())
    return mb.real_div(x=x, y=n, name=t.name(main=True))


@_h("GroupNormalization")
def _group_norm(t, node, a, ins):
    mb = _mb()
    x = ins[0]
    g = int(a["num_groups"])
    n, c = x.shape[0], x.shape[1]
    scale, bias = (t.f32(t.const(i, "parameter")).reshape(-1) for i in node.input[1:3])
    if scale.size != c:  # opset 18: one scale/bias per group
        scale, bias = np.repeat(scale, c // g), np.repeat(bias, c // g)
    r = mb.reshape(x=x, shape=[n, g, int(np.prod(x.shape[1:])) // g, 1], name=t.name())
    r = mb.instance_norm(x=r, epsilon=np.float32(a.get("epsilon", 1e-5)), name=t.name(main=True))
    r = mb.reshape(x=r, shape=list(x.shape), name=t.name())
    bshape = [c] + [1] * (x.rank - 2)
    r = mb.mul(x=r, y=scale.reshape(bshape).astype(np.float32), name=t.name())
    return mb.add(x=r, y=bias.reshape(bshape).astype(np.float32), name=t.name())


def _einsum_plan(eq: str):
    """The letters of a plain (batched) matmul ``A[batch, m.., k..] B[batch, k.., n..]`` (any order, no
    repeated letter in an operand, no broadcasting, no ellipsis): (a, b, batch, m, k, n, out), or None."""
    lhs, arrow, out = eq.replace(" ", "").partition("->")
    ins = lhs.split(",")
    if len(ins) != 2 or "." in eq or not arrow:
        return None
    a, b = ins
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        return None
    batch = [c for c in out if c in a and c in b]
    m = [c for c in out if c in a and c not in b]
    n = [c for c in out if c in b and c not in a]
    k = [c for c in a if c in b and c not in out]
    if not k or set(a) != {*batch, *m, *k} or set(b) != {*batch, *n, *k} or set(out) != {*batch, *m, *n}:
        return None
    return a, b, batch, m, k, n, out


@_h("Einsum")
def _einsum(t, node, a, ins):
    mb = _mb()
    plan = _einsum_plan(str(a["equation"]))
    if plan is None:
        raise UnsupportedOpError(f"node {node.name}: Einsum {a['equation']!r} is not a plain matmul (not translated to Core ML)")
    sa, sb, batch, m, k, n, out = plan
    x, y = (_operand(v) for v in ins)
    size = {c: d for s_, v in ((sa, x), (sb, y)) for c, d in zip(s_, v.shape)}

    def arrange(v, letters, order, shape):
        perm = [letters.index(c) for c in order]
        if perm != list(range(len(perm))):
            v = v.transpose(perm) if isinstance(v, np.ndarray) else mb.transpose(x=v, perm=perm, name=t.name())
        if list(v.shape) != shape:
            v = v.reshape(shape) if isinstance(v, np.ndarray) else mb.reshape(x=v, shape=shape, name=t.name())
        return v

    def prod(letters):
        return int(np.prod([size[c] for c in letters]))

    bshape = [size[c] for c in batch]
    x = arrange(x, sa, [*batch, *m, *k], [*bshape, prod(m), prod(k)])
    y = arrange(y, sb, [*batch, *k, *n], [*bshape, prod(k), prod(n)])
    name = t.name(main=True)
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        t.weights[name] = "y" if isinstance(y, np.ndarray) else "x"
    r = mb.matmul(x=x, y=y, name=name)
    got = [*batch, *m, *n]
    full = [size[c] for c in got]
    if list(r.shape) != full:
        r = mb.reshape(x=r, shape=full, name=t.name())
    perm = [got.index(c) for c in out]
    return r if perm == list(range(len(perm))) else mb.transpose(x=r, perm=perm, name=t.name())


def _resize_index(mode: str, nearest: str, n: int, m: int, scale: float) -> np.ndarray:
    """ONNX Resize's nearest source index per output index (one axis)."""
    i = np.arange(m, dtype=np.float64)
    if mode == "half_pixel":
        xo = (i + 0.5) / scale - 0.5
    elif mode == "pytorch_half_pixel":
        xo = (i + 0.5) / scale - 0.5 if m > 1 else np.zeros(m)
    elif mode == "align_corners":
        xo = i * (n - 1) / (m - 1) if m > 1 else np.zeros(m)
    elif mode == "asymmetric":
        xo = i / scale
    elif mode == "half_pixel_symmetric":
        adj = m / (scale * n)
        xo = n / 2 * (1 - adj) + (i + 0.5) / scale - 0.5
    else:
        raise ValueError(mode)
    if nearest == "floor":
        j = np.floor(xo)
    elif nearest == "ceil":
        j = np.ceil(xo)
    elif nearest == "round_prefer_ceil":
        j = np.floor(xo + 0.5)
    else:  # round_prefer_floor (default)
        j = np.ceil(xo - 0.5)
    return np.clip(j, 0, n - 1).astype(np.int32)


def _resize(t, node, x, mode: str, coord: str, nearest: str, scales, sizes):
    mb = _mb()
    shape = list(x.shape)
    r = x.rank
    if sizes is not None:
        out = [int(v) for v in sizes]
        scales = [o / i for o, i in zip(out, shape)]
    else:
        scales = [float(v) for v in scales]
        out = [int(np.floor(i * s + 1e-6)) for i, s in zip(shape, scales)]
    want = t.shapes.get(node.output[0])
    if want is not None:
        out = list(want)
    if r < 3 or out[:-2] != shape[:-2]:
        raise UnsupportedOpError(f"node {node.name}: Resize of other than the last two axes is not translated to Core ML")
    (h, w), (oh, ow), (sh, sw) = shape[-2:], out[-2:], scales[-2:]
    if mode == "nearest":
        idx = [_resize_index(coord, nearest, n, m, s) for n, m, s in ((h, oh, sh), (w, ow, sw))]
        ints = [float(s).is_integer() and s >= 1 for s in (sh, sw)]
        if all(ints) and all(np.array_equal(ix, np.arange(m) // int(s)) for ix, m, s in zip(idx, (oh, ow), (sh, sw))):
            return mb.upsample_nearest_neighbor(x=x, scale_factor_height=int(sh), scale_factor_width=int(sw),
                                                name=t.name(main=True))
        # any other sampling: the exact ONNX source indices, gathered per axis
        y = x
        for ax, ix, n in ((r - 2, idx[0], h), (r - 1, idx[1], w)):
            if not np.array_equal(ix, np.arange(n)):
                y = mb.gather(x=y, indices=ix, axis=ax, name=t.name(main=True))
        return y if y is not x else mb.identity(x=x, name=t.name(main=True))
    if mode != "linear":
        raise UnsupportedOpError(f"node {node.name}: Resize mode {mode} is not translated to Core ML")
    if any(abs(s - m / n) > 1e-6 for s, n, m in ((sh, h, oh), (sw, w, ow))):
        raise UnsupportedOpError(f"node {node.name}: linear Resize with scales not equal to output/input sizes "
                                 "is not translated to Core ML")
    if coord == "pytorch_half_pixel" and (oh == 1 or ow == 1):
        raise UnsupportedOpError(f"node {node.name}: pytorch_half_pixel Resize to size 1 is not translated to Core ML")
    modes = {"half_pixel": "UNALIGN_CORNERS", "pytorch_half_pixel": "UNALIGN_CORNERS", "align_corners": "STRICT_ALIGN_CORNERS",
             "asymmetric": "DEFAULT"}
    if coord not in modes:
        raise UnsupportedOpError(f"node {node.name}: Resize coordinate_transformation_mode {coord} is not translated to Core ML")
    if coord != "asymmetric" and all(float(s).is_integer() and s >= 1 for s in (sh, sw)):
        return mb.upsample_bilinear(x=x, scale_factor_height=int(sh), scale_factor_width=int(sw),
                                    align_corners=coord == "align_corners", name=t.name(main=True))
    return mb.resize_bilinear(x=x, target_size_height=oh, target_size_width=ow, sampling_mode=modes[coord],
                              name=t.name(main=True))


@_h("Resize")
def _resize_op(t, node, a, ins):
    x = ins[0]
    if a.get("antialias", 0) or a.get("axes") is not None or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise UnsupportedOpError(f"node {node.name}: Resize with antialias/axes/keep_aspect_ratio_policy is not "
                                 "translated to Core ML")
    mode = a.get("mode", "nearest")
    coord = a.get("coordinate_transformation_mode", "half_pixel" if t.opset >= 11 else "asymmetric")
    nearest = a.get("nearest_mode", "round_prefer_floor" if t.opset >= 11 else "floor")
    scales = sizes = None
    if t.opset < 11:
        scales = t.const(node.input[1], "scales").tolist()
    else:
        if len(node.input) > 3 and node.input[3]:
            sizes = t.const(node.input[3], "sizes").tolist()
        if sizes is None or not sizes:
            sizes = None
            scales = t.const(node.input[2], "scales").tolist() if len(node.input) > 2 and node.input[2] else None
            if not scales:
                raise UnsupportedOpError(f"node {node.name}: Resize needs constant scales or sizes for Core ML")
    return _resize(t, node, x, mode, coord, nearest, scales, sizes)


@_h("Upsample")
def _upsample(t, node, a, ins):
    scales = a.get("scales") if t.opset < 9 else t.const(node.input[1], "scales").tolist()
    mode = {"bilinear": "linear"}.get(a.get("mode", "nearest"), a.get("mode", "nearest"))
    return _resize(t, node, ins[0], mode, "asymmetric", "floor", list(scales), None)



_RNN_ACTS = {"Sigmoid": "sigmoid", "Tanh": "tanh", "Relu": "relu"}
#: ONNX LSTM gate blocks (i, o, f, c) <-> MIL lstm (i, f, o, z): the same permutation both ways
_LSTM_GATES = [0, 2, 1, 3]


def _blocks(w: np.ndarray, order: list[int], axis: int = 0) -> np.ndarray:
    return np.concatenate([np.split(w, len(order), axis=axis)[i] for i in order], axis=axis)


def _rnn_common(t, node, a, ins):
    """(x as [s, b, I], directions, hidden size, activations) of an ONNX LSTM/GRU; refuses what MIL lacks."""
    mb = _mb()
    if len(node.input) > 4 and node.input[4]:
        raise UnsupportedOpError(f"node {node.name}: {node.op_type} with sequence_lens is not translated to Core ML")
    x = ins[0]
    if a.get("layout", 0):
        x = mb.transpose(x=x, perm=[1, 0, 2], name=t.name())
    direction = a.get("direction", "forward")
    d = 2 if direction == "bidirectional" else 1
    acts = [str(v.decode() if isinstance(v, bytes) else v) for v in a.get("activations", [])]
    return x, direction, d, int(a["hidden_size"]), acts


def _rnn_state(t, node, ins, i: int, d: int, b: int, h: int, layout: int):
    """An initial state input ([D, b, H], or [b, D, H] with layout 1) as MIL's [b, D*H] (zeros when absent)."""
    mb = _mb()
    v = ins[i] if len(ins) > i else None
    if v is None:
        return np.zeros((b, d * h), np.float32)
    if isinstance(v, np.ndarray):
        v = v.astype(np.float32)
        return np.ascontiguousarray((v if layout else v.transpose(1, 0, 2)).reshape(b, d * h))
    if not layout:
        v = mb.transpose(x=v, perm=[1, 0, 2], name=t.name())
    return mb.reshape(x=v, shape=[b, d * h], name=t.name())


def _rnn_outputs(t, a, y, hs, d: int, h: int, states):
    """MIL's [s, b, D*H] sequence and [b, D*H] states as ONNX Y [s, D, b, H] and Y_h/Y_c [D, b, H] (layout 0)."""
    mb = _mb()
    s_, b = y.shape[0], y.shape[1]
    layout = int(a.get("layout", 0))
    yy = mb.reshape(x=y, shape=[s_, b, d, h], name=t.name())
    yy = mb.transpose(x=yy, perm=[1, 0, 2, 3] if layout else [0, 2, 1, 3], name=t.name())
    outs = [yy]
    for st in states:
        r = mb.reshape(x=st, shape=[b, d, h], name=t.name())
        outs.append(r if layout else mb.transpose(x=r, perm=[1, 0, 2], name=t.name()))
    return outs


@_h("LSTM")
def _lstm(t, node, a, ins):
    mb = _mb()
    x, direction, d, h, acts = _rnn_common(t, node, a, ins)
    if a.get("input_forget", 0):
        raise UnsupportedOpError(f"node {node.name}: LSTM input_forget is not translated to Core ML")
    acts = acts or ["Sigmoid", "Tanh", "Tanh"] * d
    if any(v not in _RNN_ACTS for v in acts) or acts[:3] != acts[3:6] and d == 2:
        raise UnsupportedOpError(f"node {node.name}: LSTM activations {acts} are not translated to Core ML")
    w = t.f32(t.const(node.input[1], "W"))
    r = t.f32(t.const(node.input[2], "R"))
    bias = (t.f32(t.const(node.input[3], "B")) if len(node.input) > 3 and node.input[3]
            else np.zeros((d, 8 * h), np.float32))
    p = t.f32(t.const(node.input[7], "P")) if len(node.input) > 7 and node.input[7] else None
    b = x.shape[1]
    kw = {}
    for k, suffix in ((0, ""), (1, "_back")):
        if k >= d:
            break
        kw[f"weight_ih{suffix}"] = _blocks(w[k], _LSTM_GATES)
        kw[f"weight_hh{suffix}"] = _blocks(r[k], _LSTM_GATES)
        kw[f"bias{suffix}"] = _blocks(bias[k][:4 * h] + bias[k][4 * h:], _LSTM_GATES)
        if p is not None:
            kw[f"peephole{suffix}"] = _blocks(p[k], [0, 2, 1])  # ONNX i, o, f -> MIL i, f, o
    if a.get("clip") is not None:
        kw["clip"] = np.float32(a["clip"])
    name = t.name(main=True)
    layout = int(a.get("layout", 0))
    y, hs, cs = mb.lstm(x=x, initial_h=_rnn_state(t, node, ins, 5, d, b, h, layout),
                        initial_c=_rnn_state(t, node, ins, 6, d, b, h, layout),
                        direction=direction, output_sequence=True, recurrent_activation=_RNN_ACTS[acts[0]],
                        cell_activation=_RNN_ACTS[acts[1]], activation=_RNN_ACTS[acts[2]], name=name, **kw)
    return _rnn_outputs(t, a, y, hs, d, h, [hs, cs])


@_h("GRU")
def _gru(t, node, a, ins):
    """Unrolled over the (static) sequence with linear/sigmoid/tanh ops, as coremltools' own PyTorch frontend
    does: MIL's ``gru`` op applies the reset gate outside the recurrent bias, ONNX's GRUs (both
    ``linear_before_reset`` forms) do not."""
    mb = _mb()
    x, direction, d, h, acts = _rnn_common(t, node, a, ins)
    acts = acts or ["Sigmoid", "Tanh"] * d
    if any(v not in _RNN_ACTS for v in acts):
        raise UnsupportedOpError(f"node {node.name}: GRU activations {acts} are not translated to Core ML")
    if a.get("clip") is not None:
        raise UnsupportedOpError(f"node {node.name}: GRU clip is not translated to Core ML")
    w = t.f32(t.const(node.input[1], "W"))
    r = t.f32(t.const(node.input[2], "R"))
    bias = (t.f32(t.const(node.input[3], "B")) if len(node.input) > 3 and node.input[3]
            else np.zeros((d, 6 * h), np.float32))
    before = bool(a.get("linear_before_reset", 0))
    s_, b = x.shape[0], x.shape[1]
    h0 = ins[5] if len(ins) > 5 and ins[5] is not None else np.zeros((d, b, h), np.float32)
    if a.get("layout", 0) and len(ins) > 5 and ins[5] is not None:  # [b, D, H] -> [D, b, H]
        h0 = h0.transpose(1, 0, 2) if isinstance(h0, np.ndarray) else mb.transpose(x=h0, perm=[1, 0, 2], name=t.name())
    steps = [mb.squeeze(x=v, axes=[0], name=t.name())
             for v in (mb.split(x=x, num_splits=s_, axis=0, name=t.name()) if s_ > 1 else [x])]
    seqs, finals = [], []
    for k in range(d):
        act_f, act_g = getattr(mb, _RNN_ACTS[acts[2 * k]]), getattr(mb, _RNN_ACTS[acts[2 * k + 1]])
        wz, wr, wh = np.split(w[k], 3)
        rz, rr, rh = np.split(r[k], 3)
        wbz, wbr, wbh, rbz, rbr, rbh = np.split(bias[k], 6)
        hk = h0[k] if isinstance(h0, np.ndarray) else mb.squeeze(
            x=mb.slice_by_index(x=h0, begin=[k, 0, 0], end=[k + 1, b, h], name=t.name()), axes=[0], name=t.name())
        reverse = direction == "reverse" or k == 1
        outs = [None] * s_
        for i in (range(s_ - 1, -1, -1) if reverse else range(s_)):
            xt = steps[i]
            gz = mb.add(x=mb.linear(x=xt, weight=wz, bias=wbz + rbz, name=t.name()),
                        y=mb.linear(x=hk, weight=rz, name=t.name()) if not isinstance(hk, np.ndarray) else hk @ rz.T,
                        name=t.name())
            gr = mb.add(x=mb.linear(x=xt, weight=wr, bias=wbr + rbr, name=t.name()),
                        y=mb.linear(x=hk, weight=rr, name=t.name()) if not isinstance(hk, np.ndarray) else hk @ rr.T,
                        name=t.name())
            z, rg = act_f(x=gz, name=t.name()), act_f(x=gr, name=t.name())
            if before:  # g(x Wh + Wbh + r * (h Rh + Rbh))
                hr = (mb.linear(x=hk, weight=rh, bias=rbh, name=t.name()) if not isinstance(hk, np.ndarray)
                      else hk @ rh.T + rbh)
                inner = mb.mul(x=rg, y=hr, name=t.name())
            else:  # g(x Wh + (r * h) Rh + Rbh + Wbh)
                inner = mb.linear(x=mb.mul(x=rg, y=hk, name=t.name()), weight=rh, bias=rbh, name=t.name())
            n = act_g(x=mb.add(x=mb.linear(x=xt, weight=wh, bias=wbh, name=t.name()), y=inner, name=t.name()), name=t.name())
            # h = (1 - z) * n + z * h_prev = n + z * (h_prev - n)
            hk = mb.add(x=n, y=mb.mul(x=z, y=mb.sub(x=hk, y=n, name=t.name()), name=t.name()), name=t.name())
            outs[i] = hk
        seqs.append(mb.stack(values=outs, axis=0, name=t.name()) if s_ > 1 else mb.expand_dims(x=outs[0], axes=[0],
                                                                                                 name=t.name()))
        finals.append(hk)
    y = seqs[0] if d == 1 else mb.concat(values=seqs, axis=2, name=t.name())
    hs = finals[0] if d == 1 else mb.concat(values=finals, axis=1, name=t.name())
    y = mb.identity(x=y, name=t.name(main=True))
    return _rnn_outputs(t, a, y, hs, d, h, [hs])


#: ONNX ops :func:`to_mil` translates (the planner's table for this backend).
SUPPORTED_OPS = frozenset(_HANDLERS)

_RESIZE_LINEAR_COORDS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
_RESIZE_NEAREST_COORDS = (*_RESIZE_LINEAR_COORDS, "half_pixel_symmetric")


def refusal(op_type: str, attrs: dict[str, Any]) -> str | None:
    """Why a node of a translated op type is still not translated, from its attributes alone (None: it is);
    the one rule for both :func:`to_mil` and the pre-flight (``edgeopt analyze --target ios``)."""
    a = attrs
    if op_type == "Resize":
        mode = a.get("mode", "nearest")
        coord = a.get("coordinate_transformation_mode", "half_pixel")
        if mode not in ("nearest", "linear"):
            return f"mode {mode} is not translated (nearest and linear are)"
        if coord not in (_RESIZE_LINEAR_COORDS if mode == "linear" else _RESIZE_NEAREST_COORDS):
            return f"coordinate_transformation_mode {coord} with mode {mode} is not translated"
        if a.get("antialias", 0) or a.get("axes") is not None or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            return "antialias/axes/keep_aspect_ratio_policy are not translated"
    elif op_type == "Upsample" and a.get("mode", "nearest") not in ("nearest", "linear", "bilinear"):
        return f"mode {a.get('mode')} is not translated"
    elif op_type == "Einsum" and _einsum_plan(str(a.get("equation", ""))) is None:
        return f"equation {a.get('equation')!r} is not a plain (batched) matmul"
    elif op_type == "TopK" and not a.get("sorted", 1):
        return "unsorted TopK is not translated"
    elif op_type in ("ArgMax", "ArgMin") and a.get("select_last_index", 0):
        return "select_last_index is not translated"
    elif op_type == "LpNormalization" and int(a.get("p", 2)) not in (1, 2):
        return f"p={a.get('p')} is not translated (1 and 2 are)"
    elif op_type == "LSTM" and a.get("input_forget", 0):
        return "input_forget is not translated"
    elif op_type == "GRU" and a.get("clip") is not None:
        return "clip is not translated"
    elif op_type == "ConvTranspose" and a.get("auto_pad", "NOTSET") != "NOTSET":
        return "auto_pad is not translated"
    elif op_type == "Pad" and a.get("mode", "constant") not in ("constant", "reflect", "edge"):
        return f"mode {a.get('mode')} is not translated"
    elif op_type == "Cast" and int(a.get("to", 1)) not in (*_FLOAT_TYPES, *_INT_TYPES):
        return f"cast to type {a.get('to')} is not translated"
    return None


def to_mil(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> tuple[Translation, onnx.ModelProto]:
    """Translate ``model`` (any float ONNX model; cleaned here) to a MIL program; also returns the cleaned model."""
    prepared = prepare(model, shapes)
    inputs = static_shapes(prepared, shapes)
    return _Translator(prepared).translate(inputs), prepared


# --------------------------------------------------------------------------- MIL (saved) -> ONNX


def load_program(package: str):
    """The MIL program of a saved .mlpackage (no Core ML runtime needed)."""
    from .._quiet import import_quietly

    import_quietly("coremltools")  # its version notices on first import
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.models import utils as model_utils

    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    spec = mlmodel.get_spec()
    prog = model_utils._convert_model_spec_to_pymil_prog(mlmodel, spec.specificationVersion, milproto_load.load)
    return mlmodel, spec, prog


def weight_value(var) -> np.ndarray | None:
    """A const or constexpr var's (decompressed) value."""
    if var.val is not None:
        return np.asarray(var.val)
    op = var.op
    if op is not None and op.op_type.startswith("constexpr_"):
        v = op.materialized_val_inference()
        if isinstance(v, (tuple, list)):
            v = v[list(op.outputs).index(var)]
        return np.asarray(v)
    return None


class _Exporter:
    def __init__(self, round_fp16: bool):
        import onnx

        self.onnx = onnx
        self.round_fp16 = round_fp16
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.k = 0

    def tmp(self, base: str) -> str:
        self.k += 1
        return f"{base}__x{self.k}"

    def init(self, value: np.ndarray, base: str, dtype=None) -> str:
        name = self.tmp(base)
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        self.inits[name] = self.onnx.numpy_helper.from_array(np.ascontiguousarray(arr), name)
        return name

    def tensor(self, var) -> str:
        """The ONNX tensor name of a MIL var (constants become initializers)."""
        if var.name in self.inits:
            return var.name
        v = weight_value(var)
        if v is not None and (var.op is None or var.op.op_type == "const" or var.op.op_type.startswith("constexpr_")):
            # floats compute in fp32 (rounded per op), integers (indices: int16/uint16 after coremltools' casts) in int32
            arr = v.astype(np.float32) if v.dtype.kind == "f" else v.astype(np.int32) if v.dtype.kind in "iu" else v
            self.inits[var.name] = self.onnx.numpy_helper.from_array(np.ascontiguousarray(arr), var.name)
        return var.name

    def node(self, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outputs, name=self.tmp(outputs[0]), **attrs))


def _param(op, name, default=None):
    v = op.inputs.get(name)
    if v is None:
        return default
    return v.val if not isinstance(v, (list, tuple)) else v


def _onnx_pads(mil_pad, nd: int) -> list[int]:
    p = [int(v) for v in (mil_pad if mil_pad is not None else [0] * (2 * nd))]
    return [p[2 * i] for i in range(nd)] + [p[2 * i + 1] for i in range(nd)]


def _pool_pads(op, nd: int) -> list[int]:
    pad_type = _param(op, "pad_type", "valid")
    if pad_type != "custom" and pad_type != "valid":
        raise EdgeoptError(f"MIL op {op.name}: pad_type {pad_type} is not exported to ONNX")
    return _onnx_pads(_param(op, "pad") if pad_type == "custom" else None, nd)


_ONNX_UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "sqrt": "Sqrt", "abs": "Abs", "erf": "Erf",
               "floor": "Floor", "ceil": "Ceil", "sin": "Sin", "cos": "Cos", "softplus": "Softplus", "softsign": "Softsign",
               "sign": "Sign", "atan": "Atan", "identity": "Identity", "round": "Round"}
_ONNX_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "real_div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min"}
_ONNX_REDUCE = {"reduce_mean": "ReduceMean", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin", "reduce_sum": "ReduceSum",
                "reduce_prod": "ReduceProd", "reduce_l2_norm": "ReduceL2", "reduce_log_sum_exp": "ReduceLogSumExp"}


_ONNX_COMPARE = {"equal": "Equal", "greater": "Greater", "greater_equal": "GreaterOrEqual", "less": "Less",
                 "less_equal": "LessOrEqual", "logical_and": "And", "logical_or": "Or", "logical_xor": "Xor"}
_ONNX_REDUCE_MORE = {"reduce_l1_norm": "ReduceL1", "reduce_sum_square": "ReduceSumSquare", "reduce_log_sum": "ReduceLogSum"}
#: MIL dtype name -> ONNX element type in the equivalent (floats compute in fp32, integers in int32)
_ONNX_DTYPES = {"fp16": 1, "fp32": 1, "fp64": 1, "bool": 9, "int32": 6, "int16": 6, "int8": 6, "uint8": 6, "uint16": 6,
                "int64": 6}


def _export_gelu(e: _Exporter, x: str, out: str, mode: str) -> None:
    def c(v):
        return e.init(np.float32(v), out)

    if mode == "SIGMOID_APPROXIMATION":  # x * sigmoid(1.702 x)
        a, s = e.tmp(out), e.tmp(out)
        e.node("Mul", [x, c(1.702)], [a])
        e.node("Sigmoid", [a], [s])
        e.node("Mul", [x, s], [out])
        return
    h = e.tmp(out)
    e.node("Mul", [x, c(0.5)], [h])
    if mode == "TANH_APPROXIMATION":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3, p, q, r = e.tmp(out), e.tmp(out), e.tmp(out), e.tmp(out)
        e.node("Pow", [x, c(3.0)], [x3])
        e.node("Mul", [x3, c(0.044715)], [p])
        e.node("Add", [x, p], [q])
        e.node("Mul", [q, c(np.sqrt(2 / np.pi))], [r])
        f = e.tmp(out)
        e.node("Tanh", [r], [f])
    elif mode == "EXACT":  # 0.5 x (1 + erf(x / sqrt 2))
        r, f = e.tmp(out), e.tmp(out)
        e.node("Mul", [x, c(1 / np.sqrt(2))], [r])
        e.node("Erf", [r], [f])
    else:
        raise EdgeoptError(f"MIL gelu mode {mode} is not exported to ONNX")
    g = e.tmp(out)
    e.node("Add", [f, c(1.0)], [g])
    e.node("Mul", [h, g], [out])


def _export_resize(e: _Exporter, op, x: str, out: str) -> None:
    t = op.op_type
    xv = op.inputs["x"]
    nd = xv.rank
    oshape = list(op.outputs[0].shape)
    empty = ""
    sizes = e.init(np.array(oshape, np.int64), out)
    if t == "upsample_nearest_neighbor":  # out[i] = in[floor(i / scale)]
        sc = [1.0] * (nd - 2) + [float(_param(op, "scale_factor_height", 1)), float(_param(op, "scale_factor_width", 1))]
        e.node("Resize", [x, empty, e.init(np.array(sc, np.float32), out)], [out], mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        return
    if t == "resize_nearest_neighbor":
        e.node("Resize", [x, empty, empty, sizes], [out], mode="nearest", coordinate_transformation_mode="asymmetric",
               nearest_mode="floor")
        return
    if t == "upsample_bilinear":  # the scale is recomputed from the sizes (MIL doc)
        align = bool(_param(op, "align_corners", True))
        half = _param(op, "half_pixel_centers", None)
        half = (not align) if half is None else bool(half)
        coord = "align_corners" if align else ("half_pixel" if half else "asymmetric")
    elif t == "resize_bilinear":
        mode = str(_param(op, "sampling_mode", "DEFAULT"))
        coord = {"STRICT_ALIGN_CORNERS": "align_corners", "DEFAULT": "asymmetric", "UNALIGN_CORNERS": "half_pixel"}.get(mode)
        if mode == "ALIGN_CORNERS" and oshape[-1] > 1 and oshape[-2] > 1:
            coord = "align_corners"
        if coord is None:
            raise EdgeoptError(f"MIL op {op.name}: resize_bilinear sampling_mode {mode} is not exported to ONNX")
    else:
        raise EdgeoptError(f"MIL op {op.name} ({t}) is not exported to ONNX")
    e.node("Resize", [x, empty, empty, sizes], [out], mode="linear", coordinate_transformation_mode=coord)


def _export_lstm(e: _Exporter, op, x: str, outs: list[str]) -> None:
    """MIL lstm -> ONNX LSTM (gates i, f, o, z -> i, o, f, c; states [b, D*H] <-> [D, b, H])."""
    direction = str(_param(op, "direction", "forward"))
    d = 2 if direction == "bidirectional" else 1
    s_, b, _ = op.inputs["x"].shape
    h = op.inputs["weight_hh"].shape[1]
    sides = [""] + (["_back"] if d == 2 else [])

    def val(name, default=None):
        v = op.inputs.get(name)
        return default if v is None else np.asarray(weight_value(v), np.float32)

    w = np.stack([_blocks(val(f"weight_ih{k}"), _LSTM_GATES) for k in sides])
    r = np.stack([_blocks(val(f"weight_hh{k}"), _LSTM_GATES) for k in sides])
    bias = np.stack([np.concatenate([_blocks(val(f"bias{k}", np.zeros(4 * h, np.float32)), _LSTM_GATES),
                                     np.zeros(4 * h, np.float32)]) for k in sides])
    ins = [x, e.init(w, outs[0]), e.init(r, outs[0]), e.init(bias, outs[0]), ""]
    for state in ("initial_h", "initial_c"):  # [b, D*H] -> [D, b, H]
        rs, tr = e.tmp(outs[0]), e.tmp(outs[0])
        e.node("Reshape", [e.tensor(op.inputs[state]), e.init(np.array([b, d, h], np.int64), outs[0])], [rs])
        e.node("Transpose", [rs], [tr], perm=[1, 0, 2])
        ins.append(tr)
    if any(op.inputs.get(f"peephole{k}") is not None for k in sides):
        ins.append(e.init(np.stack([_blocks(val(f"peephole{k}", np.zeros(3 * h, np.float32)), [0, 2, 1]) for k in sides]),
                          outs[0]))
    names = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
    acts = [str(_param(op, k, dflt)) for k, dflt in (("recurrent_activation", "sigmoid"), ("cell_activation", "tanh"),
                                                     ("activation", "tanh"))]
    if any(v not in names for v in acts):
        raise EdgeoptError(f"MIL op {op.name}: lstm activations {acts} are not exported to ONNX")
    attrs = dict(hidden_size=int(h), direction=direction, activations=[names[v] for v in acts] * d)
    if op.inputs.get("clip") is not None:
        attrs["clip"] = float(_param(op, "clip"))
    y, yh, yc = e.tmp(outs[0]), e.tmp(outs[0]), e.tmp(outs[0])
    e.node("LSTM", ins, [y, yh, yc], **attrs)
    # Y [s, D, b, H] -> [s, b, D*H] (every step, or the last hidden state as [1, b, D*H])
    for src, dst, shape in ((yh, outs[1], [b, d * h]), (yc, outs[2], [b, d * h])):
        tr = e.tmp(outs[0])
        e.node("Transpose", [src], [tr], perm=[1, 0, 2])
        e.node("Reshape", [tr, e.init(np.array(shape, np.int64), outs[0])], [dst])
    if _param(op, "output_sequence", False):
        tr = e.tmp(outs[0])
        e.node("Transpose", [y], [tr], perm=[0, 2, 1, 3])
        e.node("Reshape", [tr, e.init(np.array([s_, b, d * h], np.int64), outs[0])], [outs[0]])
    else:
        e.node("Unsqueeze", [outs[1], e.init(np.array([0], np.int64), outs[0])], [outs[0]])


def _export_op(e: _Exporter, op, outs: list[str]) -> None:  # noqa: C901 - one branch per MIL op
    t = op.op_type
    out = outs[0]
    x = e.tensor(op.inputs["x"]) if "x" in op.inputs and not isinstance(op.inputs["x"], (list, tuple)) else None
    if t in _ONNX_UNARY:
        e.node(_ONNX_UNARY[t], [x], [out])
    elif t == "cast":
        to = _ONNX_DTYPES.get(str(_param(op, "dtype")))
        if to is None:
            raise EdgeoptError(f"MIL op {op.name}: cast to {_param(op, 'dtype')} is not exported to ONNX")
        e.node("Cast", [x], [out], to=to)  # float <-> float: the fp16 rounding is applied after every op
    elif t == "gelu":
        _export_gelu(e, x, out, str(_param(op, "mode", "EXACT")))
    elif t == "silu":
        s = e.tmp(out)
        e.node("Sigmoid", [x], [s])
        e.node("Mul", [x, s], [out])
    elif t == "square":
        e.node("Mul", [x, x], [out])
    elif t == "rsqrt":
        s, q = e.tmp(out), e.tmp(out)
        e.node("Add", [x, e.init(np.float32(_param(op, "epsilon", 1e-12)), out)], [s])
        e.node("Sqrt", [s], [q])
        e.node("Reciprocal", [q], [out])
    elif t == "threshold":
        e.node("Max", [x, e.init(np.float32(_param(op, "alpha")), out)], [out])
    elif t == "thresholded_relu":
        e.node("ThresholdedRelu", [x], [out], alpha=float(_param(op, "alpha", 1.0)))
    elif t == "scaled_tanh":
        s, q = e.tmp(out), e.tmp(out)
        e.node("Mul", [x, e.init(np.float32(_param(op, "beta", 1.0)), out)], [s])
        e.node("Tanh", [s], [q])
        e.node("Mul", [q, e.init(np.float32(_param(op, "alpha", 1.0)), out)], [out])
    elif t == "linear_activation":
        s = e.tmp(out)
        e.node("Mul", [x, e.init(np.float32(_param(op, "alpha", 1.0)), out)], [s])
        e.node("Add", [s, e.init(np.float32(_param(op, "beta", 0.0)), out)], [out])
    elif t in _ONNX_COMPARE:
        e.node(_ONNX_COMPARE[t], [e.tensor(op.inputs["x"]), e.tensor(op.inputs["y"])], [out])
    elif t == "not_equal":
        s = e.tmp(out)
        e.node("Equal", [e.tensor(op.inputs["x"]), e.tensor(op.inputs["y"])], [s])
        e.node("Not", [s], [out])
    elif t == "logical_not":
        e.node("Not", [x], [out])
    elif t == "select":
        e.node("Where", [e.tensor(op.inputs["cond"]), e.tensor(op.inputs["a"]), e.tensor(op.inputs["b"])], [out])
    elif t == "floor_div":
        s = e.tmp(out)
        e.node("Div", [e.tensor(op.inputs["x"]), e.tensor(op.inputs["y"])], [s])
        e.node("Floor", [s], [out])
    elif t == "topk":
        axis = int(_param(op, "axis", -1))
        k = int(_param(op, "k", 1))
        if k < 0:
            k = op.inputs["x"].shape[axis]
        i64 = e.tmp(out)
        e.node("TopK", [x, e.init(np.array([k], np.int64), out)], [out, i64], axis=axis,
               largest=int(not _param(op, "ascending", False)), sorted=1)
        if len(outs) > 1:
            e.node("Cast", [i64], [outs[1]], to=6)
    elif t in ("reduce_argmax", "reduce_argmin"):
        i64 = e.tmp(out)
        e.node("ArgMax" if t == "reduce_argmax" else "ArgMin", [x], [i64], axis=int(_param(op, "axis", -1)),
               keepdims=int(bool(_param(op, "keep_dims", False))))
        e.node("Cast", [i64], [out], to=6)
    elif t == "cumsum":
        e.node("CumSum", [x, e.init(np.array(int(_param(op, "axis", 0)), np.int64), out)], [out],
               exclusive=int(bool(_param(op, "exclusive", False))), reverse=int(bool(_param(op, "reverse", False))))
    elif t == "gather_along_axis":
        e.node("GatherElements", [x, e.tensor(op.inputs["indices"])], [out], axis=int(_param(op, "axis", 0)))
    elif t == "tile":
        e.node("Tile", [x, e.init(np.array([int(v) for v in _param(op, "reps")], np.int64), out)], [out])
    elif t == "depth_to_space":
        e.node("DepthToSpace", [x], [out], blocksize=int(_param(op, "block_size")), mode="DCR")
    elif t == "pixel_shuffle":
        e.node("DepthToSpace", [x], [out], blocksize=int(_param(op, "upscale_factor")), mode="CRD")
    elif t == "space_to_depth":
        e.node("SpaceToDepth", [x], [out], blocksize=int(_param(op, "block_size")))
    elif t == "local_response_norm":
        e.node("LRN", [x], [out], size=int(_param(op, "size")), alpha=float(_param(op, "alpha", 1e-4)),
               beta=float(_param(op, "beta", 0.75)), bias=float(_param(op, "k", 1.0)))
    elif t in ("upsample_nearest_neighbor", "resize_nearest_neighbor", "upsample_bilinear", "resize_bilinear"):
        _export_resize(e, op, x, out)
    elif t == "lstm":
        _export_lstm(e, op, x, outs)
    elif t == "einsum":
        e.node("Einsum", [e.tensor(v) for v in op.inputs["values"]], [out], equation=str(_param(op, "equation")))
    elif t == "stack":
        axis = int(_param(op, "axis")) % op.outputs[0].rank
        parts = []
        for v in op.inputs["values"]:
            u = e.tmp(out)
            e.node("Unsqueeze", [e.tensor(v), e.init(np.array([axis], np.int64), out)], [u])
            parts.append(u)
        e.node("Concat", parts, [out], axis=axis)
    elif t == "slice_by_size":
        shape = op.inputs["x"].shape
        begin = [int(v) for v in _param(op, "begin")]
        size = [int(v) for v in _param(op, "size")]
        ends = [shape[i] if size[i] < 0 else begin[i] + size[i] for i in range(len(shape))]
        e.node("Slice", [x, e.init(np.array(begin, np.int64), out), e.init(np.array(ends, np.int64), out),
                         e.init(np.arange(len(shape), dtype=np.int64), out)], [out])
    elif t == "relu6":
        e.node("Clip", [x, e.init(np.float32(0), out), e.init(np.float32(6), out)], [out])
    elif t == "clip":
        e.node("Clip", [x, e.init(np.float32(_param(op, "alpha")), out), e.init(np.float32(_param(op, "beta")), out)], [out])
    elif t == "log":
        eps = e.init(np.float32(_param(op, "epsilon", 1e-45)), out)
        s = e.tmp(out)
        e.node("Add", [x, eps], [s])
        e.node("Log", [s], [out])
    elif t == "inverse":
        s = e.tmp(out)
        e.node("Add", [x, e.init(np.float32(_param(op, "epsilon", 1e-4)), out)], [s])
        e.node("Reciprocal", [s], [out])
    elif t in _ONNX_BINARY:
        e.node(_ONNX_BINARY[t], [e.tensor(op.inputs["x"]), e.tensor(op.inputs["y"])], [out])
    elif t == "sigmoid_hard":
        e.node("HardSigmoid", [x], [out], alpha=float(_param(op, "alpha")), beta=float(_param(op, "beta")))
    elif t == "leaky_relu":
        e.node("LeakyRelu", [x], [out], alpha=float(_param(op, "alpha")))
    elif t == "elu":
        e.node("Elu", [x], [out], alpha=float(_param(op, "alpha")))
    elif t == "prelu":
        alpha = np.asarray(_param(op, "alpha"), np.float32)
        rank = op.inputs["x"].rank
        e.node("PRelu", [x, e.init(alpha.reshape(-1, *([1] * (rank - 2))), out)], [out])
    elif t in ("conv", "conv_transpose"):
        w = e.tensor(op.inputs["weight"])
        nd = op.inputs["weight"].rank - 2
        pad_type = _param(op, "pad_type")
        if pad_type not in ("custom", "valid"):
            raise EdgeoptError(f"MIL op {op.name}: pad_type {pad_type} is not exported to ONNX")
        ins = [x, w] + ([e.tensor(op.inputs["bias"])] if op.inputs.get("bias") is not None else [])
        attrs = dict(strides=[int(v) for v in _param(op, "strides", [1] * nd)],
                     dilations=[int(v) for v in _param(op, "dilations", [1] * nd)],
                     group=int(_param(op, "groups", 1)), pads=_onnx_pads(_param(op, "pad") if pad_type == "custom" else None, nd))
        if t == "conv_transpose" and op.inputs.get("output_shape") is not None:
            attrs["output_shape"] = [int(v) for v in _param(op, "output_shape")[2:]]
        e.node("Conv" if t == "conv" else "ConvTranspose", ins, [out], **attrs)
    elif t == "linear":
        w = op.inputs["weight"]
        wt = e.tmp(out)
        e.node("Transpose", [e.tensor(w)], [wt], perm=[1, 0])
        b = op.inputs.get("bias")
        if b is None:
            e.node("MatMul", [x, wt], [out])
        else:
            s = e.tmp(out)
            e.node("MatMul", [x, wt], [s])
            e.node("Add", [s, e.tensor(b)], [out])
    elif t == "matmul":
        ins = []
        for side, flag in (("x", "transpose_x"), ("y", "transpose_y")):
            v = op.inputs[side]
            name = e.tensor(v)
            if _param(op, flag, False):
                perm = list(range(v.rank))
                perm[-2:] = perm[-2:][::-1]
                tr = e.tmp(out)
                e.node("Transpose", [name], [tr], perm=perm)
                name = tr
            ins.append(name)
        e.node("MatMul", ins, [out])
    elif t in ("max_pool", "avg_pool"):
        k = [int(v) for v in _param(op, "kernel_sizes")]
        attrs = dict(kernel_shape=k, strides=[int(v) for v in _param(op, "strides", [1] * len(k))],
                     pads=_pool_pads(op, len(k)), ceil_mode=int(bool(_param(op, "ceil_mode", False))))
        if t == "avg_pool":
            attrs["count_include_pad"] = int(not _param(op, "exclude_padding_from_average", False))
        e.node("MaxPool" if t == "max_pool" else "AveragePool", [x], [out], **attrs)
    elif t in _ONNX_REDUCE or t in _ONNX_REDUCE_MORE:
        axes = _param(op, "axes")
        axes = list(range(op.inputs["x"].rank)) if axes is None else [int(v) for v in axes]
        keep = int(bool(_param(op, "keep_dims", False)))
        if t == "reduce_sum":
            e.node("ReduceSum", [x, e.init(np.array(axes, np.int64), out)], [out], keepdims=keep)
        else:
            e.node(_ONNX_REDUCE.get(t) or _ONNX_REDUCE_MORE[t], [x], [out], axes=axes, keepdims=keep)
    elif t == "reshape":
        e.node("Reshape", [x, e.init(np.array(op.outputs[0].shape, np.int64), out)], [out])
    elif t == "transpose":
        rank = op.outputs[0].rank  # MIL allows negative axes in perm, ONNX does not
        e.node("Transpose", [x], [out], perm=[int(v) % rank for v in _param(op, "perm")])
    elif t == "concat":
        axis = int(_param(op, "axis")) % op.outputs[0].rank
        if _param(op, "interleave", False):  # [a0, b0, a1, b1, ...] along axis: stack behind it, then merge
            parts = []
            for v in op.inputs["values"]:
                u = e.tmp(out)
                e.node("Unsqueeze", [e.tensor(v), e.init(np.array([axis + 1], np.int64), out)], [u])
                parts.append(u)
            s = e.tmp(out)
            e.node("Concat", parts, [s], axis=axis + 1)
            e.node("Reshape", [s, e.init(np.array(op.outputs[0].shape, np.int64), out)], [out])
        else:
            e.node("Concat", [e.tensor(v) for v in op.inputs["values"]], [out], axis=axis)
    elif t == "softmax":
        e.node("Softmax", [x], [out], axis=int(_param(op, "axis", -1)))
    elif t in ("squeeze", "expand_dims"):
        axes = _param(op, "axes")
        if axes is None:
            axes = [i for i, d in enumerate(op.inputs["x"].shape) if d == 1]
        e.node("Squeeze" if t == "squeeze" else "Unsqueeze", [x, e.init(np.array(axes, np.int64), out)], [out])
    elif t == "batch_norm":
        c = op.inputs["x"].shape[1]
        g = _param(op, "gamma")
        b = _param(op, "beta")
        ins = [x, e.init(np.ones(c) if g is None else g, out), e.init(np.zeros(c) if b is None else b, out),
               e.tensor(op.inputs["mean"]), e.tensor(op.inputs["variance"])]
        e.node("BatchNormalization", ins, [out], epsilon=float(_param(op, "epsilon", 1e-5)))
    elif t == "instance_norm":
        c = op.inputs["x"].shape[1]
        g, b = op.inputs.get("gamma"), op.inputs.get("beta")
        e.node("InstanceNormalization", [x, e.tensor(g) if g is not None else e.init(np.ones(c), out),
                                         e.tensor(b) if b is not None else e.init(np.zeros(c), out)], [out],
               epsilon=float(_param(op, "epsilon", 1e-5)))
    elif t == "layer_norm":
        rank = op.inputs["x"].rank
        axes = sorted(int(v) % rank for v in _param(op, "axes"))
        if axes != list(range(axes[0], rank)):
            raise EdgeoptError(f"MIL op {op.name}: layer_norm over axes {axes} (not trailing) is not exported to ONNX")
        norm = tuple(op.inputs["x"].shape[min(axes):])
        g, b = _param(op, "gamma"), _param(op, "beta")
        e.node("LayerNormalization", [x, e.init(np.ones(norm) if g is None else g, out),
                                      e.init(np.zeros(norm) if b is None else b, out)], [out],
               axis=min(axes), epsilon=float(_param(op, "epsilon", 1e-5)))
    elif t == "pad":
        r = op.inputs["x"].rank
        p = [int(v) for v in _param(op, "pad")]
        p = [0] * (2 * r - len(p)) + p
        pads = [p[2 * i] for i in range(r)] + [p[2 * i + 1] for i in range(r)]
        mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[_param(op, "mode", "constant")]
        e.node("Pad", [x, e.init(np.array(pads, np.int64), out), e.init(np.float32(_param(op, "constant_val", 0.0)), out)],
               [out], mode=mode)
    elif t == "slice_by_index":
        shape = op.inputs["x"].shape
        r = len(shape)
        begin, end = list(_param(op, "begin")), list(_param(op, "end"))
        stride = list(_param(op, "stride", [1] * r))
        bm, em = list(_param(op, "begin_mask", [False] * r)), list(_param(op, "end_mask", [False] * r))
        sm = list(_param(op, "squeeze_mask", [False] * r))
        starts, ends = [], []
        for i in range(r):
            st = int(stride[i])
            s = (0 if st > 0 else shape[i] - 1) if bm[i] else int(begin[i])
            en = (shape[i] if st > 0 else -(2**62)) if em[i] else int(end[i])
            if sm[i]:
                en = s + 1
            starts.append(s)
            ends.append(en)
        sl = e.tmp(out) if any(sm) else out
        e.node("Slice", [x, e.init(np.array(starts, np.int64), out), e.init(np.array(ends, np.int64), out),
                         e.init(np.arange(r, dtype=np.int64), out), e.init(np.array(stride, np.int64), out)], [sl])
        if any(sm):
            e.node("Squeeze", [sl, e.init(np.array([i for i in range(r) if sm[i]], np.int64), out)], [out])
    elif t == "gather":
        iv = op.inputs["indices"]
        idx = e.tensor(iv) if iv.val is None else e.init(np.asarray(iv.val), out, dtype=np.int64)
        e.node("Gather", [x, idx], [out], axis=int(_param(op, "axis", 0)))
    else:
        raise EdgeoptError(f"MIL op {op.name} ({t}) is not exported to ONNX")


_MULTI_OUTPUT = ("topk", "lstm")


def to_onnx(prog, round_fp16: bool = True) -> onnx.ModelProto:
    """An ONNX model computing what the (saved, compressed) MIL program ``prog`` computes.

    Constexpr weights are decompressed; with ``round_fp16`` every fp16 tensor is rounded
    to fp16 (Cast to float16 and back) after the op that makes it, everything else runs in fp32.
    """
    import onnx
    from coremltools.converters.mil.mil import types as mtypes

    func = prog.functions["main"]
    e = _Exporter(round_fp16)
    for op in func.operations:
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            continue
        if op.op_type == "split":
            x = e.tensor(op.inputs["x"])
            sizes = [int(v) for v in _param(op, "split_sizes")] if op.inputs.get("split_sizes") is not None else None
            outs = [v.name if not (round_fp16 and v.dtype == mtypes.fp16) else e.tmp(v.name) for v in op.outputs]
            if sizes is None:
                sizes = [v.shape[int(_param(op, "axis"))] for v in op.outputs]
            e.node("Split", [x, e.init(np.array(sizes, np.int64), op.name)], outs, axis=int(_param(op, "axis")))
            raw = outs
        else:
            raw = [e.tmp(v.name) if round_fp16 and v.dtype == mtypes.fp16 else v.name for v in op.outputs]
            if len(op.outputs) != 1 and op.op_type not in _MULTI_OUTPUT:
                raise EdgeoptError(f"MIL op {op.name} ({op.op_type}) has {len(op.outputs)} outputs; not exported")
            _export_op(e, op, raw)
        for v, r in zip(op.outputs, raw):
            if r != v.name:  # round to fp16, then compute on in fp32
                h = e.tmp(v.name)
                e.node("Cast", [r], [h], to=onnx.TensorProto.FLOAT16)
                e.node("Cast", [h], [v.name], to=onnx.TensorProto.FLOAT)
    f32 = onnx.TensorProto.FLOAT
    inputs = [onnx.helper.make_tensor_value_info(v.name, f32 if mtypes.is_float(v.dtype) else onnx.TensorProto.INT32,
                                                 list(v.shape)) for v in func.inputs.values()]
    outputs = [onnx.helper.make_tensor_value_info(v.name, f32, list(v.shape)) for v in func.outputs]
    graph = onnx.helper.make_graph(e.nodes, "coreml_equivalent", inputs, outputs, initializer=list(e.inits.values()))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], producer_name="edgeopt-coreml")
    model.ir_version = 8
    return model
