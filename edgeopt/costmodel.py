"""Predicting latency, memory and storage of a model on a target from its analysis.

A per-layer roofline: a layer takes the longer of its arithmetic at the unit's
peak rate (times the backend's efficiency) and its memory traffic at the unit's
bandwidth, plus a fixed per-layer overhead.  Activations that every backend fuses
into the producing conv/matmul (ReLU, clip, bias/scale) and pure view ops
(Reshape, Flatten, Squeeze...) cost nothing.  Pure: no vendor SDKs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from . import technique
from .graph import ArenaPlan, plan_arena
from .types import BackendOption, ComputeUnit, LayerInfo, ModelAnalysis, Target, TensorInfo

#: Ops that are views of their input on every backend.
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
#: Elementwise ops every backend fuses into a preceding conv/gemm/matmul.
FUSABLE = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "PRelu", "Elu",
                     "BatchNormalization", "Add", "Mul", "Sub", "Div"})
PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "MatMulNBits"})
#: Bytes of quantization metadata per output channel (fp32 scale + zero point).
_PER_CHANNEL_BYTES = 5
#: Weight-only int4 block size (MatMulNBits default) and bytes per block (fp16 scale + packed zero point).
INT4_BLOCK = 32
_INT4_BLOCK_BYTES = 2.5


def fused_layers(analysis: ModelAnalysis, fusable: frozenset[str] | set[str] | list[str] | None = None) -> set[str]:
    """Names of layers that cost nothing because backends fuse them or treat them as views (``fusable``: the
    elementwise ops the backend folds into a preceding conv/matmul, default :data:`FUSABLE`)."""
    fusable = FUSABLE if fusable is None else frozenset(fusable)
    producer: dict[str, LayerInfo] = {o: ly for ly in analysis.layers for o in ly.outputs}
    consumers: dict[str, int] = {}
    for ly in analysis.layers:
        for i in ly.inputs:
            consumers[i] = consumers.get(i, 0) + 1
    fused: set[str] = set()
    chain_ok: set[str] = set()  # layers that are a producer or already fused onto one
    for ly in analysis.layers:
        if ly.op_type in VIEW_OPS:
            fused.add(ly.name)
            continue
        if ly.op_type in PRODUCERS:
            chain_ok.add(ly.name)
            continue
        if ly.op_type not in fusable:
            continue
        acts = [i for i in ly.inputs if i and i not in ly.weights]
        if len(acts) != 1:
            continue  # binary op of two activations (residual add): a real layer
        src = producer.get(acts[0])
        if src is not None and src.name in chain_ok and consumers.get(acts[0], 0) == 1:
            fused.add(ly.name)
            chain_ok.add(ly.name)
    return fused


#: Ops onnxruntime's NCHWc layout (x86 CPU) runs blocked when every activation input is blocked and, for binary ops,
#: of the same shape (checked on onnxruntime 1.32's optimized graphs); any other consumer of a blocked tensor gets a
#: ReorderOutput first, and a convolution reading an unblocked tensor a ReorderInput.
NCHWC_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Concat", "Relu", "Sigmoid",
                       "Tanh", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "BatchNormalization"})
NCHWC_BINARY = frozenset({"Add", "Sum", "Mul"})
_CONVS = frozenset({"Conv", "FusedConv"})


def nchwc_reorders(analysis: ModelAnalysis, fused: set[str], block: int) -> dict[str, int]:
    """Elements a blocked-layout runtime reorders before each layer (layer name -> elements): the layout conversions
    onnxruntime inserts around its NCHWc convolutions on x86.  ``block``: channels per block; tensors with fewer
    channels (an RGB input) are read by the convolution as they are."""
    shapes = {t.name: t.shape for t in analysis.tensors}
    by_output = {o: ly for ly in analysis.layers for o in ly.outputs}
    blocked: set[str] = set()
    out: dict[str, int] = {}

    def elems(name: str) -> int:
        n = 1
        for d in shapes.get(name, []):
            n *= max(int(d), 1)
        return n

    for ly in analysis.layers:
        acts = [i for i in ly.inputs if i and i not in ly.weights and i in shapes]
        if ly.name in fused:  # an activation folded into its producer, or a view: keeps the layout it reads
            if any(i in blocked for i in acts) and ly.op_type not in VIEW_OPS:
                blocked.update(ly.outputs)
            continue
        if ly.op_type in _CONVS and acts and len(shapes[acts[0]]) == 4:
            x = acts[0]
            if x not in blocked and shapes[x][1] >= block:
                out[ly.name] = elems(x)  # ReorderInput
            blocked.update(ly.outputs)
            continue
        capable = ly.op_type in NCHWC_OPS or (
            ly.op_type in NCHWC_BINARY and len(acts) == len([i for i in ly.inputs if i])
            and len({tuple(shapes[i]) for i in acts}) == 1)
        if capable and acts and all(i in blocked for i in acts):
            blocked.update(ly.outputs)
            continue
        n = sum(elems(i) for i in acts if i in blocked and by_output.get(i) is not None)
        if n:
            out[ly.name] = n  # ReorderOutput of each blocked input
    return out


def planned_weight_bytes(layer: LayerInfo, precision: str, sparsity: str = "none", ratio: float = 0.0,
                         compresses: bool = False) -> int:
    """Stored bytes of a layer's weights after quantization and pruning.

    Args:
        layer: the layer as analysis saw it.
        precision: its numeric format (a registered precision technique).
        sparsity: its pruning pattern (``none`` or a registered sparsity technique).
        ratio: the fraction the pattern removes.
        compresses: whether the backend stores the pruned weights compactly.

    Returns:
        Bytes of the weight tensor (body, index of kept elements, quantization metadata) and the other constants.
    """
    p = technique.get(precision)
    if not layer.quantizable:
        # biases, BN parameters, shape constants: stored in the float precision the layer runs
        if p.float_bits < 32:
            float_bytes = min(layer.weight_bytes, layer.params * 4)
            return layer.weight_bytes - float_bytes + float_bytes * p.float_bits // 32
        return layer.weight_bytes
    main = layer.weight_shapes[0] if layer.weight_shapes else []
    n_main = 1
    for d in main:
        n_main *= d
    rest = max(0, layer.params - n_main)  # bias
    out_ch = main[0] if main else 1
    kept, index_bytes, channels = 1.0, 0.0, 1.0
    if sparsity != "none":
        sp = technique.get(sparsity)
        kept, index_bytes = sp.storage(n_main, ratio, compresses)
        channels = kept if sp.removes_channels else 1.0
    body = n_main * kept * p.weight_bits / 8 + index_bytes
    meta = p.metadata_bytes(n_main * kept, out_ch * channels)
    return int(round(body + meta + rest * channels * p.float_bits / 8))


@dataclass(frozen=True)
class LayerCost:
    ms: float
    compute_ms: float
    memory_ms: float
    bound: str  # "compute" | "memory" | "fused"


def kernel_kind(layer: LayerInfo) -> str:
    """The kind of kernel a layer runs (:data:`edgeopt.types.KERNEL_KINDS`, timed separately by
    ``BackendOption.kernel_models["<precision>:<kind>"]``): dense, pointwise and depthwise convolutions run at very
    different rates, upsampling layers (transposed convolutions, resizes) have kernels of their own, and other ops
    without MACs (elementwise, pooling, concat) are bound by the bytes they move."""
    if layer.op_type == "ConvTranspose":
        return "convtranspose"
    if layer.op_type in ("Resize", "Upsample"):
        return "resize"
    if layer.op_type in ("Conv", "FusedConv", "QLinearConv", "ConvInteger"):
        group = int(layer.attributes.get("group", 1) or 1)
        if group > 1:
            return "depthwise"
        kernel = layer.weight_shapes[0][2:] if layer.weight_shapes and len(layer.weight_shapes[0]) > 2 else []
        return "pointwise" if kernel and all(d == 1 for d in kernel) else "conv"
    if layer.op_type in ("Gemm", "MatMul", "MatMulNBits", "MatMulInteger", "QLinearMatMul"):
        return "gemm"
    return "elementwise"


def layer_latency(layer: LayerInfo, precision: str, option: BackendOption, unit: ComputeUnit, *,
                  fused: bool = False, weight_bytes: int | None = None, sparsity_speedup: float = 1.0,
                  keep: float = 1.0) -> LayerCost:
    if fused:
        return LayerCost(0.0, 0.0, 0.0, "fused")
    cp = option.compute_precision(precision)
    act_bytes = (layer.input_elems + layer.output_elems * keep) * option.activation_bits(precision) / 8
    wb = layer.weight_bytes if weight_bytes is None else weight_bytes
    km = option.kernel_models.get(f"{precision}:{kernel_kind(layer)}")
    if km is not None:  # measured on synthetic layers of this kind: fixed + per-MAC + per-byte
        compute_ms = km.us_per_mmac * layer.macs * keep / 1e6 / sparsity_speedup / 1e3
        memory_ms = km.us_per_mb * (act_bytes + wb) / 1e6 / 1e3
        ms = km.fixed_us / 1e3 + compute_ms + memory_ms + option.overhead_us_by_precision.get(precision, 0.0) / 1e3
        return LayerCost(ms, compute_ms, memory_ms, "compute" if compute_ms >= memory_ms else "memory")
    eff = option.efficiency_for(precision, unit)
    ops = (2 * layer.macs * keep + layer.flops)
    compute_s = ops / (unit.peak_ops_per_s[cp] * eff) / sparsity_speedup
    memory_s = (act_bytes + wb) / unit.memory_bandwidth_bytes_per_s
    ms = max(compute_s, memory_s) * 1e3 + option.overhead_us_for(precision, unit) / 1e3
    return LayerCost(ms, compute_s * 1e3, memory_s * 1e3, "compute" if compute_s >= memory_s else "memory")


def reorder_ms(elems: int, precision: str, option: BackendOption, unit: ComputeUnit) -> float:
    """Time to convert ``elems`` activations between layouts (read + write, as an elementwise kernel)."""
    nbytes = 2 * elems * option.activation_bits(precision) / 8
    km = option.kernel_models.get(f"{precision}:elementwise")
    if km is not None:
        return (km.fixed_us + km.us_per_mb * nbytes / 1e6) / 1e3
    return nbytes / unit.memory_bandwidth_bytes_per_s * 1e3 + unit.layer_overhead_us / 1e3


def tensor_bits(analysis: ModelAnalysis, precisions: Mapping[str, str], option: BackendOption) -> dict[str, int]:
    """Bits per element of each activation tensor: its producer's precision; graph inputs: their consumer's."""
    by_output = {o: ly for ly in analysis.layers for o in ly.outputs}
    first_consumer: dict[str, LayerInfo] = {}
    for ly in analysis.layers:
        for i in ly.inputs:
            first_consumer.setdefault(i, ly)
    bits: dict[str, int] = {}
    for t in analysis.tensors:
        ly = by_output.get(t.name) or first_consumer.get(t.name)
        dtype_bits = {"float": 32, "float16": 16, "bfloat16": 16, "int8": 8, "uint8": 8, "int64": 64, "int32": 32,
                      "bool": 8, "double": 64}.get(t.dtype, 32)
        if ly is None:
            bits[t.name] = dtype_bits
        elif t.dtype in ("float", "float16", "bfloat16"):
            bits[t.name] = option.activation_bits(precisions[ly.name])
        else:
            bits[t.name] = dtype_bits
    return bits


def fused_tensors(analysis: ModelAnalysis) -> list[TensorInfo]:
    """Activation tensors as a fusing runtime holds them: the output of a conv/matmul
    that an activation is fused into never exists on its own."""
    fused = {ly.name for ly in analysis.layers if ly.op_type not in VIEW_OPS} & fused_layers(analysis)
    first = {t.name: t.first for t in analysis.tensors}
    dropped: set[str] = set()
    for ly in analysis.layers:  # topological order: a chain conv -> bn -> relu collapses step by step
        if ly.name in fused:
            src = next(i for i in ly.inputs if i and i not in ly.weights)
            if src in first and ly.outputs[0] in first:
                first[ly.outputs[0]] = min(first[ly.outputs[0]], first[src])
                dropped.add(src)
    return [t if first[t.name] == t.first else t.model_copy(update={"first": first[t.name]})
            for t in analysis.tensors if t.name not in dropped]


def arena(analysis: ModelAnalysis, precisions: Mapping[str, str], option: BackendOption) -> ArenaPlan:
    """Arena of the fused graph (what a runtime that fuses activations allocates), with the tensors the backend's
    converter adds (TFLite: the PAD op's output before a conv/pool whose padding SAME cannot express)."""
    bits = tensor_bits(analysis, precisions, option)
    tensors = fused_tensors(analysis)
    if option.backend in ("tflite", "tflm"):
        added = tflite_pad_tensors(analysis)
        if added:
            # a PAD op runs just before its layer: steps doubled, PAD at 2k-1 (reads the input, writes the copy),
            # the layer at 2k (reads the copy); an input the layer alone read dies at the PAD
            pad_steps = {t.first: src for t, src in added}
            doubled = []
            for t in tensors:
                last = 2 * t.last - 1 if pad_steps.get(t.last) == t.name else 2 * t.last
                doubled.append(t.model_copy(update={"first": 2 * t.first if t.first >= 0 else t.first, "last": last}))
            for t, src in added:
                bits[t.name] = bits.get(src, 32)
                doubled.append(t.model_copy(update={"first": 2 * t.first - 1, "last": 2 * t.first}))
            tensors = doubled

    def nbytes(t: TensorInfo) -> int:
        return (t.elems * bits[t.name] + 7) // 8

    return plan_arena(tensors, nbytes)


def tflite_pad_tensors(analysis: ModelAnalysis) -> list[tuple[TensorInfo, str]]:
    """The padded copies the TFLite writer makes before convs and max-pools whose ONNX padding TFLite's SAME/VALID
    cannot express (:func:`edgeopt.backends._tflite_writer.tflite_padding`), each with the tensor it copies; they
    live during their layer's step, beside its input and output."""
    from .backends._tflite_writer import tflite_padding

    by_name = {t.name: t for t in analysis.tensors}
    out = []
    for ly in analysis.layers:
        if ly.op_type not in ("Conv", "MaxPool", "AveragePool") or not ly.inputs or not ly.outputs:
            continue
        src, dst = by_name.get(ly.inputs[0]), by_name.get(ly.outputs[0])
        if src is None or dst is None or len(src.shape) != 4:
            continue
        a = ly.attributes
        kernel = list(a.get("kernel_shape") or (ly.weight_shapes[0][2:] if ly.weight_shapes else []))
        if len(kernel) != 2:
            continue
        if ly.op_type == "AveragePool" and not a.get("count_include_pad", 0):
            continue  # refused by the writer when explicit padding would be needed
        _, pads = tflite_padding(a.get("auto_pad", "NOTSET"), a.get("pads", [0, 0, 0, 0]), src.shape[2:], kernel,
                                 list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1])))
        if not pads:
            continue
        n, c, h, w = src.shape
        shape = [n, c, h + pads[0] + pads[2], w + pads[1] + pads[3]]
        step = dst.first
        out.append((TensorInfo(name=f"{ly.name}/padded", shape=shape, dtype=src.dtype, elems=math.prod(shape),
                               first=step, last=step), src.name))
    return out


def graph_overhead_bytes(analysis: ModelAnalysis) -> int:
    """File bytes that are not weights (graph structure, names, metadata)."""
    return max(0, analysis.file_bytes - analysis.total_weight_bytes)


def unit_of(target: Target, option: BackendOption) -> ComputeUnit:
    return target.compute_units[option.unit]
