"""int8: static quantization of weights and activations (QDQ), by the int8 pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..technique import ApplyContext, SimContext, Technique
from . import insert_after, insert_before, layer_copy, qdq_nodes

if TYPE_CHECKING:  # pragma: no cover
    import onnx

#: Sensitivity's int8 weight grid when the caller names none: full range, what every int8 runtime runs exactly except
#: onnxruntime on x86 CPUs without VNNI (7-bit there; pass ``configs={"int8": {"weight_bits": 7}}``).
SENSITIVITY_WEIGHT_BITS = 8


def _config(ctx_config: dict):
    from ..passes.int8 import Config

    return Config(**{"weight_bits": SENSITIVITY_WEIGHT_BITS, **ctx_config})


def _simulate(ctx: SimContext, layer: str) -> onnx.ModelProto:
    """The int8 pass's numerics on one layer: its weight fake-quantized on the pass's grid (per channel, 7 or 8 bits,
    bias-corrected where the pass would be), its input and output through Quantize/DequantizeLinear with the
    scale and zero point onnxruntime computes from the ranges of the pass's own calibrator (same method, percentile,
    samples) -- measured once per model and configuration."""
    from ..passes import PassOutcome
    from ..passes import int8 as p
    from ..passes._util import output_channel_axis

    cfg = _config(ctx.config("int8"))
    ranges = ctx.once(f"int8.ranges:{cfg.model_dump_json()}", lambda: p.activation_ranges(ctx.model, cfg, ctx.data))
    m, g, node, w = layer_copy(ctx, layer)
    bits = p.resolved_weight_bits(cfg)
    if cfg.bias_correction if cfg.bias_correction is not None else bits == 7:
        p.bias_correct(m, {layer}, cfg, ctx.data, PassOutcome(m))
        g.refresh()
    axis = output_channel_axis(node, w.ndim) if cfg.per_channel else None
    g.set_initializer(node.input[1], p.fake_quant_weight(w, axis, bits).astype(w.dtype))
    x, y = node.input[0], node.output[0]
    if x in ranges:
        tag = f"{layer}/sim_in"
        node.input[0] = f"{tag}/dq"
        insert_before(m, node, qdq_nodes(m, x, f"{tag}/dq", *p.activation_qparams(*ranges[x], cfg), tag))
    # onnxruntime's QDQ quantizer removes a Relu/Clip that alone consumes a quantized output (asymmetric ranges):
    # the output is quantized with the activation's range, whose saturation does the clipping
    consumers = [n for n in m.graph.node if y in n.input]
    act = consumers[0] if len(consumers) == 1 else None
    if node.op_type in cfg.exclude_output_quantization:
        pass  # the consumer's input Q/DQ quantizes it (measured with that layer)
    elif (act is not None and act.op_type in ("Relu", "Clip") and not cfg.activation_symmetric
            and y not in {o.name for o in m.graph.output} and act.output[0] in ranges):
        y2, tag = act.output[0], f"{layer}/sim_out"
        act.output[0] = f"{tag}/raw"
        insert_after(m, act, qdq_nodes(m, f"{tag}/raw", y2, *p.activation_qparams(*ranges[y2], cfg), tag))
    elif y in ranges:
        tag = f"{layer}/sim_out"
        node.output[0] = f"{tag}/raw"
        insert_after(m, node, qdq_nodes(m, f"{tag}/raw", y, *p.activation_qparams(*ranges[y], cfg), tag))
    return m


def _apply(model: onnx.ModelProto, layers: list[str], ctx: ApplyContext) -> tuple[onnx.ModelProto, str | None]:
    from ..errors import EdgeoptError
    from ..passes import run_pass

    if ctx.calib is None:
        raise EdgeoptError(f"the plan quantizes {len(layers)} layer(s) to int8: give calibration data")
    res = run_pass("int8", model, {**ctx.config("int8"), "nodes": layers}, ctx.calib, evaluate=False)
    return res.model, res.report.summary()


TECHNIQUES = [
    Technique(name="int8", kind="precision", description="int8 weights (per channel) and activations (static QDQ)",
              fidelity=40, weight_bits=8, activation_bits=8, float_bits=32,
              metadata_bytes=lambda weights, channels: channels * 5,  # fp32 scale + zero point per output channel
              profiled=True, simulate=_simulate, apply=_apply, apply_order=20),
]
