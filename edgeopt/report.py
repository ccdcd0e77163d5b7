"""The fleet report: one self-contained HTML page with a latency-vs-accuracy Pareto
plot (inline SVG) and a per-layer table for every target."""

from __future__ import annotations

import html
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from .types import Artifact
from .units import fmt_bytes


class FleetEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str
    ok: bool
    error: str = ""
    artifact: Artifact | None = None

    @property
    def latency_ms(self) -> float | None:
        a = self.artifact
        if a is None:
            return None
        on_device = a.measured_latency_ms is not None and a.measured_on_target
        return a.measured_latency_ms if on_device else a.predicted_latency_ms

    @property
    def quality(self) -> float | None:
        """Accuracy when labels were given, else top-1 agreement with the original model."""
        a = self.artifact
        if a is None:
            return None
        acc = a.accuracy
        return acc.get("accuracy", acc.get("top1_agreement", acc.get("equivalent_top1_agreement")))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both lower latency and higher quality."""
    front = []
    for i, (li, qi) in enumerate(points):
        dominated = any((lj <= li and qj >= qi) and (lj < li or qj > qi) for j, (lj, qj) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _svg(entries: list[FleetEntry], width: int = 640, height: int = 360) -> str:
    pts = [(e.latency_ms, e.quality, e) for e in entries if e.latency_ms is not None and e.quality is not None]
    if not pts:
        return "<p>No target could be validated here, so there is nothing to plot (see the table).</p>"
    import math

    xs = [math.log10(max(p[0], 1e-6)) for p in pts]
    ys = [p[1] for p in pts]
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2
    y0, y1 = min(min(ys) - 0.01, 0.9), min(1.0, max(ys) + 0.01) + 0.005
    m = 50

    def sx(v: float) -> float:
        return m + (v - x0) / (x1 - x0) * (width - 2 * m)

    def sy(v: float) -> float:
        return height - m - (v - y0) / (y1 - y0) * (height - 2 * m)

    front = set(pareto_front([(p[0], p[1]) for p in pts]))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect x="{m}" y="{m}" width="{width - 2 * m}" height="{height - 2 * m}" fill="none" stroke="#999"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">latency, ms (log; measured on a machine of the target class, else predicted)</text>',
             f'<text x="14" y="{height / 2}" text-anchor="middle" transform="rotate(-90 14 {height / 2})">accuracy / top-1 agreement</text>']
    for k in range(math.floor(x0), math.ceil(x1) + 1):
        for mult in (1, 2, 5):
            v = math.log10(mult) + k
            if x0 <= v <= x1:
                parts.append(f'<text x="{sx(v):.1f}" y="{height - m + 14}" text-anchor="middle">{mult * 10 ** k:g}</text>')
                parts.append(f'<line x1="{sx(v):.1f}" y1="{height - m}" x2="{sx(v):.1f}" y2="{height - m + 4}" stroke="#999"/>')
    for frac in (0, 0.5, 1):
        v = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{m - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
    order = sorted(front, key=lambda i: xs[i])
    if len(order) > 1:
        path = " ".join(f"{sx(xs[i]):.1f},{sy(ys[i]):.1f}" for i in order)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#2a7" stroke-dasharray="4 3"/>')
    placed: list[tuple[float, float]] = []
    for i, (_lat, _q, e) in enumerate(pts):
        color = "#2a7" if i in front else "#c55"
        measured = e.artifact.measured_latency_ms is not None and e.artifact.measured_on_target
        x, y = sx(xs[i]), sy(ys[i])
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color if measured else "white"}" stroke="{color}"/>')
        ly = y - 6
        while any(abs(px - x) < 120 and abs(py - ly) < 12 for px, py in placed):
            ly += 13  # stack labels of points that sit together
        placed.append((x, ly))
        parts.append(f'<text x="{x + 7:.1f}" y="{ly:.1f}">{html.escape(e.target)} ({e.artifact.backend})</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def fleet_html(model_name: str, entries: list[FleetEntry]) -> str:
    esc = html.escape
    rows = []
    for e in entries:
        if not e.ok or e.artifact is None:
            rows.append(f"<tr><td>{esc(e.target)}</td><td colspan='9' class='err'>{esc(e.error)}</td></tr>")
            continue
        a = e.artifact
        acc = a.accuracy
        quality = (f"{acc['accuracy']:.4f} ({acc['accuracy_delta']:+.4f})" if "accuracy" in acc
                   else f"agreement {acc['top1_agreement']:.3f}" if "top1_agreement" in acc
                   else f"agreement {acc['equivalent_top1_agreement']:.3f} (ONNX equivalent)" if "equivalent_top1_agreement" in acc
                   else "not runnable here")
        measured = "-" if a.measured_latency_ms is None else (
            f"{a.measured_latency_ms:.3f}" + ("" if a.measured_on_target else " (host, not the device)"))
        precisions: dict[str, int] = {}
        for lp in a.plan.layers:
            precisions[lp.precision] = precisions.get(lp.precision, 0) + 1
        budget = a.plan.accuracy.budget.describe() if a.plan.accuracy is not None else "-"
        control = "; ".join(f"{s.iteration}. {s.summary}: {s.action}" for s in a.accuracy_control) or "-"
        rows.append(f"<tr><td>{esc(e.target)}</td><td>{esc(a.backend)}/{esc(a.plan.unit)}</td><td>{a.predicted_latency_ms:.3f}</td>"
                    f"<td>{measured}</td><td>{fmt_bytes(a.size_bytes)}</td><td>{fmt_bytes(a.plan.predicted_ram_bytes)}</td>"
                    f"<td>{esc(quality)}</td><td>{esc(', '.join(f'{k} x{v}' for k, v in precisions.items()))}</td>"
                    f"<td>{esc(budget)}</td><td title='{esc(a.fidelity)}'>{esc(control)}</td></tr>")
    details = []
    for e in entries:
        if e.artifact is None:
            continue
        plan = e.artifact.plan
        lines = "".join(
            f"<tr><td>{esc(lp.name)}</td><td>{esc(lp.op_type)}</td><td>{lp.precision}</td>"
            f"<td>{'' if lp.sparsity == 'none' else f'{lp.sparsity} {lp.sparsity_ratio:.0%}'}</td>"
            f"<td>{fmt_bytes(lp.weight_bytes) if lp.weight_bytes else ''}</td><td>{lp.predicted_ms:.4f}</td><td>{esc(lp.reason)}</td></tr>"
            for lp in plan.layers)
        why = "".join(f"<li>{esc(r)}</li>" for r in plan.rationale)
        details.append(f"<details><summary>{esc(e.target)}: per-layer plan ({len(plan.layers)} layers)</summary><ul>{why}</ul>"
                       "<table><tr><th>layer</th><th>op</th><th>precision</th><th>sparsity</th><th>weights</th>"
                       f"<th>pred. ms</th><th>why</th></tr>{lines}</table></details>")
    style = ("body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
             ".err{color:#b22}details{margin:10px 0}summary{cursor:pointer;font-weight:bold}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>edgeopt fleet: {esc(model_name)}</title>"
            f"<style>{style}</style></head><body><h1>edgeopt fleet: {esc(model_name)}</h1>"
            f"<h2>Latency vs accuracy</h2>{_svg(entries)}<p>Filled: latency measured on this machine, which is of the target's "
            "device class; hollow: predicted from the target's compute model. Quality: accuracy against labels, else top-1 "
            "agreement with the original model, measured in the artifact's own runtime (Core ML: its ONNX equivalent). "
            "Green: on the Pareto front.</p><h2>Targets</h2><table><tr><th>target</th><th>backend</th>"
            "<th>predicted ms</th><th>measured ms (this host)</th><th>size</th><th>RAM</th><th>accuracy (delta)</th><th>precisions</th>"
            "<th>accuracy budget</th><th>accuracy control (hover: how fidelity was measured)</th></tr>"
            f"{''.join(rows)}</table><h2>Plans</h2>{''.join(details)}</body></html>")
