"""TensorRT (gpu-server, Jetson): TensorRT-ready QDQ/fp16 ONNX plus an engine build step."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EdgeoptError
from ..types import Artifact, BackendOption, ModelAnalysis, Plan
from . import _ops
from .base import Backend, Runner, RuntimeUnavailable, make_artifact, tool_versions

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData

SDK_MODULES = ("tensorrt",)
SDK_LABEL = "tensorrt"

#: ONNX ops the TensorRT ONNX parser (onnx-tensorrt, TensorRT 10) rejects, beyond the never-supported set.
UNSUPPORTED = frozenset(
    "BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im DFT STFT BlackmanWindow HammingWindow HannWindow "
    "MelWeightMatrix DynamicQuantizeLinear MatMulInteger ConvInteger QLinearConv QLinearMatMul MaxRoiPool "
    "Unique Det CenterCropPad AffineGrid ImageDecoder".split()
)

#: Layers the DLA runs natively (others fall back to the GPU when gpu_fallback is set).
DLA_OPS = frozenset(
    "Conv ConvTranspose Gemm MatMul BatchNormalization Relu Clip Sigmoid Tanh LeakyRelu PRelu MaxPool AveragePool "
    "GlobalAveragePool Add Sub Mul Max Min Concat Reshape Flatten Transpose Softmax Resize Slice Identity "
    "QuantizeLinear DequantizeLinear Constant Shape".split()
)


_is_supported = _ops.onnx_op_checker(UNSUPPORTED)


def _no_fp64(layer, option, analysis) -> str | None:
    dt = {t.name: t.dtype for t in analysis.tensors}
    if any(dt.get(o) == "double" for o in layer.outputs):
        return "produces float64, which TensorRT does not support"
    return None


def check_ops(analysis: ModelAnalysis, option: BackendOption) -> list[str]:
    supported = _is_supported
    if option.settings.device == "dla" and not option.settings.gpu_fallback:
        def supported(op: str, domain: str) -> bool:
            return op in DLA_OPS and _is_supported(op, domain)
    return _ops.check_layers(analysis, option, supported, [_no_fp64, _ops.max_rank(8)])


# --------------------------------------------------------------------------- building and running

BUILD_FILE = "build.json"
BUILD_SCRIPT = "build_engine.py"
ENGINE = "model.engine"

_SCRIPT_HEAD = r'''#!/usr/bin/env python3
"""Build the TensorRT engine for this edgeopt artifact: model.onnx + build.json -> model.engine.

Run it on the machine that will serve the engine (engines are specific to the GPU
and the TensorRT version):  python build_engine.py   (or: edgeopt's tensorrt backend does it
when TensorRT is installed where the artifact is built or loaded, with the same builder
code, in-process; it never runs this file).  The equivalent trtexec command is in build.json ("trtexec").
"""
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


class BuildFailed(Exception):
    pass


'''

_SCRIPT_MAIN = r'''

def main() -> int:
    cfg = json.loads((HERE / "build.json").read_text())
    try:
        import tensorrt as trt
    except ImportError:
        print("error: tensorrt is not installed; pip install 'edgeopt[tensorrt]'", file=sys.stderr)
        return 2
    try:
        engine = serialize_engine(HERE / cfg["onnx"], cfg)
    except BuildFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (HERE / cfg["engine"]).write_bytes(engine)
    print(f"wrote {HERE / cfg['engine']} with TensorRT {trt.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


class BuildFailed(Exception):
    """TensorRT could not parse the ONNX file or build the engine."""


def serialize_engine(onnx_path, cfg: dict) -> bytes:
    """TensorRT's builder on a build.json's settings: the serialized engine.  Self-contained (tensorrt only): its
    source is also the body of the artifact's ``build_engine.py`` (:func:`build_script`)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(str(trt.__version__).split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildFailed(f"TensorRT could not parse {cfg['onnx']}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg["workspace_bytes"]))
    for flag in cfg["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if cfg.get("dla_core") is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(cfg["dla_core"])
        if cfg.get("gpu_fallback", True):
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    for name, shape in cfg["input_shapes"].items():
        profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildFailed("TensorRT failed to build the engine (see its log above)")
    return bytes(engine)


def build_script() -> str:
    """The artifact's ``build_engine.py``: :func:`serialize_engine`'s own source plus a main that reads build.json."""
    import inspect

    return _SCRIPT_HEAD + inspect.getsource(serialize_engine) + _SCRIPT_MAIN


def build_config(plan: Plan, has_qdq: bool) -> dict:
    precisions = {lp.precision for lp in plan.layers}
    flags = []
    if "fp16" in precisions:
        flags.append("FP16")
    if "bf16" in precisions:
        flags.append("BF16")
    if "int8" in precisions or has_qdq:
        flags.append("INT8")
    if any(lp.sparsity == "2:4" for lp in plan.layers):
        flags.append("SPARSE_WEIGHTS")
    opts = plan.backend_options
    dla = opts.get("dla_core") if opts.get("device") == "dla" else None
    shapes = {k: list(v) for k, v in plan.input_shapes.items()}
    cmd = ["trtexec", "--onnx=model.onnx", f"--saveEngine={ENGINE}"]
    cmd += [f"--{f.lower().replace('sparse_weights', 'sparsity=enable')}" for f in flags]
    if dla is not None:
        cmd += [f"--useDLACore={dla}"] + (["--allowGPUFallback"] if opts.get("gpu_fallback", True) else [])
    shape_arg = ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items())
    cmd += [f"--minShapes={shape_arg}", f"--optShapes={shape_arg}", f"--maxShapes={shape_arg}"]
    return {"onnx": "model.onnx", "engine": ENGINE, "flags": flags, "workspace_bytes": 1 << 30,
            "dla_core": dla, "gpu_fallback": bool(opts.get("gpu_fallback", True)), "input_shapes": shapes,
            "trtexec": " ".join(cmd)}


#: build.json keys: the ones the engine build reads, checked before anything is built; ``trtexec`` and ``passes`` are
#: notes for people (never run).  build.json comes with the artifact, which may come from elsewhere (``edgeopt agent``).
BUILD_KEYS = ("onnx", "engine", "flags", "workspace_bytes", "dla_core", "gpu_fallback", "input_shapes", "trtexec", "passes")
#: builder flags build_config writes
BUILD_FLAGS = ("FP16", "BF16", "INT8", "SPARSE_WEIGHTS")
MAX_WORKSPACE = 1 << 40


def read_build_config(artifact_dir: Path) -> dict:
    """An artifact's ``build.json``, checked key by key (types and ranges) before an engine is built from it.

    Args:
        artifact_dir: the artifact's directory.

    Returns:
        The settings the engine build uses: onnx (a file inside the artifact), engine (``model.engine``), flags,
        workspace_bytes, dla_core, gpu_fallback, input_shapes.

    Raises:
        EdgeoptError: the file is missing or not JSON, a key is unknown or missing, or a value has the wrong type
            or is out of range (the message names the key and what is valid).
    """
    from .base import artifact_path, read_settings_file

    cfg = read_settings_file(artifact_dir, BUILD_FILE, BUILD_KEYS, "tensorrt")
    missing = [k for k in ("onnx", "flags", "input_shapes") if k not in cfg]
    if missing:
        raise EdgeoptError(f"{BUILD_FILE}: missing key {missing[0]!r}")

    def bad(key: str, valid: str) -> EdgeoptError:
        return EdgeoptError(f"{BUILD_FILE}: {key} = {json.dumps(cfg[key])[:100]} is not valid; {key} must be {valid}")

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    onnx_file = cfg["onnx"]
    if not isinstance(onnx_file, str) or not onnx_file.endswith(".onnx"):
        raise bad("onnx", "the relative path of the artifact's .onnx file")
    artifact_path(artifact_dir, onnx_file, "build.json onnx")
    if cfg.get("engine", ENGINE) != ENGINE:
        raise bad("engine", f'"{ENGINE}"')
    flags = cfg["flags"]
    if not isinstance(flags, list) or not all(isinstance(f, str) and f in BUILD_FLAGS for f in flags):
        raise bad("flags", f"a list of {', '.join(BUILD_FLAGS)}")
    workspace = cfg.get("workspace_bytes", 1 << 30)
    if not is_int(workspace) or not 1 << 20 <= workspace <= MAX_WORKSPACE:
        raise bad("workspace_bytes", f"an integer from {1 << 20} to {MAX_WORKSPACE}")
    dla = cfg.get("dla_core")
    if dla is not None and (not is_int(dla) or not 0 <= dla <= 15):
        raise bad("dla_core", "null or an integer from 0 to 15")
    fallback = cfg.get("gpu_fallback", True)
    if not isinstance(fallback, bool):
        raise bad("gpu_fallback", "true or false")
    shapes = cfg["input_shapes"]
    if (not isinstance(shapes, dict) or not 0 < len(shapes) <= 256
            or not all(isinstance(k, str) and 0 < len(k) <= 1024 for k in shapes)
            or not all(isinstance(v, list) and 0 <= len(v) <= 8 and all(is_int(d) and 0 < d <= 1 << 24 for d in v)
                       for v in shapes.values())):
        raise bad("input_shapes", "an object of input name -> shape (at most 8 dimensions of 1..16777216)")
    return {"onnx": onnx_file, "engine": ENGINE, "flags": list(flags), "workspace_bytes": workspace, "dla_core": dla,
            "gpu_fallback": fallback, "input_shapes": {k: list(v) for k, v in shapes.items()}}


def build_engine(artifact_dir: Path) -> Path:
    """Build the artifact's engine here with edgeopt's own builder, from its checked ``build.json``
    (:func:`read_build_config`); the artifact's ``build_engine.py`` is never run (it is there for people building
    by hand).  Raises the not-installed error where TensorRT is missing."""
    cfg = read_build_config(artifact_dir)
    BACKEND.require()
    return _build(Path(artifact_dir), cfg)


def _build(artifact_dir: Path, cfg: dict) -> Path:
    """TensorRT's builder on checked settings (what build_engine.py does, in-process)."""
    try:
        engine = serialize_engine(artifact_dir / cfg["onnx"], cfg)
    except BuildFailed as e:
        raise EdgeoptError(str(e)) from None
    out = artifact_dir / ENGINE
    out.write_bytes(engine)
    return out


class TrtRunner(Runner):
    """Runs a serialized engine with TensorRT, device buffers from PyTorch's CUDA allocator."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailable("running a TensorRT engine needs a CUDA GPU")
        self._trt, self._torch = trt, torch
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        torch, trt = self._torch, self._trt
        keep = []
        for name in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            t = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return [o.cpu().numpy() for o in outs]


class TensorRtBackend(Backend):
    precisions = frozenset({"fp32", "fp16", "bf16", "int8"})
    name = "tensorrt"
    sdk_modules = SDK_MODULES
    sdk_label = SDK_LABEL
    runtime_dist = "tensorrt"
    uses_int8_pass = True
    #: TensorRT's explicit quantization: symmetric int8 activations, float biases, Q/DQ on layer inputs only (the
    #: builder fuses Conv/GEMM with their activation and quantizes the fused output with the next input's scale)
    int8_config = {"activation_symmetric": True, "activation_type": "int8", "quantize_bias": False,
                   "exclude_output_quantization": ["Conv", "ConvTranspose", "Gemm", "MatMul"]}
    convert_requires_sdk = False  # the ONNX and the build step are written anywhere; the engine where TensorRT is

    def convert(self, model: onnx.ModelProto, plan: Plan, out_dir: Path,
                calib: CalibrationData | None = None) -> Artifact:
        import onnx

        from .onnxruntime import apply_precisions

        # TensorRT's explicit quantization wants symmetric int8 (zero point 0) on activations and weights;
        # fp16/bf16 come from builder flags on the float graph, so only int8 layers are rewritten.
        int8_plan = plan.model_copy(update={"layers": [lp if lp.precision == "int8" else lp.model_copy(update={"precision": "fp32"})
                                                       for lp in plan.layers]})
        model, notes = apply_precisions(model, int8_plan, calib, int8_config=dict(self.int8_config))
        out_dir = Path(out_dir)
        onnx.save(model, str(out_dir / "model.onnx"))
        has_qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        cfg = {**build_config(plan, has_qdq), "passes": notes}
        (out_dir / BUILD_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        (out_dir / BUILD_SCRIPT).write_text(build_script())
        primary = "model.onnx"
        if self.is_available():
            build_engine(out_dir)
            primary = ENGINE
        numerics = {"int8_scheme": "symmetric int8 activations, 8-bit symmetric weights, float biases (TensorRT explicit quantization)",
                    "int8_reason": "TensorRT's QDQ rules; the engine's int8 kernels accumulate in int32"} if has_qdq else {}
        return make_artifact(out_dir, primary, plan, self.name, tool_versions("tensorrt"), numerics=numerics)

    def load(self, artifact: Artifact, artifact_dir: Path, threads: int | None = None) -> Runner:
        self._no_threads(threads)
        self.require()
        engine = Path(artifact_dir) / ENGINE
        if not engine.is_file():
            build_engine(Path(artifact_dir))
        return TrtRunner(engine)

    def reference(self, artifact: Artifact, artifact_dir: Path) -> Runner | None:
        """The QDQ ONNX the engine is built from, run as written in onnxruntime (exact fake-quant numerics), with
        the 16-bit float formats the builder flags allow emulated (see :func:`emulate_float_flags`)."""
        from importlib.util import find_spec

        if find_spec("onnxruntime") is None:
            return None
        import tempfile

        import onnx

        from .onnxruntime import OrtRunner

        model = emulate_float_flags(onnx.load(str(Path(artifact_dir) / "model.onnx")), artifact.plan)
        with tempfile.TemporaryDirectory(prefix="edgeopt-trt-ref-") as d:
            path = Path(d) / "reference.onnx"
            onnx.save(model, str(path))
            runner = OrtRunner(path, optimize=False)
        floats = sorted({lp.precision for lp in artifact.plan.layers} & {"fp16", "bf16"})
        runner.description = ("exact reference numerics: the graph the engine is built from run as written in onnxruntime"
                              + (f", {'/'.join(floats)} layers with their weights and outputs rounded to that format"
                                 if floats else ""))
        return runner


def emulate_float_flags(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """The float graph as the engine computes it where the builder may pick 16-bit kernels: with the fp16 (or bf16)
    flag set, TensorRT may run any non-int8 layer in that format, so every weighted layer and every layer the plan
    puts in it stores its float weights in it and rounds its output through it.  (Accumulation inside a kernel is
    not emulated: TensorRT accumulates fp16 convolutions and GEMMs in fp32.)"""
    import ml_dtypes
    from onnx import TensorProto, numpy_helper

    from ..techniques import round_output

    precisions = {lp.precision for lp in plan.layers}
    fmt = "fp16" if "fp16" in precisions else "bf16" if "bf16" in precisions else None
    if fmt is None:
        return model
    to = TensorProto.FLOAT16 if fmt == "fp16" else TensorProto.BFLOAT16
    dtype = np.float16 if fmt == "fp16" else ml_dtypes.bfloat16
    int8 = {lp.name for lp in plan.layers if lp.precision == "int8"}
    planned = {lp.name for lp in plan.layers}
    inits = {t.name: t for t in model.graph.initializer}
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for node in list(model.graph.node):
        if node.name not in planned or node.name in int8 or node.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            continue
        if any(i in quantized for i in node.input):
            continue  # a Q/DQ island: int8 kernels
        for name in node.input[1:]:
            t = inits.get(name)
            if t is not None and t.data_type == TensorProto.FLOAT:
                v = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array(v.astype(dtype).astype(np.float32), name))
        round_output(model, node, to)
    return model


BACKEND = TensorRtBackend()
