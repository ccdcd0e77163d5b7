"""ONNX -> TFLite flatbuffer, written with LiteRT's flatbuffer schema (no converter, no download).

Three stages:

1. :func:`build_ir` cleans a copy of the ONNX model (input shapes fixed, Constant nodes
   to initializers, constant folding incl. shape subgraphs, BatchNormalization folded)
   and translates it node by node into a small IR of TFLite builtins.  Rank-4
   activations live in NHWC: a conv reads NHWC, and a layout change (TRANSPOSE, or a
   RESHAPE where the two orders coincide in memory) is inserted only where an op needs
   the ONNX order.  Model inputs/outputs of rank 4 are NHWC; :class:`IOSpec` records
   the permutation, and the runners transpose so callers keep the ONNX layout.
   Fusions: bias Add into conv/FC, Relu/Clip(0,6)/Clip(-1,1) as fused activation,
   HardSigmoid into the preceding conv (scaled weights + RELU6 + MUL 1/6),
   ``x*clip(x+3,0,6)/6`` and ``x*HardSigmoid(x)`` as HARD_SWISH, Div by a constant as
   MUL; a Flatten of NHWC data feeding FC layers permutes the FC weights instead of
   transposing the activations.  Subgraphs replaced as a whole (:meth:`_Builder._find_patterns`):
   GELU ``x*0.5*(1+Erf(x/sqrt2))`` and its tanh form (PyTorch's / Hugging Face's exports, any
   operand order) as GELU (TFLite has no ERF: a lone Erf is refused; for TFLite Micro, which
   has no GELU kernel, ``micro=True`` writes the tanh form in MUL/ADD/TANH), and the decomposed
   layer norm (ReduceMean, Sub, Pow|Mul, ReduceMean, Add, Sqrt, Div, Mul, Add), written like
   LayerNormalization as MEAN/SQUARED_DIFFERENCE/RSQRT/SUB/MUL/ADD.  Softmax/LogSoftmax/TopK
   on an axis that is not the last run between two TRANSPOSEs; Resize picks TFLite's
   align_corners/half_pixel_centers by comparing both sampling grids (refused where none
   samples what ONNX does); comparisons, Where and logical ops carry bool tensors, Gather and
   TopK int32 ones (int64 model inputs become int32 inputs).
2. :func:`emit` writes the IR as a ``.tflite`` with one precision per op: fp32, fp16
   (fp16 weights + DEQUANTIZE, the standard TFLite fp16 model) or int8 (int8 weights
   symmetric per-channel for CONV_2D (axis 0) / DEPTHWISE_CONV_2D (axis 3), per-tensor
   for FULLY_CONNECTED, int32 bias at input_scale*weight_scale, int8 asymmetric
   activations).  QUANTIZE/DEQUANTIZE are inserted where int8 and float ops meet, so
   mixed plans work; ``io="int8"`` makes the model's inputs/outputs int8 (full-integer
   targets), ``io="float"`` keeps float I/O.
3. :func:`calibrate` runs the fp32 flatbuffer in LiteRT (builtin kernels, no XNNPACK, every
   tensor preserved) over calibration samples and records each tensor's min/max,
   which :func:`activation_qparams` turns into int8 parameters obeying TFLite's int8
   constraints (LOGISTIC/SOFTMAX outputs 1/256 zero point -128, TANH 1/128 zero 0,
   MAX_POOL/AVERAGE_POOL/RESHAPE/TRANSPOSE/PAD/CONCATENATION/MAXIMUM/MINIMUM share in/out params).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EdgeoptError, InternalError, UnsupportedOpError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData


def schema():
    """LiteRT's flatbuffer schema (object API); tflite-micro ships the same one."""
    try:
        from ai_edge_litert import schema_py_generated as s
    except ImportError:
        try:
            from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as s
        except ImportError as e:
            raise EdgeoptError("writing .tflite needs ai-edge-litert's flatbuffer schema; pip install 'edgeopt[tflite]'") from e
    return s


#: ONNX ops the writer translates (others are folded when constant, else refused).
SUPPORTED_OPS = frozenset(
    "Conv Gemm MatMul Add Sub Mul Div Max Min Pow Relu Clip LeakyRelu Sigmoid Tanh HardSigmoid HardSwish Exp Log Sqrt "
    "Neg Abs Floor Ceil Sin Cos MaxPool AveragePool GlobalAveragePool GlobalMaxPool ReduceMean ReduceMax ReduceMin "
    "ReduceSum Reshape Flatten Squeeze Unsqueeze Transpose Concat Softmax LogSoftmax Pad Slice Identity Dropout Cast "
    "BatchNormalization Constant Shape Erf Gelu LayerNormalization Gather Equal Greater Less GreaterOrEqual LessOrEqual "
    "Where Not And Or TopK Resize ConvTranspose Einsum Split".split()
)

#: TFLite builtins with int8 kernels (TFLite and TFLite Micro); others run in float.
INT8_OPS = frozenset(
    "CONV_2D DEPTHWISE_CONV_2D FULLY_CONNECTED ADD SUB MUL MAX_POOL_2D AVERAGE_POOL_2D MEAN REDUCE_MAX REDUCE_MIN SUM "
    "RESHAPE TRANSPOSE PAD PADV2 CONCATENATION SOFTMAX LOG_SOFTMAX LOGISTIC TANH HARD_SWISH RELU RELU6 RELU_N1_TO_1 "
    "LEAKY_RELU MAXIMUM MINIMUM STRIDED_SLICE BATCH_MATMUL GELU SQUARED_DIFFERENCE RSQRT GATHER EQUAL GREATER LESS "
    "GREATER_EQUAL LESS_EQUAL SELECT_V2 LOGICAL_NOT LOGICAL_AND LOGICAL_OR TOPK_V2 RESIZE_NEAREST_NEIGHBOR RESIZE_BILINEAR "
    "TRANSPOSE_CONV".split()
)

#: int8 ops whose output must carry its input's quantization (the kernel does not requantize).
SAME_PARAMS = frozenset(
    "MAX_POOL_2D AVERAGE_POOL_2D RESHAPE TRANSPOSE PAD PADV2 CONCATENATION STRIDED_SLICE REDUCE_MAX REDUCE_MIN MAXIMUM MINIMUM "
    "GATHER SELECT_V2 TOPK_V2 RESIZE_NEAREST_NEIGHBOR RESIZE_BILINEAR "
    # comparisons: their kernels rescale, but with one scale for both sides equal floats stay equal in int8
    "EQUAL GREATER LESS GREATER_EQUAL LESS_EQUAL".split()
)

#: int8 outputs with fixed quantization (scale, zero point), as TFLite's kernels require.
FIXED_PARAMS = {"LOGISTIC": (1 / 256, -128), "SOFTMAX": (1 / 256, -128), "TANH": (1 / 128, 0), "LOG_SOFTMAX": (16 / 256, 127)}

OPTIONS = {
    "CONV_2D": "Conv2DOptions", "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions", "FULLY_CONNECTED": "FullyConnectedOptions",
    "MAX_POOL_2D": "Pool2DOptions", "AVERAGE_POOL_2D": "Pool2DOptions", "ADD": "AddOptions", "SUB": "SubOptions",
    "MUL": "MulOptions", "DIV": "DivOptions", "RESHAPE": "ReshapeOptions", "SOFTMAX": "SoftmaxOptions",
    "CONCATENATION": "ConcatenationOptions", "MEAN": "ReducerOptions", "REDUCE_MAX": "ReducerOptions",
    "REDUCE_MIN": "ReducerOptions", "SUM": "ReducerOptions", "TRANSPOSE": "TransposeOptions", "PAD": "PadOptions",
    "PADV2": "PadV2Options", "LEAKY_RELU": "LeakyReluOptions", "HARD_SWISH": "HardSwishOptions",
    "DEQUANTIZE": "DequantizeOptions", "QUANTIZE": "QuantizeOptions", "STRIDED_SLICE": "StridedSliceOptions",
    "BATCH_MATMUL": "BatchMatMulOptions", "MAXIMUM": "MaximumMinimumOptions", "MINIMUM": "MaximumMinimumOptions",
    "LOG_SOFTMAX": "LogSoftmaxOptions", "EXP": "ExpOptions", "NEG": "NegOptions", "ABS": "AbsOptions", "POW": "PowOptions",
    "GELU": "GeluOptions", "SQUARED_DIFFERENCE": "SquaredDifferenceOptions", "GATHER": "GatherOptions",
    "EQUAL": "EqualOptions", "GREATER": "GreaterOptions", "LESS": "LessOptions", "GREATER_EQUAL": "GreaterEqualOptions",
    "LESS_EQUAL": "LessEqualOptions", "SELECT_V2": "SelectV2Options", "LOGICAL_NOT": "LogicalNotOptions",
    "LOGICAL_AND": "LogicalAndOptions", "LOGICAL_OR": "LogicalOrOptions", "TOPK_V2": "TopKV2Options",
    "RESIZE_NEAREST_NEIGHBOR": "ResizeNearestNeighborOptions", "RESIZE_BILINEAR": "ResizeBilinearOptions",
    "TRANSPOSE_CONV": "TransposeConvOptions",
}

_ACT = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}
_UNARY = {"Sigmoid": "LOGISTIC", "Tanh": "TANH", "HardSwish": "HARD_SWISH", "Exp": "EXP", "Log": "LOG", "Sqrt": "SQRT",
          "Neg": "NEG", "Abs": "ABS", "Floor": "FLOOR", "Ceil": "CEIL", "Sin": "SIN", "Cos": "COS"}
_BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Max": "MAXIMUM", "Min": "MINIMUM", "Pow": "POW"}
_COMPARE = {"Equal": "EQUAL", "Greater": "GREATER", "Less": "LESS", "GreaterOrEqual": "GREATER_EQUAL", "LessOrEqual": "LESS_EQUAL"}
_REDUCE = {"ReduceMean": "MEAN", "ReduceMax": "REDUCE_MAX", "ReduceMin": "REDUCE_MIN", "ReduceSum": "SUM",
           "GlobalAveragePool": "MEAN", "GlobalMaxPool": "REDUCE_MAX"}
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


# --------------------------------------------------------------------------- IR


@dataclass
class Tensor:
    id: int
    name: str
    shape: tuple[int, ...]
    role: str = "act"  # act | weight | bias | const | padval | int | bool
    data: np.ndarray | None = None
    dtype: str = "float32"  # of an activation: float32 (quantizable), int32 (indices) or bool (masks)


@dataclass
class Op:
    code: str
    inputs: list[int]
    outputs: list[int]
    options: dict[str, Any]
    node: str
    precision: str


@dataclass
class IOSpec:
    name: str  # the ONNX input/output name
    tensor: int  # IR tensor id
    onnx_shape: list[int]
    nhwc: bool  # the .tflite tensor is the ONNX tensor transposed NCHW -> NHWC


@dataclass
class IR:
    tensors: list[Tensor] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: list[IOSpec] = field(default_factory=list)
    outputs: list[IOSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, shape, role: str = "act", data: np.ndarray | None = None, dtype: str = "float32") -> int:
        self.tensors.append(Tensor(len(self.tensors), name, tuple(int(d) for d in shape), role, data, dtype))
        return len(self.tensors) - 1

    def is_float(self, tid: int) -> bool:
        t = self.tensors[tid]
        return t.role == "act" and t.dtype == "float32"


def _unsupported(node: onnx.NodeProto, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"tflite writer: node '{node.name}' (op {node.op_type}): {why}")


def _same_memory(shape: list[int] | tuple[int, ...]) -> bool:
    """Whether an NCHW tensor and its NHWC transpose have the same memory order (unit dims aside)."""
    return [a for a in (0, 1, 2, 3) if shape[a] != 1] == [a for a in NCHW_TO_NHWC if shape[a] != 1]


def _scalar(a) -> float:
    return float(np.asarray(a).reshape(-1)[0])


def _nhwc(shape) -> list[int]:
    return [shape[a] for a in NCHW_TO_NHWC]


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def tflite_padding(auto_pad, pads, in_hw, kernel, strides, dilations) -> tuple[str, list[int] | None]:
    """How an ONNX conv/pool's padding is written in TFLite: (SAME|VALID, explicit [top, left, bottom, right] pads a
    PAD op applies first, or None).  TFLite's SAME pads the extra row/column at the end; ONNX pads that differ (e.g.
    a stride-2 3x3 conv's symmetric 1 on an even input) need the PAD op, whose output the arena holds too (the cost
    model asks this function: :func:`edgeopt.costmodel.arena`)."""
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto == "VALID":
        return "VALID", None
    same = [_same_pads(in_hw[i], kernel[i], strides[i], dilations[i]) for i in range(2)]
    if auto == "SAME_UPPER":
        return "SAME", None
    pads = [same[0][1], same[1][1], same[0][0], same[1][0]] if auto == "SAME_LOWER" else list(pads)
    if not any(pads):
        return "VALID", None
    if pads == [same[0][0], same[1][0], same[0][1], same[1][1]]:
        return "SAME", None
    return "VALID", pads


# --------------------------------------------------------------------------- ONNX -> IR


def prepare_onnx(model: onnx.ModelProto, input_shapes: Mapping[str, list[int]] | None) -> tuple[onnx.ModelProto, dict]:
    """A cleaned copy of ``model`` with static input shapes, and every tensor's shape (by running it once)."""
    import onnx

    from ..fidelity import session
    from ..graph import expose_outputs, fix_input_shapes
    from ..passes.cleanup import normalize
    from ..passes.unroll_rnn import unroll_rnns

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    names = {i.name for i in m.graph.input if i.name not in inits}
    fix_input_shapes(m, {k: v for k, v in (input_shapes or {}).items() if k in names})
    for o in m.graph.output:  # declared output dims may be stale once inputs are fixed
        o.type.tensor_type.ClearField("shape")
    m, _ = unroll_rnns(m)  # TFLite's fused LSTM kernels take another weight layout: GRU/LSTM as plain ops
    normalize(m)
    tensors = [o for n in m.graph.node for o in n.output if o]
    sess = session(expose_outputs(m, tensors), optimize=False)
    feeds = {}
    for i in sess.get_inputs():
        dt = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(i.type, np.float32)
        feeds[i.name] = np.zeros(i.shape, dt)
    values = dict(zip(tensors, sess.run(tensors, feeds)))
    shapes = {k: list(v.shape) for k, v in values.items()}
    dtypes = {k: v.dtype for k, v in values.items()}
    for i in sess.get_inputs():
        shapes[i.name] = list(i.shape)
    return m, {"shapes": shapes, "dtypes": dtypes}


class _Builder:
    def __init__(self, model: onnx.ModelProto, info: dict, precision_of: Mapping[str, str], default: str,
                 micro: bool = False):
        import onnx

        self.micro = micro  # TFLite Micro: builtins it lacks (GELU) are lowered to ones it has
        self.onnx = onnx
        self.model = model
        self.g = model.graph
        self.shapes: dict[str, list[int]] = info["shapes"]
        self.dtypes = info["dtypes"]
        self.consts = {t.name: onnx.numpy_helper.to_array(t) for t in self.g.initializer}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.graph_outputs = {o.name for o in self.g.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.precision_of = precision_of
        self._shared: dict = {}  # (role, shape, content hash) -> tensor id, for cst(share=True)
        self.default = default
        self.ir = IR()
        self.vals: dict[str, tuple[int, str]] = {}  # onnx tensor -> (IR tensor, layout: plain | nhwc | flat)
        self.flat_perm: dict[int, tuple[list[int], np.ndarray]] = {}  # flat tensor -> (C,H,W shape, hwc->chw index)
        self.layout_cache: dict[tuple[int, str], int] = {}
        self.done: set[str] = set()
        self.unnamed = 0
        self.cur_prec = default

    # ---------------------------------------------------------------- helpers

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return self.onnx.helper.get_attribute_value(a)
        return default

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def prec(self, node) -> str:
        p = self.precision_of.get(node.name)
        if p is None and "/" in node.name:  # a node a pass made from a layer (an unrolled GRU's ops): the layer's
            p = self.precision_of.get(node.name.rsplit("/", 1)[0])
        return p or self.default

    def op(self, code, inputs, outputs, node, prec, **options) -> Op:
        o = Op(code, list(inputs), list(outputs), options, node.name, prec)
        self.ir.ops.append(o)
        return o

    def act(self, name: str, shape, dtype: str = "float32") -> int:
        return self.ir.add(name, shape, dtype=dtype)

    def dtype_of(self, name: str) -> str:
        """The IR dtype of ONNX tensor ``name``: float32, int32 (any integer) or bool."""
        if name in self.vals:
            return self.ir.tensors[self.vals[name][0]].dtype
        dt = np.dtype(self.dtypes.get(name, np.float32))
        return "bool" if dt == np.bool_ else ("int32" if dt.kind in "iu" else "float32")

    def cst(self, name: str, data: np.ndarray, role: str = "const", *, share: bool = False) -> int:
        """A constant tensor; ``share``: reuse an identical one made before (a weight many nodes read: the steps of
        an unrolled GRU/LSTM), so the flatbuffer holds it once."""
        data = np.ascontiguousarray(data, np.int32 if role == "int" else np.float32)
        if not share:
            return self.ir.add(name, data.shape, role, data)
        import hashlib

        key = (role, data.shape, hashlib.sha1(data.tobytes()).hexdigest())
        if key not in self._shared:
            self._shared[key] = self.ir.add(name, data.shape, role, data)
        return self._shared[key]

    def ints(self, name: str, values) -> int:
        return self.cst(name, np.asarray(values, np.int32), "int")

    def only_consumer(self, tensor: str):
        cons = self.consumers.get(tensor, [])
        if len(cons) == 1 and tensor not in self.graph_outputs and cons[0].name not in self.done:
            return cons[0]
        return None

    def clip_bounds(self, node) -> tuple[float, float]:
        if self.opset < 11:
            return float(self.attr(node, "min", -np.inf)), float(self.attr(node, "max", np.inf))
        lo = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(-np.inf)
        hi = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(np.inf)
        if lo is None or hi is None:
            raise _unsupported(node, "Clip bounds must be constant")
        return _scalar(lo), _scalar(hi)

    @staticmethod
    def act_of_bounds(lo: float, hi: float) -> str | None:
        if lo == 0 and hi == 6:
            return "RELU6"
        if lo == 0 and hi >= 3.0e38:
            return "RELU"
        if lo == -1 and hi == 1:
            return "RELU_N1_TO_1"
        return None

    def next_activation(self, out: str) -> tuple[str, str]:
        """A Relu/Clip that consumes only ``out`` and can be fused: (activation, its output)."""
        n = self.only_consumer(out)
        if n is None:
            return "NONE", out
        fused = None
        if n.op_type == "Relu":
            fused = "RELU"
        elif n.op_type == "Clip":
            fused = self.act_of_bounds(*self.clip_bounds(n))
        if fused is None:
            return "NONE", out
        self.done.add(n.name)
        return fused, n.output[0]

    def next_bias(self, out: str, channels: int, rank: int, channel_axis: int) -> tuple[np.ndarray | None, str]:
        """A following Add of a per-channel constant, folded into the bias."""
        n = self.only_consumer(out)
        if n is None or n.op_type != "Add":
            return None, out
        other = n.input[1] if n.input[0] == out else n.input[0]
        c = self.const(other)
        if c is None or c.ndim > rank:
            return None, out
        shp = [1] * (rank - c.ndim) + list(c.shape)
        if any(d != 1 for i, d in enumerate(shp) if i != channel_axis) or shp[channel_axis] not in (1, channels):
            return None, out
        self.done.add(n.name)
        return np.broadcast_to(c.reshape(-1).astype(np.float32), (channels,)).copy(), n.output[0]

    # ---------------------------------------------------------------- layouts

    def get(self, name: str, want: str = "any") -> tuple[int, str]:
        """The IR tensor for ONNX tensor ``name`` in layout ``want`` (plain | nhwc | any)."""
        if name not in self.vals:
            raise InternalError(f"tflite writer: tensor '{name}' is not produced by a translated node")
        tid, layout = self.vals[name]
        if want == "any" or want == layout:
            return tid, layout
        shape = self.shapes[name]
        key = (tid, want)
        if key in self.layout_cache:
            return self.layout_cache[key], want
        if layout == "flat":
            tid = self._flat_to_plain(tid, name)
            layout = "plain"
            if want == "plain":
                self.layout_cache[key] = tid
                return tid, want
        t = self.ir.tensors[tid]
        if want == "nhwc":
            if len(shape) != 4:
                raise EdgeoptError(f"tflite writer: tensor '{name}' of rank {len(shape)} used where NHWC is needed")
            new = self.act(f"{name}/nhwc", _nhwc(shape), t.dtype)
        else:
            new = self.act(f"{name}/nchw", shape, t.dtype)
        src_prec = self.cur_prec
        if _same_memory(shape):
            self.ir.ops.append(Op("RESHAPE", [tid, self.ints(f"{name}/shape", self.ir.tensors[new].shape)], [new],
                                  {"newShape": list(self.ir.tensors[new].shape)}, t.name, src_prec))
        else:
            perm = NCHW_TO_NHWC if want == "nhwc" else NHWC_TO_NCHW
            self.ir.ops.append(Op("TRANSPOSE", [tid, self.ints(f"{name}/perm", perm)], [new], {}, t.name, src_prec))
        self.layout_cache[key] = new
        return new, want

    def _flat_to_plain(self, tid: int, name: str) -> int:
        (c, h, w), _ = self.flat_perm[tid]
        n = self.ir.tensors[tid].shape[0]
        t4 = self.act(f"{name}/hwc", [n, h, w, c])
        self.ir.ops.append(Op("RESHAPE", [tid, self.ints(f"{name}/s1", [n, h, w, c])], [t4], {"newShape": [n, h, w, c]}, name, self.cur_prec))
        t5 = self.act(f"{name}/chw", [n, c, h, w])
        self.ir.ops.append(Op("TRANSPOSE", [t4, self.ints(f"{name}/p", NHWC_TO_NCHW)], [t5], {}, name, self.cur_prec))
        out = self.act(f"{name}/plain", [n, c * h * w])
        self.ir.ops.append(Op("RESHAPE", [t5, self.ints(f"{name}/s2", [n, c * h * w])], [out], {"newShape": [n, c * h * w]}, name, self.cur_prec))
        return out

    def const_for(self, c: np.ndarray, layout: str, out_rank: int) -> np.ndarray:
        """A constant operand of a broadcasting op whose activation operand is in ``layout``."""
        c = np.asarray(c, np.float32)
        if c.size == 1:
            return c.reshape([1])
        if layout == "nhwc":
            c4 = c.reshape([1] * (4 - c.ndim) + list(c.shape))
            return np.ascontiguousarray(c4.transpose(NCHW_TO_NHWC))
        return c

    # ---------------------------------------------------------------- translation

    def build(self) -> IR:
        for inp in self.g.input:
            if inp.name in self.consts:
                continue
            shape = self.shapes[inp.name]
            TP = self.onnx.TensorProto
            et = inp.type.tensor_type.elem_type
            if et not in (TP.FLOAT, TP.INT64, TP.INT32):
                raise EdgeoptError(f"tflite writer: input '{inp.name}' is not float32 (or int64/int32 indices); "
                                   "other input types are not supported")
            dtype = "float32" if et == TP.FLOAT else "int32"
            nhwc = len(shape) == 4 and dtype == "float32"
            tid = self.act(inp.name, _nhwc(shape) if nhwc else shape, dtype)
            self.vals[inp.name] = (tid, "nhwc" if nhwc else "plain")
            self.ir.inputs.append(IOSpec(inp.name, tid, list(shape), nhwc))
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        fused = self._find_patterns()
        for node in self.g.node:
            if node.name in self.done:
                continue
            if node.name in fused:
                self.cur_prec = self.prec(node)
                kind, info = fused[node.name]
                getattr(self, f"_emit_{kind}")(node, **info)
                continue
            if node.domain not in ("", "ai.onnx"):
                raise _unsupported(node, f"domain {node.domain} is not supported by the TFLite writer")
            if node.op_type not in SUPPORTED_OPS:
                raise _unsupported(node, "not supported by the TFLite writer")
            why = attribute_refusal(node.op_type, {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute})
            if why:
                raise _unsupported(node, why)
            if all((not i) or i in self.consts for i in node.input) and node.input:
                raise _unsupported(node, "all inputs are constant but it was not folded")
            if node.name not in self.precision_of:
                self.unnamed += 1
            self.cur_prec = self.prec(node)
            getattr(self, f"_op_{node.op_type}", self._generic)(node)
            self.done.add(node.name)
        for out in self.g.output:
            if out.name not in self.vals:
                raise InternalError(f"tflite writer: graph output '{out.name}' is not produced by a translated node")
            tid, layout = self.vals[out.name]
            if layout == "flat":
                tid, layout = self.get(out.name, "plain")
            self.ir.outputs.append(IOSpec(out.name, tid, list(self.shapes[out.name]), layout == "nhwc"))
        if self.unnamed:
            self.ir.notes.append(f"{self.unnamed} node(s) not named in the plan took its dominant precision {self.default}")
        return self.ir

    def _generic(self, node):
        if node.op_type in _UNARY:
            return self._unary(node, _UNARY[node.op_type])
        if node.op_type in _BINARY:
            return self._binary(node)
        if node.op_type in _REDUCE:
            return self._reduce(node)
        if node.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            return self._reshape(node)
        if node.op_type in ("Identity", "Dropout"):
            self.vals[node.output[0]] = self.vals[node.input[0]]
            return None
        raise _unsupported(node, "not supported by the TFLite writer")

    def _op_Cast(self, node):
        TP = self.onnx.TensorProto
        to = {TP.FLOAT: "float32", TP.INT64: "int32", TP.INT32: "int32", TP.BOOL: "bool"}.get(self.attr(node, "to"))
        src = self.dtype_of(node.input[0])
        if to is None:
            raise _unsupported(node, "only casts between float32, int64/int32 (as int32) and bool are supported")
        if to == src:
            self.vals[node.output[0]] = self.vals[node.input[0]]
            return
        tid, layout = self.get(node.input[0], "any")
        if layout == "flat":
            tid, layout = self.get(node.input[0], "plain")
        y = self.act(node.output[0], self.ir.tensors[tid].shape, to)
        if src == "bool" and to == "float32":  # a mask used in arithmetic: SELECT_V2(mask, 1, 0), which has int8 kernels
            ones = [self.cst(f"{node.name}/{v}", np.array([v], np.float32)) for v in (1.0, 0.0)]
            self.op("SELECT_V2", [tid, *ones], [y], node, self.prec(node))
        else:
            self.op("CAST", [tid], [y], node, self.prec(node))
        self.vals[node.output[0]] = (y, layout)

    def _op_BatchNormalization(self, node):
        x = node.input[0]
        scale, bias, mean, var = (self.const(i) for i in node.input[1:5])
        if any(v is None for v in (scale, bias, mean, var)):
            raise _unsupported(node, "BatchNormalization parameters must be constant")
        k = scale / np.sqrt(var + self.attr(node, "epsilon", 1e-5))
        shape = [1, -1] + [1] * (len(self.shapes[x]) - 2)
        tid, layout = self.get(x, "any")
        if layout == "flat":
            tid, layout = self.get(x, "plain")
        out_shape = self.shapes[node.output[0]]
        mid = self.act(f"{node.output[0]}/scaled", self.ir.tensors[tid].shape)
        p = self.prec(node)
        self.op("MUL", [tid, self.cst(f"{node.name}/k", self.const_for(k.reshape(shape), layout, len(out_shape)))], [mid], node, p,
                fusedActivationFunction=0)
        act, final = self.next_activation(node.output[0])
        out = self.act(final, self.ir.tensors[tid].shape)
        self.op("ADD", [mid, self.cst(f"{node.name}/b", self.const_for((bias - mean * k).reshape(shape), layout, len(out_shape)))],
                [out], node, p, fusedActivationFunction=_ACT[act])
        self.vals[final] = (out, layout)

    # convolution ---------------------------------------------------------

    def _padding(self, node, in_hw, kernel, strides, dilations) -> tuple[str, list[int] | None]:
        """(SAME|VALID, explicit [top, left, bottom, right] pads to apply first, or None)."""
        return tflite_padding(self.attr(node, "auto_pad", b"NOTSET"), self.attr(node, "pads", [0, 0, 0, 0]), in_hw,
                              kernel, strides, dilations)

    def _explicit_pad(self, tid: int, pads: list[int], name: str, node, prec: str, value: float = 0.0) -> int:
        n, h, w, c = self.ir.tensors[tid].shape
        t, left, b, r = pads
        out = self.act(f"{name}/padded", [n, h + t + b, w + left + r, c])
        paddings = self.ints(f"{name}/paddings", [[0, 0], [t, b], [left, r], [0, 0]])
        if value == 0.0:
            self.op("PAD", [tid, paddings], [out], node, prec)
        else:
            # a max-pool's "-inf" padding: its calibrated range is the input's, not the sentinel's
            self.op("PADV2", [tid, paddings, self.cst(f"{name}/padvalue", np.array([value], np.float32), "padval")], [out], node, prec,
                    sentinel=value <= -1e30)
        return out

    def _op_Conv(self, node):
        x = node.input[0]
        w = self.const(node.input[1])
        if w is None:
            raise _unsupported(node, "the weight must be constant")
        if w.ndim != 4:
            raise _unsupported(node, f"only 2-D convolution is supported (weight rank {w.ndim})")
        m, cg, kh, kw = w.shape
        c = self.shapes[x][1]
        group = int(self.attr(node, "group", 1))
        b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(m, np.float32)
        if b is None:
            raise _unsupported(node, "the bias must be constant")
        w, b = w.astype(np.float32), b.astype(np.float32).copy()
        strides = list(self.attr(node, "strides", [1, 1]))
        dil = list(self.attr(node, "dilations", [1, 1]))
        p = self.prec(node)
        extra, out = self.next_bias(node.output[0], m, 4, 1)
        if extra is not None:
            b += extra
        act, out, post = self._fused_tail(out, w, b)
        if post is not None:
            w, b = post
        tid, _ = self.get(x, "nhwc")
        padding, pads = self._padding(node, self.shapes[x][2:], [kh, kw], strides, dil)
        if pads:
            tid = self._explicit_pad(tid, pads, node.name, node, p)
        if group == 1:
            code, wt, axis = "CONV_2D", w.transpose(0, 2, 3, 1), 0
            opts = {}
        elif group == c and cg == 1:
            code, wt, axis = "DEPTHWISE_CONV_2D", w.transpose(1, 2, 3, 0), 3
            opts = {"depthMultiplier": m // c}
        else:
            raise _unsupported(node, f"grouped convolution (group={group}) has no TFLite builtin")
        y = self.act(out if post is None else f"{out}/conv", _nhwc(self.shapes[out]))
        wid = self.cst(f"{node.name}/weight", wt, "weight")
        bid = self.cst(f"{node.name}/bias", b, "bias")
        self.op(code, [tid, wid, bid], [y], node, p, padding=0 if padding == "SAME" else 1, strideH=strides[0],
                strideW=strides[1], dilationHFactor=dil[0], dilationWFactor=dil[1], fusedActivationFunction=_ACT[act], axis=axis,
                **opts)
        if post is not None:
            y = self._times_sixth(y, out, node, p)
        self.vals[out] = (y, "nhwc")

    def _fused_tail(self, out: str, w: np.ndarray, b: np.ndarray):
        """Activation after a conv/FC: (activation, final ONNX tensor, (w, b) rescaled for a fused HardSigmoid or None).

        HardSigmoid(y) = relu6(6*alpha*y + 6*beta) / 6: the affine part goes into the weights and bias,
        relu6 becomes the fused activation, a MUL by 1/6 follows.
        """
        n = self.only_consumer(out)
        if n is not None and n.op_type == "HardSigmoid" and not self._hardswish_pair(n):
            alpha, beta = float(self.attr(n, "alpha", 0.2)), float(self.attr(n, "beta", 0.5))
            self.done.add(n.name)
            return "RELU6", n.output[0], (w * np.float32(6 * alpha), b * np.float32(6 * alpha) + np.float32(6 * beta))
        act, final = self.next_activation(out)
        return act, final, None

    def _times_sixth(self, y: int, out: str, node, prec: str) -> int:
        z = self.act(out, self.ir.tensors[y].shape)
        self.op("MUL", [y, self.cst(f"{node.name}/sixth", np.array([1 / 6], np.float32))], [z], node, prec, fusedActivationFunction=0)
        return z

    def _hardswish_pair(self, hs) -> bool:
        """HardSigmoid(x) (alpha 1/6, beta 0.5) feeding only Mul(x, .): that pair is HARD_SWISH."""
        alpha, beta = float(self.attr(hs, "alpha", 0.2)), float(self.attr(hs, "beta", 0.5))
        mul = self.only_consumer(hs.output[0])
        return (abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6 and mul is not None and mul.op_type == "Mul"
                and set(mul.input) == {hs.input[0], hs.output[0]})

    # fully connected -----------------------------------------------------

    def _op_Gemm(self, node):
        a = node.input[0]
        bmat = self.const(node.input[1])
        if bmat is None:
            raise _unsupported(node, "B must be constant")
        if self.attr(node, "transA", 0):
            raise _unsupported(node, "transA=1 is not supported")
        w = (bmat if self.attr(node, "transB", 0) else bmat.T).astype(np.float32) * float(self.attr(node, "alpha", 1.0))
        n_out = w.shape[0]
        bias = np.zeros(n_out, np.float32)
        c_dyn = None
        if len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2])
            if c is None:
                c_dyn = node.input[2]
            elif c.size in (1, n_out) and c.ndim <= 2 and (c.ndim < 2 or c.shape[0] == 1):
                bias = np.broadcast_to(c.reshape(-1), (n_out,)).astype(np.float32) * float(self.attr(node, "beta", 1.0))
            else:
                raise _unsupported(node, f"bias of shape {list(c.shape)} is not a per-output vector")
        self._fc(node, a, w, bias, c_dyn)

    def _op_MatMul(self, node):
        a, bname = node.input
        bmat = self.const(bname)
        if bmat is None:
            return self._batch_matmul(node)
        if bmat.ndim != 2:
            raise _unsupported(node, "a constant B must be 2-D")
        self._fc(node, a, bmat.T.astype(np.float32), np.zeros(bmat.shape[1], np.float32), None)

    def _fc(self, node, a: str, w: np.ndarray, bias: np.ndarray, c_dyn: str | None):
        p = self.prec(node)
        rank = len(self.shapes[node.output[0]])
        out = node.output[0]
        if c_dyn is None:
            extra, out = self.next_bias(out, w.shape[0], rank, rank - 1)
            if extra is not None:
                bias = bias + extra
            act, out, post = self._fused_tail(out, w, bias)
            if post is not None:
                w, bias = post
        else:
            act, post = "NONE", None
        tid, layout = self.get(a, "any")
        if layout == "flat":
            w = w[:, self.flat_perm[tid][1]]
        elif layout == "nhwc":
            tid, layout = self.get(a, "plain")
        shape_out = self.shapes[out]
        mid = out if post is None and c_dyn is None else f"{out}/fc"
        y = self.act(mid, shape_out)
        self.op("FULLY_CONNECTED", [tid, self.cst(f"{node.name}/weight", np.ascontiguousarray(w), "weight", share=True),
                                    self.cst(f"{node.name}/bias", bias, "bias")], [y], node, p,
                fusedActivationFunction=_ACT[act], keepNumDims=len(self.shapes[a]) > 2)
        if post is not None:
            y = self._times_sixth(y, out, node, p)
        if c_dyn is not None:
            cid, _ = self.get(c_dyn, "plain")
            z = self.act(out, shape_out)
            self.op("ADD", [y, cid], [z], node, p, fusedActivationFunction=0)
            y = z
        self.vals[out] = (y, "plain")

    def _batch_matmul(self, node):
        p = self.prec(node)
        a, _ = self.get(node.input[0], "plain")
        b, _ = self.get(node.input[1], "plain")
        y = self.act(node.output[0], self.shapes[node.output[0]])
        self.op("BATCH_MATMUL", [a, b], [y], node, p, adjX=False, adjY=False)
        self.vals[node.output[0]] = (y, "plain")

    # elementwise --------------------------------------------------------

    def _unary(self, node, code: str, **options):
        p = self.prec(node)
        tid, layout = self.get(node.input[0], "any")
        y = self.act(node.output[0], self.ir.tensors[tid].shape)
        self.op(code, [tid], [y], node, p, **options)
        self._set(node.output[0], y, layout, tid)

    def _set(self, name: str, y: int, layout: str, src: int | None = None):
        self.vals[name] = (y, layout)
        if layout == "flat" and src is not None:
            self.flat_perm[y] = self.flat_perm[src]

    def _op_Relu(self, node):
        self._unary(node, "RELU")

    def _op_LeakyRelu(self, node):
        self._unary(node, "LEAKY_RELU", alpha=float(self.attr(node, "alpha", 0.01)))

    def _op_Clip(self, node):
        lo, hi = self.clip_bounds(node)
        dtype = self.dtype_of(node.input[0])
        act = self.act_of_bounds(lo, hi) if dtype == "float32" else None
        if act is not None:
            return self._unary(node, act)
        p = self.prec(node)
        tid, layout = self.get(node.input[0], "any")
        shape = self.ir.tensors[tid].shape
        cur = tid
        for code, bound, tag in (("MAXIMUM", lo, "lo"), ("MINIMUM", hi, "hi")):
            if not math.isfinite(bound):
                continue
            y = self.act(f"{node.output[0]}/{tag}", shape, dtype)
            c = self.cst(f"{node.name}/{tag}", np.array([bound]), "int" if dtype == "int32" else "const")
            self.op(code, [cur, c], [y], node, p)
            cur = y
        if cur == tid:
            self.vals[node.output[0]] = self.vals[node.input[0]]
            return
        self.ir.tensors[cur].name = node.output[0]
        self._set(node.output[0], cur, layout, tid)

    def _op_HardSigmoid(self, node):
        if self._hardswish_pair(node):
            mul = self.only_consumer(node.output[0])
            self.done.add(mul.name)
            p = self.prec(node)
            tid, layout = self.get(node.input[0], "any")
            y = self.act(mul.output[0], self.ir.tensors[tid].shape)
            self.op("HARD_SWISH", [tid], [y], node, p)
            return self._set(mul.output[0], y, layout, tid)
        alpha, beta = float(self.attr(node, "alpha", 0.2)), float(self.attr(node, "beta", 0.5))
        p = self.prec(node)
        tid, layout = self.get(node.input[0], "any")
        shape = self.ir.tensors[tid].shape
        t1 = self.act(f"{node.output[0]}/scaled", shape)
        self.op("MUL", [tid, self.cst(f"{node.name}/a6", np.array([6 * alpha], np.float32))], [t1], node, p, fusedActivationFunction=0)
        t2 = self.act(f"{node.output[0]}/relu6", shape)
        self.op("ADD", [t1, self.cst(f"{node.name}/b6", np.array([6 * beta], np.float32))], [t2], node, p,
                fusedActivationFunction=_ACT["RELU6"])
        y = self._times_sixth(t2, node.output[0], node, p)
        self._set(node.output[0], y, layout, tid)

    def _try_hardswish(self, node) -> bool:
        """Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(., 6) (or Mul by 1/6): one HARD_SWISH."""
        if node.op_type != "Add":
            return False
        a, b = node.input
        x, c = (a, self.const(b)) if self.const(b) is not None else (b, self.const(a))
        if c is None or c.size != 1 or float(c.reshape(-1)[0]) != 3.0:
            return False
        clip = self.only_consumer(node.output[0])
        if clip is None or clip.op_type != "Clip" or self.clip_bounds(clip) != (0.0, 6.0):
            return False
        mul = self.only_consumer(clip.output[0])
        if mul is None or mul.op_type != "Mul" or set(mul.input) != {x, clip.output[0]}:
            return False
        last = self.only_consumer(mul.output[0])
        if last is None or last.op_type not in ("Div", "Mul"):
            return False
        k = self.const(last.input[1])
        if k is None or k.size != 1 or last.input[0] != mul.output[0]:
            return False
        k = float(k.reshape(-1)[0])
        if not ((last.op_type == "Div" and k == 6.0) or (last.op_type == "Mul" and abs(k - 1 / 6) < 1e-6)):
            return False
        self.done.update({clip.name, mul.name, last.name})
        p = self.prec(node)
        tid, layout = self.get(x, "any")
        y = self.act(last.output[0], self.ir.tensors[tid].shape)
        self.op("HARD_SWISH", [tid], [y], node, p)
        self._set(last.output[0], y, layout, tid)
        return True

    def _binary(self, node):
        if self._try_hardswish(node):
            return
        code = _BINARY[node.op_type]
        if len(node.input) != 2:
            raise _unsupported(node, "only two inputs are supported")
        if self.dtype_of(node.output[0]) != "float32":  # integer arithmetic on indices
            if code in ("DIV", "POW"):
                raise _unsupported(node, f"integer {node.op_type} is not supported")
            return self._elementwise(node, code, list(node.input))
        a, b = node.input
        ca, cb = self.const(a), self.const(b)
        if code == "DIV" and cb is not None:
            code, cb = "MUL", 1.0 / cb.astype(np.float32)
        p = self.prec(node)
        out_shape = self.shapes[node.output[0]]
        acts = [n for n, c in ((a, ca), (b, cb)) if c is None]
        layouts = [self.vals[n][1] if n in self.vals else "plain" for n in acts]
        use_nhwc = len(out_shape) == 4 and "nhwc" in layouts and all(len(self.shapes[n]) == 4 for n in acts)
        if "flat" in layouts and len(acts) == 1 and (ca if ca is not None else cb) is not None and \
                (ca if ca is not None else cb).size == 1:
            want = "flat"
        else:
            want = "nhwc" if use_nhwc else "plain"
        ins, src = [], None
        for n, c in ((a, ca), (b, cb)):
            if c is None:
                tid, _ = self.get(n, "any" if want == "flat" else want)
                src = tid
                ins.append(tid)
            else:
                ins.append(self.cst(f"{node.name}/{n}", self.const_for(c, want, len(out_shape))))
        options: dict[str, Any] = {}
        out = node.output[0]
        if code in ("ADD", "SUB", "MUL", "DIV"):
            act, out = self.next_activation(out)
            options["fusedActivationFunction"] = _ACT[act]
        shape = _nhwc(out_shape) if want == "nhwc" else (self.ir.tensors[src].shape if want == "flat" else out_shape)
        y = self.act(out, shape)
        self.op(code, ins, [y], node, p, **options)
        self._set(out, y, want, src)

    # pooling and reductions ----------------------------------------------

    def _pool(self, node, code: str):
        x = node.input[0]
        kernel = list(self.attr(node, "kernel_shape"))
        if len(kernel) != 2:
            raise _unsupported(node, "only 2-D pooling is supported")
        strides = list(self.attr(node, "strides", [1, 1]))
        if any(d != 1 for d in self.attr(node, "dilations", [1, 1])):
            raise _unsupported(node, "dilated pooling has no TFLite builtin")
        p = self.prec(node)
        in_hw = self.shapes[x][2:]
        padding, pads = self._padding(node, in_hw, kernel, strides, [1, 1])
        if code == "AVERAGE_POOL_2D" and self.attr(node, "count_include_pad", 0) and (pads or padding == "SAME"):
            if pads is None:  # SAME, but the pads count in the average: pad explicitly
                (t, b), (left, r) = (_same_pads(in_hw[i], kernel[i], strides[i], 1) for i in range(2))
                pads = [t, left, b, r]
            padding = "VALID"
        elif code == "AVERAGE_POOL_2D" and pads:
            raise _unsupported(node, "explicit padding excluded from the average has no TFLite builtin")
        tid, _ = self.get(x, "nhwc")
        if pads:
            tid = self._explicit_pad(tid, pads, node.name, node, p, value=0.0 if code == "AVERAGE_POOL_2D" else -3.0e38)
        h, w = self.ir.tensors[tid].shape[1:3]
        expect = [-(-h // strides[0]), -(-w // strides[1])] if padding == "SAME" else \
            [(h - kernel[0]) // strides[0] + 1, (w - kernel[1]) // strides[1] + 1]
        out_shape = self.shapes[node.output[0]]
        if expect != list(out_shape[2:]):
            raise _unsupported(node, f"output size {out_shape[2:]} (ceil_mode) differs from TFLite's {expect}")
        act, out = self.next_activation(node.output[0])
        y = self.act(out, _nhwc(out_shape))
        self.op(code, [tid], [y], node, p, padding=0 if padding == "SAME" else 1, strideH=strides[0], strideW=strides[1],
                filterHeight=kernel[0], filterWidth=kernel[1], fusedActivationFunction=_ACT[act])
        self.vals[out] = (y, "nhwc")

    def _op_MaxPool(self, node):
        if len(node.output) > 1 and node.output[1]:
            raise _unsupported(node, "the Indices output is not supported")
        self._pool(node, "MAX_POOL_2D")

    def _op_AveragePool(self, node):
        self._pool(node, "AVERAGE_POOL_2D")

    def _reduce(self, node):
        code = _REDUCE[node.op_type]
        x = node.input[0]
        rank = len(self.shapes[x])
        if node.op_type.startswith("Global"):
            axes, keep = list(range(2, rank)), 1
        else:
            keep = int(self.attr(node, "keepdims", 1))
            axes = self.attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                c = self.const(node.input[1])
                if c is None:
                    raise _unsupported(node, "axes must be constant")
                axes = c.tolist()
            if not axes:
                if self.attr(node, "noop_with_empty_axes", 0):
                    self.vals[node.output[0]] = self.vals[x]
                    return
                axes = list(range(rank))
        axes = sorted(a % rank for a in axes)
        p = self.prec(node)
        tid, layout = self.get(x, "any")
        if layout == "nhwc":
            inv = {a: i for i, a in enumerate(NCHW_TO_NHWC)}
            mapped = sorted(inv[a] for a in axes)
            rest = [a for a in NCHW_TO_NHWC if a not in axes]
            if keep or rest == sorted(rest):
                out_layout = "nhwc" if keep else "plain"
                ax = mapped
            else:
                tid, layout = self.get(x, "plain")
                out_layout, ax = "plain", axes
        else:
            if layout == "flat":
                tid, layout = self.get(x, "plain")
            out_layout, ax = "plain", axes
        out_shape = self.shapes[node.output[0]]
        y = self.act(node.output[0], _nhwc(out_shape) if out_layout == "nhwc" else out_shape)
        self.op(code, [tid, self.ints(f"{node.name}/axes", ax)], [y], node, p, keepDims=bool(keep))
        self.vals[node.output[0]] = (y, out_layout)

    # data movement -------------------------------------------------------

    def _reshape_op(self, tid: int, name: str, shape, node, prec: str) -> int:
        y = self.act(name, shape)
        self.op("RESHAPE", [tid, self.ints(f"{name}/shape", shape)], [y], node, prec, newShape=list(shape))
        return y

    def _reshape(self, node):
        x = node.input[0]
        out = node.output[0]
        out_shape = self.shapes[out]
        p = self.prec(node)
        tid, layout = self.get(x, "any")
        in_shape = self.shapes[x]
        if layout == "nhwc" and _same_memory(in_shape):
            y = self._reshape_op(tid, out, out_shape, node, p)
            self.vals[out] = (y, "plain")
            return
        if layout == "nhwc" and self._flatten_feeds_fc(in_shape, out, out_shape):
            n, c, h, w = in_shape
            y = self._reshape_op(tid, out, [n, h * w * c], node, p)
            self.vals[out] = (y, "flat")
            self.flat_perm[y] = ([c, h, w], np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1))
            return
        if layout != "plain":
            tid, _ = self.get(x, "plain")
        y = self._reshape_op(tid, out, out_shape, node, p)
        self.vals[out] = (y, "plain")

    def _flatten_feeds_fc(self, in_shape, out: str, out_shape) -> bool:
        if len(out_shape) != 2 or out_shape[0] != in_shape[0] or out in self.graph_outputs:
            return False
        cons = self.consumers.get(out, [])
        for n in cons:
            if n.input[0] != out or n.input[1] not in self.consts:
                return False
            if n.op_type == "Gemm" and not self.attr(n, "transA", 0):
                continue
            if n.op_type == "MatMul" and self.consts[n.input[1]].ndim == 2:
                continue
            return False
        return bool(cons)

    def _op_Transpose(self, node):
        x = node.input[0]
        perm = list(self.attr(node, "perm", list(range(len(self.shapes[x])))[::-1]))
        p = self.prec(node)
        tid, layout = self.get(x, "any")
        if layout == "nhwc" and perm == list(NCHW_TO_NHWC):
            self.vals[node.output[0]] = (tid, "plain")  # already in that order
            return
        if layout != "plain":
            tid, _ = self.get(x, "plain")
        y = self.act(node.output[0], self.shapes[node.output[0]])
        self.op("TRANSPOSE", [tid, self.ints(f"{node.name}/perm", perm)], [y], node, p)
        self.vals[node.output[0]] = (y, "plain")

    def _op_Concat(self, node):
        axis = int(self.attr(node, "axis"))
        out_shape = self.shapes[node.output[0]]
        rank = len(out_shape)
        axis %= rank
        p = self.prec(node)
        if any(i in self.consts for i in node.input):
            raise _unsupported(node, "constant inputs to Concat are not supported")
        nhwc = rank == 4 and any(self.vals[i][1] == "nhwc" for i in node.input)
        want = "nhwc" if nhwc else "plain"
        ins = [self.get(i, want)[0] for i in node.input]
        y = self.act(node.output[0], _nhwc(out_shape) if nhwc else out_shape)
        self.op("CONCATENATION", ins, [y], node, p, axis=NCHW_TO_NHWC.index(axis) if nhwc else axis, fusedActivationFunction=0)
        self.vals[node.output[0]] = (y, want)

    def _softmax(self, node, code: str):
        """SOFTMAX / LOG_SOFTMAX run over the last axis: another axis is transposed there and back."""
        x, out = node.input[0], node.output[0]
        rank = len(self.shapes[x])
        axis = int(self.attr(node, "axis", -1 if self.opset >= 13 else 1)) % rank
        p = self.prec(node)
        opts = {"beta": 1.0} if code == "SOFTMAX" else {}
        tid, layout = self.get(x, "any")
        if layout == "flat":
            tid, layout = self.get(x, "plain")
        if self.opset < 13 and axis != rank - 1:  # opset < 13: over the input flattened to 2-D at axis
            tid, layout = self.get(x, "plain")
            shape = self.shapes[x]
            flat = [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]
            t = self._reshape_op(tid, f"{out}/2d", flat, node, p)
            y2 = self.act(f"{out}/2d_out", flat)
            self.op(code, [t], [y2], node, p, **opts)
            self.vals[out] = (self._reshape_op(y2, out, shape, node, p), "plain")
            return
        pos = NCHW_TO_NHWC.index(axis) if layout == "nhwc" else axis
        t, perm = self._to_last(tid, pos, f"{out}/to_last", node, p)
        y = self.act(out if perm is None else f"{out}/last", self.ir.tensors[t].shape)
        self.op(code, [t], [y], node, p, **opts)
        if perm is not None:
            z = self.act(out, self.ir.tensors[tid].shape)
            self.op("TRANSPOSE", [y, self.ints(f"{out}/perm_back", perm)], [z], node, p)
            y = z
        self.vals[out] = (y, layout)

    def _op_Softmax(self, node):
        self._softmax(node, "SOFTMAX")

    def _op_LogSoftmax(self, node):
        self._softmax(node, "LOG_SOFTMAX")

    def _op_Pad(self, node):
        x = node.input[0]
        rank = len(self.shapes[x])
        mode = self.attr(node, "mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            raise _unsupported(node, "only constant padding is supported")
        if self.opset < 11:
            pads, value = list(self.attr(node, "pads")), float(self.attr(node, "value", 0.0))
        else:
            pc = self.const(node.input[1])
            if pc is None:
                raise _unsupported(node, "pads must be constant")
            pads = pc.tolist()
            vc = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            value = _scalar(vc) if vc is not None else 0.0
            if len(node.input) > 3 and node.input[3]:
                raise _unsupported(node, "the axes input is not supported")
        if any(v < 0 for v in pads):
            raise _unsupported(node, "negative pads are not supported")
        p = self.prec(node)
        tid, layout = self.get(x, "any")
        if layout == "flat":
            tid, layout = self.get(x, "plain")
        order = NCHW_TO_NHWC if layout == "nhwc" else tuple(range(rank))
        paddings = [[pads[a], pads[a + rank]] for a in order]
        out_shape = self.shapes[node.output[0]]
        y = self.act(node.output[0], _nhwc(out_shape) if layout == "nhwc" else out_shape)
        pid = self.ints(f"{node.name}/paddings", paddings)
        if value == 0.0:
            self.op("PAD", [tid, pid], [y], node, p)
        else:
            self.op("PADV2", [tid, pid, self.cst(f"{node.name}/value", np.array([value], np.float32), "padval")], [y], node, p)
        self.vals[node.output[0]] = (y, layout)

    def _op_Slice(self, node):
        x = node.input[0]
        shape = self.shapes[x]
        rank = len(shape)
        if self.opset < 10:
            starts, ends = list(self.attr(node, "starts")), list(self.attr(node, "ends"))
            axes = list(self.attr(node, "axes", list(range(len(starts)))))
            steps = [1] * len(starts)
        else:
            vals = [self.const(i) if i else None for i in list(node.input[1:]) + [""] * (5 - len(node.input))]
            if vals[0] is None or vals[1] is None or any(v is None for v, i in zip(vals[2:], node.input[3:]) if i):
                raise _unsupported(node, "starts/ends/axes/steps must be constant")
            starts, ends = vals[0].tolist(), vals[1].tolist()
            axes = vals[2].tolist() if vals[2] is not None else list(range(len(starts)))
            steps = vals[3].tolist() if vals[3] is not None else [1] * len(starts)
        if any(s <= 0 for s in steps):
            raise _unsupported(node, "only positive steps are supported")
        begin, end, stride = [0] * rank, list(shape), [1] * rank
        for s, e, a, st in zip(starts, ends, axes, steps):
            a %= rank
            d = shape[a]
            s = min(max(s + d if s < 0 else s, 0), d)
            e = min(max(e + d if e < 0 else e, 0), d)
            begin[a], end[a], stride[a] = s, e, st
        p = self.prec(node)
        tid, layout = self.get(x, "any")
        if layout == "flat":
            tid, layout = self.get(x, "plain")
        order = NCHW_TO_NHWC if layout == "nhwc" else tuple(range(rank))
        out_shape = self.shapes[node.output[0]]
        y = self.act(node.output[0], _nhwc(out_shape) if layout == "nhwc" else out_shape)
        self.op("STRIDED_SLICE", [tid, self.ints(f"{node.name}/begin", [begin[a] for a in order]),
                                  self.ints(f"{node.name}/end", [end[a] for a in order]),
                                  self.ints(f"{node.name}/strides", [stride[a] for a in order])], [y], node, p,
                beginMask=0, endMask=0, ellipsisMask=0, newAxisMask=0, shrinkAxisMask=0, offset=False)
        self.vals[node.output[0]] = (y, layout)

    # ---------------------------------------------------------------- patterns: GELU and decomposed layer norm

    def _uses(self, tensor: str) -> list:
        """The distinct nodes consuming ``tensor``."""
        seen: dict[str, Any] = {}
        for n in self.consumers.get(tensor, []):
            seen.setdefault(n.name, n)
        return list(seen.values())

    def _sole(self, tensor: str, op_type: str):
        """The only consumer of ``tensor`` when it is an ``op_type`` node (and ``tensor`` no graph output)."""
        cons = self._uses(tensor)
        if len(cons) == 1 and cons[0].op_type == op_type and tensor not in self.graph_outputs:
            return cons[0]
        return None

    def _scalar_const(self, name: str) -> float | None:
        c = self.const(name)
        return float(c.reshape(-1)[0]) if c is not None and c.size == 1 and c.dtype.kind == "f" else None

    def _with_const(self, node, value: float, tol: float = 1e-3) -> str | None:
        """The activation operand of commutative binary ``node`` whose other operand is the scalar ``value``."""
        if len(node.input) != 2:
            return None
        for k in (0, 1):
            v = self._scalar_const(node.input[k])
            if v is not None and abs(v - value) <= tol * max(1.0, abs(value)) and self.const(node.input[1 - k]) is None:
                return node.input[1 - k]
        return None

    def _halves(self, n, t: str) -> bool:
        """Whether node ``n`` is ``t * 0.5`` (either order) or ``t / 2``."""
        if n is None or len(n.input) != 2:
            return False
        if n.op_type == "Mul":
            return self._with_const(n, 0.5) == t
        return n.op_type == "Div" and n.input[0] == t and self._scalar_const(n.input[1]) == 2.0

    def _sole_any(self, tensor: str, *op_types: str):
        for op_type in op_types:
            n = self._sole(tensor, op_type)
            if n is not None:
                return n
        return None

    def _gelu_tail(self, t: str, x: str):
        """``Add(t, 1)`` times ``x`` and 0.5 (or divided by 2) in any order/grouping: (its nodes, final output) or None."""
        add = self._sole(t, "Add")
        if add is None or self._with_const(add, 1.0) != t:
            return None
        a = add.output[0]
        m1 = self._sole_any(a, "Mul", "Div")
        if m1 is None or len(m1.input) != 2:
            return None
        if self._halves(m1, a):  # x * (a * 0.5)
            m2 = self._sole(m1.output[0], "Mul")
            return ([add, m1, m2], m2.output[0]) if m2 is not None and set(m2.input) == {x, m1.output[0]} else None
        if m1.op_type != "Mul":
            return None
        other = m1.input[1] if m1.input[0] == a else m1.input[0]
        if other == x:  # (x * a) * 0.5
            m2 = self._sole_any(m1.output[0], "Mul", "Div")
            return ([add, m1, m2], m2.output[0]) if self._halves(m2, m1.output[0]) else None
        h = self.producer.get(other)  # (x * 0.5) * a
        if self._halves(h, x):
            s = self._sole(other, "Mul")
            if s is not None and s.name == m1.name:
                return [h, add, m1], m1.output[0]
        return None

    def _match_gelu_erf(self, erf):
        u = erf.input[0]
        d = self.producer.get(u)
        if d is None or self._sole(u, "Erf") is None:
            return None
        x = None
        if d.op_type == "Div" and len(d.input) == 2 and self.const(d.input[0]) is None:
            v = self._scalar_const(d.input[1])
            x = d.input[0] if v is not None and abs(v - math.sqrt(2)) < 1e-3 else None
        elif d.op_type == "Mul":
            x = self._with_const(d, 1 / math.sqrt(2))
        tail = self._gelu_tail(erf.output[0], x) if x else None
        if tail is None:
            return None
        return [d, erf, *tail[0]], {"x": x, "out": tail[1], "approximate": False}

    def _cube(self, n, x: str) -> list | None:
        """Nodes computing x**3 ending in ``n``: Pow(x, 3) or x * (x * x)."""
        if n.op_type == "Pow" and n.input[0] == x and self._scalar_const(n.input[1]) == 3.0:
            return [n]
        if n.op_type == "Mul" and x in n.input and len(n.input) == 2:
            other = n.input[1] if n.input[0] == x else n.input[0]
            sq = self.producer.get(other)
            if sq is not None and sq.op_type == "Mul" and list(sq.input) == [x, x] and self._sole(other, "Mul") is not None:
                return [sq, n]
        return None

    def _match_gelu_tanh(self, th):
        """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))."""
        v = th.input[0]
        m = self.producer.get(v)
        if m is None or m.op_type != "Mul" or self._sole(v, "Tanh") is None:
            return None
        w = self._with_const(m, math.sqrt(2 / math.pi))
        a = self.producer.get(w) if w else None
        if a is None or a.op_type != "Add" or len(a.input) != 2 or self._sole(w, "Mul") is None:
            return None
        for x, k in ((a.input[0], a.input[1]), (a.input[1], a.input[0])):
            km = self.producer.get(k)
            if km is None or km.op_type != "Mul" or self._sole(k, "Add") is None:
                continue
            c = self._with_const(km, 0.044715)
            cn = self.producer.get(c) if c else None
            cube = self._cube(cn, x) if cn is not None and self._sole(c, "Mul") is not None else None
            tail = self._gelu_tail(th.output[0], x) if cube else None
            if tail:
                return [*cube, km, a, m, th, *tail[0]], {"x": x, "out": tail[1], "approximate": True}
        return None

    def _axes_of(self, node, rank: int) -> list[int] | None:
        axes = self.attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            c = self.const(node.input[1])
            axes = None if c is None else c.tolist()
        return None if axes is None else sorted(int(a) % rank for a in axes)

    def _match_layernorm(self, r1):
        """ReduceMean -> Sub -> Pow 2 (or Mul) -> ReduceMean -> Add eps -> Sqrt -> Div [-> Mul gamma] [-> Add beta]."""
        x, mean = r1.input[0], r1.output[0]
        rank = len(self.shapes.get(x, []))
        axes = self._axes_of(r1, rank) if rank else None
        if not axes or not self.attr(r1, "keepdims", 1) or self.const(x) is not None:
            return None
        sub = self._sole(mean, "Sub")
        if sub is None or list(sub.input) != [x, mean]:
            return None
        d = sub.output[0]
        uses = self._uses(d)
        if d in self.graph_outputs or len(uses) != 2:
            return None
        sq = next((n for n in uses if n.op_type in ("Pow", "Mul")), None)
        div = next((n for n in uses if n.op_type == "Div"), None)
        if sq is None or div is None:
            return None
        if not ((sq.op_type == "Pow" and sq.input[0] == d and self._scalar_const(sq.input[1]) == 2.0)
                or (sq.op_type == "Mul" and list(sq.input) == [d, d])):
            return None
        r2 = self._sole(sq.output[0], "ReduceMean")
        if r2 is None or self._axes_of(r2, rank) != axes or not self.attr(r2, "keepdims", 1):
            return None
        add = self._sole(r2.output[0], "Add")
        eps_in = next((i for i in (add.input if add is not None else []) if self._scalar_const(i) is not None), None)
        if eps_in is None or self._with_const(add, self._scalar_const(eps_in), 0.0) != r2.output[0]:
            return None
        sqrt = self._sole(add.output[0], "Sqrt")
        if sqrt is None or list(div.input) != [d, sqrt.output[0]] or self._sole(sqrt.output[0], "Div") is None:
            return None
        nodes, out, gamma, beta = [r1, sub, sq, r2, add, sqrt, div], div.output[0], None, None
        for op_type in ("Mul", "Add"):
            n = self._sole(out, op_type)
            if n is None or len(n.input) != 2:
                break
            c = self.const(n.input[1] if n.input[0] == out else n.input[0])
            if c is None or c.dtype.kind != "f":
                break
            if op_type == "Mul":
                gamma = c
            else:
                beta = c
            nodes.append(n)
            out = n.output[0]
        return nodes, {"x": x, "axes": axes, "eps": self._scalar_const(eps_in), "gamma": gamma, "beta": beta, "out": out}

    def _find_patterns(self) -> dict[str, tuple[str, dict]]:
        """GELU and decomposed layer-norm subgraphs: first node -> (emitter, its arguments); the others marked done."""
        order = {n.name: i for i, n in enumerate(self.g.node)}
        claimed: set[str] = set()
        found: dict[str, tuple[str, dict]] = {}
        matchers = {"Erf": (self._match_gelu_erf, "gelu"), "Tanh": (self._match_gelu_tanh, "gelu"),
                    "ReduceMean": (self._match_layernorm, "layernorm")}
        for node in self.g.node:
            if node.op_type not in matchers:
                continue
            match, kind = matchers[node.op_type]
            m = match(node)
            if m is None or any(n.name in claimed for n in m[0]):
                continue
            nodes = sorted(m[0], key=lambda n: order[n.name])
            claimed.update(n.name for n in nodes)
            found[nodes[0].name] = (kind, m[1])
            self.done.update(n.name for n in nodes[1:])
        return found

    def _emit_gelu(self, node, x: str, out: str, approximate: bool):
        tid, layout = self.get(x, "any")
        shape = self.ir.tensors[tid].shape
        y = self.act(out, shape)
        if not self.micro:
            self.op("GELU", [tid], [y], node, self.cur_prec, approximate=bool(approximate))
            return self._set(out, y, layout, tid)
        # TFLite Micro has no GELU kernel: its tanh form 0.5x(1 + tanh(x(a + b x^2))) in int8 builtins
        p = self.cur_prec
        a, b = math.sqrt(2 / math.pi), math.sqrt(2 / math.pi) * 0.044715

        def step(code, ins, tag, const=None):
            if const is not None:
                ins = [*ins, self.cst(f"{out}/gelu/{tag}_c", np.array([const], np.float32))]
            t = y if tag == "out" else self.act(f"{out}/gelu/{tag}", shape)
            self.op(code, ins, [t], node, p, **({} if code == "TANH" else {"fusedActivationFunction": 0}))
            return t

        sq = step("MUL", [tid, tid], "x2")
        poly = step("ADD", [step("MUL", [sq], "bx2", b)], "poly", a)
        th = step("TANH", [step("MUL", [tid, poly], "inner")], "tanh")
        step("MUL", [step("MUL", [tid], "half_x", 0.5), step("ADD", [th], "one_plus", 1.0)], "out")
        self._set(out, y, layout, tid)

    def _emit_layernorm(self, node, x: str, axes: list[int], eps: float, gamma, beta, out: str):
        """Layer norm as TF's converter lowers it: MEAN, SQUARED_DIFFERENCE, MEAN, ADD eps, RSQRT, SUB, MUL (, MUL, ADD)."""
        p = self.cur_prec
        tid, layout = self.get(x, "any")
        if layout == "flat":
            tid, layout = self.get(x, "plain")
        shape = list(self.ir.tensors[tid].shape)
        if layout == "nhwc":  # normalise in place: the axes (and gamma/beta) follow the layout
            axes = sorted(NCHW_TO_NHWC.index(a) for a in axes)
        red = [1 if i in axes else d for i, d in enumerate(shape)]
        n = f"{out}/ln"
        ax = self.ints(f"{n}/axes", axes)
        mean = self.act(f"{n}/mean", red)
        self.op("MEAN", [tid, ax], [mean], node, p, keepDims=True)
        sq = self.act(f"{n}/sqdiff", shape)
        self.op("SQUARED_DIFFERENCE", [tid, mean], [sq], node, p)
        var = self.act(f"{n}/var", red)
        self.op("MEAN", [sq, ax], [var], node, p, keepDims=True)
        ve = self.act(f"{n}/var_eps", red)
        self.op("ADD", [var, self.cst(f"{n}/eps", np.array([eps], np.float32))], [ve], node, p, fusedActivationFunction=0)
        rs = self.act(f"{n}/rstd", red)
        self.op("RSQRT", [ve], [rs], node, p)
        xc = self.act(f"{n}/centered", shape)
        self.op("SUB", [tid, mean], [xc], node, p, fusedActivationFunction=0)
        steps = [("MUL", None, "normed")]
        if gamma is not None:
            steps.append(("MUL", gamma, "scaled"))
        if beta is not None:
            steps.append(("ADD", beta, "shifted"))
        cur = xc
        for i, (code, c, tag) in enumerate(steps):
            other = rs if c is None else self.cst(f"{n}/{tag}", self.const_for(c, layout, len(shape)))
            y = self.act(out if i == len(steps) - 1 else f"{n}/{tag}", shape)
            self.op(code, [cur, other], [y], node, p, fusedActivationFunction=0)
            cur = y
        self.vals[out] = (cur, layout)

    def _op_Erf(self, node):
        raise _unsupported(node, "not supported by the TFLite writer: TFLite has no ERF builtin; only Erf inside GELU "
                                 "(x * 0.5 * (1 + Erf(x / sqrt(2)))) converts, to the GELU builtin")

    def _op_Gelu(self, node):
        approx = self.attr(node, "approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else approx
        self._emit_gelu(node, node.input[0], node.output[0], approx == "tanh")

    def _op_LayerNormalization(self, node):
        x = node.input[0]
        rank = len(self.shapes[x])
        axis = int(self.attr(node, "axis", -1)) % rank
        gamma = self.const(node.input[1])
        has_b = len(node.input) > 2 and bool(node.input[2])
        beta = self.const(node.input[2]) if has_b else None
        if gamma is None or (has_b and beta is None):
            raise _unsupported(node, "Scale and B must be constant")
        if any(node.output[1:]):
            raise _unsupported(node, "the Mean / InvStdDev outputs are not supported")
        self._emit_layernorm(node, x, list(range(axis, rank)), float(self.attr(node, "epsilon", 1e-5)), gamma, beta,
                             node.output[0])

    # gather, comparisons, select, logical, top-k --------------------------

    def _const_tensor(self, name: str, c: np.ndarray, layout: str, act_dtype: str = "float32") -> int:
        """A constant operand of an elementwise op, in ``layout``, typed like its data (float, int32, bool)."""
        c = np.asarray(c)
        if c.size == 1:
            c = c.reshape([1])
        elif layout == "nhwc":
            c = np.ascontiguousarray(c.reshape([1] * (4 - c.ndim) + list(c.shape)).transpose(NCHW_TO_NHWC))
        if c.dtype == np.bool_:
            return self.ir.add(name, c.shape, "bool", c)
        if c.dtype.kind in "iu" or act_dtype == "int32":
            return self.cst(name, c, "int")
        return self.cst(name, c)

    def _elementwise(self, node, code: str, names: list[str], **options):
        """An op over broadcast operands (activations and constants): NHWC when every activation is rank-4 NHWC."""
        out = node.output[0]
        out_shape = self.shapes[out]
        acts = [n for n in names if self.const(n) is None]
        layouts = [self.vals[n][1] for n in acts]
        use_nhwc = len(out_shape) == 4 and "nhwc" in layouts and all(len(self.shapes[n]) == 4 for n in acts)
        want = "nhwc" if use_nhwc else "plain"
        act_dtype = self.dtype_of(acts[-1]) if acts else "float32"
        ins = [self.get(n, want)[0] if self.const(n) is None else
               self._const_tensor(f"{node.name}/{n}", self.const(n), want, act_dtype) for n in names]
        y = self.act(out, _nhwc(out_shape) if want == "nhwc" else out_shape, self.dtype_of(out))
        self.op(code, ins, [y], node, self.prec(node), **options)
        self.vals[out] = (y, want)

    def _compare(self, node):
        self._elementwise(node, _COMPARE[node.op_type], list(node.input))

    _op_Equal = _op_Greater = _op_Less = _op_GreaterOrEqual = _op_LessOrEqual = _compare

    def _op_Not(self, node):
        self._elementwise(node, "LOGICAL_NOT", [node.input[0]])

    def _op_And(self, node):
        self._elementwise(node, "LOGICAL_AND", list(node.input))

    def _op_Or(self, node):
        self._elementwise(node, "LOGICAL_OR", list(node.input))

    def _op_Where(self, node):
        self._elementwise(node, "SELECT_V2", list(node.input))

    def _op_Gather(self, node):
        data, idx = node.input
        cd, ci = self.const(data), self.const(idx)
        rank = cd.ndim if cd is not None else len(self.shapes[data])
        axis = int(self.attr(node, "axis", 0)) % rank
        out = node.output[0]
        p = self.prec(node)
        if cd is not None:  # an embedding table
            if cd.dtype.kind != "f":
                raise _unsupported(node, "only float constant tables are supported")
            params, layout = self.cst(f"{node.name}/table", cd), "plain"
        else:
            params, layout = self.get(data, "any")
            if layout == "flat" or (layout == "nhwc" and (ci is None or ci.ndim != 1)):
                params, layout = self.get(data, "plain")
        if ci is not None:
            ci = ci.astype(np.int64)
            dim = (cd.shape if cd is not None else self.shapes[data])[axis]
            ci = np.asarray(np.where(ci < 0, ci + dim, ci), np.int32)  # a 0-d index stays 0-d: the rank drops
            ind = self.ir.add(f"{node.name}/indices", ci.shape, "int", ci)
        else:
            if self.dtype_of(idx) != "int32":
                raise _unsupported(node, "indices must be integers")
            ind, _ = self.get(idx, "plain")
        out_shape = self.shapes[out]
        y = self.act(out, _nhwc(out_shape) if layout == "nhwc" else out_shape, self.dtype_of(out))
        self.op("GATHER", [params, ind], [y], node, p, axis=NCHW_TO_NHWC.index(axis) if layout == "nhwc" else axis, batchDims=0)
        self.vals[out] = (y, layout)

    def _to_last(self, tid: int, pos: int, name: str, node, p: str) -> tuple[int, list[int] | None]:
        """``tid`` with axis ``pos`` swapped to the last (a TRANSPOSE; none when it already is): (tensor, perm or None)."""
        shape = self.ir.tensors[tid].shape
        last = len(shape) - 1
        if pos == last:
            return tid, None
        perm = list(range(len(shape)))
        perm[pos], perm[last] = last, pos
        t = self.act(name, [shape[i] for i in perm], self.ir.tensors[tid].dtype)
        self.op("TRANSPOSE", [tid, self.ints(f"{name}/perm", perm)], [t], node, p)
        return t, perm

    def _op_TopK(self, node):
        x = node.input[0]
        k = self.const(node.input[1])
        if k is None:
            raise _unsupported(node, "K must be constant")
        if not self.attr(node, "largest", 1):
            raise _unsupported(node, "largest=0 (the k smallest) has no TFLite builtin (TOPK_V2 returns the largest)")
        rank = len(self.shapes[x])
        axis = int(self.attr(node, "axis", -1)) % rank
        p = self.prec(node)
        tid, layout = self.get(x, "any")
        if layout == "flat":
            tid, layout = self.get(x, "plain")
        pos = NCHW_TO_NHWC.index(axis) if layout == "nhwc" else axis
        t, perm = self._to_last(tid, pos, f"{node.output[0]}/to_last", node, p)
        kshape = list(self.ir.tensors[t].shape[:-1]) + [int(k.reshape(-1)[0])]
        outs = []
        for name, dtype in zip(node.output, ("float32", "int32")):
            outs.append(self.act(name if perm is None else f"{name}/last", kshape, dtype))
        self.op("TOPK_V2", [t, self.ints(f"{node.name}/k", [int(k.reshape(-1)[0])])], outs, node, p)
        for name, o in zip(node.output, outs):
            if not name:
                continue
            if perm is not None:
                shape = [kshape[i] for i in perm]
                y = self.act(name, shape, self.ir.tensors[o].dtype)
                self.op("TRANSPOSE", [o, self.ints(f"{name}/perm", perm)], [y], node, p)
                o = y
            self.vals[name] = (o, layout)

    def _op_Split(self, node):
        """One STRIDED_SLICE per output (int8: each shares the input's parameters), in the input's layout."""
        x = node.input[0]
        shape = self.shapes[x]
        rank = len(shape)
        axis = int(self.attr(node, "axis", 0)) % rank
        sizes = [self.shapes[o][axis] for o in node.output]  # the sizes onnxruntime produced at these shapes
        p = self.prec(node)
        tid, layout = self.get(x, "any")
        if layout == "flat":
            tid, layout = self.get(x, "plain")
        order = NCHW_TO_NHWC if layout == "nhwc" else tuple(range(rank))
        start = 0
        for out, size in zip(node.output, sizes):
            begin, end = [0] * rank, list(shape)
            begin[axis], end[axis] = start, start + size
            start += size
            if not out:
                continue
            out_shape = self.shapes[out]
            y = self.act(out, _nhwc(out_shape) if layout == "nhwc" else out_shape)
            self.op("STRIDED_SLICE", [tid, self.ints(f"{out}/begin", [begin[a] for a in order]),
                                      self.ints(f"{out}/end", [end[a] for a in order]),
                                      self.ints(f"{out}/strides", [1] * rank)], [y], node, p,
                    beginMask=0, endMask=0, ellipsisMask=0, newAxisMask=0, shrinkAxisMask=0, offset=False)
            self.vals[out] = (y, layout)

    # resize, transposed convolution, einsum --------------------------------

    def _op_Resize(self, node):
        x = node.input[0]
        in_shape, out_shape = self.shapes[x], self.shapes[node.output[0]]
        if len(in_shape) != 4 or list(in_shape[:2]) != list(out_shape[:2]):
            raise _unsupported(node, "only resizing the two spatial axes of a 4-D NCHW tensor maps to TFLite")
        mode = self._str_attr(node, "mode", "nearest")
        ctm = self._str_attr(node, "coordinate_transformation_mode", "half_pixel" if self.opset >= 11 else "asymmetric")
        # opset 10: onnxruntime rounds down when upsampling, up when downsampling
        up = all(o >= i for o, i in zip(out_shape[2:], in_shape[2:]))
        nearest_mode = self._str_attr(node, "nearest_mode", "round_prefer_floor" if self.opset >= 11 else ("floor" if up else "ceil"))
        if mode not in ("nearest", "linear"):
            raise _unsupported(node, f"mode {mode} has no TFLite builtin (RESIZE_NEAREST_NEIGHBOR / RESIZE_BILINEAR only)")
        if self.attr(node, "antialias", 0):
            raise _unsupported(node, "antialias has no TFLite builtin")
        if self.attr(node, "axes") is not None or self._str_attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            raise _unsupported(node, "axes / keep_aspect_ratio_policy are not supported")
        scales = None
        sc_in = node.input[2] if self.opset >= 11 and len(node.input) > 2 else (node.input[1] if self.opset < 11 else "")
        if sc_in:
            c = self.const(sc_in)
            if c is None:
                raise _unsupported(node, "scales must be constant")
            scales = [float(v) for v in c.reshape(-1)] if c.size else None
        flags = self._resize_flags(mode, ctm, nearest_mode, in_shape[2:], out_shape[2:], scales[2:] if scales else None)
        if flags is None:
            raise _unsupported(node, f"{mode} with coordinate_transformation_mode={ctm}"
                                     f"{', nearest_mode=' + nearest_mode if mode == 'nearest' else ''} at "
                                     f"{list(in_shape[2:])} -> {list(out_shape[2:])} samples other pixels than TFLite's "
                                     "align_corners / half_pixel_centers resize")
        p = self.prec(node)
        tid, _ = self.get(x, "nhwc")
        out = node.output[0]
        y = self.act(out, _nhwc(out_shape))
        code = "RESIZE_NEAREST_NEIGHBOR" if mode == "nearest" else "RESIZE_BILINEAR"
        self.op(code, [tid, self.ints(f"{node.name}/size", list(out_shape[2:]))], [y], node, p,
                alignCorners=flags[0], halfPixelCenters=flags[1])
        self.vals[out] = (y, "nhwc")

    def _str_attr(self, node, name: str, default: str) -> str:
        v = self.attr(node, name, default)
        return v.decode() if isinstance(v, bytes) else v

    @staticmethod
    def _resize_flags(mode, ctm, nearest_mode, in_hw, out_hw, scales) -> tuple[bool, bool] | None:
        """TFLite's (align_corners, half_pixel_centers) that sample exactly what ONNX's Resize does, or None."""
        def onnx_coords(i, n_in, n_out, s):
            x = np.arange(n_out, dtype=np.float64)
            if ctm == "half_pixel":
                return (x + 0.5) / s - 0.5
            if ctm == "pytorch_half_pixel":
                return (x + 0.5) / s - 0.5 if n_out > 1 else np.zeros_like(x)
            if ctm == "align_corners":
                return x * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros_like(x)
            if ctm == "asymmetric":
                return x / s
            if ctm == "tf_half_pixel_for_nn":
                return (x + 0.5) / s
            if ctm == "half_pixel_symmetric":
                adj = n_out / (s * n_in)
                return n_in / 2 * (1 - adj) + (x + 0.5) / s - 0.5
            return None

        def onnx_index(c, n_in):
            r = {"round_prefer_floor": np.ceil(c - 0.5), "round_prefer_ceil": np.floor(c + 0.5), "floor": np.floor(c),
                 "ceil": np.ceil(c)}.get(nearest_mode)
            return None if r is None else np.clip(r, 0, n_in - 1)

        def tfl(n_in, n_out, align, half):
            x = np.arange(n_out, dtype=np.float64)
            s = (n_in - 1) / (n_out - 1) if align and n_out > 1 else n_in / n_out
            if mode == "nearest":
                idx = np.floor(x * s + 0.5) if align else np.floor((x + (0.5 if half else 0.0)) * s)
                return np.clip(idx, 0, n_in - 1)
            return np.clip((x + 0.5) * s - 0.5 if half else x * s, 0, n_in - 1)

        for align, half in ((False, False), (True, False), (False, True)):
            ok = True
            for i in range(2):
                n_in, n_out = int(in_hw[i]), int(out_hw[i])
                s = scales[i] if scales else n_out / n_in
                c = onnx_coords(i, n_in, n_out, s)
                if c is None:
                    return None
                want = onnx_index(c, n_in) if mode == "nearest" else np.clip(c, 0, n_in - 1)
                if want is None:
                    return None
                if not np.allclose(want, tfl(n_in, n_out, align, half), atol=1e-5):
                    ok = False
                    break
            if ok:
                return align, half
        return None

    def _op_ConvTranspose(self, node):
        x = node.input[0]
        w = self.const(node.input[1])
        if w is None or w.ndim != 4:
            raise _unsupported(node, "the weight must be a constant 2-D convolution kernel")
        if int(self.attr(node, "group", 1)) != 1:
            raise _unsupported(node, "grouped transposed convolution has no TFLite builtin")
        if any(d != 1 for d in self.attr(node, "dilations", [1, 1])):
            raise _unsupported(node, "dilated transposed convolution has no TFLite builtin")
        auto = self._str_attr(node, "auto_pad", "NOTSET")
        cin, cout, kh, kw = w.shape
        b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(cout, np.float32)
        if b is None:
            raise _unsupported(node, "the bias must be constant")
        strides = list(self.attr(node, "strides", [1, 1]))
        in_hw = self.shapes[x][2:]
        out_shape = list(self.shapes[node.output[0]])
        if auto == "VALID":
            begin = [0, 0]
        elif auto in ("SAME_UPPER", "SAME_LOWER") or self.attr(node, "output_shape") is not None:
            # ONNX derives the pads from the output size: the total split evenly, the odd one at the end for
            # SAME_UPPER, at the start otherwise
            op_pad = list(self.attr(node, "output_padding", [0, 0]))
            total = [strides[i] * (in_hw[i] - 1) + op_pad[i] + (kh, kw)[i] - out_shape[2 + i] for i in range(2)]
            begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        else:
            begin = list(self.attr(node, "pads", [0, 0, 0, 0]))[:2]
        if any(b < 0 for b in begin):
            raise _unsupported(node, "negative padding is not supported")
        # TFLite's output = the full transposed convolution cropped from pad_before (0 for VALID, centred for SAME)
        same_before = [max(((in_hw[i] - 1) * strides[i] + (kh, kw)[i] - out_shape[2 + i]) // 2, 0) for i in range(2)]
        p = self.prec(node)
        b = b.astype(np.float32).copy()
        extra, out = self.next_bias(node.output[0], cout, 4, 1)
        if extra is not None:
            b += extra
        tid, _ = self.get(x, "nhwc")
        n = out_shape[0]
        full = [(in_hw[i] - 1) * strides[i] + (kh, kw)[i] for i in range(2)]
        if begin == same_before and all(-(-out_shape[2 + i] // strides[i]) == in_hw[i] for i in range(2)):
            padding, tfl_hw, crop = 0, out_shape[2:], None  # SAME: TFLite's own centred crop
        else:  # VALID: the full output (plus output_padding rows), then cropped
            padding, tfl_hw = 1, [max(begin[i] + out_shape[2 + i], full[i]) for i in range(2)]
            crop = begin if tfl_hw != list(out_shape[2:]) else None
        y = self.act(out if crop is None else f"{out}/full", [n, *tfl_hw, cout])
        self.op("TRANSPOSE_CONV", [self.ints(f"{node.name}/output_shape", [n, *tfl_hw, cout]),
                                   self.cst(f"{node.name}/weight", w.transpose(1, 2, 3, 0).astype(np.float32), "weight"), tid,
                                   self.cst(f"{node.name}/bias", b, "bias")], [y], node, p,
                padding=padding, strideH=strides[0], strideW=strides[1], fusedActivationFunction=0, axis=0)
        if crop is not None:
            z = self.act(out, _nhwc(out_shape))
            self.op("STRIDED_SLICE", [y, self.ints(f"{node.name}/begin", [0, crop[0], crop[1], 0]),
                                      self.ints(f"{node.name}/end", [n, crop[0] + out_shape[2], crop[1] + out_shape[3], cout]),
                                      self.ints(f"{node.name}/strides", [1, 1, 1, 1])], [z], node, p,
                    beginMask=0, endMask=0, ellipsisMask=0, newAxisMask=0, shrinkAxisMask=0, offset=False)
            y = z
        self.vals[out] = (y, "nhwc")

    def _op_Einsum(self, node):
        adj = einsum_matmul(self._str_attr(node, "equation", ""))
        if adj is None or len(node.input) != 2:
            raise _unsupported(node, EINSUM_WHY)
        adj_x, adj_y = adj
        p = self.prec(node)
        cb = self.const(node.input[1])
        if cb is not None and cb.ndim == 2 and not adj_x:  # x @ constant: FULLY_CONNECTED
            w = cb if adj_y else cb.T
            return self._fc(node, node.input[0], np.ascontiguousarray(w.astype(np.float32)),
                            np.zeros(w.shape[0], np.float32), None)
        if self.const(node.input[0]) is not None or cb is not None:
            raise _unsupported(node, "a constant operand is supported only as the right-hand 2-D matrix")
        ta, _ = self.get(node.input[0], "plain")
        tb, _ = self.get(node.input[1], "plain")
        y = self.act(node.output[0], self.shapes[node.output[0]])
        self.op("BATCH_MATMUL", [ta, tb], [y], node, p, adjX=adj_x, adjY=adj_y)
        self.vals[node.output[0]] = (y, "plain")


EINSUM_WHY = "only an Einsum that is a (batch) matrix product maps to TFLite: '...ij,...jk->...ik' (either operand transposed)"


def einsum_matmul(equation: str) -> tuple[bool, bool] | None:
    """(adjX, adjY) of the BATCH_MATMUL an Einsum equation is, or None when it is no (batch) matrix product."""
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1 or "." in eq:
        return None
    lhs, res = eq.split("->")
    a, b = lhs.split(",")
    if len(a) < 2 or len(b) < 2 or len(res) != len(a) or (len(b) != len(a) and len(b) != 2) \
            or (len(b) == len(a) and a[:-2] != b[:-2]) or res[:-2] != a[:-2] or len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    i_, k_ = res[-2], res[-1]
    pa, pb = a[-2:], b[-2:]
    ja, jb = set(pa) - {i_}, set(pb) - {k_}
    if i_ not in pa or k_ not in pb or len(ja) != 1 or ja != jb or i_ == k_:
        return None
    return pa != i_ + next(iter(ja)), pb != next(iter(jb)) + k_


def attribute_refusal(op_type: str, attrs: Mapping[str, Any]) -> str | None:
    """Why the writer refuses a node of ``op_type`` from its attributes alone (None: it may convert).  The writer
    and the backends' op pre-flight both ask this, so they refuse the same nodes with the same words."""
    def text(name, default):
        v = attrs.get(name, default)
        return v.decode() if isinstance(v, bytes) else v

    if op_type == "Resize":
        mode = text("mode", "nearest")
        if mode not in ("nearest", "linear"):
            return f"mode {mode} has no TFLite builtin (RESIZE_NEAREST_NEIGHBOR / RESIZE_BILINEAR only)"
        if text("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
            return "coordinate_transformation_mode tf_crop_and_resize has no TFLite builtin"
        if attrs.get("antialias", 0):
            return "antialias has no TFLite builtin"
        if attrs.get("axes") is not None or text("keep_aspect_ratio_policy", "stretch") != "stretch":
            return "axes / keep_aspect_ratio_policy are not supported"
    elif op_type == "TopK" and not attrs.get("largest", 1):
        return "largest=0 (the k smallest) has no TFLite builtin (TOPK_V2 returns the largest)"
    elif op_type == "Einsum" and einsum_matmul(text("equation", "")) is None:
        return EINSUM_WHY
    elif op_type == "ConvTranspose":
        if int(attrs.get("group", 1)) != 1:
            return "grouped transposed convolution has no TFLite builtin"
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            return "dilated transposed convolution has no TFLite builtin"
    return None


def build_ir(model: onnx.ModelProto, input_shapes: Mapping[str, list[int]] | None = None,
             precision_of: Mapping[str, str] | None = None, default: str = "fp32", micro: bool = False) -> IR:
    """Translate ``model`` (float ONNX) to the IR; ``precision_of`` maps ONNX node names to fp32/fp16/int8;
    ``micro``: for TFLite Micro (GELU lowered to the builtins it has)."""
    m, info = prepare_onnx(model, input_shapes)
    return _Builder(m, info, precision_of or {}, default, micro).build()


# --------------------------------------------------------------------------- quantization parameters


def _qparams(lo: float, hi: float) -> tuple[float, int]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise EdgeoptError(f"tflite writer: a calibrated activation range is not finite ({lo}, {hi})")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = float(np.float32((hi - lo) / 255.0))
    zp = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zp


def activation_qparams(ir: IR, ranges: Mapping[int, tuple[float, float]], op_precision: list[str]) -> dict[int, tuple[float, int]]:
    """int8 (scale, zero point) per activation tensor: calibrated min/max, with TFLite's shared/fixed-params rules."""
    parent = list(range(len(ir.tensors)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    fixed: dict[int, tuple[float, int]] = {}
    for op, prec in zip(ir.ops, op_precision):
        if prec != "int8" or op.code not in INT8_OPS:
            continue
        if op.code in FIXED_PARAMS:
            fixed[op.outputs[0]] = FIXED_PARAMS[op.code]
        if op.code == "GATHER" and ir.tensors[op.inputs[0]].role != "act":  # a constant table: its own range
            table = ir.tensors[op.inputs[0]].data
            fixed[op.outputs[0]] = _qparams(float(table.min()), float(table.max()))
        if op.code in SAME_PARAMS:
            acts = [i for i in op.inputs + op.outputs if i >= 0 and ir.is_float(i)]
            for t in acts[1:]:
                parent[find(t)] = find(acts[0])
    groups: dict[int, list[int]] = defaultdict(list)
    for t in ir.tensors:
        if ir.is_float(t.id):
            groups[find(t.id)].append(t.id)
    out: dict[int, tuple[float, int]] = {}
    for members in groups.values():
        fx = [fixed[m] for m in members if m in fixed]
        if fx:
            q = fx[0]
        else:
            rs = [ranges[m] for m in members if m in ranges]
            q = _qparams(min(r[0] for r in rs), max(r[1] for r in rs)) if rs else (1.0 / 255, 0)
        for m in members:
            out[m] = q
    return out


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (per channel along ``axis``, per tensor when None): (int8 values, float32 scales)."""
    w = np.asarray(w, np.float32)
    if axis is None:
        amax = np.array([np.abs(w).max()], np.float32)
        scale = np.maximum(amax / 127.0, 1e-12).astype(np.float32)
        q = np.clip(np.round(w / scale[0]), -127, 127).astype(np.int8)
        return q, scale
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=red)
    scale = np.maximum(amax / 127.0, 1e-12).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


# --------------------------------------------------------------------------- flatbuffer emission


class _AlignedBuffer:
    """A BufferT whose data starts 16-byte aligned in the file (TFLite/TFLM read weights in place)."""

    def __init__(self, data: bytes = b""):
        self.data = data

    def Pack(self, builder):  # noqa: N802 - the flatbuffers object API's name
        s = schema()
        vec = None
        if self.data:
            n = len(self.data)
            builder.StartVector(1, n, 16)
            builder.head = builder.head - n
            builder.Bytes[builder.head: builder.head + n] = self.data
            vec = builder.EndVector()
        s.BufferStart(builder)
        if vec is not None:
            s.BufferAddData(builder, vec)
        return s.BufferEnd(builder)


_TYPES = {"float32": 0, "float16": 1, "int32": 2, "bool": 6, "int8": 9}


@dataclass
class Emitted:
    data: bytes
    tensor_index: dict[int, int]  # IR activation tensor -> flatbuffer tensor (the version ops produce)
    inputs: list[dict]
    outputs: list[dict]
    op_counts: dict[str, int]


class _Emitter:
    def __init__(self, ir: IR, op_precision: list[str], qp: Mapping[int, tuple[float, int]] | None, io: str):
        self.s = schema()
        self.ir, self.prec, self.qp, self.io = ir, op_precision, qp or {}, io
        self.tensors: list = []
        self.buffers: list = [_AlignedBuffer()]
        self.ops: list = []
        self.codes: list = []
        self.code_index: dict[str, int] = {}
        self.versions: dict[tuple[int, str], int] = {}
        self.cache: dict[tuple, int] = {}
        self.wscales: dict[int, np.ndarray] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def tensor(self, name: str, shape, ttype: str, data: np.ndarray | None = None, q: tuple | None = None) -> int:
        s = self.s
        t = s.TensorT()
        t.name = name
        t.shape = [int(d) for d in shape]
        t.type = _TYPES[ttype]
        if data is not None:
            self.buffers.append(_AlignedBuffer(np.ascontiguousarray(data).tobytes()))
            t.buffer = len(self.buffers) - 1
        if q is not None:
            scales, zps, axis = q
            qt = s.QuantizationParametersT()
            qt.scale = [float(v) for v in scales]
            qt.zeroPoint = [int(v) for v in zps]
            qt.quantizedDimension = int(axis)
            t.quantization = qt
        self.tensors.append(t)
        return len(self.tensors) - 1

    def operator(self, code: str, ins: list[int], outs: list[int], options: Mapping[str, Any] | None = None) -> None:
        s = self.s
        if code not in self.code_index:
            oc = s.OperatorCodeT()
            value = getattr(s.BuiltinOperator, code)
            oc.builtinCode = value
            oc.deprecatedBuiltinCode = min(value, 127)
            oc.version = 1
            self.code_index[code] = len(self.codes)
            self.codes.append(oc)
        op = s.OperatorT()
        op.opcodeIndex = self.code_index[code]
        op.inputs = list(ins)
        op.outputs = list(outs)
        if code in OPTIONS:
            cls = getattr(s, OPTIONS[code] + "T")()
            for k, v in (options or {}).items():
                if hasattr(cls, k):
                    setattr(cls, k, v)
            op.builtinOptionsType = getattr(s.BuiltinOptions, OPTIONS[code])
            op.builtinOptions = cls
        self.ops.append(op)
        self.counts[code] += 1

    # activations: one float and/or one int8 version per IR tensor
    def act(self, tid: int, kind: str) -> int:
        if self.ir.tensors[tid].dtype != "float32":
            kind = "f"  # int32 indices and bool masks are never quantized
        key = (tid, kind)
        if key in self.versions:
            return self.versions[key]
        other = (tid, "q" if kind == "f" else "f")
        if other not in self.versions:
            raise InternalError(f"tflite writer: tensor {self.ir.tensors[tid].name} used before it is produced")
        idx = self.new_act(tid, kind, suffix="/dequant" if kind == "f" else "/quant")
        self.operator("DEQUANTIZE" if kind == "f" else "QUANTIZE", [self.versions[other]], [idx])
        return idx

    def new_act(self, tid: int, kind: str, suffix: str = "") -> int:
        t = self.ir.tensors[tid]
        if t.dtype != "float32":
            idx = self.tensor(t.name + suffix, t.shape, t.dtype)
            self.versions[(tid, "f")] = self.versions[(tid, "q")] = idx
            return idx
        if kind == "q":
            scale, zp = self.qp[tid]
            idx = self.tensor(t.name + suffix, t.shape, "int8", q=([scale], [zp], 0))
        else:
            idx = self.tensor(t.name + suffix, t.shape, "float32")
        self.versions[(tid, kind)] = idx
        return idx

    def fp16_const(self, tid: int) -> int:
        key = ("fp16", tid)
        if key not in self.cache:
            t = self.ir.tensors[tid]
            half = self.tensor(t.name + "/fp16", t.shape, "float16", t.data.astype(np.float16))
            out = self.tensor(t.name, t.shape, "float32")
            self.operator("DEQUANTIZE", [half], [out])
            self.cache[key] = out
        return self.cache[key]

    def const_input(self, op: Op, k: int, tid: int, quant: bool, fp16: bool) -> int:
        t = self.ir.tensors[tid]
        if t.role in ("int", "bool"):
            key = (t.role, tid)
            if key not in self.cache:
                dt = "int32" if t.role == "int" else "bool"
                self.cache[key] = self.tensor(t.name, t.shape, dt, t.data.astype(np.int32 if t.role == "int" else np.bool_))
            return self.cache[key]
        if t.role == "weight":
            if quant:
                axis = op.options.get("axis") if op.code in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV") else None
                key = ("weight-int8", tid, axis)
                if key not in self.cache:  # a shared weight (unrolled steps) is written once
                    q, scales = quantize_weight(t.data, axis)
                    self.wscales[tid] = scales
                    self.cache[key] = self.tensor(t.name, t.shape, "int8", q, (scales, [0] * len(scales), axis or 0))
                return self.cache[key]
            if fp16:
                return self.fp16_const(tid)
            key = ("weight-fp32", tid)
            if key not in self.cache:
                self.cache[key] = self.tensor(t.name, t.shape, "float32", t.data)
            return self.cache[key]
        if t.role == "bias":
            if quant:
                x_in = next(i for i in op.inputs if i >= 0 and self.ir.tensors[i].role == "act")
                w_in = next(i for i in op.inputs if i >= 0 and self.ir.tensors[i].role == "weight")
                in_scale = np.float64(self.qp[x_in][0])
                scales = in_scale * self.wscales[w_in].astype(np.float64)  # one per channel, or one
                q = np.round(t.data.astype(np.float64) / np.broadcast_to(scales, t.data.shape))
                q = np.clip(q, -(2**31), 2**31 - 1).astype(np.int32)
                return self.tensor(t.name, t.shape, "int32", q, (scales.astype(np.float32), [0] * len(scales), 0))
            return self.fp16_const(tid) if fp16 else self.tensor(t.name, t.shape, "float32", t.data)
        # float operands of elementwise ops / pad values
        if quant:
            if t.role == "padval" or op.code in SAME_PARAMS:  # compared/copied as raw int8: the op's own params
                ref = next(i for i in op.outputs + op.inputs if i >= 0 and self.ir.is_float(i))
                scale, zp = self.qp[ref]
            else:
                scale, zp = _qparams(float(t.data.min()), float(t.data.max()))
            q = np.clip(np.round(t.data.astype(np.float64) / scale) + zp, -128, 127).astype(np.int8)
            return self.tensor(t.name, t.shape, "int8", q, ([scale], [zp], 0))
        if fp16 and op.code == "GATHER":  # an embedding table: fp16 like the weights
            return self.fp16_const(tid)
        return self.tensor(t.name, t.shape, "float32", t.data)

    def run(self) -> Emitted:
        s = self.s
        ir = self.ir
        in_kind = "q" if self.io == "int8" else "f"
        inputs, outputs = [], []
        for spec in ir.inputs:
            idx = self.new_act(spec.tensor, in_kind)
            inputs.append(self._io(spec, idx, in_kind))
        for op, prec in zip(ir.ops, self.prec):
            quant = prec == "int8" and op.code in INT8_OPS
            fp16 = prec == "fp16"
            ins = []
            for k, tid in enumerate(op.inputs):
                if tid < 0:
                    ins.append(-1)
                elif ir.tensors[tid].role == "act":
                    ins.append(self.act(tid, "q" if quant else "f"))
                else:
                    ins.append(self.const_input(op, k, tid, quant, fp16))
            outs = [self.new_act(t, "q" if quant else "f") for t in op.outputs]
            self.operator(op.code, ins, outs, op.options)
        out_kind = "q" if self.io == "int8" else "f"
        for spec in ir.outputs:
            idx = self.act(spec.tensor, out_kind)
            outputs.append(self._io(spec, idx, out_kind))
        sg = s.SubGraphT()
        sg.tensors = self.tensors
        sg.inputs = [d["index"] for d in inputs]
        sg.outputs = [d["index"] for d in outputs]
        sg.operators = self.ops
        sg.name = "main"
        model = s.ModelT()
        model.version = 3
        model.description = "edgeopt"
        model.operatorCodes = self.codes
        model.subgraphs = [sg]
        model.buffers = self.buffers
        import flatbuffers

        total = sum(len(b.data) for b in self.buffers)
        if total > (1 << 31) - (1 << 26):
            raise EdgeoptError(f"tflite writer: {total / 2**30:.2f} GiB of constants; a .tflite flatbuffer holds under 2 GiB")
        builder = flatbuffers.Builder(max(1 << 20, total + (1 << 20)))
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        index = {tid: i for (tid, kind), i in self.versions.items()}
        return Emitted(bytes(builder.Output()), index, inputs, outputs, dict(self.counts))

    def _io(self, spec: IOSpec, idx: int, kind: str) -> dict:
        t = self.ir.tensors[spec.tensor]
        d = {"name": spec.name, "index": idx, "onnx_shape": spec.onnx_shape, "tflite_shape": list(t.shape),
             "layout": "nhwc" if spec.nhwc else "onnx", "dtype": t.dtype if t.dtype != "float32" else ("int8" if kind == "q" else "float32")}
        if d["dtype"] == "int8":
            d["scale"], d["zero_point"] = self.qp[spec.tensor]
        return d


def emit(ir: IR, op_precision: list[str] | str, qp: Mapping[int, tuple[float, int]] | None = None, io: str = "float") -> Emitted:
    """Write the IR as a .tflite: ``op_precision`` per op (or one for all), ``qp`` int8 params, ``io`` float|int8."""
    if isinstance(op_precision, str):
        op_precision = [op_precision] * len(ir.ops)
    if (io == "int8" or "int8" in op_precision) and qp is None:
        raise EdgeoptError("tflite writer: int8 needs calibrated quantization parameters")
    return _Emitter(ir, list(op_precision), qp, io).run()


# --------------------------------------------------------------------------- calibration and the whole conversion


_NP = {"float32": np.float32, "int8": np.float32, "int32": np.int32, "bool": np.bool_}


def to_tflite_layout(x: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    # np.asarray(order="C"), not np.ascontiguousarray: that makes a 0-d (scalar) input 1-d
    return np.ascontiguousarray(x.transpose(NCHW_TO_NHWC)) if spec["layout"] == "nhwc" else np.asarray(x, order="C")


def from_tflite_layout(y: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    return np.ascontiguousarray(y.transpose(NHWC_TO_NCHW)) if spec["layout"] == "nhwc" else y


def calibrate(ir: IR, calib: CalibrationData, limit: int = 256) -> dict[int, tuple[float, float]]:
    """Min/max of every activation over ``calib``: the fp32 flatbuffer run in LiteRT's builtin kernels (no XNNPACK,
    so every intermediate tensor can be read), one model batch at a time, at most ``limit`` samples."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    em = emit(ir, "fp32")
    interp = Interpreter(model_content=em.data, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                         experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    batch = {d["name"]: d["tflite_shape"][0] for d in em.inputs if len(d["tflite_shape"])}
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}
    sentinel = {o for op in ir.ops if op.options.get("sentinel") for o in op.outputs}
    tracked = [(tid, idx) for tid, idx in em.tensor_index.items() if ir.is_float(tid) and tid not in sentinel]
    b = max(batch.values()) if batch else 1
    # the data's own feeding (a fixed batch, or one sample at a time in the model's shapes: scalars, states)
    for feed, real in calib.counted_batches(b, limit=limit):
        if not calib.per_sample and real < b and not calib.fixed_batch:
            break  # a last partial batch the static-shaped flatbuffer cannot take
        for d in em.inputs:
            interp.set_tensor(d["index"], to_tflite_layout(np.asarray(feed[d["name"]]).astype(_NP[d["dtype"]]), d))
        interp.invoke()
        for tid, idx in tracked:
            v = interp.get_tensor(idx)
            mn, mx = float(v.min()), float(v.max())
            lo[tid] = min(lo.get(tid, mn), mn)
            hi[tid] = max(hi.get(tid, mx), mx)
    if not lo:
        raise EdgeoptError(f"calibration needs at least {b} sample(s); got {len(calib)}")
    return {t: (lo[t], hi[t]) for t in lo}


@dataclass
class Conversion:
    data: bytes
    info: dict


def op_precisions(ir: IR, full_integer: bool) -> list[str]:
    precs = [op.precision for op in ir.ops]
    for i, (op, p) in enumerate(zip(ir.ops, precs)):
        if p not in ("fp32", "fp16", "int8"):
            raise EdgeoptError(f"tflite writer: node '{op.node}' is planned {p}; TFLite runs fp32, fp16 or int8")
        if full_integer:
            if op.code not in INT8_OPS:
                raise UnsupportedOpError(f"tflite writer: node '{op.node}' becomes {op.code}, which has no int8 kernel; "
                                         "a full-integer model cannot hold it")
            precs[i] = "int8"
    return precs


def convert(model: onnx.ModelProto, *, input_shapes: Mapping[str, list[int]] | None = None,
            precision_of: Mapping[str, str] | None = None, default: str = "fp32", calib: CalibrationData | None = None,
            full_integer: bool = False, calib_limit: int = 256, micro: bool = False) -> Conversion:
    """ONNX -> .tflite bytes plus a JSON-able record (I/O layouts and quantization, op counts, notes);
    ``micro``: for TFLite Micro's kernels."""
    ir = build_ir(model, input_shapes, precision_of, default, micro)
    precs = op_precisions(ir, full_integer)
    qp = None
    if full_integer or "int8" in precs:
        if calib is None:
            n = sum(p == "int8" for p in precs)
            raise EdgeoptError(f"the plan runs {n} TFLite op(s) in int8: give calibration data")
        ranges = calibrate(ir, calib, calib_limit)
        qp = activation_qparams(ir, ranges, precs)
    io = "int8" if full_integer else "float"
    floats = sorted({op.code for op, p in zip(ir.ops, precs) if p == "int8" and op.code not in INT8_OPS})
    if floats:
        ir.notes.append(f"planned int8 but without int8 kernels, run in float between QUANTIZE/DEQUANTIZE: {', '.join(floats)}")
    em = emit(ir, precs, qp, io)
    counts: dict[str, int] = defaultdict(int)
    for p in precs:
        counts[p] += 1
    info = {"format": "tflite", "io": io, "inputs": em.inputs, "outputs": em.outputs, "ops": em.op_counts,
            "op_precisions": dict(counts), "calibration_samples": min(len(calib), calib_limit) if qp is not None and calib else 0,
            "notes": ir.notes}
    return Conversion(em.data, info)
