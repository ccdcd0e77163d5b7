"""ONNX Runtime: QDQ / fp16 ONNX run by onnxruntime's execution providers."""

from __future__ import annotations

from ..types import BackendOption, ModelAnalysis
from . import _ops

SDK_MODULES = ("onnxruntime",)
SDK_LABEL = "onnxruntime"

#: com.microsoft contrib ops the CPU and CUDA providers implement that our passes emit or commonly appear.
CONTRIB_OPS = frozenset(
    "MatMulNBits QLinearConv QLinearMatMul QLinearAdd QLinearMul QGemm DynamicQuantizeMatMul MatMulInteger16 "
    "FusedConv FusedMatMul Gelu FastGelu BiasGelu QuickGelu LayerNormalization SkipLayerNormalization "
    "SimplifiedLayerNormalization SkipSimplifiedLayerNormalization Attention MultiHeadAttention GroupQueryAttention "
    "RotaryEmbedding EmbedLayerNormalization BiasAdd NhwcConv QuantizeLinear DequantizeLinear".split()
)


_is_supported = _ops.onnx_op_checker(contrib=CONTRIB_OPS, ml=True)


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    return _ops.check_layers(analysis, option, _is_supported, [_ops.static_shapes])
