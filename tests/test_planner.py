from __future__ import annotations

import numpy as np
import pytest
from conftest import init, make_model, save, vi
from onnx import helper

from edgeopt.costmodel import layer_latency, planned_weight_bytes
from edgeopt.errors import BudgetError, UnsupportedOpError
from edgeopt.graph import analyze
from edgeopt.planner import make_plan
from edgeopt.targets import builtin_names, load_target
from edgeopt.types import Plan


@pytest.fixture(scope="module")
def digits_analysis():
    from edgeopt.datasets import default_model_path

    return analyze(default_model_path())


@pytest.mark.parametrize("name", builtin_names())
def test_digits_plans_on_every_builtin_target(digits_analysis, name):
    target = load_target(name)
    plan = make_plan(digits_analysis, target)
    assert all(c.ok for c in plan.budgets)
    assert plan.backend == target.backends[0].backend  # the preferred backend runs this model
    assert {lp.name for lp in plan.layers} == {ly.name for ly in digits_analysis.layers}
    assert plan.rationale and all(lp.reason for lp in plan.layers)
    again = Plan.model_validate_json(plan.model_dump_json())
    assert again == plan


def test_mcu_plan_is_full_int8_and_counts_weights_in_flash(digits_analysis):
    plan = make_plan(digits_analysis, load_target("mcu-cortex-m7"))
    assert {lp.precision for lp in plan.layers} == {"int8"}
    # int8 weights + per-channel metadata; weights stay in flash, so RAM is just the arena
    assert 40394 < plan.predicted_storage_bytes < 40394 + 5000
    assert plan.predicted_ram_bytes == plan.predicted_arena_bytes
    # fused conv+relu keeps one 32x8x8 int8 tensor plus its input alive at the peak
    assert 2048 + 1024 <= plan.predicted_arena_bytes <= 2048 + 1024 + 64


def test_ios_plan_is_fp16(digits_analysis):
    plan = make_plan(digits_analysis, load_target("ios"))
    assert {lp.precision for lp in plan.layers} == {"fp16"}
    assert plan.predicted_storage_bytes < digits_analysis.file_bytes * 0.6


def test_tight_budget_names_closest_point(tmp_path, digits_analysis):
    f = tmp_path / "t.yaml"
    f.write_text("base: mcu-cortex-m7\nname: m7-2k\nbudgets: {ram: 2KiB}\n")
    with pytest.raises(BudgetError, match=r"closest: tflm/cpu int8: ram 3\.0 KiB > 2\.0 KiB"):
        make_plan(digits_analysis, load_target(f))
    plan = make_plan(digits_analysis, load_target(f), enforce_budgets=False)
    assert [c.name for c in plan.budgets if not c.ok] == ["ram"]


def test_budget_pushes_to_lower_precision(tmp_path, digits_analysis):
    f = tmp_path / "t.yaml"
    # 100 KiB of storage does not hold 158 KiB of fp32 weights: ORT falls to weight-only or int8
    f.write_text("base: x86-cpu\nname: x86-small\nbudgets: {storage: 100KiB}\n")
    plan = make_plan(digits_analysis, load_target(f))
    assert plan.predicted_storage_bytes <= 100 * 1024
    assert plan.rationale[0].startswith("rejected onnxruntime/cpu(CPUExecutionProvider) fp32")
    assert {lp.precision for lp in plan.layers if lp.op_type == "Gemm"} <= {"wint8", "int8"}


def test_unsupported_op_names_the_node(tmp_path):
    nodes = [helper.make_node("Einsum", ["x", "W"], ["y"], name="the_einsum", equation="ij,jk->ik")]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("y", None)], [init("W", np.ones((4, 3), np.float32))])
    a = analyze(save(m, tmp_path / "e.onnx"))
    assert a.layers[0].macs == 2 * 4 * 3
    assert make_plan(a, load_target("x86-cpu")).backend == "onnxruntime"
    hard = make_model([helper.make_node("Hardmax", ["x"], ["y"], name="the_hardmax")], [vi("x", [2, 4])], [vi("y", None)])
    with pytest.raises(UnsupportedOpError, match=r"op Hardmax is not supported by tflm.*\(1 layer: the_hardmax\)"):
        make_plan(analyze(save(hard, tmp_path / "h.onnx")), load_target("mcu-cortex-m7"))


def test_precision_and_backend_forcing(digits_analysis):
    x86 = load_target("x86-cpu")
    plan = make_plan(digits_analysis, x86, backend="openvino", precision="bf16")
    assert plan.backend == "openvino" and {lp.precision for lp in plan.layers} == {"bf16"}
    with pytest.raises(Exception, match="no backend 'coreml'"):
        make_plan(digits_analysis, x86, backend="coreml")


def test_roofline_behaviour(digits_analysis):
    target = load_target("x86-cpu")
    opt, unit = target.backends[0], target.compute_units["cpu"]
    conv = next(ly for ly in digits_analysis.layers if ly.name == "/3/Conv")
    fp32 = layer_latency(conv, "fp32", opt, unit)
    int8 = layer_latency(conv, "int8", opt, unit)
    assert fp32.bound == "compute" and int8.ms < fp32.ms
    ops = 2 * conv.macs + conv.flops
    assert fp32.compute_ms == pytest.approx(ops / (unit.peak_ops_per_s["fp32"] * unit.efficiency) * 1e3)
    fused = layer_latency(conv, "fp32", opt, unit, fused=True)
    assert fused.ms == 0
    gemm = next(ly for ly in digits_analysis.layers if ly.name == "/12/Gemm")
    assert layer_latency(gemm, "fp32", opt, unit).bound == "memory"  # 64 KiB of weights for 16K MACs
    assert planned_weight_bytes(gemm, "wint4") < planned_weight_bytes(gemm, "int8") < planned_weight_bytes(gemm, "fp16")
    assert planned_weight_bytes(gemm, "fp32") == gemm.weight_bytes


def test_refusals_name_each_distinct_reason_once():
    from edgeopt.planner import summarize_refusals

    reasons = [f"/b{i}/Erf: op Erf is not supported by tflite" for i in range(12)]
    reasons += ["/ln: op LayerNormalization is not supported by tflite", "/c: Conv is a grouped convolution (group=2)"]
    text = summarize_refusals(reasons)
    assert text.count("op Erf") == 1 and "12 layers: /b0/Erf, /b1/Erf, ..." in text
    assert "op LayerNormalization is not supported by tflite (1 layer: /ln)" in text and "grouped convolution" in text


def test_cli_refusal_lists_every_missing_op_type(tmp_path, capsys):
    """Many layers of one unsupported op must not hide another unsupported op type behind "+N more"."""
    from conftest import make_model, save, vi
    from onnx import helper

    from edgeopt.cli import main

    nodes, x = [], "x"
    for i in range(6):
        nodes.append(helper.make_node("Hardmax", [x], [f"h{i}"], name=f"hardmax{i}", axis=-1))
        x = f"h{i}"
    nodes.append(helper.make_node("Det", [x], ["y"], name="det"))
    path = save(make_model(nodes, [vi("x", [1, 4, 4])], [vi("y", [1])]), tmp_path / "m.onnx")
    rc = main(["plan", str(path), "--target", "android-mid"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("op Hardmax") <= 2 and "op Det" in err, err


def test_embedding_tables_are_parameters_stored_in_fp16_where_the_backend_runs_it(tmp_path):
    """A token embedding (Gather from a 2 MiB float table by a model input): counted as parameters, and where the
    option runs fp16 (TFLite) its table is planned in fp16, halving its predicted storage (MiniLM's 45 MiB table
    kept it over android-mid's 64 MiB storage budget)."""
    from onnx import TensorProto

    table = np.random.default_rng(0).normal(size=(4096, 128)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["y"], name="proj")]
    m = make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])], [vi("y", None)],
                   [init("E", table), init("W", np.ones((128, 16), np.float32))])
    a = analyze(save(m, tmp_path / "emb.onnx"))
    embed = next(ly for ly in a.layers if ly.name == "embed")
    assert embed.params == 4096 * 128 and a.total_params == 4096 * 128 + 128 * 16
    from edgeopt.planner import _fill, evaluate

    android = load_target("android-mid")
    option = android.backends[0]
    choices = _fill(a, option, {})  # what the per-layer search gives layers it does not search
    assert choices["embed"].precision == "fp16" and "lookup table" in choices["embed"].reason
    ev = evaluate(a, android, option, "per-layer", choices=choices)
    assert ev.storage < table.nbytes * 0.6
    x86 = load_target("x86-cpu").backends[0]
    assert _fill(a, x86, {})["embed"].precision == "fp32"  # the CPU option runs no fp16: the table stays as it is
