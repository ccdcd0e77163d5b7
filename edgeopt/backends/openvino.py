"""OpenVINO: IR for CPU/GPU/NPU via openvino (+ nncf for quantization)."""

from __future__ import annotations

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


_is_supported = _ops.onnx_op_checker(UNSUPPORTED, CONTRIB_OPS)


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    return _ops.check_layers(analysis, option, _is_supported, [])
