"""MCU fit: a structural reduction that makes a model fit a small target's RAM and flash.

:func:`fit_search` looks for per-layer channel keep ratios (the :mod:`~edgeopt.passes.channel_prune` pass's prunable
groups) and, only when the user allows it, a smaller square input side, such that the model's *predicted* int8 RAM
(the arena of :func:`edgeopt.costmodel.arena`, with the PAD copies the TFLite writer inserts; plus the weights where
the target loads them into RAM) and storage fit the target's budgets with a margin.  It prefers the least aggressive
change: the original resolution first, then each smaller side in turn, and at each side the fewest channels removed:

* flash: the group holding the most weight bytes loses 1/8 of its channels, repeatedly (in MobileNetV2: the last
  1x1 conv with the classifier's input channels, then the late 960-wide expansions);
* RAM: at the arena's peak step, the group whose channels hold the most live bytes there loses 1/8 of its channels
  (in MobileNetV2: the early wide expansions and the PAD copies of their depthwise convs).

No layer keeps fewer than ``min_keep`` of its channels (capacity guard); the input shrinks only when channels within
that guard cannot fit.  :func:`apply_fit` makes the proposed model: channel-pruned (consumers re-fitted by least
squares on calibration data when given) and, if chosen, with the new input side (shapes re-inferred; models whose
Reshape/Flatten pins the spatial size are refused).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import EdgeoptError
from .units import fmt_bytes

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from .calibration import CalibrationData
    from .types import BackendOption, ModelAnalysis, Target

#: smaller square input sides tried, largest first (multiples of 16/32: strided nets keep whole feature maps)
SIDES = (192, 160, 128, 112, 96, 80, 64, 48, 32, 24, 16)
#: channels removed per step, as a fraction of a layer's original channels
STEP = 0.125
MAX_ITERATIONS = 80
#: TFLite/TFLM per-channel int8 quantization parameters in the flatbuffer: a float32 scale and an int64 zero point
#: for each output channel of a weight and of most biases (measured on MobileNetV2: 23465 parameters, 12696 channels)
QUANT_PARAM_BYTES_PER_CHANNEL = 22  # 12 bytes per parameter, ~1.85 parameters per channel
#: TFLite Micro's tail (runtime structs after the tensors), as its recording allocator measures it on a 64-bit host
#: (what the tflm backend checks against the RAM budget): each conv/fully-connected kernel's per-channel output
#: multiplier and shift (int32 each), and per op the node, registration and eval-tensor records
TFLM_TAIL_BYTES_PER_CHANNEL = 8
TFLM_TAIL_BYTES_PER_LAYER = 96


class FitError(EdgeoptError):
    """A fit that cannot be applied (a model whose head pins the input size, a proposal for another model)."""


class FitProposal(BaseModel):
    """A structural reduction predicted to fit a target, and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str
    option: str = Field(description="the backend option whose cost model predicted the numbers")
    precision: str
    input_name: str
    original_side: int | None = Field(description="the original square input side (None: not a square image input)")
    resolution: int | None = Field(default=None, description="the new square input side; None: unchanged")
    ratios: dict[str, float] = Field(description="producer node -> fraction of its output channels removed")
    channels: dict[str, tuple[int, int]] = Field(description="producer node -> (channels before, after)")
    min_keep: float
    round_to: int
    min_channels: int
    margin: float
    predicted_ram: int = Field(description="arena (+ weights where loaded into RAM) + the runtime's overhead")
    predicted_arena: int = Field(description="the planner's arena (TFLite PAD copies included)")
    predicted_storage: int = Field(description="weights + graph + the format's quantization parameters")
    runtime_ram: int = Field(default=0, description="of predicted_ram: the runtime's tail (TFLM structs, 64-bit)")
    runtime_storage: int = Field(default=0, description="of predicted_storage: per-channel quantization parameters")
    ram_budget: int
    storage_budget: int
    original_ram: int
    original_storage: int
    params_before: int
    params_after: int
    rationale: list[str]

    def summary(self) -> str:
        """One line: what changes and the predicted RAM/flash against the budgets."""
        pruned = {k: v for k, v in self.channels.items() if v[1] < v[0]}
        res = (f"input {self.original_side}->{self.resolution}, " if self.resolution else "")
        return (f"{res}{len(pruned)} layer(s) channel-pruned (params {self.params_before} -> {self.params_after}); "
                f"predicted {self.precision} RAM {fmt_bytes(self.predicted_ram)} <= {fmt_bytes(self.ram_budget)}, "
                f"storage {fmt_bytes(self.predicted_storage)} <= {fmt_bytes(self.storage_budget)} "
                f"({self.margin:.0%} margin kept)")


# --------------------------------------------------------------------------- model edits


def _input(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    inits = {t.name for t in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    if not ins:
        raise FitError("fit: the model has no input")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ins[0].type.tensor_type.shape.dim]
    return ins[0].name, dims


def square_side(model: onnx.ModelProto) -> int | None:
    """The square spatial side of the model's first input when it is an NCHW image ([N, C, S, S]), else None."""
    _, dims = _input(model)
    if len(dims) == 4 and dims[2] is not None and dims[2] == dims[3]:
        return int(dims[2])
    return None


def spatial_pin(model: onnx.ModelProto, analysis: ModelAnalysis | None = None) -> str | None:
    """Why the model cannot run at another input size, or None: a Reshape/Flatten of a feature map with a spatial
    extent (its consumer's weights are sized to ``C*H*W``); a GlobalAveragePool -> Flatten head works at any size."""
    shapes = {t.name: t.shape for t in analysis.tensors} if analysis is not None else {}
    if not shapes:
        from .passes.channel_prune import _dims

        shapes = _dims(model)
    for n in model.graph.node:
        if n.op_type not in ("Flatten", "Reshape") or not n.input:
            continue
        s = shapes.get(n.input[0])
        if s is not None and len(s) == 4 and all(d is not None for d in s[2:]) and s[2] * s[3] > 1:
            return (f"{n.op_type} node {n.name} flattens a {s[1]}x{s[2]}x{s[3]} feature map, which pins the input size "
                    f"(only a GlobalAveragePool/Flatten head works at any size)")
    return None


def resize_input(model: onnx.ModelProto, side: int) -> onnx.ModelProto:
    """A copy of ``model`` whose image input is ``side`` x ``side`` (shapes re-inferred).

    Raises:
        FitError: not a square NCHW input, a head that pins the spatial size, or shape inference that fails or
            changes the outputs' shapes at the new size.
    """
    import onnx

    name, dims = _input(model)
    if square_side(model) is None:
        raise FitError(f"fit: input {name} of shape {dims} is not a square NCHW image; its resolution cannot change")
    pin = spatial_pin(model)
    if pin:
        raise FitError(f"fit: cannot change the input resolution: {pin}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inp = next(i for i in out.graph.input if i.name == name)
    shape = inp.type.tensor_type.shape
    shape.dim[2].dim_value = side
    shape.dim[3].dim_value = side
    del out.graph.value_info[:]
    before = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim][1:] for o in model.graph.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - any inference failure means the graph does not work at this size
        raise FitError(f"fit: the model does not work at {side}x{side}: {str(e).splitlines()[0][:200]}") from None
    for o in inferred.graph.output:
        after = [d.dim_value for d in o.type.tensor_type.shape.dim][1:]
        if before.get(o.name) and any(b and a != b for a, b in zip(after, before[o.name])):
            raise FitError(f"fit: at {side}x{side} output {o.name} changes shape ({before[o.name]} -> {after}); "
                           f"the model's head pins the input size")
    return out


def _prune(model: onnx.ModelProto, ratios: dict[str, float], round_to: int, min_channels: int,
           calib: CalibrationData | None = None) -> onnx.ModelProto:
    """``model`` (not modified) with each producer's ``ratios`` fraction of channels removed."""
    import onnx

    from .passes import channel_prune as cp

    out = onnx.ModelProto()
    out.CopyFrom(model)
    active = {k: v for k, v in ratios.items() if v > 0}
    if not active:
        return out
    cfg = cp.Config(ratio=0.5, ratios=active, nodes=[_literal(k) for k in active], reconstruct=calib is not None,
                    round_to=round_to, min_channels=min_channels)
    return cp.apply(out, cfg, calib).model


def _literal(name: str) -> str:
    import re

    return re.escape(name)


# --------------------------------------------------------------------------- prunable groups


class _Group:
    def __init__(self, name: str, channels: int, tensors: set[str], per_channel: float):
        self.name, self.channels, self.tensors, self.per_channel = name, channels, tensors, per_channel


def _groups(model: onnx.ModelProto, min_channels: int) -> list[_Group]:
    """The prunable producers of (normalized) ``model``, each with the tensors carrying its channels and the weight
    elements per channel it and its consumers hold."""
    from .passes import channel_prune as cp
    from .passes._util import Graph

    g = Graph(model)
    dims = cp._dims(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or (node.op_type == "Conv" and (cp._attr(node, "group", 1) or 1) != 1):
            continue
        try:
            grp = cp._trace(g, node, dims, lambda _n: False)
        except cp._Blocked:
            continue
        if grp.channels <= min_channels:
            continue
        c = grp.channels
        per = g.array(node.input[1]).size / c + 4  # + int32 bias
        for e in grp.edits:
            if e.kind == "dw":
                per += g.array(e.node.input[1]).size / c + 4
            elif e.kind in ("conv_in", "gemm_in", "matmul_in"):
                per += g.array(e.node.input[1]).size / c
        out.append(_Group(node.name, c, grp.tensors, per))
    return out


# --------------------------------------------------------------------------- prediction


def _evaluate(model: onnx.ModelProto, target: Target, option: BackendOption, precision: str, workdir: Path, tag: str):
    import onnx

    from .graph import analyze
    from .planner import evaluate

    path = workdir / f"{tag}.onnx"
    onnx.save(model, str(path))
    analysis = analyze(path, model=model)
    return analysis, evaluate(analysis, target, option, precision)


def runtime_overheads(analysis: ModelAnalysis, option: BackendOption) -> tuple[int, int]:
    """(RAM, storage) bytes the backend adds beyond the arena and the weights: for TFLite/TFLM, the per-channel int8
    quantization parameters in the flatbuffer; for TFLM also the runtime tail of the arena (per-channel requantization
    data and per-op records).  The planner's :func:`~edgeopt.planner.evaluate` does not count them; on MobileNetV2 at
    128x128 they are ~110 KiB of RAM and ~280 KiB of flash."""
    if option.backend not in ("tflite", "tflm"):
        return 0, 0
    channels = 0
    for ly in analysis.layers:
        if ly.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and ly.weight_shapes and ly.output_shapes:
            shape = ly.output_shapes[0]
            if len(shape) >= 2:
                channels += int(shape[1] if ly.op_type in ("Conv", "ConvTranspose") else shape[-1])
    storage = QUANT_PARAM_BYTES_PER_CHANNEL * channels
    ram = TFLM_TAIL_BYTES_PER_CHANNEL * channels + TFLM_TAIL_BYTES_PER_LAYER * len(analysis.layers) if (
        option.backend == "tflm") else 0
    return ram, storage


def _needs(analysis: ModelAnalysis, option: BackendOption, ev, overheads: bool) -> tuple[int, int]:
    """(RAM, storage) the model needs: the planner's prediction plus the backend's runtime overheads."""
    extra = runtime_overheads(analysis, option) if overheads else (0, 0)
    return int(ev.ram) + extra[0], int(ev.storage) + extra[1]


def _peak_live(analysis: ModelAnalysis, option: BackendOption, precision: str) -> tuple[dict[str, int], int]:
    """(tensor -> bytes) alive at the step where the most activation bytes are alive (the TFLite PAD copies included,
    named by the tensor they copy), and that step's total."""
    from . import costmodel

    precisions = {ly.name: precision for ly in analysis.layers}
    bits = costmodel.tensor_bits(analysis, precisions, option)
    tensors = costmodel.fused_tensors(analysis)
    spans = [(t.name, t.first, t.last, (t.elems * bits.get(t.name, 32) + 7) // 8) for t in tensors]
    if option.backend in ("tflite", "tflm"):
        added = costmodel.tflite_pad_tensors(analysis)
        if added:
            pad_steps = {t.first: src for t, src in added}
            spans = [(n, 2 * f if f >= 0 else f, 2 * last - 1 if pad_steps.get(last) == n else 2 * last, b)
                     for n, f, last, b in spans]
            for t, src in added:
                spans.append((src, 2 * t.first - 1, 2 * t.first, (t.elems * bits.get(src, 32) + 7) // 8))
    if not spans:
        return {}, 0
    lo = min(max(f, 0) for _, f, _, _ in spans)
    hi = max(last for _, _, last, _ in spans)
    best, best_step = -1, lo
    for step in range(lo, hi + 1):
        total = sum(b for _, f, last, b in spans if f <= step <= last)
        if total > best:
            best, best_step = total, step
    live: dict[str, int] = {}
    for n, f, last, b in spans:
        if f <= best_step <= last:
            live[n] = live.get(n, 0) + b
    return live, best


# --------------------------------------------------------------------------- search


def _keep_frac(ratios: dict[str, float], name: str) -> float:
    return 1.0 - ratios.get(name, 0.0)


def _step_down(ratios: dict[str, float], g: _Group, min_keep: float) -> bool:
    """Remove another :data:`STEP` of ``g``'s channels unless that goes below ``min_keep``."""
    keep = _keep_frac(ratios, g.name)
    new = round(keep - STEP, 6)
    if new < min_keep - 1e-9:
        return False
    ratios[g.name] = round(1.0 - new, 6)
    return True


def _storage_moves(groups: list[_Group], ratios: dict[str, float], excess: float, min_keep: float,
                   floor: float) -> list[str]:
    """Step down the groups whose next step saves the most weight bytes until the estimated saving covers ``excess``;
    below ``min_keep`` (down to ``floor``) a step's saving counts half."""
    moved: list[str] = []
    saved = 0.0

    def score(g: _Group) -> float:  # bytes a step saves; going below min_keep counts half (capacity first)
        below = _keep_frac(ratios, g.name) - STEP < min_keep - 1e-9
        return g.per_channel * g.channels * (0.5 if below else 1.0)

    while saved < excess:
        cands = [g for g in groups if _keep_frac(ratios, g.name) - STEP >= floor - 1e-9]
        if not cands:
            break
        # the layer where a step saves the most bytes: the biggest weights; a layer already at min_keep goes lower
        # only while that still saves more than pruning a small layer to min_keep would (flash has no other lever)
        g = max(cands, key=lambda g: (score(g), g.per_channel * g.channels * _keep_frac(ratios, g.name)))
        _step_down(ratios, g, floor)
        saved += g.per_channel * g.channels * STEP
        moved.append(g.name)
    return moved


def _ram_move(groups: list[_Group], ratios: dict[str, float], live: dict[str, int], min_keep: float) -> str | None:
    """Step down the group whose channels hold the most bytes at the peak; None when none can."""
    held: dict[str, int] = {}
    for g in groups:
        if _keep_frac(ratios, g.name) - STEP < min_keep - 1e-9:
            continue
        b = sum(v for k, v in live.items() if k in g.tensors)
        if b:
            held[g.name] = b
    if not held:
        return None
    name = max(held, key=held.get)
    _step_down(ratios, next(g for g in groups if g.name == name), min_keep)
    return name


def _channels(groups: list[_Group], ratios: dict[str, float], round_to: int, min_channels: int) -> dict[str, tuple[int, int]]:
    from .passes import channel_prune as cp

    cfg = cp.Config(ratio=0.5, round_to=round_to, min_channels=min_channels, reconstruct=False)
    return {g.name: (g.channels, cp._keep_count(g.channels, cfg, ratios.get(g.name, 0.0))) for g in groups}


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def fit_search(model: onnx.ModelProto, analysis: ModelAnalysis, target: Target, option: BackendOption, *,
               allow_resolution: bool, calib: CalibrationData | None = None, margin: float = 0.10,
               min_keep: float = 0.5, storage_floor: float = 0.25, round_to: int = 8, min_channels: int = 8, sides: tuple[int, ...] | None = None,
               precision: str | None = None, overheads: bool = True, why: list[str] | None = None) -> FitProposal | None:
    """Find channel keep ratios (and, with ``allow_resolution``, a smaller square input side) under which the
    model's predicted RAM and storage fit ``target``'s budgets with ``margin`` to spare.

    The search is structural (channels are sliced, nothing is re-fitted); ``calib`` is not read (accepted for the
    planner's uniform call; :func:`apply_fit` re-fits on it).

    Args:
        model: the model (not modified).
        analysis: its analysis (the original's predicted RAM/storage are reported from it).
        target: the target whose budgets must be met.
        option: the backend option the model will run on (its cost model; TFLite/TFLM: with the PAD copies).
        allow_resolution: whether the input side may shrink (only when channels alone cannot fit).
        calib: calibration data (unused by the search).
        margin: fraction of each budget kept free (predictions are estimates).
        min_keep: no layer keeps fewer than this fraction of its channels, except that where flash cannot fit
            otherwise the largest layers go on down to ``storage_floor`` (resolution does not change flash).
        storage_floor: the lowest keep fraction flash may push a layer to.
        round_to: channel counts kept a multiple of this (the pass's rounding).
        min_channels: never fewer channels than this.
        sides: the smaller sides tried, largest first (default: :data:`SIDES` below the original side).
        precision: the numeric format predicted (default int8 where the option runs it, else its first).
        overheads: add the backend's runtime overheads to the planner's prediction (:func:`runtime_overheads`).
        why: when given, lines saying why no proposal was found (or what was tried) are appended to it.

    Returns:
        The least aggressive :class:`FitProposal` found, or None when nothing fits (the reasons in ``why``).
    """
    import onnx

    from .passes.cleanup import normalize
    from .planner import evaluate

    notes: list[str] = [] if why is None else why
    precision = precision or ("int8" if "int8" in option.precisions else option.precisions[0])
    b = target.budgets
    ram_cap, sto_cap = int(b.ram) * (1 - margin), int(b.storage) * (1 - margin)
    ev0 = evaluate(analysis, target, option, precision)
    ram0, sto0 = _needs(analysis, option, ev0, overheads)
    base = onnx.ModelProto()
    base.CopyFrom(model)
    normalize(base)
    groups = _groups(base, min_channels)
    input_name, _ = _input(base)
    side0 = square_side(base)
    extra = (" (runtime overheads included: " + ", ".join(
        f"{k} {fmt_bytes(v)}" for k, v in zip(("RAM", "storage"), runtime_overheads(analysis, option)) if v) + ")"
        if overheads and any(runtime_overheads(analysis, option)) else "")
    rationale = [f"original ({precision}, {option.label}): predicted RAM {fmt_bytes(ram0)} vs "
                 f"{fmt_bytes(b.ram)}, storage {fmt_bytes(sto0)} vs {fmt_bytes(b.storage)}{extra}; fitting with "
                 f"{margin:.0%} margin: RAM <= {fmt_bytes(ram_cap)}, storage <= {fmt_bytes(sto_cap)}"]
    if ram0 <= ram_cap and sto0 <= sto_cap:
        rationale.append("the model already fits: nothing to change")
        return _proposal(target, option, precision, input_name, side0, None, {}, groups, round_to, min_channels,
                         min_keep, margin, (ram0, sto0), (ram0, sto0), ev0, runtime_overheads(analysis, option)
                         if overheads else (0, 0), b, _params(base), _params(base), rationale)
    trials: list[int | None] = [None]
    if allow_resolution:
        if side0 is None:
            notes.append(f"input {input_name} is not a square NCHW image: only channels are pruned")
        else:
            pin = spatial_pin(base, analysis)
            if pin:
                notes.append(f"the resolution stays: {pin}")
            else:
                trials += [s for s in (sides or SIDES) if s < side0]
    if not groups:
        notes.append("no layer is channel-prunable (every Conv/Gemm output reaches a residual Add, Concat, a graph "
                     "output... or has min_channels or fewer channels)")
        return None

    with tempfile.TemporaryDirectory(prefix="edgeopt-fit-") as tmp:
        work = Path(tmp)
        storage_ratios: dict[str, float] | None = None  # found at the first side; the weights do not depend on it
        storage_moves: list[str] = []
        storage_failed = False
        for side in trials:
            try:
                shaped = base if side is None else resize_input(base, side)
            except FitError as e:
                notes.append(str(e))
                break
            ratios = dict(storage_ratios or {})
            where = f"{side}x{side}" if side else "the original resolution"
            moves: list[str] = list(storage_moves)
            result = None
            for it in range(MAX_ITERATIONS):
                cand = _prune(shaped, ratios, round_to, min_channels)
                an, ev = _evaluate(cand, target, option, precision, work, f"s{side or 0}_{it}")
                ram, sto = _needs(an, option, ev, overheads)
                ram_ok, sto_ok = ram <= ram_cap, sto <= sto_cap
                if ram_ok and sto_ok:
                    result = (cand, ev, (ram, sto), runtime_overheads(an, option) if overheads else (0, 0))
                    break
                progressed = False
                if not sto_ok:
                    moved = _storage_moves(groups, ratios, sto - sto_cap, min_keep, storage_floor)
                    moves += [f"storage: {m}" for m in moved]
                    progressed = bool(moved)
                    if not moved:
                        notes.append(f"storage {fmt_bytes(sto)} > {fmt_bytes(sto_cap)} with every prunable layer at its "
                                     f"floor ({storage_floor:.0%} of its channels kept); a lower resolution does not "
                                     f"reduce flash")
                        storage_failed = True
                        break
                elif not ram_ok:
                    live, _ = _peak_live(an, option, precision)
                    moved1 = _ram_move(groups, ratios, live, min_keep)
                    if moved1:
                        moves.append(f"RAM: {moved1}")
                        progressed = True
                    else:
                        top = sorted(live.items(), key=lambda kv: -kv[1])[:3]
                        notes.append(f"at {where}: RAM {fmt_bytes(ram)} > {fmt_bytes(ram_cap)}; the peak is held by "
                                     + ", ".join(f"{k} ({fmt_bytes(v)})" for k, v in top)
                                     + f", which no prunable layer above its floor ({min_keep:.0%} kept) controls")
                        break
                if not progressed:
                    break
            else:
                notes.append(f"at {where}: no fit after {MAX_ITERATIONS} steps")
            if storage_ratios is None:
                # the storage-driven part of this side's ratios carries over to smaller sides (weights do not depend
                # on the resolution); the RAM-driven part is redone at each side
                storage_ratios = {}
                storage_moves = [m for m in moves if m.startswith("storage: ")]
                for m in storage_moves:
                    g = next(g for g in groups if g.name == m[9:])
                    _step_down(storage_ratios, g, storage_floor)
            if result is None:
                if storage_failed:
                    break
                continue
            cand, ev, need, over = result
            chans = _channels(groups, ratios, round_to, min_channels)
            pruned = {k: v for k, v in chans.items() if v[1] < v[0]}
            rationale += _explain(notes, side0, side, pruned, moves, min_keep, need, ram_cap, sto_cap)
            return _proposal(target, option, precision, input_name, side0, side, {k: ratios[k] for k in pruned},
                             groups, round_to, min_channels, min_keep, margin, (ram0, sto0), need, ev, over, b,
                             _params(base), _params(cand), rationale)
    if not allow_resolution and side0 is not None:
        notes.append("a lower input resolution was not allowed (allow_resolution / --allow-resolution)")
    return None


def _explain(notes, side0, side, pruned, moves, min_keep, need, ram_cap, sto_cap) -> list[str]:
    lines = [f"tried first: {n}" for n in notes]
    n_sto = sum(m.startswith("storage") for m in moves)
    n_ram = sum(m.startswith("RAM") for m in moves)
    if side:
        lines.append(f"input {side0}x{side0} -> {side}x{side}: channels alone (each layer keeping >= {min_keep:.0%}) "
                     f"could not fit at the larger sides; the arena scales with the feature maps' area")
    if n_sto:
        low = min((b / a for a, b in pruned.values()), default=1.0)
        lines.append(f"flash: {n_sto} step(s) of {STEP:.0%} of a layer's channels where the weight bytes are (the "
                     f"largest producer+consumer weights first)"
                     + (f"; flash needed layers below {min_keep:.0%} (down to {low:.0%} kept)" if low < min_keep - 0.02
                        else ""))
    if n_ram:
        lines.append(f"RAM: {n_ram} step(s) of {STEP:.0%} of the channels of the layer holding the most bytes at the "
                     f"arena's peak step (PAD copies included)")
    top = sorted(pruned.items(), key=lambda kv: kv[1][1] / kv[1][0])[:4]
    if top:
        lines.append("most pruned: " + ", ".join(f"{k} {a}->{b}" for k, (a, b) in top))
    lines.append(f"predicted RAM {fmt_bytes(need[0])} <= {fmt_bytes(ram_cap)}, storage {fmt_bytes(need[1])} <= "
                 f"{fmt_bytes(sto_cap)}")
    return lines


def _proposal(target, option, precision, input_name, side0, side, ratios, groups, round_to, min_channels, min_keep,
              margin, need0, need, ev, over, b, p0, p1, rationale) -> FitProposal:
    return FitProposal(
        target=target.name, option=option.label, precision=precision, input_name=input_name, original_side=side0,
        resolution=side, ratios=ratios, channels=_channels(groups, ratios, round_to, min_channels), min_keep=min_keep,
        round_to=round_to, min_channels=min_channels, margin=margin, predicted_ram=int(need[0]),
        predicted_arena=int(ev.arena), predicted_storage=int(need[1]), runtime_ram=int(over[0]),
        runtime_storage=int(over[1]), ram_budget=int(b.ram), storage_budget=int(b.storage), original_ram=int(need0[0]),
        original_storage=int(need0[1]), params_before=p0, params_after=p1, rationale=rationale)


def apply_fit(model: onnx.ModelProto, proposal: FitProposal, calib: CalibrationData | None = None) -> onnx.ModelProto:
    """The model ``proposal`` describes: channel-pruned (consumers re-fitted by least squares on ``calib`` when
    given, at the original resolution) and, if ``proposal.resolution``, with a ``resolution`` x ``resolution`` input.

    Args:
        model: the original model (not modified).
        proposal: from :func:`fit_search` on this model.
        calib: calibration data at the original input size (None: no re-fit).

    Returns:
        The fitted model (shapes re-inferred where the input changed).

    Raises:
        FitError: the proposal names layers this model lacks, or the model's head pins the input size.
    """
    import onnx

    from .passes.cleanup import normalize

    base = onnx.ModelProto()
    base.CopyFrom(model)
    normalize(base)
    names = {n.name for n in base.graph.node}
    missing = [k for k in proposal.ratios if k not in names]
    if missing:
        raise FitError(f"fit: the proposal prunes {missing[0]}, which this model lacks (a proposal for another model?)")
    if proposal.resolution:
        pin = spatial_pin(base)
        if pin:
            raise FitError(f"fit: cannot change the input resolution: {pin}")
    out = _prune(base, proposal.ratios, proposal.round_to, proposal.min_channels, calib)
    if proposal.resolution:
        out = resize_input(out, proposal.resolution)
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    onnx.checker.check_model(out)
    return out


def resize_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]``: rows of the antialiased bilinear resampling from ``src`` to ``dst`` samples (torch's
    ``interpolate(mode="bilinear", antialias=True)`` along one axis); ``R @ x @ R.T`` resizes a square image."""
    import torch
    import torch.nn.functional as F

    eye = torch.eye(src, dtype=torch.float64)[None, None]
    r = F.interpolate(eye, size=(dst, src), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return r.numpy().astype(np.float32)


def resize_images(x: np.ndarray, side: int) -> np.ndarray:
    """NCHW square images resampled to ``side`` x ``side`` (see :func:`resize_matrix`)."""
    if x.shape[2] == side and x.shape[3] == side:
        return x
    r = resize_matrix(x.shape[2], side)
    return np.einsum("ij,ncjk,lk->ncil", r, x.astype(np.float32), r, optimize=True).astype(np.float32)


# --------------------------------------------------------------------------- recovery at a lower resolution

#: the tensor a resize prefix feeds the fitted model's first layers with
PREFIX_IN = "fit_resized"


def with_resize_prefix(student: onnx.ModelProto, src: int, dst: int) -> onnx.ModelProto:
    """``student`` (a ``dst`` x ``dst`` input) behind a fixed resampling of a ``src`` x ``src`` input (MatMuls with
    the constant on the left, which :func:`edgeopt.recover.recover` does not train), so that teacher and student
    share their input during recovery; :func:`strip_resize_prefix` takes it off again."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(student)
    inp = m.graph.input[0]
    name = inp.name
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x == name:
                n.input[i] = PREFIX_IN
    m.graph.initializer.append(numpy_helper.from_array(resize_matrix(src, dst), "fit_resize_r"))
    pre = [helper.make_node("MatMul", ["fit_resize_r", name], ["fit_r1"], name="fit_resize_rows"),
           helper.make_node("Transpose", ["fit_r1"], ["fit_r2"], name="fit_resize_t1", perm=[0, 1, 3, 2]),
           helper.make_node("MatMul", ["fit_resize_r", "fit_r2"], ["fit_r3"], name="fit_resize_cols"),
           helper.make_node("Transpose", ["fit_r3"], [PREFIX_IN], name="fit_resize_t2", perm=[0, 1, 3, 2])]
    nodes = pre + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    inp.type.tensor_type.shape.dim[2].dim_value = src
    inp.type.tensor_type.shape.dim[3].dim_value = src
    del m.graph.value_info[:]
    return m


def strip_resize_prefix(model: onnx.ModelProto, dst: int) -> onnx.ModelProto:
    """The model :func:`with_resize_prefix` wrapped, back on its own ``dst`` x ``dst`` input."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [n for n in m.graph.node if not n.name.startswith("fit_resize_")]
    name = m.graph.input[0].name
    for n in keep:
        for i, x in enumerate(n.input):
            if x == PREFIX_IN:
                n.input[i] = name
    del m.graph.node[:]
    m.graph.node.extend(keep)
    inits = [t for t in m.graph.initializer if t.name != "fit_resize_r"]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = dst
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_value = dst
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    return m
