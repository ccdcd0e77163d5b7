"""Core ML backend: .mlpackage building and compression (coremltools runs on Linux), checked
through the package's spec and its ONNX equivalent (Core ML itself predicts only on macOS)."""

from __future__ import annotations

import json
import platform

import numpy as np
import onnx
import pytest
from conftest import init, make_model, save, vi
from onnx import helper

from edgeopt.backends import _coreml_mil as cm
from edgeopt.backends import coreml
from edgeopt.backends.base import RuntimeUnavailable, build_artifact, open_artifact, read_manifest
from edgeopt.calibration import as_calibration
from edgeopt.datasets import default_model_path, digits
from edgeopt.errors import InputShapeError, UnsupportedOpError
from edgeopt.fidelity import session
from edgeopt.graph import analyze
from edgeopt.planner import make_plan
from edgeopt.targets import load_target

pytest.importorskip("coremltools")


def _with(plan, **by_layer):
    """A copy of ``plan`` with per-layer field updates: layer name -> dict, or op type -> dict."""
    layers = [lp.model_copy(update={**by_layer.get(lp.op_type, {}), **by_layer.get(lp.name, {})}) for lp in plan.layers]
    return plan.model_copy(update={"layers": layers})


def _record(out):
    return json.loads((out / coreml.RECORD).read_text())


def _accuracy(out, x, y):
    return float((coreml.OnnxEquivalentRunner(out).run({"image": x})[0].argmax(1) == y).mean())


@pytest.fixture(scope="module")
def digits_setup():
    m = onnx.load(str(default_model_path()))
    xc, _ = digits("calib")
    x, y = digits("test")
    ref_acc = float((session(m).run(None, {"image": x})[0].argmax(1) == y).mean())
    return m, analyze(default_model_path()), as_calibration(xc, m), x, y, ref_acc


@pytest.fixture(scope="module")
def digits_fp16(tmp_path_factory, digits_setup):
    model, analysis, calib, *_ = digits_setup
    plan = make_plan(analysis, load_target("ios"), backend="coreml", precision="fp16")
    out = tmp_path_factory.mktemp("coreml") / "fp16"
    return build_artifact(model, plan, out, calib), out


def test_digits_fp16_package_spec_and_onnx_equivalent(digits_setup, digits_fp16):
    model, analysis, _, x, y, ref_acc = digits_setup
    art, out = digits_fp16
    assert read_manifest(out) == art and art.primary == "model.mlpackage" and (out / art.primary).is_dir()
    assert "model.mlpackage/Manifest.json" in art.files and f"model.mlpackage/{coreml.WEIGHTS}" in art.files
    assert art.tool_versions["coremltools"]
    rec = _record(out)
    assert rec["compute_precision"] == "fp16" and rec["deployment_target"] == "iOS17" and rec["compression"] == []
    v = rec["validation"]
    assert v["specification_version"] >= 8  # iOS17
    assert v["inputs"] == {"image": {"shape": [1, 1, 8, 8], "dtype": "FLOAT32"}}
    assert v["outputs"] == {"logits": {"shape": [1, 10], "dtype": "FLOAT32"}}
    assert v["ops"]["conv"] == 3 and v["ops"]["linear"] == 2 and v["ops"]["max_pool"] == 2 and v["compressed_weights"] == {}
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 2 * params <= v["weight_bytes"] < 2 * params * 1.1  # fp16 weights
    # the package's computation, re-exported from its MIL program, run in onnxruntime
    eq = coreml.onnx_equivalent(out)
    assert [i.name for i in eq.graph.input] == ["image"] and [o.name for o in eq.graph.output] == ["logits"]
    fid = coreml.compare_with_onnx(out, model, {"image": x}, y)
    assert fid.top1_agreement >= 0.99 and 40 < fid.snr_db < 100, fid  # fp16, not a copy of the fp32 model
    assert abs(fid.accuracy - ref_acc) <= 0.01 and art.accuracy["equivalent_top1_agreement"] == 1.0
    assert coreml.BACKEND.check(art.plan, analysis) == []


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML predicts on macOS")
def test_load_off_macos_says_why(digits_fp16):
    _, out = digits_fp16
    with pytest.raises(RuntimeUnavailable, match="macOS.*ONNX equivalent"):
        open_artifact(out)


@pytest.mark.parametrize("precision, options, op, saved_at_least", [
    ("wint8", {}, "constexpr_affine_dequantize", 0.4),
    ("wint4", {}, "constexpr_lut_to_dense", 0.7),
    ("wint4", {"wint4": "linear"}, "constexpr_blockwise_shift_scale", 0.6),  # a target option; needs iOS18
])
def test_digits_weight_compression(tmp_path, digits_setup, digits_fp16, precision, options, op, saved_at_least):
    model, analysis, _, x, y, ref_acc = digits_setup
    plan = make_plan(analysis, load_target("ios"), backend="coreml", precision=precision)
    plan = plan.model_copy(update={"backend_options": {**plan.backend_options, **options}})
    gemms = [lp.name for lp in plan.layers if lp.precision == precision]
    assert gemms == ["/12/Gemm", "/14/Gemm"]
    art = build_artifact(model, plan, tmp_path / "a")
    rec = _record(tmp_path / "a")
    assert [c["layer"] for c in rec["compression"]] == gemms
    assert rec["validation"]["compressed_weights"] == {op: 2}
    assert rec["deployment_target"] == ("iOS18" if options else "iOS17")
    fp16_bytes = _record(digits_fp16[1])["validation"]["weight_bytes"]
    gemm_fp16_bytes = 2 * (64 * 256 + 10 * 64)
    assert fp16_bytes - rec["validation"]["weight_bytes"] >= saved_at_least * gemm_fp16_bytes
    assert art.size_bytes < digits_fp16[0].size_bytes
    _, _, prog = cm.load_program(str(tmp_path / "a" / "model.mlpackage"))
    ops = {o.name: o for o in prog.functions["main"].operations}
    for c in rec["compression"]:
        w = cm.weight_value(ops[c["op"]].inputs["weight"])
        assert list(w.shape) == c["shape"]
        if op == "constexpr_lut_to_dense":
            assert len(np.unique(w)) <= 16
    assert abs(_accuracy(tmp_path / "a", x, y) - ref_acc) <= 0.01


def test_mixed_plan_fp32_islands_pruning_and_joint_compression(tmp_path, digits_setup):
    model, analysis, _, x, y, ref_acc = digits_setup
    plan = _with(make_plan(analysis, load_target("ios"), backend="coreml", precision="fp16"),
                 **{"/0/Conv": {"precision": "fp32"}, "/2/Relu": {"precision": "fp32"},
                    "/3/Conv": {"sparsity": "unstructured", "sparsity_ratio": 0.5}, "/7/Conv": {"sparsity": "2:4"},
                    "/12/Gemm": {"precision": "wint8", "sparsity": "unstructured", "sparsity_ratio": 0.5},
                    "/14/Gemm": {"precision": "wint4"}})
    build_artifact(model, plan, tmp_path / "a")
    rec = _record(tmp_path / "a")
    assert rec["deployment_target"] == "iOS18"  # pruned + quantized weights need iOS18 constexpr ops
    assert rec["compute_precision"] == "mixed" and rec["fp32_ops"] == ["_0_Conv", "_2_Relu"]
    assert rec["validation"]["compressed_weights"] == {"constexpr_lut_to_dense": 1, "constexpr_sparse_to_dense": 3,
                                                       "constexpr_sparse_blockwise_shift_scale": 1}
    _, _, prog = cm.load_program(str(tmp_path / "a" / "model.mlpackage"))
    ops = {o.name: o for o in prog.functions["main"].operations}
    assert str(ops["_0_Conv"].outputs[0].dtype.__name__) == "fp32" and "_3_Conv_cast_fp16" in ops
    w3 = cm.weight_value(ops["_3_Conv_cast_fp16"].inputs["weight"])
    w7 = cm.weight_value(ops["_7_Conv_cast_fp16"].inputs["weight"])
    w12 = cm.weight_value(ops["_12_Gemm_cast_fp16"].inputs["weight"])
    assert abs(float(np.mean(w3 == 0)) - 0.5) < 0.02 and abs(float(np.mean(w12 == 0)) - 0.5) < 0.02
    groups = np.moveaxis(w7, 1, -1).reshape(-1, 4)  # 2:4 along the input channels
    assert np.all((groups == 0).sum(1) >= 2)
    assert _accuracy(tmp_path / "a", x, y) >= ref_acc - 0.05  # 50% pruning without fine-tuning


def _coverage_model():
    rng = np.random.default_rng(0)

    def r(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], name="conv/asym", strides=[2, 1], pads=[1, 2, 0, 0], dilations=[1, 2]),
        n("PRelu", ["c1", "slope"], ["p1"], name="prelu"),
        n("Conv", ["p1", "w2"], ["c2"], name="dw", group=8, auto_pad="SAME_UPPER", strides=[2, 2]),
        n("HardSwish", ["c2"], ["h"], name="hswish"),
        n("AveragePool", ["h"], ["ap"], name="avg", kernel_shape=[2, 2], pads=[0, 1, 0, 0], count_include_pad=0),
        n("BatchNormalization", ["ap", "bs", "bb", "bm", "bv"], ["bn"], name="bn", epsilon=1e-3),
        n("Pad", ["bn", "pads"], ["pd"], name="pad", mode="reflect"),
        n("MaxPool", ["pd"], ["mp"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        n("LeakyRelu", ["mp"], ["lr"], name="lrelu", alpha=0.1),
        n("ConvTranspose", ["lr", "wt", "bt"], ["ct"], name="deconv", strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
        n("Slice", ["ct", "st", "en", "ax", "sp"], ["sl"], name="slice"),
        n("Split", ["sl", "split"], ["s1", "s2"], name="split", axis=1),
        n("ReduceMean", ["s2"], ["rm"], name="rmean", axes=[1], keepdims=1),
        n("Sub", ["s2", "rm"], ["sb"], name="sub"),
        n("Concat", ["s1", "sb"], ["cc"], name="concat", axis=1),
        n("Transpose", ["cc"], ["tp"], name="transpose", perm=[0, 2, 3, 1]),
        n("LayerNormalization", ["tp", "lg", "lb"], ["ln"], name="lnorm", axis=-1),
        n("Reshape", ["ln", "shape"], ["rs"], name="reshape"),
        n("MatMul", ["rs", "wm"], ["mm"], name="matmul"),
        n("Clip", ["mm", "lo"], ["cl"], name="clip_min"),
        n("Div", ["cl", "two"], ["dv"], name="div"),
        n("Tanh", ["dv"], ["th"], name="tanh"),
        n("Softmax", ["th"], ["out/probs"], name="softmax", axis=-1),
        n("Gather", ["x", "idx"], ["g"], name="gather", axis=1),
        n("Unsqueeze", ["g", "uax"], ["ug"], name="unsqueeze"),
        n("GlobalMaxPool", ["ug"], ["gm"], name="gmax"),
        n("Flatten", ["gm"], ["fl"], name="flatten"),
        n("Abs", ["fl"], ["ab"], name="abs"),
        n("Sqrt", ["ab"], ["sq"], name="sqrt"),
        n("Sigmoid", ["sq"], ["sg"], name="sigmoid"),
        n("LogSoftmax", ["th"], ["ls"], name="logsoftmax", axis=1),
        n("ReduceSum", ["ls", "rsax"], ["rsum"], name="rsum", keepdims=1),
        n("Mul", ["sg", "rsum"], ["out2"], name="mul"),
    ]
    inits = [init("w1", r(8, 4, 3, 2)), init("b1", r(8)), init("slope", r(8, 1, 1, scale=0.2)), init("w2", r(8, 1, 3, 3)),
             init("bs", rng.uniform(0.5, 2, 8).astype(np.float32)), init("bb", r(8)), init("bm", r(8)),
             init("bv", rng.uniform(0.5, 1, 8).astype(np.float32)), init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             init("wt", r(8, 4, 3, 3)), init("bt", r(4)), init("st", np.array([1, 0], np.int64)),
             init("en", np.array([4, -1], np.int64)), init("ax", np.array([1, 3], np.int64)), init("sp", np.array([1, 2], np.int64)),
             init("split", np.array([1, 2], np.int64)), init("lg", r(3, scale=1) + 1), init("lb", r(3)),
             init("shape", np.array([0, -1], np.int64)), init("wm", r(48, 6, scale=0.3)), init("lo", np.array(-0.5, np.float32)),
             init("two", np.array([2.0], np.float32)), init("idx", np.array(2, np.int64)), init("uax", np.array([1], np.int64)),
             init("rsax", np.array([1], np.int64))]
    return make_model(nodes, [vi("x", [1, 4, 17, 11])], [vi("out/probs", None), vi("out2", None)], inits)


def test_op_coverage_fp32_matches_onnx(tmp_path):
    model = _coverage_model()
    path = save(model, tmp_path / "cov.onnx")
    plan = make_plan(analyze(path), load_target("ios"), backend="coreml", precision="fp32")
    assert plan.unit == "gpu"
    build_artifact(model, plan, tmp_path / "a")
    rec = _record(tmp_path / "a")
    assert rec["compute_precision"] == "fp32" and rec["outputs"] == {"out/probs": "out_probs", "out2": "out2"}
    assert set(rec["validation"]["outputs"]) == {"out_probs", "out2"}
    x = np.random.default_rng(1).standard_normal((3, 1, 4, 17, 11)).astype(np.float32)
    ref = [session(model).run(None, {"x": xi}) for xi in x]
    eq = session(coreml.onnx_equivalent(tmp_path / "a"))
    assert [o.name for o in eq.get_outputs()] == ["out/probs", "out2"]
    for xi, r in zip(x, ref):
        for a, b in zip(r, eq.run(None, {"x": xi})):
            assert a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-5), np.abs(a - b).max()


def test_unsupported_op_names_the_node(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Hardmax", ["r"], ["y"], name="my/hardmax")]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", None)])
    with pytest.raises(UnsupportedOpError, match="my/hardmax.*Hardmax"):
        cm.to_mil(model, {"x": [2, 3]})
    reasons = coreml.check_ops(analyze(save(model, tmp_path / "e.onnx")), load_target("ios").backends[0])
    assert len(reasons) == 1 and reasons[0].startswith("my/hardmax: op Hardmax")


@pytest.mark.slow
def test_mobilenetv2_int8_weights(tmp_path):
    from edgeopt.zoo import imagenet_samples, mobilenetv2_path

    path = mobilenetv2_path()
    model = onnx.load(str(path))
    plan = make_plan(analyze(path), load_target("ios"), backend="coreml", precision="fp16", enforce_budgets=False)
    plan = _with(plan, Conv={"precision": "wint8"}, Gemm={"precision": "wint8"})
    build_artifact(model, plan, tmp_path / "a")
    rec = _record(tmp_path / "a")
    v = rec["validation"]
    assert rec["compute_precision"] == "fp16" and v["inputs"] == {"input": {"shape": [1, 3, 224, 224], "dtype": "FLOAT32"}}
    assert v["ops"]["conv"] == 52 and v["ops"]["linear"] == 1 and v["ops"]["relu6"] == 35
    assert v["compressed_weights"] == {"constexpr_affine_dequantize": 53} and len(rec["compression"]) == 53
    fp32_bytes = sum(4 * int(np.prod(t.dims)) for t in model.graph.initializer)
    assert v["weight_bytes"] < 0.27 * fp32_bytes, (v["weight_bytes"], fp32_bytes)  # measured 0.25
    fid = coreml.compare_with_onnx(tmp_path / "a", model, {"input": imagenet_samples(32, seed=1)})
    # measured: top-1 agreement 0.94, SNR 20.9 dB (= per-channel int8 weights in numpy: 20.6 dB)
    assert fid.top1_agreement >= 0.8 and fid.snr_db >= 16, fid


@pytest.mark.slow
def test_ppocr_cls_fixed_input(tmp_path):
    from edgeopt.zoo import ppocr_cls_path

    path = ppocr_cls_path()
    model = onnx.load(str(path))
    with pytest.raises(InputShapeError, match="x"):
        cm.static_shapes(model, {})
    plan = make_plan(analyze(path, input_shapes={"x": [1, 3, 48, 192]}), load_target("ios"), backend="coreml",
                     precision="fp16", enforce_budgets=False)
    build_artifact(model, plan, tmp_path / "a")
    v = _record(tmp_path / "a")["validation"]
    assert v["inputs"] == {"x": {"shape": [1, 3, 48, 192], "dtype": "FLOAT32"}}
    assert v["ops"]["sigmoid_hard"] == 9 and v["ops"]["softmax"] == 1
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3, 48, 192)).astype(np.float32)
    fid = coreml.compare_with_onnx(tmp_path / "a", model, {"x": x})
    assert fid.top1_agreement == 1.0 and fid.snr_db >= 35, fid  # measured 48 dB
