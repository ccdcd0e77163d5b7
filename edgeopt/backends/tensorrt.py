"""TensorRT (gpu-server, Jetson): TensorRT-ready QDQ/fp16 ONNX plus an engine build step."""

from __future__ import annotations

from ..types import BackendOption, ModelAnalysis
from . import _ops

SDK_MODULES = ("tensorrt",)
SDK_LABEL = "tensorrt"

#: ONNX ops the TensorRT ONNX parser (onnx-tensorrt, TensorRT 10) rejects, beyond the never-supported set.
UNSUPPORTED = frozenset(
    "BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im DFT STFT BlackmanWindow HammingWindow HannWindow "
    "MelWeightMatrix DynamicQuantizeLinear MatMulInteger ConvInteger QLinearConv QLinearMatMul MaxRoiPool "
    "Unique Det CenterCropPad AffineGrid ImageDecoder".split()
)

#: Layers the DLA runs natively (others fall back to the GPU when gpu_fallback is set).
DLA_OPS = frozenset(
    "Conv ConvTranspose Gemm MatMul BatchNormalization Relu Clip Sigmoid Tanh LeakyRelu PRelu MaxPool AveragePool "
    "GlobalAveragePool Add Sub Mul Max Min Concat Reshape Flatten Transpose Softmax Resize Slice Identity "
    "QuantizeLinear DequantizeLinear Constant Shape".split()
)


_is_supported = _ops.onnx_op_checker(UNSUPPORTED)


def _no_fp64(layer, option, analysis) -> str | None:
    dt = {t.name: t.dtype for t in analysis.tensors}
    if any(dt.get(o) == "double" for o in layer.outputs):
        return "produces float64, which TensorRT does not support"
    return None


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    supported = _is_supported
    if option.options.get("device") == "dla" and not option.options.get("gpu_fallback", False):
        def supported(op: str, domain: str) -> bool:
            return op in DLA_OPS and _is_supported(op, domain)
    return _ops.check_layers(analysis, option, supported, [_no_fp64, _ops.max_rank(8)])
