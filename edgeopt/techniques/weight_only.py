"""wint8 / wint4: weight-only blockwise quantization of MatMul/Gemm (MatMulNBits), activations stay float."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..technique import ApplyContext, SimContext, Technique
from . import scoped_pass

if TYPE_CHECKING:  # pragma: no cover
    import onnx

#: What the weight_only pass is run with, in builds and in sensitivity alike.  accuracy_level 4: int8 activations
#: inside MatMulNBits; the default level dequantizes to fp32 on every call, which made 8-bit weights ~1.5x slower
#: than fp32 on MobileNetV2's classifier.
PASS_CONFIG = {"accuracy_level": 4, "block_size": 32}
OPS = frozenset({"MatMul", "Gemm"})


def _simulator(bits: int):
    def simulate(ctx: SimContext, layer: str) -> onnx.ModelProto:
        """The weight_only pass itself on this layer (the MatMulNBits node runs in onnxruntime)."""
        return scoped_pass(ctx, "weight_only", layer, {**PASS_CONFIG, **ctx.config(f"wint{bits}"), "bits": bits})

    return simulate


def _applier(bits: int):
    def apply(model: onnx.ModelProto, layers: list[str], ctx: ApplyContext) -> tuple[onnx.ModelProto, str | None]:
        from ..passes import run_pass

        cfg = {**PASS_CONFIG, **ctx.config(f"wint{bits}"), "bits": bits, "nodes": layers}
        res = run_pass("weight_only", model, cfg, None, evaluate=False)
        return res.model, res.report.summary()

    return apply


def _block_metadata(weights: float, channels: float) -> float:
    return weights / PASS_CONFIG["block_size"] * 2.5  # fp16 scale + packed zero point per block


TECHNIQUES = [
    Technique(name="wint8", kind="precision", description="8-bit weights per block of 32 along K, float activations "
              "(MatMul/Gemm only)", fidelity=30, weight_bits=8, activation_bits=None, float_bits=32,
              metadata_bytes=lambda weights, channels: channels * 5, ops=OPS, profiled=True,
              simulate=_simulator(8), apply=_applier(8), apply_order=10),
    Technique(name="wint4", kind="precision", description="4-bit weights per block of 32 along K, float activations "
              "(MatMul/Gemm only)", fidelity=50, weight_bits=4, activation_bits=None, float_bits=32,
              metadata_bytes=_block_metadata, ops=OPS, profiled=True,
              simulate=_simulator(4), apply=_applier(4), apply_order=10),
    # no recovery prior for wint4: LSQ learns a per-channel grid that MatMulNBits' blocks of 32 do not reproduce
    # exactly, and on MobileNetV2 4-bit weights lost SNR through fine-tuning (8.2 -> 4.1 dB, bench_recovery.py)
]
