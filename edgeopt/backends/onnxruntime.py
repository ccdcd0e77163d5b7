"""ONNX Runtime: QDQ / fp16 ONNX run by onnxruntime's execution providers."""

from __future__ import annotations

from functools import lru_cache

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


@lru_cache(maxsize=1)
def _supported() -> frozenset[str]:
    return _ops.onnx_default_ops() - _ops.NEVER


def _is_supported(op: str, domain: str) -> bool:
    if domain in ("", "ai.onnx"):
        return op in _supported()
    if domain == "com.microsoft":
        return op in CONTRIB_OPS
    return domain == "ai.onnx.ml"


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    return _ops.check_layers(analysis, option, _is_supported, [_ops.static_shapes])
