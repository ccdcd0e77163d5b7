"""TensorRT: the ONNX and build step are produced and checked here; the engine is built and run
only where TensorRT and a GPU exist (the test for that runs on such a machine and is skipped elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import onnx
import pytest

from edgeopt.backends import get
from edgeopt.backends.base import build_artifact, read_manifest
from edgeopt.backends.tensorrt import build_config
from edgeopt.calibration import as_calibration
from edgeopt.datasets import default_model_path, digits
from edgeopt.errors import BackendNotInstalledError
from edgeopt.fidelity import session
from edgeopt.graph import analyze
from edgeopt.planner import make_plan
from edgeopt.targets import load_target

HAVE_TRT = find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def setup():
    m = onnx.load(str(default_model_path()))
    xc, _ = digits("calib")
    return m, analyze(default_model_path()), as_calibration(xc, m)


def test_int8_artifact_is_tensorrt_ready_qdq(tmp_path, setup):
    model, analysis, calib = setup
    plan = make_plan(analysis, load_target("gpu-server"), backend="tensorrt", precision="int8")
    out = tmp_path / "trt"
    art = build_artifact(model, plan, out, calib)
    assert read_manifest(out) == art and {"model.onnx", "build.json", "build_engine.py"} <= set(art.files)
    qdq = onnx.load(str(out / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    zps = [inits[n.input[2]] for n in qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # symmetric int8: what TensorRT accepts
    weight_dq = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert weight_dq and all(inits[n.input[1]].ndim == 1 for n in weight_dq)  # per-channel conv weights
    x, y = digits("test")
    acc = float((session(qdq).run(None, {"image": x})[0].argmax(1) == y).mean())
    assert acc >= 0.98  # the QDQ graph's numerics, checked in onnxruntime
    cfg = json.loads((out / "build.json").read_text())
    assert cfg["flags"] == ["INT8"] and cfg["input_shapes"] == {"image": [1, 1, 8, 8]}
    assert "--int8" in cfg["trtexec"] and "--minShapes=image:1x1x8x8" in cfg["trtexec"]


def test_build_config_flags_for_fp16_dla_and_sparsity(setup):
    _, analysis, _ = setup
    plan = make_plan(analysis, load_target("jetson-orin"), backend="tensorrt", precision="fp16")
    gpu = build_config(plan, has_qdq=False)
    assert gpu["flags"] == ["FP16"] and gpu["dla_core"] is None
    sparse = plan.model_copy(update={"layers": [lp.model_copy(update={"sparsity": "2:4"}) for lp in plan.layers]})
    assert "SPARSE_WEIGHTS" in build_config(sparse, False)["flags"]
    target = load_target("jetson-orin")
    dla_plan = plan.model_copy(update={"unit": "dla", "backend_options": dict(target.backends[1].options)})
    dla = build_config(dla_plan, has_qdq=False)
    assert dla["dla_core"] == 0 and "--useDLACore=0" in dla["trtexec"] and "--allowGPUFallback" in dla["trtexec"]


@pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour where TensorRT is missing")
def test_clear_error_without_tensorrt(tmp_path, setup):
    model, analysis, calib = setup
    plan = make_plan(analysis, load_target("gpu-server"), backend="tensorrt", precision="fp16")
    out = tmp_path / "trt16"
    art = build_artifact(model, plan, out, calib)
    assert art.primary == "model.onnx"
    proc = subprocess.run([sys.executable, str(out / "build_engine.py")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: tensorrt is not installed; pip install 'edgeopt[tensorrt]'"
    with pytest.raises(BackendNotInstalledError, match=r"tensorrt is not installed; pip install 'edgeopt\[tensorrt\]'"):
        get("tensorrt").BACKEND.load(art, out)


@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and a CUDA GPU")
def test_engine_builds_and_matches_onnx(tmp_path, setup):  # pragma: no cover - runs on GPU machines
    model, analysis, calib = setup
    x, y = digits("test")
    for precision in ("fp16", "int8"):
        plan = make_plan(analysis, load_target("gpu-server"), backend="tensorrt", precision=precision)
        out = tmp_path / precision
        art = build_artifact(model, plan, out, calib)
        assert art.primary == "model.engine"
        runner = get("tensorrt").BACKEND.load(art, out)
        logits = np.concatenate([runner.run({"image": x[i : i + 1]})[0] for i in range(len(x))])
        assert float((logits.argmax(1) == y).mean()) >= 0.98
