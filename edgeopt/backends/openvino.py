"""OpenVINO: IR for CPU/GPU/NPU via openvino (+ nncf for quantization)."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EdgeoptError
from ..types import Artifact, BackendOption, ModelAnalysis, OpTiming, Plan
from . import _ops
from .base import Backend, Runner, int8_numerics, int8_scheme_for, make_artifact, tool_versions

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData

SDK_MODULES = ("openvino",)
SDK_LABEL = "openvino"

#: ONNX ops OpenVINO's ONNX frontend does not convert, beyond the never-supported set.
UNSUPPORTED = frozenset("BitShift Col2Im DFT STFT MelWeightMatrix Det AffineGrid CenterCropPad ImageDecoder".split())

CONTRIB_OPS = frozenset(
    "MatMulNBits QLinearConv QLinearMatMul QLinearAdd QLinearMul FusedConv FusedMatMul Gelu FastGelu BiasGelu "
    "SkipLayerNormalization SimplifiedLayerNormalization SkipSimplifiedLayerNormalization Attention "
    "EmbedLayerNormalization BiasAdd QuickGelu RotaryEmbedding GroupQueryAttention".split()
)


_is_supported = _ops.onnx_op_checker(UNSUPPORTED, CONTRIB_OPS)


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    return _ops.check_layers(analysis, option, _is_supported, [])


# --------------------------------------------------------------------------- building and running

COMPILE_FILE = "compile.json"
#: plan precision -> OpenVINO INFERENCE_PRECISION_HINT.  Set explicitly: on CPUs with
#: AVX512-BF16/AMX, OpenVINO otherwise runs "fp32" models in bf16.
PRECISION_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


def _float_precision(plan: Plan) -> str:
    floats = {lp.precision for lp in plan.layers if lp.precision in ("fp32", "bf16", "fp16")}
    if len(floats) > 1:
        raise EdgeoptError(f"openvino runs one float precision per model; the plan mixes {sorted(floats)}")
    return floats.pop() if floats else "fp32"


class OpenVinoRunner(Runner):
    def __init__(self, xml: Path, device: str = "CPU", config: Mapping[str, object] | None = None):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(str(xml), device, {k: v for k, v in (config or {}).items() if v is not None})
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        res = self.request.infer({name: np.ascontiguousarray(feeds[name]) for name in self.input_names})
        return [np.array(res[o]) for o in self.compiled.outputs]

    def op_profile(self, feeds: Mapping[str, np.ndarray], repeats: int = 20) -> list[OpTiming]:
        """OpenVINO's per-layer counters (PERF_COUNT), averaged over ``repeats`` runs."""
        total: dict[str, float] = {}
        kind: dict[str, str] = {}
        for _ in range(repeats):
            self.run(feeds)
            for p in self.request.profiling_info:
                if str(p.status).endswith("EXECUTED") and "NOT_RUN" not in str(p.status):
                    total[p.node_name] = total.get(p.node_name, 0.0) + p.real_time.total_seconds() * 1e6
                    kind[p.node_name] = f"{p.node_type}:{p.exec_type}"
        whole = sum(total.values()) or 1.0
        return sorted((OpTiming(name=n, op_type=kind[n], mean_us=t / repeats, share=t / whole) for n, t in total.items()),
                      key=lambda o: -o.mean_us)


class OpenVinoBackend(Backend):
    precisions = frozenset({"fp32", "fp16", "bf16", "int8"})
    name = "openvino"
    sdk_modules = SDK_MODULES
    sdk_label = SDK_LABEL
    runtime_dist = "openvino"
    uniform_float = True  # INFERENCE_PRECISION_HINT applies to the whole model
    threaded = True

    def convert(self, model: onnx.ModelProto, plan: Plan, out_dir: Path,
                calib: CalibrationData | None = None) -> Artifact:
        import onnx
        import openvino as ov

        self.require()
        float_precision = _float_precision(plan)
        int8 = [lp.name for lp in plan.layers if lp.precision == "int8"]
        notes = []
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "model.onnx"
            onnx.save(model, str(src))
            ov_model = ov.convert_model(str(src))
        if int8:
            if calib is None:
                raise EdgeoptError(f"the plan quantizes {len(int8)} layer(s) to int8: give calibration data")
            ov_model, note = _nncf_quantize(ov_model, plan, int8, calib)
            notes.append(note)
        xml = Path(out_dir) / "model.xml"
        # weights stay fp32 unless the plan runs fp16 (OpenVINO's default compresses them)
        ov.save_model(ov_model, str(xml), compress_to_fp16=float_precision == "fp16")
        opts = plan.backend_options
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINT[float_precision],
                  "INFERENCE_NUM_THREADS": opts.get("threads"), "PERF_COUNT": "YES"}
        (Path(out_dir) / COMPILE_FILE).write_text(json.dumps(
            {"device": str(opts.get("device", "CPU")), "config": config, "notes": notes}, indent=2) + "\n")
        return make_artifact(Path(out_dir), "model.xml", plan, self.name, tool_versions("openvino", "nncf"),
                             numerics=int8_numerics(plan, int8_scheme_for(plan)))

    def load(self, artifact: Artifact, artifact_dir: Path, threads: int | None = None) -> Runner:
        self.require()
        spec = json.loads((Path(artifact_dir) / COMPILE_FILE).read_text())
        config = {**spec["config"], **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})}
        return OpenVinoRunner(Path(artifact_dir) / artifact.primary, spec["device"], config)

    def artifact_threads(self, artifact: Artifact, artifact_dir: Path) -> int | None:
        return json.loads((Path(artifact_dir) / COMPILE_FILE).read_text())["config"].get("INFERENCE_NUM_THREADS")


def _nncf_quantize(ov_model, plan: Plan, int8_layers: list[str], calib: CalibrationData):
    """Post-training int8 with nncf; layers the plan keeps in float go to the ignored scope.  The weight range
    follows the target CPU: nncf's overflow fix (7-bit weights) everywhere on CPUs without VNNI, nowhere on CPUs whose
    int8 kernels accumulate exactly (nncf's default fixes only the first layer, whatever the CPU)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    float_layers = [lp.name for lp in plan.layers if lp.precision != "int8" and lp.op_type in ("Conv", "Gemm", "MatMul")]
    # OpenVINO names a converted layer after its ONNX node, plus suffixes such as "/WithoutBiases"
    ignored = nncf.IgnoredScope(patterns=[re.escape(n) + "(/.*)?" for n in float_layers], validate=False)
    dataset = nncf.Dataset(list(calib.batches(1, limit=300)))
    scheme = int8_scheme_for(plan)
    advanced, fix = None, "nncf default"
    if scheme is not None:
        fix = "overflow fix on (7-bit weights)" if scheme.weight_bits == 7 else "overflow fix off (8-bit weights)"
        advanced = AdvancedQuantizationParameters(
            overflow_fix=nncf.OverflowFix.ENABLE if scheme.weight_bits == 7 else nncf.OverflowFix.DISABLE)
    quantized = nncf.quantize(ov_model, dataset, subset_size=min(300, len(calib)), ignored_scope=ignored,
                              advanced_parameters=advanced)
    return quantized, f"nncf.quantize: {len(int8_layers)} layer(s) int8, {len(float_layers)} kept float, {fix}"


BACKEND = OpenVinoBackend()
