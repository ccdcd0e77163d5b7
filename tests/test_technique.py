"""The technique registry: every stage derives from it, the simulators are the passes' numerics, and a new
technique plugs in end to end with one registration (the README's worked example)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from edgeopt import technique
from edgeopt.backends import BACKENDS, get
from edgeopt.costmodel import planned_weight_bytes
from edgeopt.fidelity import session
from edgeopt.inputs import BuildInputs
from edgeopt.latency_table import profiled
from edgeopt.passes import run_pass
from edgeopt.passes.cleanup import Config as CleanupConfig
from edgeopt.passes.cleanup import apply as cleanup
from edgeopt.pipeline import build
from edgeopt.planner import fidelity_order, make_plan, search_plan
from edgeopt.sensitivity import _compare, measure, measured_techniques
from edgeopt.targets import load_target, valid_names
from edgeopt.technique import ApplyContext, SimContext, Technique
from edgeopt.types import BACKEND_SETTINGS, BackendOption, Target


@pytest.fixture(scope="module")
def inputs():
    return BuildInputs.default_model()


# --------------------------------------------------------------------------- registry consistency


def test_registry_is_consistent_with_targets_and_backends():
    names = [t.name for t in technique.all_techniques()]
    assert len(names) == len(set(names))
    assert fidelity_order()[0] == technique.REFERENCE
    assert len({t.fidelity for t in technique.precisions()}) == len(technique.precisions())
    for t in technique.all_techniques():
        assert t.apply is not None, t.name  # every built-in technique can be written into a graph
        if t.name != technique.REFERENCE:
            assert t.simulate is not None, t.name
    assert set(measured_techniques()) == set(names) - {technique.REFERENCE}
    assert set(profiled()) <= set(technique.precision_names())
    assert BACKENDS == tuple(BACKEND_SETTINGS)
    for name in BACKENDS:
        assert get(name).BACKEND.name == name
    with pytest.raises(ValidationError, match="unknown backend 'ncnn'; valid: onnxruntime"):
        BackendOption(backend="ncnn", unit="cpu", precisions=["fp32"])
    for name in valid_names():
        if name == "host":
            continue  # measured on this machine (tests/test_host_target.py)
        target = load_target(name)
        for option in target.backends:
            backend = get(option.backend).BACKEND
            for p in option.precisions:
                assert backend.writes(p), f"{name}: {option.label} lists {p}, which {option.backend} cannot write"
            for sp in option.sparsity:
                assert backend.writes(sp.pattern), f"{name}: {option.label} lists {sp.pattern}"


def test_unknown_technique_names_are_rejected_naming_the_valid_ones():
    spec = load_target("x86-cpu").model_dump()
    spec["backends"][0]["precisions"] = ["fp32", "int3"]
    with pytest.raises(ValidationError, match="unknown precision 'int3'; valid: fp32, fp16"):
        Target.model_validate(spec)
    spec["backends"][0]["precisions"] = ["fp32"]
    spec["backends"][0]["sparsity"] = [{"pattern": "4:8"}]
    with pytest.raises(ValidationError, match="unknown sparsity '4:8'"):
        Target.model_validate(spec)
    with pytest.raises(ValueError, match="already registered"):
        technique.register(technique.get("int8"))


# --------------------------------------------------------------------------- simulators are the passes' numerics


@pytest.mark.parametrize("layer", ["/3/Conv", "/7/Conv", "/12/Gemm"])
def test_int8_simulator_matches_the_int8_pass(inputs, layer):
    """Sensitivity's int8 noise for one layer equals the noise of the int8 pass (percentile calibration, per-channel
    weights) scoped to that layer and the Relu/Clip that alone follows it (a plan puts them in the layer's format, and
    onnxruntime's quantizer then folds the activation into the output's range), both run as written."""
    clean = onnx.ModelProto()
    clean.CopyFrom(inputs.model)
    cleanup(clean, CleanupConfig(remove_identity=False))
    feeds = inputs.calib.subset(32).feeds()
    ref = session(clean).run(None, feeds)[0]
    sim = technique.get("int8").simulate(SimContext(model=clean, data=inputs.calib, fit=inputs.calib), layer)
    node = next(n for n in clean.graph.node if n.name == layer)
    acts = [n.name for n in clean.graph.node if node.output[0] in n.input and n.op_type in ("Relu", "Clip")]
    real = run_pass("int8", clean, {"nodes": [layer, *acts], "weight_bits": 8}, inputs.calib, evaluate=False).model
    n_sim = _compare(ref, session(sim, optimize=False).run(None, feeds)[0])[0]
    n_real = _compare(ref, session(real, optimize=False).run(None, feeds)[0])[0]
    assert n_real > 0 and abs(n_sim / n_real - 1) < 0.05, (n_sim, n_real)


def test_sensitivity_takes_pass_settings(inputs):
    """A 7-bit weight grid (x86 without VNNI) is noisier than the full-range one, and both are cached apart."""
    full = measure(inputs.model, inputs.calib, options=["int8"], layers=["/7/Conv"], cache=False)
    seven = measure(inputs.model, inputs.calib, options=["int8"], layers=["/7/Conv"], cache=False,
                    configs={"int8": {"weight_bits": 7, "bias_correction": False}})
    assert seven[("/7/Conv", "int8")].noise > full[("/7/Conv", "int8")].noise


# --------------------------------------------------------------------------- a technique plugs in end to end

QMAX6 = 31  # a symmetric 6-bit grid: [-31, 31]


def _quant6(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=red, keepdims=True) / QMAX6
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(w / scale), -QMAX6, QMAX6).astype(np.int8), scale


def _simulate6(ctx: SimContext, layer: str) -> onnx.ModelProto:
    from edgeopt.passes._util import output_channel_axis
    from edgeopt.techniques import layer_copy

    m, g, node, w = layer_copy(ctx, layer)
    q, scale = _quant6(w, output_channel_axis(node, w.ndim))
    g.set_initializer(node.input[1], (q * scale).astype(np.float32))
    return m


def _apply6(model: onnx.ModelProto, layers: list[str], ctx: ApplyContext) -> tuple[onnx.ModelProto, str]:
    """6-bit values held in int8 initializers, dequantized per output channel in the graph."""
    from edgeopt.passes._util import Graph, output_channel_axis

    g = Graph(model)
    for node in [n for n in model.graph.node if n.name in layers]:
        w = g.array(node.input[1])
        axis = output_channel_axis(node, w.ndim)
        q, scale = _quant6(w, axis)
        base = node.input[1]
        g.set_initializer(f"{base}.q6", q)
        g.set_initializer(f"{base}.q6_scale", scale.reshape(-1))
        g.set_initializer(f"{base}.q6_zero", np.zeros(scale.size, np.int8))
        model.graph.node.insert(0, onnx.helper.make_node(
            "DequantizeLinear", [f"{base}.q6", f"{base}.q6_scale", f"{base}.q6_zero"], [f"{base}.w6"],
            name=f"{node.name}/dq6", axis=axis))
        node.input[1] = f"{base}.w6"
    Graph(model).remove_unused_initializers()
    return model, f"wint6: {len(layers)} layer(s)"


@pytest.fixture
def wint6():
    t = technique.register(Technique(
        name="wint6", kind="precision", description="6-bit weights per output channel, float activations",
        fidelity=35, weight_bits=6, activation_bits=None, float_bits=32,
        metadata_bytes=lambda weights, channels: channels * 4, simulate=_simulate6, apply=_apply6, apply_order=15))
    yield t
    technique.unregister("wint6")


def test_a_registered_technique_plugs_in_end_to_end(tmp_path, inputs, wint6):
    # sensitivity measures it with its simulator, on every weighted layer (Conv included: no ops restriction)
    sens = measure(inputs.model, inputs.calib, options=["wint6", "int8"], cache=False)
    for layer in ("/0/Conv", "/7/Conv", "/12/Gemm"):
        s = sens[(layer, "wint6")]
        assert s.applicable and 0 < s.noise < 0.05, s
    # the cost model stores it at 6 bits
    gemm = next(ly for ly in inputs.analysis.layers if ly.name == "/12/Gemm")
    assert planned_weight_bytes(gemm, "wint6") < planned_weight_bytes(gemm, "int8") < planned_weight_bytes(gemm, "fp32")
    # targets may list it; the planner tries it in fidelity order (after wint8, before int8)
    assert fidelity_order().index("wint8") < fidelity_order().index("wint6") < fidelity_order().index("int8")
    spec = load_target("x86-cpu").model_dump(mode="json")
    spec["name"] = "x86-wint6"
    ort = next(b for b in spec["backends"] if b["backend"] == "onnxruntime")
    ort["precisions"] = ["fp32", "wint6"]
    ort["kernel_models"] = {}
    spec["backends"] = [ort]
    fp32_bytes = make_plan(inputs.analysis, Target.model_validate(spec), enforce_budgets=False).predicted_storage_bytes
    spec["budgets"]["storage"] = int(fp32_bytes * 0.45)
    target = Target.model_validate(spec)
    plan = make_plan(inputs.analysis, target)
    weighted = [lp for lp in plan.layers if lp.op_type in ("Conv", "Gemm")]
    assert {lp.precision for lp in weighted} == {"wint6"} and plan.predicted_storage_bytes < fp32_bytes * 0.45
    per_layer = search_plan(inputs.analysis, target, sens)
    assert any(lp.precision == "wint6" for lp in per_layer.layers)
    # the onnxruntime backend writes it through the technique's apply hook, and the artifact keeps the accuracy
    art = build(inputs, target, tmp_path / "out", plan=plan)
    written = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in written.graph.node) == len(weighted)
    assert art.accuracy["accuracy_delta"] >= -0.02
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {lp["precision"] for lp in manifest["plan"]["layers"]} >= {"wint6"}
    # a backend that writes its own format refuses what it cannot write, by name
    assert not get("tflite").BACKEND.writes("wint6") and get("onnxruntime").BACKEND.writes("wint6")
    # unregistered, the name is unknown again
    technique.unregister("wint6")
    with pytest.raises(ValidationError, match="unknown precision 'wint6'"):
        Target.model_validate(spec)
