from __future__ import annotations

import json

import pytest

from edgeopt.errors import BudgetError, PlanError
from edgeopt.pipeline import BuildInputs, build, fleet, load_plan, plan_for
from edgeopt.planner import search_plan
from edgeopt.report import pareto_front
from edgeopt.sensitivity import measure
from edgeopt.targets import load_target, load_targets


@pytest.fixture(scope="module")
def inputs():
    return BuildInputs.default_model()


@pytest.fixture(scope="module")
def sens(inputs):
    return measure(inputs.model, inputs.calib, cache=False)


def test_sensitivity_ranks_formats_sensibly(sens):
    for layer in ("/3/Conv", "/7/Conv", "/12/Gemm"):
        assert sens[(layer, "fp16")].noise < sens[(layer, "int8")].noise < sens[(layer, "unstructured")].noise
    assert sens[("/12/Gemm", "wint8")].noise < sens[("/12/Gemm", "wint4")].noise
    assert not sens[("/0/Conv", "2:4")].applicable and "multiple of m=4" in sens[("/0/Conv", "2:4")].reason
    assert not sens[("/3/Conv", "wint4")].applicable  # weight-only kernels are MatMul/Gemm only
    assert not sens[("/14/Gemm", "channel")].applicable  # its output is the graph output


def test_search_meets_tight_budget_with_least_noise(tmp_path, inputs, sens):
    f = tmp_path / "t.yaml"
    f.write_text("base: x86-cpu\nname: x86-60k\nbudgets: {storage: 60KiB}\n")
    plan = search_plan(inputs.analysis, load_target(f), sens)
    assert all(c.ok for c in plan.budgets)
    changed = {lp.name: lp for lp in plan.layers if lp.op_type in ("Conv", "Gemm") and lp.precision != "fp32"}
    assert "/7/Conv" in changed or "/12/Gemm" in changed  # the two layers holding most of the weights
    assert all("output noise" in lp.reason for lp in changed.values())
    f.write_text("base: x86-cpu\nname: x86-1k\nbudgets: {storage: 1KiB}\n")
    with pytest.raises(BudgetError, match="closest"):
        search_plan(inputs.analysis, load_target(f), sens)


def test_max_accuracy_drop_trades_noise_for_latency(inputs, sens):
    target = load_target("x86-cpu")
    safe = search_plan(inputs.analysis, target, sens)
    fast = search_plan(inputs.analysis, target, sens, max_accuracy_drop=0.02)
    assert {lp.precision for lp in safe.layers} == {"fp32"}  # everything fits: no loss taken
    assert fast.predicted_latency_ms < safe.predicted_latency_ms


def test_build_replay_and_atomicity(tmp_path, inputs):
    target = load_target("x86-cpu")
    art = build(inputs, target, tmp_path / "out", precision="int8")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["manifest.json", "model.onnx", "plan.json", "session.json"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["accuracy"]["accuracy_delta"] >= -0.01 and manifest["measured_latency_ms"] > 0
    assert manifest["tool_versions"]["onnxruntime"] and manifest["plan"]["target"] == "x86-cpu"
    plan = load_plan(tmp_path / "out" / "plan.json")
    again = build(inputs, target, tmp_path / "replay", plan=plan)
    assert again.plan == art.plan and again.files["model.onnx"] == art.files["model.onnx"]
    other = load_target("gpu-server")
    with pytest.raises(PlanError, match="for target x86-cpu"):
        build(inputs, other, tmp_path / "bad", plan=plan)
    assert not (tmp_path / "bad").exists()
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(PlanError, match="not a valid plan"):
        load_plan(tmp_path / "junk.json")


def test_plan_for_uses_sensitivity_when_calibrated(inputs, sens):
    plan = plan_for(inputs, load_target("mcu-cortex-m7"), sensitivity=sens)
    assert {lp.precision for lp in plan.layers} == {"int8"} and "move(s)" in plan.rationale[-1]


def test_fleet_report(tmp_path, inputs):
    res = fleet(inputs, load_targets("x86-cpu,gpu-server"), tmp_path / "fleet", jobs=2)
    assert [e.ok for e in res.entries] == [True, True]
    html = res.report.read_text()
    assert "<svg" in html and "x86-cpu" in html and "gpu-server" in html and "per-layer plan" in html
    summary = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    assert {e["target"] for e in summary} == {"x86-cpu", "gpu-server"}
    assert (tmp_path / "fleet" / "gpu-server" / "build_engine.py").is_file()


def test_pareto_front():
    pts = [(1.0, 0.9), (2.0, 0.95), (1.5, 0.85), (3.0, 0.95), (0.5, 0.5)]
    assert sorted(pareto_front(pts)) == [0, 1, 4]


def test_measured_layer_latency_table(inputs, sens):
    from edgeopt import latency_table

    target = load_target("x86-cpu")
    table = latency_table.measure(inputs, target, target.backends[0], threads=1, repeats=5)
    assert set(table.precisions) == {"fp32", "int8", "wint8", "wint4"}
    for layer in ("/0/Conv", "/3/Conv", "/7/Conv", "/12/Gemm", "/14/Gemm"):
        assert table.get(layer, "fp32") > 0 and table.get(layer, "int8") > 0
    assert table.get("/12/Gemm", "wint8") > 0 and table.get("/3/Conv", "wint8") is None  # weight-only: MatMul only
    assert table.conversion_ms > 0  # QuantizeLinear/DequantizeLinear nodes were timed
    plan = search_plan(inputs.analysis, target, sens, measured=table)
    assert all(c.ok for c in plan.budgets)
    with pytest.raises(Exception, match="local runtime"):
        latency_table.measure(inputs, load_target("gpu-server"), load_target("gpu-server").backends[1])
