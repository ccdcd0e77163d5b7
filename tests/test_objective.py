"""The latency objective: accuracy budget, combined error model, terminating search, accuracy control."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeopt.accuracy import ErrorModel, choose_budget, measured_value, tightened_cap, within
from edgeopt.pipeline import BuildInputs, Planning, build, plan_for, plan_latency
from edgeopt.planner import Choice, optimize_option, search_plan
from edgeopt.sensitivity import Sensitivity
from edgeopt.targets import load_target
from edgeopt.types import AccuracyBudget


@pytest.fixture(scope="module")
def digits() -> BuildInputs:
    return BuildInputs.default_model()


# --------------------------------------------------------------------------- budget and error model


def test_budget_follows_the_data():
    assert choose_budget(True, True).metric == "accuracy_drop"
    assert choose_budget(True, False).metric == "top1_disagreement"
    b = choose_budget(False, False)
    assert (b.metric, b.limit, b.source) == ("snr_db", 30.0, "default")
    assert choose_budget(True, True, max_accuracy_drop=0.05).limit == 0.05
    assert choose_budget(False, False, min_snr_db=20).limit == 20
    # a drop on a model without class scores bounds the relative output error: 1% -> 40 dB
    assert choose_budget(False, False, max_accuracy_drop=0.01).limit == pytest.approx(40.0)


def test_measured_value_and_within():
    drop = AccuracyBudget(metric="accuracy_drop", limit=0.01, source="default")
    assert measured_value(drop, {"accuracy_delta": -0.02, "top1_agreement": 0.9}) == pytest.approx(0.02)
    assert measured_value(drop, {"top1_agreement": 0.995}) == pytest.approx(0.005)  # no labels: disagreement
    assert within(drop, 0.005) and not within(drop, 0.02) and within(drop, None) is None
    snr = AccuracyBudget(metric="snr_db", limit=30, source="default")
    assert within(snr, measured_value(snr, {"snr_db": 31.0})) and not within(snr, 29.0)


def test_error_model_is_monotone_and_inverts():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(400, 10)) * 3
    budget = AccuracyBudget(metric="top1_disagreement", limit=0.02, source="default")
    m = ErrorModel(logits, None, budget)
    preds = [m.predict(n) for n in (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)]
    assert preds == sorted(preds) and preds[0] < 0.01 < preds[-1]
    cap = m.noise_cap()
    assert m.predict(cap) <= 0.02 + 1e-6 < m.predict(cap * 1.5)
    # the prediction matches flips actually caused by noise of that power (the model's own assumption)
    sigma = math.sqrt(cap * np.mean(logits**2))
    flips = np.mean([np.mean((logits + rng.normal(size=logits.shape) * sigma).argmax(1) != logits.argmax(1))
                     for _ in range(20)])
    assert flips == pytest.approx(0.02, abs=0.008)


def test_error_model_fits_measured_points():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 10)) * 3
    m = ErrorModel(logits, None, AccuracyBudget(metric="top1_disagreement", limit=0.01, source="default"))
    before = m.predict(1e-2)
    m.fit(1e-2, 2 * before)  # the artifact flipped twice as many samples as predicted
    assert m.k > 1 and m.predict(1e-2) == pytest.approx(2 * before, rel=0.05)


def test_accuracy_drop_counts_flips_that_matter():
    """With labels, flips of wrong predictions do not cost accuracy; flips towards the label gain it."""
    logits = np.array([[2.0, 1.9, 0.0, -50.0], [2.0, 1.9, 0.0, -50.0]])
    budget = AccuracyBudget(metric="accuracy_drop", limit=0.01, source="default")
    right = ErrorModel(logits, np.array([0, 0]), budget).predict(0.05)
    wrong = ErrorModel(logits, np.array([3, 3]), budget).predict(0.05)
    gains = ErrorModel(logits, np.array([1, 1]), budget).predict(0.05)
    assert right > 0 and wrong == pytest.approx(0, abs=1e-9) and gains < 0


def test_tightened_cap_always_removes_noise():
    drop = AccuracyBudget(metric="accuracy_drop", limit=0.01, source="default")
    assert tightened_cap(drop, 0.02, 1e-3) <= 0.7e-3
    assert tightened_cap(drop, 0.011, 1e-3) <= 0.7e-3
    snr = AccuracyBudget(metric="snr_db", limit=30, source="default")
    assert tightened_cap(snr, 20.0, 1e-2) == pytest.approx(1e-2 * 0.1 * 0.8)


# --------------------------------------------------------------------------- the search


def _sens(analysis, noise: dict[str, float]) -> dict:
    out = {}
    for ly in analysis.layers:
        if ly.name in noise:
            out[(ly.name, "int8")] = Sensitivity(layer=ly.name, option="int8", noise=noise[ly.name], flips=0.0)
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A conv chain big enough that int8 pays on a GPU (the digits net is all launch overhead)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.graph import analyze

    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", 64
    for i in range(4):
        w = numpy_helper.from_array(rng.normal(size=(128, c, 3, 3)).astype(np.float32) * 0.05, f"w{i}")
        inits.append(w)
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x, c = f"r{i}", 128
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 56, 56])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 128, 56, 56])], inits)
    path = tmp_path_factory.mktemp("wide") / "wide.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return analyze(path)


def test_search_backs_off_the_noisiest_layers(wide):
    target = load_target("gpu-server")
    option = target.backends[0]  # tensorrt: fp32, fp16, bf16, int8
    names = [ly.name for ly in wide.layers if ly.quantizable]
    noise = {n: 1e-4 for n in names}
    noise[names[1]] = 1.0  # one hypersensitive layer
    res = optimize_option(wide, target, option, _sens(wide, noise), noise_cap=1e-2)
    precision = {lp.name: lp.precision for lp in res.evaluation.layers}
    assert precision[names[1]] != "int8" and all(precision[n] == "int8" for n in names if n != names[1])
    assert res.noise <= 1e-2 and res.stopped == "converged"


def test_search_terminates_when_two_layers_trade_places(wide):
    """Two equally noisy layers of which only one fits the cap: any greedy search could swap them forever.  Each
    state is visited once, the back-off strictly lowers noise and polishing strictly lowers latency."""
    target = load_target("gpu-server")
    option = target.backends[0]
    names = [ly.name for ly in wide.layers if ly.quantizable]
    a, b = names[1], names[2]
    noise = {n: 1e-4 for n in names}
    noise[a] = noise[b] = 0.6e-2
    res = optimize_option(wide, target, option, _sens(wide, noise), noise_cap=1e-2, max_evaluations=50)
    int8 = [lp.name for lp in res.evaluation.layers if lp.precision == "int8" and lp.name in names]
    assert len(set(int8) & {a, b}) == 1 and res.noise <= 1e-2
    assert res.evaluations <= 50
    # the fidelity objective's search ends too (visited states, move cap), in budget and beyond it
    for drop in (0.0, 0.5):
        sens = {k: v.model_copy(update={"flips": 0.3}) for k, v in _sens(wide, noise).items()}
        search_plan(wide, target, sens, max_accuracy_drop=drop)


def test_time_budget_returns_the_best_so_far(wide):
    target = load_target("gpu-server")
    names = [ly.name for ly in wide.layers if ly.quantizable]
    res = optimize_option(wide, target, target.backends[0], _sens(wide, {n: 1e-3 for n in names}),
                          noise_cap=1.0, time_budget_s=0.0)
    assert res is not None and res.noise <= 1.0


def test_choice_is_hashable():
    assert len({Choice("int8"), Choice("int8"), Choice("fp32")}) == 2


# --------------------------------------------------------------------------- plans and builds


@pytest.mark.parametrize("target", ["gpu-server", "jetson-orin", "android-mid"])
def test_default_plans_are_not_fp32_untouched(digits, target):
    plan = plan_for(digits, load_target(target))
    assert plan.objective == "latency" and plan.accuracy is not None
    assert plan.accuracy.budget.source == "default"
    assert any(lp.precision != "fp32" or lp.sparsity != "none" for lp in plan.layers), plan.rationale
    assert plan.accuracy.predicted_noise <= plan.accuracy.noise_cap


def test_without_calibration_gpu_gets_fp16_and_says_why(digits):
    bare = BuildInputs(digits.path, digits.model, digits.analysis, None, None)
    plan = plan_for(bare, load_target("gpu-server"))
    assert {lp.precision for lp in plan.layers} == {"fp16"}
    assert any("no calibration data" in r for r in plan.rationale)


def test_unsupported_ops_are_reported_before_sensitivity(digits, monkeypatch):
    import edgeopt.sensitivity as sens

    def boom(*a, **k):
        raise AssertionError("sensitivity ran before the op pre-flight")

    monkeypatch.setattr(sens, "measure", boom)
    from edgeopt.errors import UnsupportedOpError
    from edgeopt.planner import check_option

    monkeypatch.setattr("edgeopt.planner.check_option", lambda a, o: ["Foo (op Foo is not supported)"])
    with pytest.raises(UnsupportedOpError):
        plan_for(digits, load_target("x86-cpu"))
    monkeypatch.setattr("edgeopt.planner.check_option", check_option)


def test_fidelity_objective_keeps_the_old_behaviour(digits):
    plan = plan_for(digits, load_target("x86-cpu"), objective="fidelity")
    assert plan.objective == "fidelity" and plan.accuracy is None


def test_build_records_fidelity_and_control(digits, tmp_path):
    art = build(digits, load_target("gpu-server"), tmp_path / "trt", profile=False)
    assert art.fidelity.startswith("measured on 360") and "meets" in art.fidelity
    assert art.accuracy_control and art.accuracy_control[-1].within_budget
    manifest = json.loads((tmp_path / "trt" / "manifest.json").read_text())
    assert manifest["accuracy_control"] and manifest["plan"]["accuracy"]["budget"]["metric"] == "accuracy_drop"


def test_accuracy_control_reverts_until_the_artifact_meets_the_budget(digits, tmp_path):
    """A zero budget: whatever the first plan quantizes costs some agreement, so control must move layers back up,
    rebuild, and end at a faithful format that meets it; every round is in the manifest."""
    art = build(digits, load_target("android-mid"), tmp_path / "a", max_accuracy_drop=0.0, profile=False,
                backend="tflite")
    steps = art.accuracy_control
    assert art.plan.accuracy.budget.limit == 0.0
    assert steps[-1].within_budget and len(steps) >= 1
    if len(steps) > 1:
        assert steps[0].within_budget is False and "over budget" in steps[0].action
        assert any("accuracy control round" in r for r in art.plan.rationale)


def test_control_on_a_plan_that_misses(digits, tmp_path, monkeypatch):
    """Force the first plan to be all-int8 under a budget it misses: the build re-plans and the manifest says so."""
    import edgeopt.pipeline as pipeline

    real = pipeline.plan_latency
    calls = {"n": 0}

    def first_int8(pl, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(pl, noise_cap=1e9)  # everything as aggressive as the option allows
        return real(pl, **kw)

    monkeypatch.setattr(pipeline, "plan_latency", first_int8)
    art = build(digits, load_target("x86-cpu"), tmp_path / "x", max_accuracy_drop=0.0, profile=False)
    steps = art.accuracy_control
    assert steps[0].within_budget is False and steps[-1].within_budget
    assert len(steps) >= 2 and calls["n"] >= 2


def test_build_without_evaluation_data_says_fidelity_was_not_measured(digits, tmp_path):
    bare = BuildInputs(digits.path, digits.model, digits.analysis, None, None)
    art = build(bare, load_target("x86-cpu"), tmp_path / "bare", profile=False)
    assert art.fidelity.startswith("not measured: no evaluation data")
    assert not art.accuracy_control


def test_tensorrt_reference_emulates_fp16(digits, tmp_path):
    art = build(digits, load_target("gpu-server"), tmp_path / "fp16", precision="fp16", profile=False)
    snr = art.accuracy["snr_db"]
    assert 40 < snr < 120  # rounded through fp16: close, not identical


def test_planning_state_is_reused(digits):
    pl = Planning(digits, load_target("x86-cpu"))
    plan_latency(pl)
    assert pl.budget is not None and pl.sensitivity and pl.reference is not None


def test_an_untouched_plan_says_why(digits):
    plan = plan_for(digits, load_target("x86-cpu"), max_accuracy_drop=0.0, backend="onnxruntime")
    if all(lp.precision == "fp32" and lp.sparsity == "none" for lp in plan.layers):
        assert any("kept fp32:" in r for r in plan.rationale), plan.rationale


def test_range_overrides_reach_the_calibrator_and_the_quantizer(digits):
    from edgeopt.passes.int8 import Config, activation_ranges, quantizer_options

    base = activation_ranges(digits.model, Config(weight_bits=8), digits.calib)
    t = next(iter(base))
    cfg = Config(weight_bits=8, range_overrides={t: (-1.0, 7.0)})
    assert activation_ranges(digits.model, cfg, digits.calib)[t] == (-1.0, 7.0)
    assert quantizer_options(cfg)["TensorQuantOverrides"][t][0]["rmax"] == 7.0


def test_refine_ranges_keeps_min_max_only_where_it_lowers_noise(digits):
    from edgeopt.techniques.int8 import refine_ranges

    overrides, note = refine_ranges(digits.model, digits.calib, {"calibration": "percentile", "percentile": 99.0,
                                                                 "weight_bits": 8})
    assert note.startswith("int8 ranges")
    for lo, hi in overrides.values():
        assert hi > lo


def test_fixed_batch_model_builds_with_calibration(digits, tmp_path):
    """Exports without dynamic axes (batch fixed to 1) plan and build with calibration data on the build path."""
    import onnx

    m = onnx.load(str(digits.path))
    for vi in [*m.graph.input, *m.graph.output]:
        vi.type.tensor_type.shape.dim[0].ClearField("dim_param")
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed.onnx"
    onnx.save(m, str(path))
    fixed = BuildInputs.prepare(path, calib=digits.calib.feeds(), eval_data=digits.evaluation.feeds(),
                                labels=digits.evaluation.labels)
    art = build(fixed, load_target("gpu-server"), tmp_path / "out", profile=False)
    assert art.fidelity.startswith("measured")


def test_cli_build_prints_fidelity_and_objective(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "edgeopt.cli", "build", "default", "--target", "gpu-server", "-o",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "accuracy budget: top-1 accuracy drop <= 0.01 (default)" in out.stdout
    assert "fidelity: measured" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "edgeopt.cli", "build", "default", "--target", "gpu-server", "-o",
                          str(tmp_path / "p"), "--objective", "speed"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_a_measured_faster_alternative_is_shipped(digits, tmp_path, monkeypatch):
    """On a host of the target's class, a whole-model alternative that meets the budget and times faster than the
    per-layer plan replaces it, and the manifest says so (timings faked: the decision, not the machine, is tested)."""
    import edgeopt.pipeline as pipeline

    monkeypatch.setattr(pipeline, "host_is", lambda target, unit=None: True)
    monkeypatch.setattr(pipeline, "_interleaved",
                        lambda runners, feed: {k: (2.0 if k == "plan" else 1.0) for k in runners})
    art = build(digits, load_target("x86-cpu"), tmp_path / "alt", backend="onnxruntime")
    last = art.accuracy_control[-1]
    assert "runs faster than the per-layer plan" in last.action and last.within_budget
    assert last.measured["latency_ms"] == 1.0
    assert any("measured on this host" in r for r in art.plan.rationale)
    assert (tmp_path / "alt" / "manifest.json").is_file() and not list((tmp_path / "alt").glob("alternative-*"))
    # the plan it ships is an alternative's: faithful float or uniform int8
    assert len({lp.precision for lp in art.plan.layers if lp.op_type in ("Conv", "Gemm")}) == 1


def test_a_slower_alternative_is_not_shipped(digits, tmp_path, monkeypatch):
    import edgeopt.pipeline as pipeline

    monkeypatch.setattr(pipeline, "host_is", lambda target, unit=None: True)
    monkeypatch.setattr(pipeline, "_interleaved",
                        lambda runners, feed: {k: (1.0 if k == "plan" else 2.0) for k in runners})
    art = build(digits, load_target("x86-cpu"), tmp_path / "alt", backend="onnxruntime")
    assert not any("runs faster" in s.action for s in art.accuracy_control)


def test_one_float_format_where_the_runtime_runs_one(wide):
    """OpenVINO computes every float layer in one inference precision: the search never mixes fp32 and bf16 there."""
    from edgeopt.pipeline import _float_variants

    target = load_target("x86-cpu")
    option = next(o for o in target.backends if o.backend == "openvino")
    assert "bf16" in option.precisions
    names = [ly.name for ly in wide.layers if ly.quantizable]
    sens = {}
    for i, n in enumerate(names):  # bf16 cheap on half the layers, int8 too noisy everywhere
        sens[(n, "bf16")] = Sensitivity(layer=n, option="bf16", noise=1e-6 if i % 2 else 1.0, flips=0.0)
        sens[(n, "int8")] = Sensitivity(layer=n, option="int8", noise=1.0, flips=0.0)
    variants = _float_variants(option)
    assert len(variants) == 2
    for v in variants:
        res = optimize_option(wide, target, v, sens, noise_cap=1e-3)
        floats = {lp.precision for lp in res.evaluation.layers} & {"fp32", "bf16", "fp16"}
        assert len(floats) == 1, floats


def test_openvino_plans_build(digits, tmp_path):
    art = build(digits, load_target("x86-cpu"), tmp_path / "ov", backend="openvino", profile=False)
    assert len({lp.precision for lp in art.plan.layers} & {"fp32", "bf16", "fp16"}) <= 1


def test_progress_display_takes_status_lines_from_several_threads():
    """A fleet reports from its worker threads: the CLI's progress callback must not race (it once lost a task)."""
    from concurrent.futures import ThreadPoolExecutor

    from edgeopt.cli import _progress

    progress, say = _progress()

    def worker(k: int) -> None:
        for i in range(1, 200):
            say(f"sensitivity {i}/199: layer{k}" if i % 3 else f"target{k}: converting")

    with progress, ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))


def test_quiet_stdout_mutes_only_the_thread_inside(capsys):
    """onnxruntime's quantizer prints; a fleet quantizes in several threads.  Muting must not swap the process's
    stdout (redirect_stdout did, and a fleet's own report then vanished)."""
    import threading

    from edgeopt._quiet import quiet_stdout

    inside, go = threading.Event(), threading.Event()

    def chatty() -> None:
        with quiet_stdout():
            inside.set()
            go.wait(5)
            print("muted chatter")

    threads = [threading.Thread(target=chatty) for _ in range(3)]
    for t in threads:
        t.start()
    inside.wait(5)
    print("visible while others are muted")
    go.set()
    for t in threads:
        t.join()
    print("visible after")
    out = capsys.readouterr().out
    assert "visible while others are muted" in out and "visible after" in out and "muted chatter" not in out


def test_accuracy_budget_refusal_says_accuracy_is_the_reason(tmp_path, capsys):
    """When every resource budget is met but no plan the backends can run meets the accuracy budget (an MCU runs
    full int8 only), the refusal names the accuracy budget and the predicted noise, not only budgets that are met."""
    from conftest import init, make_model, save, vi
    from onnx import helper

    from edgeopt.cli import main

    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [1, 8])], [vi("y", [1, 4])],
                   [init("W", rng.normal(size=(8, 4)).astype(np.float32))])
    path = save(m, tmp_path / "m.onnx")
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "x.npy", rng.normal(size=(32, 8)).astype(np.float32))
    rc = main(["plan", str(path), "--target", "mcu-cortex-m7", "--calib", str(tmp_path / "c"), "--min-snr-db", "200"])
    err = capsys.readouterr().err
    assert rc == 2 and "and the accuracy budget" in err and "--max-accuracy-drop" in err, err


def test_embedding_outputs_get_an_snr_budget_not_top1(tmp_path):
    """A [1, N] output computed by mean pooling (a sentence embedding) is not class scores: its default budget is an
    output SNR floor; a Gemm/Softmax head keeps the top-1 budget."""
    from conftest import init, make_model, vi
    from onnx import helper

    from edgeopt.accuracy import is_classification, output_head

    w = init("W", np.ones((8, 16), np.float32))
    emb = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("ReduceMean", ["h"], ["m"], axes=[1], keepdims=0),
                      helper.make_node("Div", ["m", "n"], ["y"])],
                     [vi("x", [1, 4, 8])], [vi("y", [1, 16])], [w, init("n", np.array(2.0, np.float32))])
    head = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Flatten", ["h"], ["y"])],
                      [vi("x", [1, 8])], [vi("y", [1, 16])], [w])
    out = np.random.default_rng(0).normal(size=(10, 16))
    assert output_head(emb) == "Div" and not is_classification(out, output_head(emb))
    assert output_head(head) == "MatMul" and is_classification(out, output_head(head))
