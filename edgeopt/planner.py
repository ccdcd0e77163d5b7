"""Choosing, for a model and a target, the backend and per-layer precision/pruning.

Pure: works on a :class:`ModelAnalysis` and a :class:`Target`, imports no vendor SDK.

The search goes through the target's backend options in preference order and,
on each, through whole-model recipes from highest to lowest fidelity
(fp32 > fp16 > bf16 > wint8 > int8 > wint4), taking the first that meets the
RAM, storage and latency budgets.  Weight-only recipes touch only MatMul/Gemm
layers (the ops MatMulNBits-style kernels exist for); full-integer backends
get int8 everywhere.  When nothing fits, the error names the closest point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import __version__
from . import backends as backend_registry
from .costmodel import VIEW_OPS, arena, fused_layers, graph_overhead_bytes, layer_latency, planned_weight_bytes, unit_of
from .errors import BudgetError, EdgeoptError, UnsupportedOpError
from .targets import target_sha256
from .types import WEIGHT_ONLY, BackendOption, BudgetCheck, LayerPlan, ModelAnalysis, Plan, Target

FIDELITY_ORDER = ("fp32", "fp16", "bf16", "wint8", "int8", "wint4")
WEIGHT_ONLY_OPS = frozenset({"MatMul", "Gemm"})


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_option(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    """Reasons ``option`` cannot run ``analysis`` (empty: it can)."""
    return backend_registry.get(option.backend).check_ops(analysis, option)


def _float_precision(option: BackendOption) -> str:
    for p in ("fp32", "fp16", "bf16"):
        if p in option.precisions:
            return p
    return option.weight_only_compute


def recipe_precisions(analysis: ModelAnalysis, option: BackendOption, recipe: str) -> dict[str, tuple[str, str]]:
    """Per-layer (precision, reason) for a whole-model recipe on a backend option."""
    out: dict[str, tuple[str, str]] = {}
    for ly in analysis.layers:
        if option.requires_full_integer:
            out[ly.name] = ("int8", f"{option.label} runs full-integer models only")
        elif recipe in WEIGHT_ONLY:
            if ly.quantizable and ly.op_type in WEIGHT_ONLY_OPS:
                out[ly.name] = (recipe, f"{recipe}: weight-only quantization of a {ly.op_type}")
            else:
                fp = _float_precision(option)
                why = "no weights" if not ly.quantizable else f"weight-only kernels exist for MatMul/Gemm, not {ly.op_type}"
                out[ly.name] = (fp, f"{fp}: {why}")
        elif recipe == "int8":
            why = "int8 static quantization" if ly.quantizable else "int8 activations between quantized layers (no Q/DQ islands)"
            out[ly.name] = ("int8", why)
        else:
            out[ly.name] = (recipe, f"{recipe} recipe")
    return out


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
        return all(c.ok for c in self.checks)

    @property
    def overshoot(self) -> float:
        """The worst ratio predicted/budget (<= 1 means it fits)."""
        return max(c.predicted / c.budget for c in self.checks)


@dataclass(frozen=True)
class Choice:
    """One layer's numeric format and pruning."""

    precision: str
    sparsity: str = "none"
    ratio: float = 0.0
    reason: str = ""


def _sparsity_support(option: BackendOption, pattern: str):
    return next((s for s in option.sparsity if s.pattern == pattern), None)


def _transition_ms(ly, prev_bits: int, bits: int, option: BackendOption, unit) -> float:
    """Cost of converting a layer's input between formats (a Q/DQ or Cast the runtime must execute)."""
    if prev_bits == bits:
        return 0.0
    return (ly.input_elems * (prev_bits + bits) / 8) / unit.memory_bandwidth_bytes_per_s * 1e3 + unit.layer_overhead_us / 1e3


def evaluate(analysis: ModelAnalysis, target: Target, option: BackendOption, recipe: str,
             precisions: dict[str, tuple[str, str]] | None = None, choices: dict[str, Choice] | None = None) -> Evaluation:
    """Predicted latency, storage and RAM of one per-layer assignment (``choices`` wins over ``precisions``)."""
    if choices is None:
        precisions = precisions or recipe_precisions(analysis, option, recipe)
        choices = {k: Choice(p, reason=why) for k, (p, why) in precisions.items()}
    unit = unit_of(target, option)
    fused = fused_layers(analysis)
    producer_bits = {}
    layers: list[LayerPlan] = []
    for ly in analysis.layers:
        c = choices[ly.name]
        support = _sparsity_support(option, c.sparsity) if c.sparsity != "none" else None
        ratio = 0.5 if c.sparsity == "2:4" else c.ratio
        wb = planned_weight_bytes(ly, c.precision, c.sparsity, ratio, bool(support and support.compresses_storage))
        keep = 1.0 - ratio if c.sparsity == "channel" else 1.0
        speedup = support.speedup if support is not None and c.sparsity != "channel" else 1.0
        cost = layer_latency(ly, c.precision, option, unit, fused=ly.name in fused, weight_bytes=wb,
                             sparsity_speedup=speedup, keep=keep)
        bits = option.activation_bits(c.precision)
        prev = [producer_bits[i] for i in ly.inputs if i in producer_bits]
        extra = _transition_ms(ly, prev[0], bits, option, unit) if prev and ly.name not in fused else 0.0
        for o in ly.outputs:
            producer_bits[o] = bits
        note = _cost_note(ly.op_type, cost.bound) + (f" (+{extra:.4f} ms format conversion)" if extra else "")
        layers.append(LayerPlan(name=ly.name, op_type=ly.op_type, precision=c.precision, sparsity=c.sparsity,
                                sparsity_ratio=ratio if c.sparsity != "none" else 0.0, predicted_ms=cost.ms + extra,
                                weight_bytes=wb, reason=c.reason + note))
    latency = sum(lp.predicted_ms for lp in layers)
    weights = sum(lp.weight_bytes for lp in layers)
    storage = graph_overhead_bytes(analysis) + weights
    ap = arena(analysis, {k: v.precision for k, v in choices.items()}, option)
    ram = ap.arena_bytes + (weights if target.budgets.weights_in_ram else 0)
    b = target.budgets
    checks = [BudgetCheck(name="ram", predicted=ram, budget=int(b.ram)),
              BudgetCheck(name="storage", predicted=storage, budget=int(b.storage)),
              BudgetCheck(name="latency_ms", predicted=round(latency, 6), budget=b.latency_ms)]
    return Evaluation(option, recipe, layers, latency, storage, ram, ap.arena_bytes, checks)


def _cost_note(op_type: str, bound: str) -> str:
    if bound != "fused":
        return ""
    return " (a view: no cost)" if op_type in VIEW_OPS else " (fused into its producer)"


def _describe(e: Evaluation) -> str:
    parts = []
    for c in e.checks:
        shown = (f"{c.predicted:.2f} ms" if c.name == "latency_ms" else _fmt_bytes(c.predicted))
        limit = (f"{c.budget:g} ms" if c.name == "latency_ms" else _fmt_bytes(c.budget))
        parts.append(f"{c.name.replace('_ms', '')} {shown} {'<=' if c.ok else '>'} {limit}")
    return f"{e.option.label} {e.recipe}: " + ", ".join(parts)


def candidate_options(target: Target, backend: str | None) -> list[BackendOption]:
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
    """
    rationale: list[str] = []
    unsupported: list[str] = []
    evaluations: list[Evaluation] = []
    options = candidate_options(target, backend)
    for option in options:
        reasons = check_option(analysis, option)
        if reasons:
            more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
            unsupported.append(f"{option.label}: {'; '.join(reasons[:3])}{more}")
            rationale.append(f"skipped {option.label}: {len(reasons)} layer(s) unsupported, first: {reasons[0]}")
            continue
        recipes: Iterable[str] = [p for p in FIDELITY_ORDER if p in option.precisions]
        if precision is not None:
            if precision not in option.precisions:
                rationale.append(f"skipped {option.label}: it does not run {precision} (it runs {', '.join(option.precisions)})")
                continue
            recipes = [precision]
        for recipe in recipes:
            ev = evaluate(analysis, target, option, recipe)
            evaluations.append(ev)
            if ev.fits:
                rationale.append(f"chose {_describe(ev)}")
                return _to_plan(analysis, target, ev, rationale)
            rationale.append(f"rejected {_describe(ev)}")
    if not evaluations:
        if unsupported:
            raise UnsupportedOpError(f"no backend of target {target.name} can run this model: " + " | ".join(unsupported))
        valid = sorted({p for o in options for p in o.precisions})
        raise EdgeoptError(f"target {target.name} cannot run precision '{precision}'; valid: {', '.join(valid)}")
    best = min(evaluations, key=lambda e: (e.overshoot, FIDELITY_ORDER.index(e.recipe)))
    if not enforce_budgets:
        rationale.append(f"no plan meets every budget; kept the closest: {_describe(best)}")
        return _to_plan(analysis, target, best, rationale)
    raise BudgetError(f"no plan meets the budgets of {target.name}; closest: {_describe(best)}")


def _to_plan(analysis: ModelAnalysis, target: Target, ev: Evaluation, rationale: list[str]) -> Plan:
    return Plan(
        edgeopt_version=__version__, model_sha256=analysis.sha256, target=target.name,
        target_sha256=target_sha256(target), backend=ev.option.backend, unit=ev.option.unit,
        backend_options=dict(ev.option.options), input_shapes=dict(analysis.inputs), layers=ev.layers,
        predicted_latency_ms=round(ev.latency_ms, 6), predicted_storage_bytes=ev.storage,
        predicted_ram_bytes=ev.ram, predicted_arena_bytes=ev.arena, budgets=ev.checks, rationale=rationale,
    )
