from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

pytest.importorskip("ai_edge_litert")

from edgeopt.backends.base import build_artifact, open_artifact, read_manifest  # noqa: E402
from edgeopt.backends.tflite import TfliteRunner  # noqa: E402
from edgeopt.backends.tflm import c_array  # noqa: E402
from edgeopt.calibration import as_calibration  # noqa: E402
from edgeopt.datasets import default_model_path, digits  # noqa: E402
from edgeopt.errors import BudgetError, EdgeoptError  # noqa: E402
from edgeopt.fidelity import session  # noqa: E402
from edgeopt.graph import analyze  # noqa: E402
from edgeopt.planner import make_plan  # noqa: E402
from edgeopt.targets import load_target  # noqa: E402


@pytest.fixture(scope="module")
def digits_setup():
    m = onnx.load(str(default_model_path()))
    xc, _ = digits("calib")
    return m, analyze(default_model_path()), as_calibration(xc, m)


def _c_bytes(cc: str) -> bytes:
    body = cc[cc.index("g_model[] = {") : cc.index("};")]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2}),", body))


def test_c_array_round_trips():
    data = bytes(range(256)) * 3 + b"\x07"
    cc, h = c_array(data, arena_bytes=4096)
    assert _c_bytes(cc) == data and f"g_model_len = {len(data)};" in cc and "alignas(16) const unsigned char g_model[]" in cc
    assert "extern const unsigned char g_model[];" in h and "kTensorArenaSize = 4096;" in h


def test_digits_full_int8_artifact(tmp_path, digits_setup):
    pytest.importorskip("tflite_micro")  # the arena is measured with TFLite Micro's interpreter
    model, analysis, calib = digits_setup
    target = load_target("mcu-cortex-m7")
    plan = make_plan(analysis, target)
    assert plan.backend == "tflm" and {lp.precision for lp in plan.layers} == {"int8"}
    out = tmp_path / "art"
    art = build_artifact(model, plan, out, calib)
    assert read_manifest(out) == art
    assert set(art.files) == {"model.tflite", "model_data.cc", "model_data.h", "arena.json", "tflm.json"}
    data = (out / "model.tflite").read_bytes()
    cc, h = (out / "model_data.cc").read_text(), (out / "model_data.h").read_text()
    assert _c_bytes(cc) == data and f"const unsigned int g_model_len = {len(data)};" in cc
    assert "alignas(16) const unsigned char g_model[]" in cc and "extern const unsigned char g_model[];" in h
    assert len(data) <= target.budgets.storage and len(data) < 50_000  # measured 46592 B

    record = json.loads((out / "tflm.json").read_text())
    assert record["io"] == "int8" and {d["dtype"] for d in record["inputs"] + record["outputs"]} == {"int8"}
    assert set(record["ops"]) == {"CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"}  # no float op, no (de)quantize

    arena = json.loads((out / "arena.json").read_text())
    measured = arena["measured"]
    assert arena["source"] == "measured by tflite-micro" and arena["arena_bytes"] == measured["measured_bytes"]
    assert arena["arena_bytes"] <= target.budgets.ram and f"kTensorArenaSize = {arena['arena_bytes']};" in h
    # measured: total 6400 B = head 3072 (tensors; the planner predicts exactly that) + tail 3328 (runtime structs)
    assert measured["head_bytes"] + measured["tail_bytes"] == measured["measured_bytes"]
    assert arena["predicted_bytes"] == plan.predicted_arena_bytes
    assert plan.predicted_arena_bytes <= measured["head_bytes"] <= 1.5 * plan.predicted_arena_bytes

    _, runner = open_artifact(out)  # TFLite Micro's interpreter, in exactly the measured arena
    assert runner.engine == "tflite-micro"
    x, y = digits("test")
    got = runner.run({"image": x})[0]
    ref = session(model).run(None, {"image": x})[0]
    assert float((got.argmax(1) == y).mean()) >= float((ref.argmax(1) == y).mean()) - 0.01  # measured: equal, 0.992
    litert = TfliteRunner(out / "model.tflite", record).run({"image": x})[0]
    assert float(np.abs(got - litert).max()) <= 2 * record["outputs"][0]["scale"] + 1e-6  # same int8 kernels' results


def test_budgets_refuse_with_numbers(tmp_path, digits_setup):
    model, analysis, calib = digits_setup
    f = tmp_path / "t.yaml"
    f.write_text("base: mcu-cortex-m7\nname: m7-2k\nbudgets: {ram: 2KiB}\n")
    plan = make_plan(analysis, load_target(f), enforce_budgets=False)  # the planner alone already says it does not fit
    with pytest.raises(BudgetError, match=r"^tflm: target m7-2k: model needs 4\d\.\d KiB of flash \(2\.0 MiB budget ok\) "
                                          r"but arena \d+\.\d KiB \((measured by tflite-micro|predicted.*)\) > RAM budget 2\.0 KiB$"):
        build_artifact(model, plan, tmp_path / "a", calib)
    assert not (tmp_path / "a").exists()
    f.write_text("base: mcu-cortex-m7\nname: m7-small-flash\nbudgets: {storage: 20KiB}\n")
    plan = make_plan(analysis, load_target(f), enforce_budgets=False)
    with pytest.raises(BudgetError, match=r"of flash \(20\.0 KiB budget exceeded\); arena .* <= RAM budget 512\.0 KiB"):
        build_artifact(model, plan, tmp_path / "b", calib)


def test_needs_calibration(tmp_path, digits_setup):
    model, analysis, _ = digits_setup
    plan = make_plan(analysis, load_target("mcu-cortex-m7"))
    with pytest.raises(EdgeoptError, match="calibration"):
        build_artifact(model, plan, tmp_path / "a", None)
