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
        # np.ascontiguousarray makes a 0-d (scalar) input 1-d: keep scalars as they are
        res = self.request.infer({name: np.ascontiguousarray(feeds[name]) if np.ndim(feeds[name]) else np.asarray(feeds[name])
                                  for name in self.input_names})
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
        spec = read_compile_spec(artifact_dir)
        if not artifact.primary.endswith(".xml"):
            raise EdgeoptError(f"openvino artifacts load an IR .xml file, not primary {artifact.primary[:200]!r}")
        self.require()
        config = {**spec["config"], **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})}
        return OpenVinoRunner(Path(artifact_dir) / artifact.primary, spec["device"], config)

    def artifact_threads(self, artifact: Artifact, artifact_dir: Path) -> int | None:
        return read_compile_spec(artifact_dir)["config"].get("INFERENCE_NUM_THREADS")


#: compile.json's ``config``: the OpenVINO properties an artifact may set (what :meth:`OpenVinoBackend.convert`
#: writes, plus a few performance hints), each with its valid values (a tuple of choices, or an int range).  Any
#: other property (CACHE_DIR, a plugin's file paths, ...) is refused: the file comes with the artifact, which may
#: come from elsewhere (``edgeopt agent``).
COMPILE_CONFIG: dict[str, tuple] = {
    "INFERENCE_PRECISION_HINT": ("f32", "bf16", "f16"),
    "INFERENCE_NUM_THREADS": (None, range(0, 1025)),
    "PERF_COUNT": ("YES", "NO", True, False),
    "PERFORMANCE_HINT": ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"),
    "EXECUTION_MODE_HINT": ("PERFORMANCE", "ACCURACY"),
    "NUM_STREAMS": ("AUTO", range(1, 1025)),
    "ENABLE_CPU_PINNING": ("YES", "NO", True, False),
    "ENABLE_HYPER_THREADING": ("YES", "NO", True, False),
}
COMPILE_KEYS = ("device", "config", "notes")
_DEVICE = re.compile(r"[A-Z][A-Z0-9_]*(\.[0-9]+)?(:[A-Z][A-Z0-9_.,()]*)?")


def _valid_value(value: object, choices: tuple) -> bool:
    for c in choices:
        if isinstance(c, range):
            if isinstance(value, int) and not isinstance(value, bool) and value in c:
                return True
        elif value is c or (type(value) is type(c) and value == c):
            return True
    return False


def _describe(choices: tuple) -> str:
    return ", ".join(f"{c.start}..{c.stop - 1}" if isinstance(c, range) else json.dumps(c) for c in choices)


def read_compile_spec(artifact_dir: Path) -> dict:
    """An artifact's ``compile.json`` (device and OpenVINO properties), checked against :data:`COMPILE_CONFIG`.

    Raises:
        EdgeoptError: the file is missing or not JSON, it has keys other than device/config/notes, its device is
            not an OpenVINO device name, or a property is not allowed or has a value outside its choices.
    """
    from .base import read_settings_file

    spec = read_settings_file(artifact_dir, COMPILE_FILE, COMPILE_KEYS, "openvino")
    device = spec.get("device", "CPU")
    if not isinstance(device, str) or len(device) > 64 or not _DEVICE.fullmatch(device):
        raise EdgeoptError(f"{COMPILE_FILE}: device {str(device)[:100]!r} is not an OpenVINO device name "
                           "(e.g. CPU, GPU, GPU.1, NPU, AUTO, AUTO:GPU,CPU)")
    config = spec.get("config", {})
    if not isinstance(config, dict):
        raise EdgeoptError(f"{COMPILE_FILE}: config must be a JSON object of OpenVINO properties")
    for key, value in config.items():
        if key not in COMPILE_CONFIG:
            raise EdgeoptError(f"{COMPILE_FILE}: OpenVINO property {str(key)[:100]!r} is not allowed; valid properties: "
                               f"{', '.join(COMPILE_CONFIG)}")
        if not _valid_value(value, COMPILE_CONFIG[key]):
            raise EdgeoptError(f"{COMPILE_FILE}: {key} = {json.dumps(value)[:100]} is not valid; valid values: "
                               f"{_describe(COMPILE_CONFIG[key])}")
    return {"device": device, "config": dict(config)}


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
