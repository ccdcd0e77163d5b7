"""LiteRT / TFLite (Android): .tflite written from our ONNX, run by ai-edge-litert."""

from __future__ import annotations

from ..types import BackendOption, ModelAnalysis
from . import _ops

SDK_MODULES = ("ai_edge_litert",)
SDK_LABEL = "ai-edge-litert"

#: NNAPI accelerators take a narrower int8 set than the XNNPACK CPU path.
NNAPI_OPS = _ops.TFLM_OPS | frozenset({"Exp", "Log", "Sqrt", "Pow", "Neg", "Abs", "Gather", "Cast", "Tile", "Expand"})


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    if option.options.get("delegate") == "nnapi":
        return _ops.check_layers(analysis, option, NNAPI_OPS, [_ops.static_shapes, _ops.div_by_constant, _ops.max_rank(4)])
    return _ops.check_layers(analysis, option, _ops.TFLITE_OPS, [_ops.static_shapes, _ops.max_rank(5)])
