"""ONNX Runtime: QDQ / fp16 ONNX run by onnxruntime's execution providers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EdgeoptError
from ..types import Artifact, BackendOption, ModelAnalysis, OpTiming, Plan
from . import _ops
from .base import Backend, Runner, RuntimeUnavailable, int8_layout, int8_numerics, int8_scheme_for, make_artifact, tool_versions

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData

SDK_MODULES = ("onnxruntime",)
SDK_LABEL = "onnxruntime"

#: com.microsoft contrib ops the CPU and CUDA providers implement that our passes emit or commonly appear.
CONTRIB_OPS = frozenset(
    "MatMulNBits QLinearConv QLinearMatMul QLinearAdd QLinearMul QGemm DynamicQuantizeMatMul MatMulInteger16 "
    "FusedConv FusedMatMul Gelu FastGelu BiasGelu QuickGelu LayerNormalization SkipLayerNormalization "
    "SimplifiedLayerNormalization SkipSimplifiedLayerNormalization Attention MultiHeadAttention GroupQueryAttention "
    "RotaryEmbedding EmbedLayerNormalization BiasAdd NhwcConv QuantizeLinear DequantizeLinear".split()
)


_is_supported = _ops.onnx_op_checker(contrib=CONTRIB_OPS, ml=True)


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    return _ops.check_layers(analysis, option, _is_supported, [_ops.static_shapes])


# --------------------------------------------------------------------------- building and running

SESSION_FILE = "session.json"


def apply_precisions(model: onnx.ModelProto, plan: Plan, calib: CalibrationData | None,
                     int8_config: dict | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Apply a plan's per-layer precisions to a float ONNX model with each technique's ``apply`` (edgeopt's passes).

    Args:
        model: the float ONNX model (after structural passes).
        plan: the plan; its layers' precisions name registered techniques.
        calib: calibration data (int8 needs it).
        int8_config: int8 pass settings on top of the layout the plan's CPU runs exactly
            (:func:`~edgeopt.backends.base.int8_scheme_for`; full-range weights where the unit is not a CPU), never
            this build host's.

    Returns:
        The model and one note per pass run.  Techniques run in their ``apply_order`` (weight-only first, then int8,
        then fp16).
    """
    from ..technique import ApplyContext, get

    by_precision: dict[str, list[str]] = {}
    for lp in plan.layers:
        by_precision.setdefault(lp.precision, []).append(lp.name)
    layout = int8_layout(int8_scheme_for(plan))
    chosen = dict(plan.technique_configs.get("int8", {}))
    ctx = ApplyContext(calib=calib, configs={"int8": {**layout, **chosen, **(int8_config or {})}},
                       backend_options=plan.backend_options)
    notes: list[str] = []
    for t in sorted((get(p) for p in by_precision), key=lambda t: t.apply_order):
        if t.apply is None:
            raise EdgeoptError(f"precision {t.name} cannot be written into an ONNX graph ({t.description})")
        model, note = t.apply(model, by_precision[t.name], ctx)
        if note:
            notes.append(note)
    return model, notes


class OrtRunner(Runner):
    def __init__(self, model_path: Path, provider: str = "CPUExecutionProvider", threads: int | None = None,
                 profile_dir: Path | None = None, optimize: bool = True):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        so = ort.SessionOptions()
        so.log_severity_level = 4  # failures raise; nothing from onnxruntime's logger on stderr
        if not optimize:  # no fusion into QLinear*/integer kernels: QDQ runs as written, exact on any CPU
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if profile_dir is not None:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
        available = ort.get_available_providers()
        if provider not in available:
            raise RuntimeUnavailable(f"onnxruntime here has no {provider} (the artifact runs on a machine that has it); "
                                     f"available here: {', '.join(available)}")
        self.session = ort.InferenceSession(str(model_path), so, providers=[provider])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._model_path = model_path
        self._provider, self._threads = provider, threads

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(feeds))

    def op_profile(self, feeds: Mapping[str, np.ndarray], repeats: int = 20) -> list[OpTiming]:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            prof = OrtRunner(self._model_path, self._provider, self._threads, profile_dir=Path(d))
            for _ in range(3):
                prof.run(feeds)
            trace_path = prof.session.end_profiling()  # drop warm-up events: start a fresh trace
            prof = OrtRunner(self._model_path, self._provider, self._threads, profile_dir=Path(d))
            for _ in range(repeats):
                prof.run(feeds)
            trace_path = prof.session.end_profiling()
            events = json.loads(Path(trace_path).read_text())
        return ops_from_trace(events, repeats)


def ops_from_trace(events: list[dict], repeats: int) -> list[OpTiming]:
    """Per-node mean kernel time from an onnxruntime profiling trace."""
    total: dict[str, float] = {}
    op_type: dict[str, str] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        total[name] = total.get(name, 0.0) + float(ev.get("dur", 0))
        op_type[name] = ev.get("args", {}).get("op_name", "")
    whole = sum(total.values()) or 1.0
    return sorted((OpTiming(name=n, op_type=op_type[n], mean_us=t / max(repeats, 1), share=t / whole)
                   for n, t in total.items()), key=lambda o: -o.mean_us)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    sdk_modules = SDK_MODULES
    sdk_label = SDK_LABEL
    runtime_dist = "onnxruntime"
    uses_int8_pass = True
    threaded = True

    def convert(self, model: onnx.ModelProto, plan: Plan, out_dir: Path,
                calib: CalibrationData | None = None) -> Artifact:
        import onnx

        self.require()
        model, notes = apply_precisions(model, plan, calib)
        out_dir = Path(out_dir)
        onnx.save(model, str(out_dir / "model.onnx"))
        opts = plan.backend_options
        session = {"provider": str(opts.get("provider", "CPUExecutionProvider")), "threads": opts.get("threads"),
                   "graph_optimization_level": "ORT_ENABLE_ALL", "passes": notes}
        (out_dir / SESSION_FILE).write_text(json.dumps(session, indent=2) + "\n")
        return make_artifact(out_dir, "model.onnx", plan, self.name, tool_versions("onnxconverter-common"),
                             numerics=int8_numerics(plan, int8_scheme_for(plan)))

    def load(self, artifact: Artifact, artifact_dir: Path, threads: int | None = None) -> Runner:
        self.require()
        artifact_dir = Path(artifact_dir)
        session = json.loads((artifact_dir / SESSION_FILE).read_text())
        return OrtRunner(artifact_dir / artifact.primary, session["provider"], threads or session.get("threads"))

    def artifact_threads(self, artifact: Artifact, artifact_dir: Path) -> int | None:
        return json.loads((Path(artifact_dir) / SESSION_FILE).read_text()).get("threads")

    def reference(self, artifact: Artifact, artifact_dir: Path) -> Runner | None:
        if not self.is_available():
            return None
        return OrtRunner(Path(artifact_dir) / artifact.primary, optimize=False)


BACKEND = OnnxRuntimeBackend()
