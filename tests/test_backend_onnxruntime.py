from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgeopt.backends.base import build_artifact, open_artifact, read_manifest
from edgeopt.calibration import as_calibration
from edgeopt.datasets import default_model_path, digits
from edgeopt.errors import EdgeoptError
from edgeopt.graph import analyze
from edgeopt.planner import make_plan
from edgeopt.targets import load_target


@pytest.fixture(scope="module")
def digits_setup():
    m = onnx.load(str(default_model_path()))
    xc, _ = digits("calib")
    return m, analyze(default_model_path()), as_calibration(xc, m)


@pytest.mark.parametrize("precision", ["fp32", "int8", "wint8", "wint4"])
def test_build_and_run_each_precision(tmp_path, digits_setup, precision):
    model, analysis, calib = digits_setup
    plan = make_plan(analysis, load_target("x86-cpu"), backend="onnxruntime", precision=precision)
    out = tmp_path / "art"
    art = build_artifact(model, plan, out, calib)
    assert read_manifest(out) == art
    assert set(art.files) == {"model.onnx", "session.json"} and art.tool_versions["onnxruntime"]
    built = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in built.graph.node}
    if precision == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    if precision.startswith("wint"):
        assert "MatMulNBits" in ops
    _, runner = open_artifact(out)
    x, y = digits("test")
    acc = float((runner.run({"image": x})[0].argmax(1) == y).mean())
    assert acc >= 0.98, acc
    prof = runner.op_profile({"image": x[:1]}, repeats=5)
    assert prof and abs(sum(o.share for o in prof) - 1) < 1e-6 and all(o.mean_us >= 0 for o in prof)


def test_damaged_artifact_and_missing_calibration(tmp_path, digits_setup):
    model, analysis, calib = digits_setup
    plan = make_plan(analysis, load_target("x86-cpu"), backend="onnxruntime", precision="int8")
    with pytest.raises(EdgeoptError, match="calibration"):
        build_artifact(model, plan, tmp_path / "a", None)
    assert not (tmp_path / "a").exists()  # nothing half-written
    build_artifact(model, plan, tmp_path / "b", calib)
    session = json.loads((tmp_path / "b" / "session.json").read_text())
    (tmp_path / "b" / "session.json").write_text(json.dumps({**session, "threads": 7}))
    with pytest.raises(EdgeoptError, match="session.json"):
        open_artifact(tmp_path / "b")
    with pytest.raises(EdgeoptError, match="no manifest"):
        open_artifact(tmp_path)


def test_check_reports_plan_backend_mismatch(digits_setup):
    from edgeopt.backends import get

    _, analysis, _ = digits_setup
    plan = make_plan(analysis, load_target("x86-cpu"), backend="openvino")
    assert any("not onnxruntime" in r for r in get("onnxruntime").BACKEND.check(plan, analysis))
    ok = make_plan(analysis, load_target("x86-cpu"), backend="onnxruntime")
    assert get("onnxruntime").BACKEND.check(ok, analysis) == []
    assert np.isfinite(ok.predicted_latency_ms)


def test_backend_contract_is_complete():
    """Every backend states its runtime distribution and whether load() takes threads; load() has one signature."""
    import inspect

    from edgeopt.backends import BACKENDS, get

    for name in BACKENDS:
        backend = get(name).BACKEND
        assert backend.name == name and backend.runtime_dist and isinstance(backend.threaded, bool)
        params = inspect.signature(backend.load).parameters
        assert list(params) == ["artifact", "artifact_dir", "threads"] and params["threads"].default is None
    assert {n for n in BACKENDS if get(n).BACKEND.threaded} == {"onnxruntime", "openvino", "tflite"}
