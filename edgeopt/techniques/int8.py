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


#: tensors :func:`refine_ranges` tries at most (those whose calibrated range clips the most)
REFINE_MAX = 32


def refine_ranges(model: onnx.ModelProto, calib, config: dict, samples: int = 32, widen: float = 1.25,
                  progress=None) -> tuple[dict[str, tuple[float, float]], str]:
    """Per activation tensor, the calibrated range or the full observed (min/max) one, whichever gives the lower model
    output noise when that tensor alone is quantized: percentile clipping helps most tensors, but clipping the rare
    large activations of a few (MobileNetV2's first ReLU6: 2e-2 of output noise alone) costs more than the coarser
    step.  Only tensors whose min/max range is at least ``widen`` times the calibrated one are tried, the
    :data:`REFINE_MAX` that clip most; each trial runs from that tensor on (:mod:`edgeopt._suffix`).  Cached on disk
    per (model, data, settings).

    Args:
        model: the float model (cleaned as sensitivity cleans it).
        calib: calibration data; the first ``samples`` are compared on.
        config: the int8 pass settings (calibration method and layout).
        samples: samples compared.
        widen: the least widening of the range worth a trial.
        progress: called with one line per trial.

    Returns:
        (tensor -> (min, max) overrides where min/max won, a rationale line).
    """
    import json

    import onnx

    from .._suffix import SuffixRunner
    from ..calibration import fingerprint
    from ..fidelity import relative_noise, run_feeds, session
    from ..io import atomic_write_text
    from ..passes import int8 as p
    from ..passes.cleanup import Config as CleanupConfig
    from ..passes.cleanup import apply as cleanup
    from ..passes.int8 import Config
    from ..zoo import cache_dir

    cfg = Config(**{"weight_bits": SENSITIVITY_WEIGHT_BITS, **config})
    if cfg.calibration == "minmax" or cfg.activation_symmetric:
        return {}, ""
    key = fingerprint(model, calib, {"v": 1, "samples": samples, "widen": widen, "max": REFINE_MAX, **cfg.model_dump()})
    store = cache_dir() / "int8ranges" / f"{key[:24]}.json"
    if store.is_file():
        try:
            saved = json.loads(store.read_text())
            return {k: (float(lo), float(hi)) for k, (lo, hi) in saved["overrides"].items()}, str(saved["note"])
        except (ValueError, KeyError, TypeError):
            pass
    clean = onnx.ModelProto()
    clean.CopyFrom(model)
    cleanup(clean, CleanupConfig(remove_identity=False))
    calibrated = p.activation_ranges(clean, cfg, calib)
    full = p.activation_ranges(clean, cfg.model_copy(update={"calibration": "minmax"}), calib)
    producer = {o: n for n in clean.graph.node for o in n.output}
    outputs = {o.name for o in clean.graph.output}
    ratio = {t: (full[t][1] - full[t][0]) / (hi - lo) for t, (lo, hi) in calibrated.items()
             if t in full and t in producer and t not in outputs and hi > lo}
    wide = sorted((t for t, r in ratio.items() if r >= widen), key=lambda t: -ratio[t])
    cands = wide[:REFINE_MAX]
    if not cands:
        return {}, "int8 ranges: no tensor's min/max range is much wider than its calibrated one"
    sub = calib.subset(min(samples, len(calib)))
    feeds = sub.feeds()
    ref = run_feeds(session(clean, optimize=False), feeds)[0]
    try:
        fast = SuffixRunner(clean, feeds, [producer[t].name for t in cands])
    except Exception:  # noqa: BLE001 - the whole model then runs each trial
        fast = None

    def noise(t: str, lo: float, hi: float) -> float:
        m = onnx.ModelProto()
        m.CopyFrom(clean)
        node = next(n for n in m.graph.node if t in n.output)
        tag = f"{t}/range"
        i = list(node.output).index(t)
        node.output[i] = f"{tag}/raw"
        insert_after(m, node, qdq_nodes(m, f"{tag}/raw", t, *p.activation_qparams(lo, hi, cfg), tag))
        out = fast.run(m, node.name, True) if fast is not None else None
        if out is None:
            out = run_feeds(session(m, optimize=False), feeds)[0]
        return relative_noise(ref, out)

    overrides: dict[str, tuple[float, float]] = {}
    gained = 0.0
    for i, t in enumerate(cands):
        if progress:
            progress(f"int8 ranges {i + 1}/{len(cands)}: {t}")
        a, b = noise(t, *calibrated[t]), noise(t, *full[t])
        if b < a:
            overrides[t] = full[t]
            gained += a - b
    note = (f"int8 ranges: {len(overrides)} of {len(cands)} tensor(s) tried (of {len(wide)} whose min/max range is >= "
            f"{widen:g}x the calibrated one) keep it (alone, their output noise drops by {gained:.3g} in total)")
    atomic_write_text(store, json.dumps({"overrides": overrides, "note": note}))
    return overrides, note


TECHNIQUES = [
    Technique(name="int8", kind="precision", description="int8 weights (per channel) and activations (static QDQ)",
              fidelity=40, weight_bits=8, activation_bits=8, float_bits=32,
              metadata_bytes=lambda weights, channels: channels * 5,  # fp32 scale + zero point per output channel
              profiled=True, simulate=_simulate, apply=_apply, apply_order=20),
]
