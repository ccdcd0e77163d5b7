"""OpenVINO: IR for CPU/GPU/NPU via openvino (+ nncf for quantization)."""

from __future__ import annotations

from functools import lru_cache

from ..types import BackendOption, ModelAnalysis
from . import _ops

SDK_MODULES = ("openvino",)
SDK_LABEL = "openvino"

#: ONNX ops OpenVINO's ONNX frontend does not convert, beyond the never-supported set.
UNSUPPORTED = frozenset("BitShift Col2Im DFT STFT MelWeightMatrix Det AffineGrid CenterCropPad ImageDecoder".split())

CONTRIB_OPS = frozenset(
    "MatMulNBits QLinearConv QLinearMatMul QLinearAdd QLinearMul FusedConv FusedMatMul Gelu FastGelu BiasGelu "
    "SkipLayerNormalization SimplifiedLayerNormalization SkipSimplifiedLayerNormalization Attention "
    "EmbedLayerNormalization BiasAdd QuickGelu RotaryEmbedding GroupQueryAttention".split()
)


@lru_cache(maxsize=1)
def _supported() -> frozenset[str]:
    return _ops.onnx_default_ops() - _ops.NEVER - UNSUPPORTED


def _is_supported(op: str, domain: str) -> bool:
    if domain in ("", "ai.onnx"):
        return op in _supported()
    return domain == "com.microsoft" and op in CONTRIB_OPS


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    return _ops.check_layers(analysis, option, _is_supported, [])
