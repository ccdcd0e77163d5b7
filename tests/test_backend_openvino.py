from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgeopt.backends.base import build_artifact, open_artifact
from edgeopt.calibration import as_calibration
from edgeopt.datasets import default_model_path, digits
from edgeopt.errors import EdgeoptError
from edgeopt.fidelity import session
from edgeopt.graph import analyze
from edgeopt.hostinfo import bf16_native, detect
from edgeopt.planner import make_plan
from edgeopt.targets import load_target

pytest.importorskip("openvino", reason="pip install 'edgeopt[openvino]'")


@pytest.fixture(scope="module")
def setup():
    m = onnx.load(str(default_model_path()))
    xc, _ = digits("calib")
    return m, analyze(default_model_path()), as_calibration(xc, m)


@pytest.mark.parametrize("precision,hint", [("fp32", "f32"), ("bf16", "bf16"), ("int8", "f32")])
def test_openvino_artifacts(tmp_path, setup, precision, hint):
    import openvino as ov

    model, analysis, calib = setup
    plan = make_plan(analysis, load_target("x86-cpu"), backend="openvino", precision=precision)
    out = tmp_path / precision
    art = build_artifact(model, plan, out, calib)
    assert {"model.xml", "model.bin", "compile.json"} <= set(art.files) and art.tool_versions["openvino"]
    spec = json.loads((out / "compile.json").read_text())
    assert spec["config"]["INFERENCE_PRECISION_HINT"] == hint  # explicit: never the CPU's silent bf16
    _, runner = open_artifact(out)
    # OpenVINO runs bf16 only where the CPU has it (AVX512-BF16/AMX); elsewhere it reports (and runs) f32
    cpu = detect()
    runs = hint if hint != "bf16" or bf16_native(cpu.arch, cpu.features) else "f32"
    assert runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == runs
    x, y = digits("test")
    logits = runner.run({"image": x})[0]
    ref = session(model).run(None, {"image": x})[0]
    if precision == "fp32":
        np.testing.assert_allclose(logits, ref, atol=1e-3)
    assert float((logits.argmax(1) == y).mean()) >= 0.98
    ir = ov.Core().read_model(str(out / "model.xml"))
    fq = [op for op in ir.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert bool(fq) == (precision == "int8")
    prof = runner.op_profile({"image": x[:1]}, repeats=3)
    assert prof and any("Convolution" in o.op_type for o in prof)


def test_openvino_int8_respects_float_layers(tmp_path, setup):
    import openvino as ov

    model, analysis, calib = setup
    plan = make_plan(analysis, load_target("x86-cpu"), backend="openvino", precision="int8")
    keep = "/14/Gemm"
    mixed = plan.model_copy(update={"layers": [lp.model_copy(update={"precision": "fp32"}) if lp.name == keep else lp
                                               for lp in plan.layers]})

    def quantized_consumers(p, name):
        build_artifact(model, p, tmp_path / name, calib)
        ir = ov.Core().read_model(str(tmp_path / name / "model.xml"))
        return {t.get_node().get_friendly_name() for op in ir.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
                for t in op.output(0).get_target_inputs()}

    uniform, kept = quantized_consumers(plan, "u"), quantized_consumers(mixed, "m")
    assert any(n.startswith(keep) for n in uniform)
    assert not any(n.startswith(keep) for n in kept) and any(n.startswith("/3/Conv") for n in kept)


def test_openvino_rejects_mixed_float_precisions(tmp_path, setup):
    model, analysis, calib = setup
    plan = make_plan(analysis, load_target("x86-cpu"), backend="openvino", precision="fp32")
    mixed = plan.model_copy(update={"layers": [plan.layers[0].model_copy(update={"precision": "bf16"}), *plan.layers[1:]]})
    with pytest.raises(EdgeoptError, match="mixes"):
        build_artifact(model, mixed, tmp_path / "x", calib)
    assert not (tmp_path / "x").exists()
