"""Terminal rendering of analyses, targets and plans (rich tables)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .planner import check_option, evaluate, fidelity_order
from .types import ModelAnalysis, Plan, Target
from .units import fmt_bytes

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from .hostinfo import HostCpu
    from .targets import Family


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=140)


def targets_table(groups: list[tuple[Family, list[Target]]], out: Console) -> None:
    """The built-in devices grouped by family, the default member of each marked (what ``--target FAMILY`` and
    ``--targets all`` pick)."""
    from rich.table import Table

    t = Table(title="targets by family", title_justify="left", caption_justify="left",
              caption="* the family's default: what --target FAMILY and fleet --targets all pick (--targets every: all "
                      "devices)")
    for c, wrap in (("family", False), ("device", False), ("aliases", True), ("class (CPU kernels)", False),
                    ("backends (preferred first)", False), ("RAM", False), ("storage", False), ("latency", False)):
        t.add_column(c, no_wrap=not wrap)
    for k, (fam, targets) in enumerate(groups):
        if k:
            t.add_section()
        for i, tg in enumerate(targets):
            b = tg.budgets
            kernels = ", ".join(sorted({u.kernel_class for u in tg.compute_units.values() if u.kernel_class}))
            family = (fam.name + (f" ({', '.join(fam.aliases)})" if fam.aliases else "")) if i == 0 else ""
            t.add_row(family, tg.name + (" *" if tg.name == fam.default else ""), ", ".join(tg.aliases),
                      tg.device_class + (f" ({kernels})" if kernels else ""), "\n".join(o.label.replace("ExecutionProvider", "") for o in tg.backends),
                      fmt_bytes(int(b.ram)), fmt_bytes(int(b.storage)), f"{b.latency_ms:g} ms")
    out.print(t)


def host_detail(cpu: HostCpu, out: Console) -> None:
    from rich.table import Table

    from .hostinfo import FEATURES, implications

    out.print(f"[bold]{cpu.model_name}[/]  {cpu.arch}  microarchitecture {cpu.microarchitecture}  "
              f"{cpu.cores} CPU(s)  RAM {fmt_bytes(cpu.ram_bytes)}  (features from {cpu.source})")
    known = FEATURES.get(cpu.arch, {})
    t = Table(title="ISA features that change kernels", title_justify="left")
    for c in ("feature", "here", "what it changes"):
        t.add_column(c)
    for name, what in known.items():
        t.add_row(name, "yes" if name in cpu.features else "-", what)
    out.print(t)
    for topic, text in implications(cpu):
        out.print(f"[bold]{topic}[/]: {text}")
    out.print("plan for this machine with --target host; built-in CPU targets by class: "
              "x86-avx2, x86-avx512-vnni, x86-cpu (AMX), arm64-server, arm64-rpi5")


def target_detail(tg: Target, out: Console, *, default_of: str | None = None) -> None:
    """The resolved target as YAML (``aliases`` and ``sources`` among its fields), after a comment line naming the
    family it is the default of, if any."""
    import yaml

    if default_of:
        out.print(f"# {tg.name}: the default of family {default_of} (--target {default_of})", markup=False,
                  soft_wrap=True)
    out.print(yaml.safe_dump(tg.model_dump(mode="json"), sort_keys=False, width=1000).rstrip(), markup=False,
              soft_wrap=True)


def analysis_summary(a: ModelAnalysis, out: Console, *, top: int | None = None) -> None:
    from rich.table import Table

    from .costmodel import fused_layers
    from .graph import plan_arena

    out.print(f"[bold]model[/] {a.path}  opset {a.opset}  {a.producer}  sha256 {a.sha256[:12]}")
    out.print("inputs  " + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in a.inputs.items())
              + "   outputs " + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in a.outputs.items()))
    out.print(f"layers {len(a.layers)}  params {a.total_params:,}  weights {fmt_bytes(a.total_weight_bytes)}"
              f"  MACs {_si(a.total_macs)}  other FLOPs {_si(a.total_flops)}  file {fmt_bytes(a.file_bytes)}")
    arena32 = plan_arena(a.tensors, lambda t: t.elems * 4)
    arena8 = plan_arena(a.tensors, lambda t: t.elems)
    out.print(f"activation memory (graph as stored, before fusion): fp32 peak live {fmt_bytes(arena32.peak_live_bytes)}, greedy arena "
              f"{fmt_bytes(arena32.arena_bytes)}; int8 peak live {fmt_bytes(arena8.peak_live_bytes)}, "
              f"arena {fmt_bytes(arena8.arena_bytes)} (peak at layer {arena32.peak_step})")
    for n in a.notes:
        out.print(f"[yellow]note[/] {n}")
    fused = fused_layers(a)
    columns = (("#", "right"), ("name", "left"), ("op", "left"), ("output", "left"), ("params", "right"),
               ("weights", "right"), ("MACs", "right"), ("act out", "right"), ("", "left"))
    title = "layers"
    rows = range(len(a.layers))
    if top:
        import heapq

        # the N costliest in one pass (ties: the earlier layer first, as a stable sort would list them)
        rows = heapq.nsmallest(top, rows, key=lambda i: (-(a.layers[i].macs + a.layers[i].flops), i))
        title = f"top {top} layers by arithmetic"
    cells = [_layer_cells(i, a.layers[i], fused) for i in rows]  # only the rows shown are formatted
    if len(cells) > RICH_TABLE_ROWS:
        _plain_table(title, columns, cells, out)
        return
    t = Table(title=title, title_justify="left")
    for c, j in columns:
        t.add_column(c, justify=j)
    for row in cells:
        t.add_row(*row)
    out.print(t)


#: Tables with more rows than this print as plain aligned text: rich lays a 50k-row table out in about half a minute.
RICH_TABLE_ROWS = 2000


def _layer_cells(i: int, ly, fused: set[str]) -> tuple[str, ...]:
    return (str(i), ly.name[:48], ly.op_type, " ".join("x".join(map(str, s)) for s in ly.output_shapes),
            f"{ly.params:,}" if ly.params else "", fmt_bytes(ly.weight_bytes) if ly.weight_bytes else "",
            _si(ly.macs) if ly.macs else "", fmt_bytes(ly.output_elems * 4), "fused" if ly.name in fused else "")


def _plain_table(title: str, columns, rows: list[tuple[str, ...]], out: Console) -> None:
    """A big table as aligned plain text, in linear time."""
    widths = [len(c) for c, _ in columns]
    for row in rows:
        for k, cell in enumerate(row):
            if len(cell) > widths[k]:
                widths[k] = len(cell)

    def line(cells) -> str:
        return "  ".join(cell.rjust(w) if j == "right" else cell.ljust(w)
                         for cell, w, (_, j) in zip(cells, widths, columns)).rstrip()

    text = "\n".join([title, line([c for c, _ in columns]), "  ".join("-" * w for w in widths).rstrip()]
                     + [line(r) for r in rows])
    out.print(text, markup=False, highlight=False, crop=False, overflow="ignore", no_wrap=True)


def target_fit(a: ModelAnalysis, tg: Target, out: Console) -> None:
    """Op pre-flight and predicted cost per backend option and precision."""
    from rich.table import Table

    out.print(f"\n[bold]target[/] {tg.name}: {tg.description}")
    t = Table(title="predicted on each backend option (uniform precision)", title_justify="left")
    for c in ("backend", "ops", "precision", "latency", "RAM", "storage", "budgets"):
        t.add_column(c)
    for option in tg.backends:
        reasons = check_option(a, option)
        if reasons:
            t.add_row(option.label, f"[red]{len(reasons)} unsupported[/]", "", "", "", "", "")
            for r in reasons[:5]:
                out.print(f"[red]unsupported[/] {option.label}: {r}")
            if len(reasons) > 5:
                out.print(f"[red]unsupported[/] {option.label}: ... {len(reasons) - 5} more")
            continue
        for p in (p for p in fidelity_order() if p in option.precisions):
            ev = evaluate(a, tg, option, p)
            missed = [c.name.replace("_ms", "") for c in ev.checks if not c.ok]
            t.add_row(option.label, "[green]ok[/]", p, f"{ev.latency_ms:.3f} ms", fmt_bytes(ev.ram),
                      fmt_bytes(ev.storage), "[green]fit[/]" if not missed else f"[red]over: {', '.join(missed)}[/]")
    out.print(t)


def plan_summary(plan: Plan, out: Console, *, layers: bool = True) -> None:
    from rich.table import Table

    out.print(f"\n[bold]plan[/] for target {plan.target} on {plan.backend}/{plan.unit}"
              + (f" {plan.backend_options}" if plan.backend_options else ""))
    for c in plan.budgets:
        shown = f"{c.predicted:.3f} ms" if c.name == "latency_ms" else fmt_bytes(c.predicted)
        limit = f"{c.budget:g} ms" if c.name == "latency_ms" else fmt_bytes(c.budget)
        mark = "[green]ok[/]" if c.ok else "[red]OVER[/]" if c.limit else "[yellow]misses the goal[/]"
        out.print(f"  {c.name.replace('_ms', ''):8} {shown:>12}  {'budget' if c.limit else 'goal  '} {limit:>10}  {mark}")
    counts: dict[str, int] = {}
    for lp in plan.layers:
        counts[lp.precision] = counts.get(lp.precision, 0) + 1
    pruned = [f"{lp.name} {lp.sparsity} {lp.sparsity_ratio:.0%}" for lp in plan.layers if lp.sparsity != "none"]
    out.print("  precisions: " + ", ".join(f"{k} x{v}" for k, v in counts.items())
              + (f"; pruned: {', '.join(pruned)}" if pruned else ""))
    if plan.accuracy is not None:
        a = plan.accuracy
        pred = ""
        if a.predicted is not None:
            pred = f", predicted {a.budget.metric.replace('_', ' ')} {a.predicted:.4f}"
        out.print(f"  accuracy budget: {a.budget.describe()}; predicted output noise {a.predicted_noise:.3g} "
                  f"(cap {a.noise_cap:.3g}){pred}")
    for r in plan.rationale:
        out.print(f"  - {r}")
    if not layers:
        return
    t = Table(title="per-layer plan", title_justify="left")
    for c in ("name", "op", "precision", "sparsity", "weights", "pred. ms", "why"):
        t.add_column(c)
    for lp in plan.layers:
        sp = "" if lp.sparsity == "none" else f"{lp.sparsity} {lp.sparsity_ratio:.0%}"
        t.add_row(lp.name[:40], lp.op_type, lp.precision, sp, fmt_bytes(lp.weight_bytes) if lp.weight_bytes else "",
                  f"{lp.predicted_ms:.4f}", lp.reason)
    out.print(t)
