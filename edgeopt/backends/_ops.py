"""Op-support tables shared by the backend modules (data only, no SDK imports)."""

from __future__ import annotations

from collections.abc import Callable

from ..types import BackendOption, LayerInfo, ModelAnalysis

NodeCheck = Callable[[LayerInfo, BackendOption, ModelAnalysis], "str | None"]


def onnx_default_ops() -> frozenset[str]:
    """Every op in the default ONNX domain known to the installed onnx package."""
    import onnx.defs

    return frozenset(s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx"))


#: Ops no inference backend we target runs (sequences, strings, optionals, training, randomness).
NEVER = frozenset(
    "ConcatFromSequence SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength "
    "SequenceMap SplitToSequence Optional OptionalGetElement OptionalHasElement StringNormalizer StringConcat "
    "StringSplit RegexFullMatch TfIdfVectorizer ImageDecoder Bernoulli Multinomial RandomNormal RandomNormalLike "
    "RandomUniform RandomUniformLike Gradient Momentum Adagrad Adam".split()
)

#: ONNX ops our TFLite writer maps to TFLite builtins (BatchNormalization is folded
#: into the preceding conv, shape computations on static shapes are folded).  The pre-flight
#: takes these AND the writer's own ``_tflite_writer.SUPPORTED_OPS`` (the truth about what converts);
#: Erf passes only inside a GELU pattern (``tflite.check_ops``).
TFLITE_OPS = frozenset(
    "Conv ConvTranspose Gemm MatMul Add Sub Mul Div Relu Clip Sigmoid Tanh HardSigmoid HardSwish LeakyRelu PRelu "
    "Elu MaxPool AveragePool GlobalAveragePool GlobalMaxPool Reshape Flatten Transpose Concat Softmax LogSoftmax "
    "Squeeze Unsqueeze Pad Resize Slice Split BatchNormalization Identity Dropout ReduceMean ReduceMax ReduceMin "
    "ReduceSum ReduceProd Exp Log Sqrt Rsqrt Pow Neg Abs Max Min ArgMax ArgMin Gather Cast Shape Constant "
    "DepthToSpace SpaceToDepth Tile Expand Where Equal Less Greater LessOrEqual GreaterOrEqual Not And Or Erf "
    "Gelu LayerNormalization Floor Ceil Round Sin Cos Softplus Sign Range QuantizeLinear DequantizeLinear TopK Einsum".split()
)

#: TFLite Micro kernels (int8 reference / CMSIS-NN) reached from ONNX.  GELU has no TFLite Micro kernel: the
#: writer lowers it (Erf/Gelu) to MUL/ADD/TANH for TFLM; TopK has none either.
TFLM_OPS = frozenset(
    "Conv ConvTranspose Gemm MatMul Add Sub Mul Div Relu Clip Sigmoid Tanh HardSwish HardSigmoid LeakyRelu PRelu "
    "MaxPool AveragePool GlobalAveragePool Reshape Flatten Transpose Concat Softmax Squeeze Unsqueeze Pad Resize "
    "Slice Split BatchNormalization Identity Dropout ReduceMean ReduceMax Max Min ArgMax DepthToSpace "
    "SpaceToDepth QuantizeLinear DequantizeLinear Shape Constant LogSoftmax Erf Gelu LayerNormalization Gather "
    "Equal Greater Less GreaterOrEqual LessOrEqual Where Not And Or Einsum".split()
)

#: ONNX ops our Core ML (MIL) builder maps (edgeopt/backends/_coreml_mil.py; the pre-flight check keeps
#: only those it translates or folds, tests/test_coreml_ops.py converts each as a one-node model).
COREML_OPS = frozenset(
    (
        "Conv ConvTranspose Gemm MatMul Add Sub Mul Div Relu Clip Sigmoid Tanh HardSigmoid HardSwish LeakyRelu "
        "PRelu Elu Selu Softplus Softsign MaxPool AveragePool GlobalAveragePool GlobalMaxPool Reshape Flatten "
        "Transpose Concat Softmax LogSoftmax Squeeze Unsqueeze Pad Resize Upsample Slice Split BatchNormalization "
        "InstanceNormalization LayerNormalization GroupNormalization Identity Dropout ReduceMean ReduceMax ReduceMin "
        "ReduceSum ReduceProd ReduceL1 ReduceL2 ReduceSumSquare ReduceLogSum ReduceLogSumExp Exp Log Sqrt Reciprocal "
        "Pow Neg Abs Max Min ArgMax ArgMin Gather GatherElements Cast Shape Size Constant ConstantOfShape DepthToSpace "
        "SpaceToDepth Tile Expand Where Equal Less Greater LessOrEqual GreaterOrEqual Not And Or Xor Erf Gelu Floor "
        "Ceil Round Sin Cos Einsum Range TopK CumSum Sign Atan LpNormalization LRN LSTM GRU"
    ).split()
)


def onnx_op_checker(unsupported: frozenset[str] = frozenset(), contrib: frozenset[str] = frozenset(),
                    ml: bool = False) -> Callable[[str, str], bool]:
    """``(op, domain) -> supported`` for backends that run every ONNX op except ``unsupported``,
    plus the listed com.microsoft ``contrib`` ops (and all of ai.onnx.ml when ``ml``)."""
    cache: list[frozenset[str]] = []

    def supported(op: str, domain: str) -> bool:
        if domain in ("", "ai.onnx"):
            if not cache:
                cache.append(onnx_default_ops() - NEVER - unsupported)
            return op in cache[0]
        if domain == "com.microsoft":
            return op in contrib
        return ml and domain == "ai.onnx.ml"

    return supported


def static_shapes(layer: LayerInfo, option: BackendOption, analysis: ModelAnalysis) -> str | None:
    if option.requires_static_shapes and any(not s or any(d <= 0 for d in s) for s in layer.output_shapes):
        return "output shape is not static"
    return None


def max_rank(n: int) -> NodeCheck:
    def check(layer: LayerInfo, option: BackendOption, analysis: ModelAnalysis) -> str | None:
        r = max((len(s) for s in layer.output_shapes), default=0)
        return f"rank-{r} tensors (this backend handles rank <= {n})" if r > n else None

    return check


def const_weight(layer: LayerInfo, option: BackendOption, analysis: ModelAnalysis) -> str | None:
    if layer.op_type in ("Gemm", "MatMul", "Conv", "ConvTranspose") and not layer.weights:
        return "needs a constant weight (both operands are activations)"
    return None


def div_by_constant(layer: LayerInfo, option: BackendOption, analysis: ModelAnalysis) -> str | None:
    """Integer-only runtimes have no DIV kernel; a division by a constant is written as MUL by its reciprocal."""
    if layer.op_type == "Div" and (len(layer.inputs) < 2 or layer.inputs[1] not in layer.weights):
        return "divides by an activation (int8 kernels exist only for division by a constant)"
    return None


def grouped_conv(layer: LayerInfo, option: BackendOption, analysis: ModelAnalysis) -> str | None:
    """TFLM has CONV_2D and DEPTHWISE_CONV_2D, no grouped convolution in between."""
    group = int(layer.attributes.get("group", 1))
    if layer.op_type != "Conv" or group == 1 or not layer.weight_shapes:
        return None
    w = layer.weight_shapes[0]  # [M, C/group, kh, kw]
    if len(w) >= 2 and w[1] == 1:
        return None  # depthwise (any channel multiplier)
    return f"is a grouped convolution (group={group}); TFLite/TFLM have only regular and depthwise conv"


#: Control-flow ops (sub-graphs).  Analysis folds those static at the input shapes (edgeopt.passes.fold_control);
#: the ones left run on values, which only runtimes that interpret the graph (onnxruntime, OpenVINO, TensorRT's
#: conditionals and loops) can do.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


#: Why a backend has no control flow (what ``control_flow_reason`` says after "cannot run ...").
_NO_CONTROL_FLOW = {
    "tflite": "edgeopt's TFLite writer emits no IF/WHILE sub-graphs",
    "tflm": "edgeopt's TFLite writer, which TFLM models go through, emits no IF/WHILE sub-graphs",
    "coreml": "edgeopt's MIL translation maps no cond/while_loop",
    "tensorrt": "the DLA has no conditional or loop layers (gpu_fallback runs them on the GPU)",
}


def control_flow_reason(layer: LayerInfo, backend: str) -> str:
    """The one-line refusal of a control-flow layer by a backend without control flow."""
    dynamic = True
    if layer.op_type == "If":
        what = f"`If` on a condition computed from input values (node {layer.name})"
    elif layer.op_type == "Loop" and layer.inputs and layer.inputs[0] in layer.weights and \
            (len(layer.inputs) < 2 or not layer.inputs[1] or layer.inputs[1] in layer.weights):
        what, dynamic = f"`Loop` of a static trip count edgeopt does not unroll (node {layer.name}: over 16 iterations or 4096 nodes, " \
                        f"a condition the body changes, or a nested sub-graph)", False
    elif layer.op_type == "Loop":
        what = f"`Loop` on a trip count or condition computed from input values (node {layer.name})"
    else:
        what, dynamic = f"`{layer.op_type}` (node {layer.name})", False
    kind = "data-dependent control flow" if dynamic else "control flow"
    why = _NO_CONTROL_FLOW.get(backend, f"edgeopt's {backend} translation has no sub-graphs")
    return (f"{what}: {backend} cannot run {kind} ({why}); give input "
            f"shapes that make it static (--input-shape) if it depends only on them, or use a backend that runs it "
            f"(onnxruntime, openvino)")


def check_layers(analysis: ModelAnalysis, option: BackendOption, supported: frozenset[str] | Callable[[str, str], bool],
                 checks: list[NodeCheck]) -> list[str]:
    """Reasons the backend option cannot run the model, one per failing layer (empty: all supported); control flow
    the backend cannot run is the one reason given when there is any (the ops around it do not matter then)."""
    reasons = []
    control = []
    for ly in analysis.layers:
        ok = supported(ly.op_type, ly.domain) if callable(supported) else (ly.domain in ("", "ai.onnx") and ly.op_type in supported)
        if not ok and ly.op_type in CONTROL_FLOW and ly.domain in ("", "ai.onnx"):
            control.append(ly)
            continue
        if not ok:
            dom = f"{ly.domain}." if ly.domain else ""
            reasons.append(f"{ly.name}: op {dom}{ly.op_type} is not supported by {option.backend}")
            continue
        for c in checks:
            why = c(ly, option, analysis)
            if why:
                reasons.append(f"{ly.name}: {ly.op_type} {why}")
                break
    if control:
        more = f" ({len(control) - 1} more control-flow node(s) like it)" if len(control) > 1 else ""
        return [f"{control[0].name}: {control_flow_reason(control[0], option.backend)}{more}"]
    return reasons
