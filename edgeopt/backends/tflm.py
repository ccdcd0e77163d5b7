"""TFLite Micro (microcontrollers): full-int8 .tflite + C array + arena estimate."""

from __future__ import annotations

from ..types import BackendOption, LayerInfo, ModelAnalysis
from . import _ops

SDK_MODULES = ("ai_edge_litert",)
SDK_LABEL = "ai-edge-litert"


def _grouped_conv(layer: LayerInfo, option: BackendOption, analysis: ModelAnalysis) -> str | None:
    """TFLM has CONV_2D and DEPTHWISE_CONV_2D, no grouped convolution in between."""
    group = int(layer.attributes.get("group", 1))
    if layer.op_type != "Conv" or group == 1 or not layer.weight_shapes:
        return None
    w = layer.weight_shapes[0]  # [M, C/group, kh, kw]
    if len(w) >= 2 and w[1] == 1:
        return None  # depthwise (any channel multiplier)
    return f"is a grouped convolution (group={group}); TFLM has only regular and depthwise conv"


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    return _ops.check_layers(analysis, option, _ops.TFLM_OPS, [_ops.static_shapes, _ops.const_weight, _ops.div_by_constant, _ops.max_rank(4), _grouped_conv])
