"""Choosing, for a model and a target, the backend and per-layer precision/pruning.

Pure: works on a :class:`ModelAnalysis` and a :class:`Target`, imports no vendor SDK.

The search goes through the target's backend options in preference order and,
on each, through whole-model recipes from highest to lowest fidelity
(each technique's ``fidelity`` in :mod:`edgeopt.technique`: fp32 > fp16 > bf16 >
wint8 > int8 > wint4), taking the first that meets the RAM, storage and latency
budgets.  A technique that names its ops (weight-only formats: MatMul/Gemm, the
ops MatMulNBits-style kernels exist for) touches only those; full-integer backends
get int8 everywhere.  When nothing fits, the error names the closest point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import __version__, technique
from . import backends as backend_registry
from .costmodel import (
    VIEW_OPS,
    arena,
    fused_layers,
    graph_overhead_bytes,
    layer_latency,
    nchwc_reorders,
    planned_weight_bytes,
    reorder_ms,
    unit_of,
)
from .errors import BudgetError, EdgeoptError, UnsupportedOpError
from .targets import target_sha256
from .types import BackendOption, BudgetCheck, LayerPlan, ModelAnalysis, Plan, Target
from .units import fmt_bytes


def fidelity_order() -> tuple[str, ...]:
    """Precisions from highest to lowest fidelity (the order whole-model recipes are tried in).

    Returns:
        The precision technique names, highest fidelity first.
    """
    return technique.precision_names()


def check_option(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    """Reasons ``option`` cannot run ``analysis``.

    Args:
        analysis: the model.
        option: one backend option of a target.

    Returns:
        One reason per unsupported layer (empty: the option runs the model).
    """
    return backend_registry.get(option.backend).check_ops(analysis, option)


def summarize_refusals(reasons: list[str], *, examples: int = 2) -> str:
    """Per-layer refusals (``"<layer>: <why>"``) grouped by reason, each distinct reason once with its layer count
    and a few layer names: ``"op Erf is not supported by tflite (12 layers: /b0/Erf, /b1/Erf, ...)"``."""
    groups: dict[str, list[str]] = {}
    for r in reasons:
        layer, sep, why = r.partition(": ")
        if not sep:
            layer, why = "", r
        groups.setdefault(why, []).append(layer)
    parts = []
    for why, layers in groups.items():
        named = [n for n in layers if n]
        shown = ", ".join(named[:examples]) + (", ..." if len(named) > examples else "")
        count = f"{len(layers)} layer{'s' if len(layers) > 1 else ''}"
        parts.append(f"{why} ({count}: {shown})" if named else why)
    return "; ".join(parts)


def option_refusal(analysis: ModelAnalysis, target: Target, option: BackendOption, reasons: list[str]) -> str:
    """Why an option cannot run the model, in one clause: each distinct missing op once and, when even the option's
    most compact whole-model format would miss a RAM or storage limit, that too (the reason a device gives first:
    adding kernels would not make the model fit)."""
    return f"{option.label}: {summarize_refusals(reasons)}{_would_not_fit(analysis, target, option)}"


def _would_not_fit(analysis: ModelAnalysis, target: Target, option: BackendOption) -> str:
    compact = [p for p in reversed(fidelity_order()) if p in option.precisions]
    if not compact:
        return ""
    try:
        ev = evaluate(analysis, target, option, compact[0])
    except Exception:  # noqa: BLE001 - the cost model of an op the option cannot run is a best effort only
        return ""
    # storage: a lower bound (every parameter in the format's bits), so that a table the cost model keeps in float
    # does not inflate the claim; RAM: the predicted arena (+ weights where they are loaded)
    least = analysis.total_params * technique.get(compact[0]).weight_bits // 8
    shown = {"storage": least, "ram": ev.ram}
    over = [(c.name, shown[c.name], c.budget) for c in ev.checks
            if c.limit and c.name in shown and shown[c.name] > c.budget]
    if not over:
        return ""
    what = ", ".join(f"{name} {'at least ' if name == 'storage' else ''}{fmt_bytes(v)} > {fmt_bytes(b)}"
                     for name, v, b in over)
    return f"; and it would not fit even in {compact[0]}: {what}"


def _float_precision(option: BackendOption) -> str:
    """The highest-fidelity float format the option runs (what layers a recipe does not touch run in)."""
    for t in technique.precisions():
        if t.name in option.precisions and not t.weight_only and t.activation_bits is not None and t.activation_bits >= 16:
            return t.name
    return option.weight_only_compute


def recipe_precisions(analysis: ModelAnalysis, option: BackendOption, recipe: str) -> dict[str, tuple[str, str]]:
    """Per-layer precision of a whole-model recipe.

    Args:
        analysis: the model.
        option: the backend option it runs on.
        recipe: a precision technique applied to every layer it applies to.

    Returns:
        Layer name -> (precision, reason).
    """
    t = technique.get(recipe)
    out: dict[str, tuple[str, str]] = {}
    for ly in analysis.layers:
        if option.requires_full_integer:
            out[ly.name] = ("int8", f"{option.label} runs full-integer models only")
        elif t.ops is not None or t.weight_only:
            if ly.quantizable and t.applies_to(ly.op_type):
                what = "weight-only quantization" if t.weight_only else recipe
                out[ly.name] = (recipe, f"{recipe}: {what} of a {ly.op_type}")
            else:
                fp = _float_precision(option)
                why = "no weights" if not ly.quantizable else f"{recipe} applies to {', '.join(sorted(t.ops or ()))}, not {ly.op_type}"
                out[ly.name] = (fp, f"{fp}: {why}")
        elif t.activation_bits is not None and t.activation_bits <= 8:
            why = (f"{recipe}: {t.description}" if ly.quantizable
                   else f"{recipe} activations between quantized layers (no Q/DQ islands)")
            out[ly.name] = (recipe, why)
        else:
            out[ly.name] = (recipe, f"{recipe} recipe")
    return out


def _over(predicted: float, budget: float) -> float:
    """predicted / budget, guarded: a target validated by :mod:`edgeopt.types` has positive budgets, but one made
    with ``model_construct`` need not, and a zero budget must read as "far over" rather than ZeroDivisionError."""
    return predicted / max(budget, 1e-12)


@dataclass(frozen=True)
class Evaluation:
    option: BackendOption
    recipe: str
    layers: list[LayerPlan]
    latency_ms: float
    storage: int
    ram: int
    arena: int
    checks: list[BudgetCheck]

    @property
    def fits(self) -> bool:
        """Whether every budget that is a limit passes (RAM, storage; latency when the target makes it one)."""
        return all(c.ok for c in self.checks if c.limit)

    @property
    def meets_goals(self) -> bool:
        """Whether every budget check passes, goals included (the target's latency when it is not a limit)."""
        return all(c.ok for c in self.checks)

    @property
    def overshoot(self) -> float:
        """The worst ratio predicted/budget over the limits (<= 1 means it fits)."""
        return max(_over(c.predicted, c.budget) for c in self.checks if c.limit)


@dataclass(frozen=True)
class Choice:
    """One layer's numeric format and pruning."""

    precision: str
    sparsity: str = "none"
    ratio: float = 0.0
    reason: str = ""


def _ratio(c: Choice) -> float:
    """The fraction a choice's pruning removes (unset: the technique's planned ratio)."""
    if c.sparsity == "none":
        return 0.0
    return c.ratio or technique.get(c.sparsity).ratio


def _sparsity_support(option: BackendOption, pattern: str):
    return next((s for s in option.sparsity if s.pattern == pattern), None)


def _choice_cost(ly, c: Choice, option: BackendOption, unit, *, fused: bool = False, measured=None):
    """(ms, weight bytes, bound) of one layer under a choice: measured time where the table has it, else the roofline."""
    support = _sparsity_support(option, c.sparsity) if c.sparsity != "none" else None
    sp = technique.get(c.sparsity) if c.sparsity != "none" else None
    ratio = _ratio(c)
    wb = planned_weight_bytes(ly, c.precision, c.sparsity, ratio, bool(support and support.compresses_storage))
    keep = 1.0 - ratio if sp is not None and sp.removes_channels else 1.0
    speedup = support.speedup if support is not None and not (sp and sp.removes_channels) else 1.0
    cost = layer_latency(ly, c.precision, option, unit, fused=fused, weight_bytes=wb, sparsity_speedup=speedup, keep=keep)
    timed = measured.get(ly.name, c.precision) if measured is not None else None
    ms = timed * keep / speedup if timed is not None else cost.ms
    return ms, wb, cost.bound


def _transition_ms(ly, prev_bits: int, bits: int, option: BackendOption, unit) -> float:
    """Cost of converting a layer's input between formats (a Q/DQ or Cast the runtime must execute)."""
    if prev_bits == bits:
        return 0.0
    return (ly.input_elems * (prev_bits + bits) / 8) / unit.memory_bandwidth_bytes_per_s * 1e3 + unit.layer_overhead_us / 1e3


def evaluate(analysis: ModelAnalysis, target: Target, option: BackendOption, recipe: str,
             precisions: dict[str, tuple[str, str]] | None = None, choices: dict[str, Choice] | None = None,
             measured=None) -> Evaluation:
    """Predicted latency, storage and RAM of one per-layer assignment (``choices`` wins over ``precisions``).

    ``measured`` (a :class:`~edgeopt.latency_table.LatencyTable`) replaces predicted layer times and
    format-conversion costs with times profiled on this machine where it has them.

    Args:
        analysis: the model.
        target: the target whose unit and budgets are used.
        option: the backend option the model runs on.
        recipe: the recipe name recorded in the result; without ``precisions`` or ``choices``
            it is also applied to the model (see :func:`recipe_precisions`).
        precisions: layer name -> (precision, reason); used when ``choices`` is None.
        choices: layer name -> :class:`Choice` for every layer (precision and pruning).
        measured: a latency table profiled for ``option``, or None to use the cost model only.

    Returns:
        The per-layer plans, predicted latency (ms), storage, RAM and arena bytes, and the
        ram/storage/latency budget checks.
    """
    if choices is None:
        precisions = precisions or recipe_precisions(analysis, option, recipe)
        choices = {k: Choice(p, reason=why) for k, (p, why) in precisions.items()}
    unit = unit_of(target, option)
    fused = fused_layers(analysis, option.fuses)
    block = getattr(option.settings, "channel_multiple", None) or 8
    reorders = nchwc_reorders(analysis, fused, block) if option.nchwc else {}
    producer_bits = {}
    layers: list[LayerPlan] = []
    for ly in analysis.layers:
        c = choices[ly.name]
        ratio = _ratio(c)
        ms, wb, bound = _choice_cost(ly, c, option, unit, fused=ly.name in fused, measured=measured)
        bits = option.activation_bits(c.precision)
        prev = [producer_bits[i] for i in ly.inputs if i in producer_bits]
        extra = _transition_ms(ly, prev[0], bits, option, unit) if prev and ly.name not in fused else 0.0
        if extra and measured is not None and measured.conversion_ms:
            extra = measured.conversion_ms
        if ly.name in reorders:
            extra += reorder_ms(reorders[ly.name], c.precision, option, unit)
        for o in ly.outputs:
            producer_bits[o] = bits
        note = _cost_note(ly.op_type, bound) + (f" (+{extra:.4f} ms format conversion)" if extra else "")
        layers.append(LayerPlan(name=ly.name, op_type=ly.op_type, precision=c.precision, sparsity=c.sparsity,
                                sparsity_ratio=ratio if c.sparsity != "none" else 0.0, predicted_ms=ms + extra,
                                weight_bytes=wb, reason=c.reason + note))
    latency = sum(lp.predicted_ms for lp in layers) + unit.run_overhead_us / 1e3
    weights = sum(lp.weight_bytes for lp in layers)
    storage = graph_overhead_bytes(analysis) + weights
    ap = arena(analysis, {k: v.precision for k, v in choices.items()}, option)
    ram = ap.arena_bytes + (weights if target.budgets.weights_in_ram else 0)
    b = target.budgets
    checks = [BudgetCheck(name="ram", predicted=ram, budget=int(b.ram)),
              BudgetCheck(name="storage", predicted=storage, budget=int(b.storage)),
              BudgetCheck(name="latency_ms", predicted=round(latency, 6), budget=b.latency_ms, limit=b.latency_is_limit)]
    return Evaluation(option, recipe, layers, latency, storage, ram, ap.arena_bytes, checks)


def _cost_note(op_type: str, bound: str) -> str:
    if bound != "fused":
        return ""
    return " (a view: no cost)" if op_type in VIEW_OPS else " (fused into its producer)"


def _describe(e: Evaluation) -> str:
    parts = []
    for c in e.checks:
        shown = (f"{c.predicted:.2f} ms" if c.name == "latency_ms" else fmt_bytes(c.predicted))
        limit = (f"{c.budget:g} ms" if c.name == "latency_ms" else fmt_bytes(c.budget))
        parts.append(f"{c.name.replace('_ms', '')} {shown} {'<=' if c.ok else '>'} {limit}{'' if c.limit else ' goal'}")
    return f"{e.option.label} {e.recipe}: " + ", ".join(parts)


def missed_goals(checks: Iterable[BudgetCheck], target_name: str) -> str | None:
    """One sentence for the goals a plan that fits its limits misses (the target's latency when it is not a limit),
    or None when it meets them all."""
    missed = [c for c in checks if not c.limit and not c.ok]
    if not missed:
        return None
    what = ", ".join(f"{c.predicted:.2f} ms predicted > {c.budget:g} ms" for c in missed)
    return (f"no plan meets the latency goal of {target_name} ({what}); this is the fastest within its limits "
            f"(--max-latency-ms makes the latency a limit that refuses instead)")


def with_latency_limit(target: Target, ms: float) -> Target:
    """``target`` with its latency budget set to ``ms`` and made a limit (plans over it are refused), as
    ``--max-latency-ms`` asks; validated like a target file's value."""
    import math

    if isinstance(ms, bool) or not math.isfinite(ms) or ms <= 0:
        raise EdgeoptError(f"--max-latency-ms must be a positive number of milliseconds, not {ms}")
    budgets = target.budgets.model_copy(update={"latency_ms": float(ms), "latency_is_limit": True})
    return target.model_copy(update={"budgets": budgets})


def candidate_options(target: Target, backend: str | None) -> list[BackendOption]:
    """The target's backend options to search, in its preference order.

    Args:
        target: the target.
        backend: keep only this backend's options; None keeps all.

    Returns:
        The matching backend options (never empty).

    Raises:
        EdgeoptError: the target has no option for ``backend``.
    """
    options = [o for o in target.backends if backend is None or o.backend == backend]
    if not options:
        valid = sorted({o.backend for o in target.backends})
        raise EdgeoptError(f"target {target.name} has no backend '{backend}'; its backends: {', '.join(valid)}")
    return options


def make_plan(analysis: ModelAnalysis, target: Target, *, backend: str | None = None,
              precision: str | None = None, enforce_budgets: bool = True) -> Plan:
    """The highest-fidelity plan that meets the target's budgets.

    ``backend`` restricts the backend; ``precision`` forces a recipe.  With
    ``enforce_budgets=False`` the best plan is returned even when it misses a
    budget (the plan's checks say which).

    Args:
        analysis: the model.
        target: the target and its budgets.
        backend: search only this backend's options; None searches all in preference order.
        precision: try only this whole-model recipe; None tries every recipe an option runs,
            highest fidelity first.
        enforce_budgets: raise when no plan fits; if False, return the closest one instead
            (least overshoot, then highest fidelity).

    Returns:
        The first plan (by option preference, then fidelity) that meets every budget, with
        its rationale.

    Raises:
        EdgeoptError: the target has no ``backend`` option, or no usable option runs ``precision``.
        UnsupportedOpError: no candidate option can run the model's ops.
        BudgetError: no plan meets the budgets and ``enforce_budgets`` is True.
    """
    rationale: list[str] = []
    unsupported: list[str] = []
    evaluations: list[Evaluation] = []
    options = candidate_options(target, backend)
    for option in options:
        reasons = check_option(analysis, option)
        if reasons:
            unsupported.append(option_refusal(analysis, target, option, reasons))
            rationale.append(f"skipped {option.label}: {len(reasons)} layer(s) unsupported, first: {reasons[0]}")
            continue
        recipes: Iterable[str] = [p for p in fidelity_order() if p in option.precisions]
        if precision is not None:
            if precision not in option.precisions:
                rationale.append(f"skipped {option.label}: it does not run {precision} (it runs {', '.join(option.precisions)})")
                continue
            recipes = [precision]
        for recipe in recipes:
            ev = evaluate(analysis, target, option, recipe)
            evaluations.append(ev)
            if ev.meets_goals:
                rationale.append(f"chose {_describe(ev)}")
                return _to_plan(analysis, target, ev, rationale)
            rationale.append(f"rejected {_describe(ev)}")
    fitting = [e for e in evaluations if e.fits]
    if fitting:  # only a goal is missed: the fastest plan within the limits
        ev = min(fitting, key=lambda e: (round(e.latency_ms, 9), fidelity_order().index(e.recipe)))
        rationale.append(f"chose {_describe(ev)}: {missed_goals(ev.checks, target.name)}")
        return _to_plan(analysis, target, ev, rationale)
    if not evaluations:
        if unsupported:
            raise UnsupportedOpError(f"no backend of target {target.name} can run this model: " + " | ".join(unsupported))
        valid = sorted({p for o in options for p in o.precisions})
        raise EdgeoptError(f"target {target.name} cannot run precision '{precision}'; valid: {', '.join(valid)}")
    best = min(evaluations, key=lambda e: (e.overshoot, fidelity_order().index(e.recipe)))
    if not enforce_budgets:
        rationale.append(f"no plan meets every budget; kept the closest: {_describe(best)}")
        return _to_plan(analysis, target, best, rationale)
    raise BudgetError(f"no plan meets the budgets of {target.name}; closest: {_describe(best)}")


def _to_plan(analysis: ModelAnalysis, target: Target, ev: Evaluation, rationale: list[str]) -> Plan:
    return Plan(objective="fidelity",
        edgeopt_version=__version__, model_sha256=analysis.sha256, target=target.name,
        target_sha256=target_sha256(target), target_definition=target, backend=ev.option.backend, unit=ev.option.unit,
        backend_options=dict(ev.option.options), input_shapes=dict(analysis.inputs), layers=ev.layers,
        predicted_latency_ms=round(ev.latency_ms, 6), predicted_storage_bytes=ev.storage,
        predicted_ram_bytes=ev.ram, predicted_arena_bytes=ev.arena, budgets=ev.checks, rationale=rationale,
    )


# --------------------------------------------------------------------------- sensitivity-driven search


def after_recovery(sens: dict) -> dict:
    """Sensitivity as the planner predicts it after recovery (``--recover``): each technique's post-training noise and
    flips scaled by its :attr:`~edgeopt.technique.Technique.recovered_noise` (pruning and 4-bit weights shrink; formats
    recovery does not train stay).  Accuracy control measures the recovered artifact against the same budget."""
    out = {}
    for key, s in sens.items():
        try:
            f = technique.get(key[1]).recovered_noise
        except (EdgeoptError, KeyError, IndexError, TypeError):
            f = 1.0
        out[key] = s if f == 1.0 or not s.applicable else s.model_copy(
            update={"noise": s.noise * f, "flips": None if s.flips is None else s.flips * f})
    return out


def layer_choices(analysis: ModelAnalysis, option: BackendOption, sens: dict) -> dict[str, list[tuple[Choice, float, float]]]:
    """Per weighted layer: every (Choice, noise, flips) the backend option can run and sensitivity measured.

    Pruning candidates are combined with each precision the sparsity support allows, skipped
    when they neither remove channels nor run faster nor store smaller; their noise and flips
    add to the precision's.

    Args:
        analysis: the model.
        option: the backend option whose precisions and sparsity patterns are candidates.
        sens: (layer name, precision or sparsity pattern) -> measured sensitivity (with
            ``noise``, ``flips`` and ``applicable``); the reference precision needs no entry.

    Returns:
        Layer name -> list of (choice, output noise, top-1 flips); layers without weights
        or without any candidate are left out.
    """
    out: dict[str, list[tuple[Choice, float, float]]] = {}
    for ly in analysis.layers:
        if not (ly.quantizable and ly.op_type in technique.WEIGHTED):
            continue
        cands: list[tuple[Choice, float, float]] = []
        for p in option.precisions:
            if p == technique.REFERENCE:
                base = (0.0, 0.0)
            else:
                s = sens.get((ly.name, p))
                if s is None or not s.applicable:
                    continue
                base = (s.noise, s.flips or 0.0)
            cands.append((Choice(p), *base))
            for sp in option.sparsity:
                if sp.precisions is not None and p not in sp.precisions:
                    continue
                if not technique.get(sp.pattern).removes_channels and sp.speedup <= 1.0 and not sp.compresses_storage:
                    continue  # zeros that neither run faster nor store smaller
                s = sens.get((ly.name, sp.pattern))
                if s is None or not s.applicable:
                    continue
                ratio = technique.get(sp.pattern).ratio
                cands.append((Choice(p, sp.pattern, ratio), base[0] + s.noise, base[1] + (s.flips or 0.0)))
        if cands:
            out[ly.name] = cands
    return out


#: a lookup table (an embedding's Gather) at least this big is stored in the smallest faithful float format
TABLE_BYTES = 1 << 20


def _table_format(option: BackendOption) -> str | None:
    """The smallest float format presumed faithful (fp16) the option runs, for embedding tables; None: fp32 only."""
    fmts = [technique.get(p) for p in option.precisions]
    faithful = [t for t in fmts if t.presumed_faithful and not t.weight_only and t.name != technique.REFERENCE]
    return min(faithful, key=lambda t: t.float_bits).name if faithful else None


def _fill(analysis: ModelAnalysis, option: BackendOption, weighted: dict[str, Choice]) -> dict[str, Choice]:
    """Choices for every layer: weightless layers run in their producer's format (no conversion islands); a big
    lookup table read from a model input (a token embedding) is stored in the smallest faithful float format."""
    fp = _float_precision(option)
    table = _table_format(option)
    producer: dict[str, str] = {}
    out: dict[str, Choice] = {}
    for ly in analysis.layers:
        if ly.name in weighted:
            c = weighted[ly.name]
        elif option.requires_full_integer:
            c = Choice("int8", reason=f"{option.label} runs full-integer models only")
        elif (table and ly.op_type == "Gather" and ly.weight_bytes >= TABLE_BYTES and ly.inputs
              and ly.inputs[0] in ly.weights):
            c = Choice(table, reason=f"{table}: a {ly.weight_bytes / 2**20:.1f} MiB lookup table, stored in the "
                                     "smallest faithful float format")
        else:
            src = next((producer[i] for i in ly.inputs if i in producer), None)
            p = src if src in option.precisions and not technique.get(src).weight_only else fp
            if src is None and any(c.precision == "int8" for c in weighted.values()) and "int8" in option.precisions:
                p = fp
            c = Choice(p, reason="runs in its input's format" if src else f"{p}: model input")
        out[ly.name] = c
        for o in ly.outputs:
            producer[o] = c.precision
    return out


def _penalty(ev: Evaluation) -> float:
    return sum(max(0.0, _over(c.predicted, c.budget) - 1.0) for c in ev.checks)


#: a move that only buys speed must gain at least this fraction of the model's latency
MIN_SPEED_GAIN = 0.03


def search_plan(analysis: ModelAnalysis, target: Target, sens: dict, *, backend: str | None = None,
                max_accuracy_drop: float | None = None, enforce_budgets: bool = True, measured=None) -> Plan:
    """Per-layer precision and pruning from measured sensitivity.

    Starts every weighted layer at its least-noisy choice and, while a budget is
    missed, takes the move with the best budget gain per unit of added output
    noise.  With ``max_accuracy_drop`` it then keeps trading noise for latency
    while the predicted drop (sum of per-layer top-1 flips) stays within it.

    Args:
        analysis: the model.
        target: the target and its budgets.
        sens: measured sensitivity, as :func:`layer_choices` takes it.
        backend: search only this backend's options; None searches all in preference order.
        max_accuracy_drop: after the budgets are met, trade accuracy for latency up to this
            predicted top-1 drop; None stops once the budgets are met.
        enforce_budgets: raise when no plan fits; if False, return the one with the least
            overshoot instead.
        measured: a latency table; used only for the option it was measured for.

    Returns:
        The first option's plan (in preference order) that meets every budget, with its rationale.

    Raises:
        EdgeoptError: the target has no ``backend`` option.
        UnsupportedOpError: no candidate option can run the model's ops.
        BudgetError: no plan meets the budgets and ``enforce_budgets`` is True.
    """
    rationale: list[str] = []
    unsupported: list[str] = []
    best: Evaluation | None = None
    for option in candidate_options(target, backend):
        reasons = check_option(analysis, option)
        if reasons:
            unsupported.append(f"{option.label}: {reasons[0]}")
            rationale.append(f"skipped {option.label}: {len(reasons)} layer(s) unsupported, first: {reasons[0]}")
            continue
        cands = layer_choices(analysis, option, sens)
        if option.requires_full_integer:
            cands = {k: [c for c in v if c[0].precision == "int8"] for k, v in cands.items()}
        current = {k: min(v, key=lambda c: (c[1], fidelity_order().index(c[0].precision))) for k, v in cands.items() if v}
        noise = {k: c[1] for k, c in current.items()}
        flips = {k: c[2] for k, c in current.items()}

        def assemble(cur, option=option):
            chosen = {k: Choice(c.precision, c.sparsity, c.ratio, _why(c, n, f)) for k, (c, n, f) in cur.items()}
            return evaluate(analysis, target, option, "per-layer", choices=_fill(analysis, option, chosen),
                            measured=measured if measured is not None and measured.option == option.label else None)

        ev = assemble(current)
        moves = 0
        visited = {tuple(sorted((k, v[0]) for k, v in current.items()))}
        cap = 4 * sum(len(v) for v in cands.values()) + 10
        while moves < cap:
            want_budget = not ev.meets_goals
            want_speed = ev.meets_goals and max_accuracy_drop is not None
            if not (want_budget or want_speed):
                break
            lat_now = {lp.name: lp.predicted_ms for lp in ev.layers}
            wb_now = {lp.name: lp.weight_bytes for lp in ev.layers}
            best_move, best_score = None, 0.0
            for name, options_ in cands.items():
                for cand in options_:
                    if cand[0] == current[name][0]:
                        continue
                    d_noise = cand[1] - noise[name]
                    d_flips = cand[2] - flips[name]
                    if want_speed and sum(flips.values()) + d_flips > max_accuracy_drop:
                        continue
                    lp = assemble_layer(analysis, target, option, name, cand[0],
                                        measured if measured is not None and measured.option == option.label else None)
                    d_lat = lp[0] - lat_now[name]
                    d_wb = lp[1] - wb_now[name]
                    if want_budget:
                        gain = sum(max(0.0, _over(c.predicted, c.budget) - 1.0) for c in ev.checks) - _local_penalty(ev, d_lat, d_wb, target)
                    else:
                        gain = -d_lat
                        if gain < MIN_SPEED_GAIN * ev.latency_ms:
                            continue  # within the latency model's error: not worth any accuracy
                    if gain <= 1e-12:
                        continue
                    score = gain / max(d_noise, 1e-9)
                    if score > best_score:
                        best_move, best_score = (name, cand), score
            if best_move is None:
                break
            name, cand = best_move
            state = tuple(sorted((k, cand[0] if k == name else v[0]) for k, v in current.items()))
            if state in visited:
                break  # a state seen before: the search would cycle
            visited.add(state)
            current[name], noise[name], flips[name] = cand, cand[1], cand[2]
            new_ev = assemble(current)
            if want_speed and new_ev.latency_ms > ev.latency_ms * (1 - MIN_SPEED_GAIN / 2):
                break  # conversions or fusion ate the gain
            ev = new_ev
            moves += 1
        pred_drop = sum(flips.values())
        rationale.append(f"{option.label}: {moves} move(s) from the least-noisy start; predicted output noise "
                         f"{sum(noise.values()):.2e}, predicted top-1 change <= {pred_drop:.3f}; {_describe(ev)}")
        if ev.meets_goals:
            return _to_plan(analysis, target, ev, rationale)
        if best is None or (not ev.fits, ev.overshoot, ev.latency_ms) < (not best.fits, best.overshoot, best.latency_ms):
            best = ev
    if best is None:
        raise UnsupportedOpError(f"no backend of target {target.name} can run this model: " + " | ".join(unsupported))
    if best.fits:  # only a goal is missed
        rationale.append(missed_goals(best.checks, target.name))
        return _to_plan(analysis, target, best, rationale)
    if not enforce_budgets:
        return _to_plan(analysis, target, best, rationale)
    raise BudgetError(f"no per-layer plan meets the budgets of {target.name}; closest: {_describe(best)}")


def _why(c: Choice, noise: float, flips: float) -> str:
    sp = f" + {c.sparsity} {c.ratio:.0%}" if c.sparsity != "none" else ""
    return f"{c.precision}{sp}: output noise {noise:.1e}, top-1 flips {flips:.3f} when alone"


def assemble_layer(analysis: ModelAnalysis, target: Target, option: BackendOption, name: str, c: Choice,
                   measured=None) -> tuple[float, int]:
    """(latency ms, weight bytes) of one layer under a choice (no fusion or conversion effects).

    Args:
        analysis: the model.
        target: the target whose compute unit is costed.
        option: the backend option the layer runs on.
        name: the layer's name (must be in ``analysis.layers``).
        c: the layer's precision and pruning.
        measured: a latency table whose time replaces the roofline estimate where it has one.

    Returns:
        (predicted latency in ms, weight bytes) of the layer.
    """
    ly = next(x for x in analysis.layers if x.name == name)
    ms, wb, _ = _choice_cost(ly, c, option, unit_of(target, option), measured=measured)
    return ms, wb


def _local_penalty(ev: Evaluation, d_lat: float, d_wb: int, target: Target) -> float:
    total = 0.0
    for c in ev.checks:
        pred = c.predicted + (d_lat if c.name == "latency_ms" else d_wb if c.name == "storage" else
                              d_wb if target.budgets.weights_in_ram else 0)
        total += max(0.0, _over(pred, c.budget) - 1.0)
    return total


# --------------------------------------------------------------------------- latency objective


#: a polishing move must gain at least this fraction of the model's predicted latency
MIN_POLISH_GAIN = 0.01


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`optimize_option`: the evaluation, its total predicted noise, and how the search went."""

    evaluation: Evaluation
    noise: float
    start: str
    moves: int
    evaluations: int
    stopped: str  # why the search ended: converged, iteration cap, time budget


def _candidate_table(analysis: ModelAnalysis, target: Target, option: BackendOption, sens: dict, measured=None):
    """Per weighted layer: candidates as (choice, noise, local ms, weight bytes), sorted by noise."""
    table: dict[str, list[tuple[Choice, float, float, int]]] = {}
    unit = unit_of(target, option)
    by_name = {ly.name: ly for ly in analysis.layers}
    cands = layer_choices(analysis, option, sens)
    for name, options_ in cands.items():
        rows = []
        for c, noise, _flips in options_:
            if option.requires_full_integer and c.precision != "int8":
                continue
            ms, wb, _ = _choice_cost(by_name[name], c, option, unit, measured=measured)
            rows.append((c, float(noise), float(ms), int(wb)))
        if rows:
            table[name] = sorted(rows, key=lambda r: (r[1], r[2], r[3]))
    return table


def optimize_option(analysis: ModelAnalysis, target: Target, option: BackendOption, sens: dict, noise_cap: float, *,
                    measured=None, time_budget_s: float = 60.0, max_evaluations: int | None = None) -> SearchResult | None:
    """The fastest per-layer plan on one backend option whose predicted total noise stays within ``noise_cap``.

    From several starts (every layer at its fastest candidate; each uniform precision; every layer at its
    least-noisy candidate) it first backs off: while the total noise exceeds the cap, the move with the most noise
    removed per millisecond added (each move lowers one layer's noise, so this phase cannot revisit a state).  It
    then polishes: moves that lower the whole plan's predicted latency by at least :data:`MIN_POLISH_GAIN` within
    the cap, each state visited once, under an evaluation cap and a time budget (the best plan so far is kept).
    Among the starts' results the fastest that meets the budgets wins (then the smallest).

    Args:
        analysis: the model.
        target: the target and its budgets.
        option: the backend option.
        sens: measured per-layer sensitivity (see :func:`layer_choices`).
        noise_cap: the largest total predicted noise (sum of per-layer noise) allowed.
        measured: a latency table for this option, or None.
        time_budget_s: wall time after which the search stops with the best plan so far.
        max_evaluations: whole-plan evaluations allowed in polishing (default ``4 * layers + 100``).

    Returns:
        The best result, or None when no weighted layer has a candidate (then the caller uses recipes).
    """
    import heapq
    import time

    table = _candidate_table(analysis, target, option, sens, measured)
    if not table:
        return None
    deadline = time.monotonic() + time_budget_s
    limit = max_evaluations if max_evaluations is not None else 4 * len(table) + 100
    counter = {"evaluations": 0}

    def assemble(state: dict[str, int]) -> Evaluation:
        counter["evaluations"] += 1
        chosen = {}
        for k, i in state.items():
            c, n, _, _ = table[k][i]
            sp = f" + {c.sparsity} {c.ratio:.0%}" if c.sparsity != "none" else ""
            chosen[k] = Choice(c.precision, c.sparsity, c.ratio, f"{c.precision}{sp}: output noise {n:.1e} when alone")
        return evaluate(analysis, target, option, "per-layer", choices=_fill(analysis, option, chosen), measured=measured)

    starts: dict[str, dict[str, int]] = {
        "fastest": {k: min(range(len(v)), key=lambda i, v=v: (v[i][2], v[i][3], v[i][1])) for k, v in table.items()},
        "least noisy": {k: 0 for k in table},
    }
    for p in option.precisions:
        uni = {}
        for k, v in table.items():
            idx = [i for i, r in enumerate(v) if r[0].precision == p and r[0].sparsity == "none"]
            uni[k] = idx[0] if idx else 0
        if uni != starts["least noisy"]:
            starts[f"uniform {p}"] = uni

    results: list[SearchResult] = []
    seen_starts: set[tuple] = set()
    for label, state in starts.items():
        key0 = tuple(sorted(state.items()))
        if key0 in seen_starts:
            continue
        seen_starts.add(key0)
        state = dict(state)
        moves = 0
        total = sum(table[k][i][1] for k, i in state.items())
        # back off: every move strictly lowers one layer's noise -> at most sum(len(candidates)) moves
        heap: list[tuple[float, str, int]] = []

        def push(k: str, state=state, heap=heap) -> None:
            cur = table[k][state[k]]
            best = None
            for j, cand in enumerate(table[k]):
                if cand[1] >= cur[1]:
                    continue
                d_noise = cur[1] - cand[1]
                d_ms = max(cand[2] - cur[2], 1e-9)
                score = d_noise / d_ms
                if best is None or score > best[0]:
                    best = (score, j)
            if best is not None:
                heapq.heappush(heap, (-best[0], k, best[1]))

        for k in state:
            push(k)
        while total > noise_cap and heap:
            _, k, j = heapq.heappop(heap)
            cur = table[k][state[k]]
            if table[k][j][1] >= cur[1]:
                continue  # stale entry
            total += table[k][j][1] - cur[1]
            state[k] = j
            moves += 1
            push(k)
        if total > noise_cap * (1 + 1e-9):
            continue  # even the least-noisy candidates exceed the cap
        ev = assemble(state)
        # polish: faster plans within the cap, each state once
        visited = {tuple(sorted(state.items()))}
        stopped = "converged"
        tried: set[tuple[str, int, tuple]] = set()
        while True:
            if time.monotonic() > deadline:
                stopped = "time budget"
                break
            if counter["evaluations"] >= limit:
                stopped = "iteration cap"
                break
            lat_now = {lp.name: lp.predicted_ms for lp in ev.layers}
            key_now = tuple(sorted(state.items()))
            ranked = []
            for k, i in state.items():
                cur = table[k][i]
                for j, cand in enumerate(table[k]):
                    if j == i or total - cur[1] + cand[1] > noise_cap:
                        continue
                    gain = lat_now[k] - cand[2]
                    if gain <= MIN_POLISH_GAIN * ev.latency_ms or (k, j, key_now) in tried:
                        continue
                    ranked.append((gain / max(cand[1] - cur[1], 1e-12), k, j))
            ranked.sort(reverse=True)
            improved = False
            for _, k, j in ranked[:8]:  # the best few by local gain per noise; whole-plan effects decide
                tried.add((k, j, key_now))
                trial = {**state, k: j}
                tkey = tuple(sorted(trial.items()))
                if tkey in visited:
                    continue
                visited.add(tkey)
                tev = assemble(trial)
                if tev.latency_ms < ev.latency_ms * (1 - MIN_POLISH_GAIN) and (tev.fits or not ev.fits):
                    total += table[k][j][1] - table[k][state[k]][1]
                    state, ev = trial, tev
                    moves += 1
                    improved = True
                    break
            if not improved:
                break
        results.append(SearchResult(ev, total, label, moves, counter["evaluations"], stopped))
    if not results:
        # nothing meets the cap: the least-noisy plan, reported as such
        state = {k: 0 for k in table}
        ev = assemble(state)
        return SearchResult(ev, sum(table[k][0][1] for k in table), "least noisy (over the noise cap)", 0,
                            counter["evaluations"], "cap unreachable")
    return min(results, key=lambda r: (not r.evaluation.fits, r.evaluation.overshoot if not r.evaluation.fits else 0,
                                       round(r.evaluation.latency_ms, 9), r.evaluation.storage, r.noise))


def summarize(layers: Iterable[LayerPlan]) -> str:
    """A plan's precisions and pruning in a few words, e.g. ``int8 47, fp32 6; channel 3``."""
    from collections import Counter

    layers = list(layers)
    prec = Counter(lp.precision for lp in layers)
    sp = Counter(lp.sparsity for lp in layers if lp.sparsity != "none")
    out = ", ".join(f"{p} {n}" for p, n in prec.most_common())
    return out + ("; " + ", ".join(f"{s} {n}" for s, n in sp.most_common()) if sp else "")


def fastest_recipe(analysis: ModelAnalysis, target: Target, option: BackendOption, allowed: Iterable[str]) -> Evaluation | None:
    """The fastest whole-model recipe among ``allowed`` precisions that the option runs (fits first, then latency,
    then storage), or None when the option runs none of them."""
    evs = [evaluate(analysis, target, option, p) for p in allowed if p in option.precisions]
    if not evs:
        return None
    return min(evs, key=lambda e: (not e.fits, e.overshoot if not e.fits else 0, round(e.latency_ms, 9), e.storage,
                                   fidelity_order().index(e.recipe)))


def to_plan(analysis: ModelAnalysis, target: Target, ev: Evaluation, rationale: list[str], *, objective: str = "latency",
            accuracy=None, configs: dict | None = None) -> Plan:
    """A :class:`Plan` from an evaluation (see :func:`evaluate`) with its rationale, accuracy prediction and the
    pass settings chosen for the model (only those of techniques the plan uses are kept)."""
    plan = _to_plan(analysis, target, ev, rationale)
    used = {lp.precision for lp in ev.layers} | {lp.sparsity for lp in ev.layers}
    configs = {k: v for k, v in (configs or {}).items() if k in used}
    return plan.model_copy(update={"objective": objective, "accuracy": accuracy, "technique_configs": configs})
