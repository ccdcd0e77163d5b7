"""Core ML (iOS): .mlpackage via coremltools' MIL builder, compressed with coremltools.optimize."""

from __future__ import annotations

from ..types import BackendOption, ModelAnalysis
from . import _ops

SDK_MODULES = ("coremltools",)
SDK_LABEL = "coremltools"


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    return _ops.check_layers(analysis, option, _ops.COREML_OPS, [_ops.max_rank(5)])
