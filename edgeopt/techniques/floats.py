"""Float formats: fp32 (the reference), fp16 and bf16 (weights and activations in 16 bits)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..technique import ApplyContext, SimContext, Technique
from . import layer_copy, round_output, scoped_pass

if TYPE_CHECKING:  # pragma: no cover
    import onnx


def _identity(model: onnx.ModelProto, layers: list[str], ctx: ApplyContext) -> tuple[onnx.ModelProto, str | None]:
    return model, None


def _simulate_fp16(ctx: SimContext, layer: str) -> onnx.ModelProto:
    """The layer's float constants stored as the fp16 pass stores them, its output rounded through float16 (the
    arithmetic itself is not emulated: fp16 kernels accumulate in fp32 or better)."""
    from onnx import TensorProto

    from ..passes.fp16 import Fp16Config, round_fp16

    cfg = Fp16Config(**ctx.config("fp16"))
    m, g, node, _ = layer_copy(ctx, layer)
    for name in node.input[1:]:
        v = g.array(name) if name else None
        if v is not None and v.dtype.kind == "f":
            g.set_initializer(name, round_fp16(v, cfg).astype(v.dtype))
    round_output(m, node, TensorProto.FLOAT16)
    return m


def _apply_fp16(model: onnx.ModelProto, layers: list[str], ctx: ApplyContext) -> tuple[onnx.ModelProto, str | None]:
    from ..passes import run_pass

    res = run_pass("fp16", model, {**ctx.config("fp16"), "nodes": layers}, None, evaluate=False)
    return res.model, res.report.summary()


def _simulate_bf16(ctx: SimContext, layer: str) -> onnx.ModelProto:
    """The bf16 pass on this layer with its activations rounded through bfloat16 (the pass's emulation mode)."""
    return scoped_pass(ctx, "bf16", layer, {**ctx.config("bf16"), "activations": True})


def _apply_bf16(model: onnx.ModelProto, layers: list[str], ctx: ApplyContext) -> tuple[onnx.ModelProto, str | None]:
    from ..passes import run_pass

    res = run_pass("bf16", model, {**ctx.config("bf16"), "nodes": layers}, None, evaluate=False)
    return res.model, res.report.summary()


TECHNIQUES = [
    Technique(name="fp32", kind="precision", description="float32 weights and activations: the reference",
              fidelity=0, weight_bits=32, activation_bits=32, float_bits=32, profiled=True, presumed_faithful=True,
              apply=_identity),
    Technique(name="fp16", kind="precision", description="float16 weights and activations",
              fidelity=10, weight_bits=16, activation_bits=16, float_bits=16, presumed_faithful=True,
              simulate=_simulate_fp16, apply=_apply_fp16, apply_order=30),
    Technique(name="bf16", kind="precision", description="bfloat16 weights and activations (fp32 range, 8-bit mantissa)",
              fidelity=20, weight_bits=16, activation_bits=16, float_bits=16,
              simulate=_simulate_bf16, apply=_apply_bf16, apply_order=30),
]
