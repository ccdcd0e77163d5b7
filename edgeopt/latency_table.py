"""Measured per-layer latency: profile uniform-precision builds on this machine and
read each layer's kernel time per precision from the runtime's per-op profile.

The roofline in :mod:`edgeopt.costmodel` cannot know that, say, a weight-only
int8 MatMul at batch 1 pays a dequantization cost, or that a QDQ island costs a
QuantizeLinear and a DequantizeLinear; a profile does.  Use it when this machine is
the target device (``x86-cpu`` with onnxruntime here); the planner then prefers
measured times over predicted ones.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import EdgeoptError

if TYPE_CHECKING:  # pragma: no cover
    from .inputs import BuildInputs
    from .types import BackendOption, Target


def profiled() -> tuple[str, ...]:
    """Precisions whose uniform builds are profiled (``Technique.profiled``)."""
    from .technique import precisions

    return tuple(t.name for t in precisions() if t.profiled)


@dataclass
class LatencyTable:
    """ms per (layer, precision), plus the measured cost of one format conversion (Q or DQ node)."""

    option: str = ""  # the backend option label it was measured for
    layers: dict[tuple[str, str], float] = field(default_factory=dict)
    conversion_ms: float = 0.0
    precisions: tuple[str, ...] = ()

    def get(self, layer: str, precision: str) -> float | None:
        return self.layers.get((layer, precision))


def _match(node: str, names: list[str]) -> str | None:
    """The layer a runtime node belongs to: same name, or the layer name plus a runtime suffix."""
    node = node.removeprefix("fused ")  # onnxruntime's name for kernels it fused (FusedGemm, FusedConv)
    best = None
    for n in names:
        if node == n or node.startswith(n + "_") or node.startswith(n + "/"):
            if best is None or len(n) > len(best):
                best = n
    return best


def measure(inputs: BuildInputs, target: Target, option: BackendOption, *, threads: int | None = None,
            repeats: int = 30) -> LatencyTable:
    """Profile a uniform build per precision the option runs (onnxruntime on the CPU only)."""
    import onnx

    from .backends.onnxruntime import OrtRunner, apply_precisions
    from .planner import make_plan

    if option.backend != "onnxruntime" or option.settings.provider != "CPUExecutionProvider":
        raise EdgeoptError(f"measured layer latency needs a local runtime; {option.label} is not onnxruntime on this CPU")
    from .costmodel import VIEW_OPS, fused_layers

    names = [ly.name for ly in inputs.analysis.layers]
    # runtimes name a fused conv+activation kernel after either node: charge it to the conv
    fused = fused_layers(inputs.analysis)
    producer = {o: ly for ly in inputs.analysis.layers for o in ly.outputs}
    owner: dict[str, str] = {}
    for ly in inputs.analysis.layers:
        root = ly
        while root.name in fused and root.op_type not in VIEW_OPS:
            src = next((producer[i] for i in root.inputs if i in producer and i not in root.weights), None)
            if src is None:
                break
            root = src
        owner[ly.name] = root.name
    feed = next(inputs.calib.batches(1)) if inputs.calib is not None else None
    if feed is None:
        raise EdgeoptError("measuring layer latency needs sample inputs: give --calib")
    table = LatencyTable(option=option.label, precisions=tuple(p for p in profiled() if p in option.precisions))
    conv_times: list[float] = []
    for p in table.precisions:
        plan = make_plan(inputs.analysis, target, backend=option.backend, precision=p, enforce_budgets=False)
        model, _ = apply_precisions(inputs.model, plan, inputs.calib)
        ran_as = {lp.name: lp.precision for lp in plan.layers}  # a wint8 recipe leaves convs in fp32
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.onnx"
            onnx.save(model, str(path))
            runner = OrtRunner(path, threads=threads or option.settings.threads)
            for op in runner.op_profile(feed, repeats=repeats):
                layer = _match(op.name, names)
                if layer is not None:
                    layer = owner[layer]
                    key = (layer, ran_as[layer])
                    if ran_as[layer] == p:
                        table.layers[key] = table.layers.get(key, 0.0) + op.mean_us / 1e3
                elif op.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    conv_times.append(op.mean_us / 1e3)
    table.conversion_ms = float(np.median(conv_times)) if conv_times else 0.0
    return table
