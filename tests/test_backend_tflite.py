from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import init, make_model, save, vi
from onnx import helper

pytest.importorskip("ai_edge_litert")

from edgeopt.backends.base import build_artifact, open_artifact, read_manifest  # noqa: E402
from edgeopt.backends.tflite import TfliteRunner  # noqa: E402
from edgeopt.calibration import as_calibration  # noqa: E402
from edgeopt.datasets import default_model_path, digits  # noqa: E402
from edgeopt.errors import EdgeoptError, UnsupportedOpError  # noqa: E402
from edgeopt.fidelity import compare_outputs, session  # noqa: E402
from edgeopt.graph import analyze  # noqa: E402
from edgeopt.planner import make_plan  # noqa: E402
from edgeopt.targets import load_target  # noqa: E402


@pytest.fixture(scope="module")
def digits_setup():
    m = onnx.load(str(default_model_path()))
    xc, _ = digits("calib")
    x, y = digits("test")
    ref = session(m).run(None, {"image": x})[0]
    return m, analyze(default_model_path()), as_calibration(xc, m), x, y, ref


def _build(tmp_path, model, plan, calib, name="art"):
    out = tmp_path / name
    art = build_artifact(model, plan, out, calib)
    assert read_manifest(out) == art
    _, runner = open_artifact(out)
    return art, out, runner


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_digits_each_precision_matches_onnx(tmp_path, digits_setup, precision):
    model, analysis, calib, x, y, ref = digits_setup
    plan = make_plan(analysis, load_target("android-mid"), backend="tflite", precision=precision)
    art, out, runner = _build(tmp_path, model, plan, calib)
    assert set(art.files) == {"model.tflite", "tflite.json"} and art.tool_versions["ai-edge-litert"]
    data = (out / "model.tflite").read_bytes()
    assert data[4:8] == b"TFL3"
    record = json.loads((out / "tflite.json").read_text())
    assert record["io"] == "float" and record["op_precisions"] == {precision: 8}  # 3 conv(+relu), 2 pool, flatten, 2 FC
    assert record["inputs"][0]["layout"] == "nhwc" and record["inputs"][0]["tflite_shape"] == [1, 8, 8, 1]
    got = runner.run({"image": x})[0]  # 360 samples through a batch-1 model
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    acc, ref_acc = float((got.argmax(1) == y).mean()), float((ref.argmax(1) == y).mean())
    fp32_size = 163776  # measured: fp32 163776 B, fp16 84000 B (weights fp16 + DEQUANTIZE), int8 46592 B
    if precision == "fp32":
        assert err < 1e-4, err  # measured 8.6e-6
        assert abs(len(data) - fp32_size) < 4096
    elif precision == "fp16":
        assert err < 0.1 and acc == ref_acc, (err, acc)  # measured 0.021 on logits up to ~30
        assert record["ops"]["DEQUANTIZE"] == 10 and len(data) < 0.55 * fp32_size
    else:
        assert record["ops"].get("QUANTIZE") == 1 and record["ops"].get("DEQUANTIZE") == 1  # float I/O on XNNPACK
        assert acc >= ref_acc - 0.01, (acc, ref_acc)  # measured: equal (0.992)
        assert len(data) < 0.3 * fp32_size


def test_full_integer_option_has_int8_io(tmp_path, digits_setup):
    """NNAPI-style options (requires_full_integer) get int8 inputs/outputs; the runner still takes floats."""
    model, analysis, calib, x, y, ref = digits_setup
    f = tmp_path / "npu.yaml"
    f.write_text("base: android-mid\nname: android-npu\nbackends:\n  - backend: tflite\n    unit: npu\n"
                 "    options: {delegate: nnapi}\n    precisions: [int8]\n    requires_full_integer: true\n"
                 "    requires_static_shapes: true\n")
    plan = make_plan(analysis, load_target(f))
    art, out, runner = _build(tmp_path, model, plan, calib)
    record = json.loads((out / "tflite.json").read_text())
    assert record["io"] == "int8" and "QUANTIZE" not in record["ops"] and "DEQUANTIZE" not in record["ops"]
    inp = record["inputs"][0]
    assert inp["dtype"] == "int8" and inp["zero_point"] == -128 and inp["scale"] == pytest.approx(1 / 255, rel=1e-3)
    got = runner.run({"image": x})[0]
    assert float((got.argmax(1) == y).mean()) >= float((ref.argmax(1) == y).mean()) - 0.01


def test_mixed_precision_plan(tmp_path, digits_setup):
    """int8 convs and fp16 FC layers in one .tflite, joined by QUANTIZE/DEQUANTIZE."""
    model, analysis, calib, x, y, ref = digits_setup
    plan = make_plan(analysis, load_target("android-mid"), backend="tflite", precision="fp32")
    layers = [lp.model_copy(update={"precision": "int8" if lp.op_type in ("Conv", "Relu", "MaxPool") else "fp16"})
              for lp in plan.layers]
    plan = plan.model_copy(update={"layers": layers})
    _, out, runner = _build(tmp_path, model, plan, calib)
    record = json.loads((out / "tflite.json").read_text())
    assert record["op_precisions"]["int8"] >= 5 and record["op_precisions"]["fp16"] >= 2
    assert record["ops"]["QUANTIZE"] == 1 and record["ops"]["DEQUANTIZE"] >= 1 + 4  # float -> int8 -> float, fp16 weights
    got = runner.run({"image": x})[0]
    assert float((got.argmax(1) == y).mean()) >= float((ref.argmax(1) == y).mean()) - 0.01


def _op_zoo_model():
    rng = np.random.default_rng(0)

    def r(*s):
        return (rng.standard_normal(s) * 0.3).astype(np.float32)

    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[0, 1, 1, 0], strides=[2, 2], kernel_shape=[3, 3]),
        n("LeakyRelu", ["c1"], ["l1"], name="lrelu", alpha=0.1),
        n("Sigmoid", ["l1"], ["s1"], name="sig"),
        n("Mul", ["l1", "s1"], ["m1"], name="mul"),
        n("BatchNormalization", ["m1", "bns", "bnb", "bnm", "bnv"], ["bn"], name="bn"),
        n("HardSigmoid", ["bn"], ["hs"], name="hs", alpha=0.2, beta=0.5),
        n("Concat", ["bn", "hs"], ["cat"], name="cat", axis=1),
        n("AveragePool", ["cat"], ["ap"], name="ap", kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 0, 0], count_include_pad=1),
        n("Pad", ["ap", "padv"], ["pd"], name="pad"),
        n("MaxPool", ["pd"], ["mp"], name="mp", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 1]),
        n("Slice", ["mp", "st", "en", "ax"], ["sl"], name="slice"),
        n("Sub", ["sl", "subc"], ["sb"], name="sub"),
        n("Max", ["sb", "sl"], ["mx"], name="max"),
        n("Tanh", ["mx"], ["th"], name="tanh"),
        n("Transpose", ["th"], ["tr"], name="tr", perm=[0, 2, 3, 1]),
        n("ReduceMean", ["tr"], ["rm"], name="rm", axes=[1], keepdims=0),
        n("MatMul", ["rm", "mmw"], ["mm"], name="mm"),
        n("Transpose", ["mm"], ["mmt"], name="mmt", perm=[0, 2, 1]),
        n("MatMul", ["mm", "mmt"], ["bmm"], name="bmm"),
        n("Reshape", ["bmm", "shp"], ["rs"], name="rs"),
        n("Softmax", ["rs"], ["y"], name="softmax", axis=-1),
        n("GlobalMaxPool", ["cat"], ["gmp"], name="gmp"),
        n("Flatten", ["gmp"], ["y2"], name="flat"),
    ]
    inits = [init("w1", r(8, 3, 3, 3)), init("b1", r(8)), init("bns", np.abs(r(8)) + 0.5), init("bnb", r(8)), init("bnm", r(8)),
             init("bnv", np.abs(r(8)) + 0.5), init("padv", np.array([0, 0, 1, 2, 0, 0, 0, 1], np.int64)),
             init("st", np.array([1, 0], np.int64)), init("en", np.array([14, 100], np.int64)),
             init("ax", np.array([1, 3], np.int64)), init("subc", r(1, 13, 1, 1)), init("mmw", r(13, 5)),
             init("shp", np.array([0, -1], np.int64))]
    model = make_model(nodes, [vi("x", ["N", 3, 16, 16])], [vi("y", None), vi("y2", None)], inits)
    return model, rng.standard_normal((16, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_op_coverage_against_onnxruntime(tmp_path, precision):
    """Asymmetric/explicit padding, pools, layout-sensitive ops (Concat, Slice, Transpose, ReduceMean, Softmax)
    and batch matmul: NHWC inside, ONNX layout outside."""
    from edgeopt.backends import _tflite_writer as writer

    model, x = _op_zoo_model()
    ref = session(model).run(None, {"x": x})
    conv = writer.convert(model, input_shapes={"x": [1, 3, 16, 16]}, default=precision, calib=as_calibration(x, model),
                          full_integer=precision == "int8")
    for op in ("PAD", "PADV2", "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION", "STRIDED_SLICE", "BATCH_MATMUL", "MEAN", "SOFTMAX"):
        assert op in conv.info["ops"], op
    (tmp_path / "m.tflite").write_bytes(conv.data)
    got = TfliteRunner(tmp_path / "m.tflite", conv.info).run({"x": x})
    errs = [float(np.abs(a - b).max()) for a, b in zip(ref, got)]
    if precision == "fp32":
        assert max(errs) < 1e-5, errs  # measured 1e-6
    else:  # softmax probabilities (step 1/256) and max-pooled features up to ~4.8
        assert errs[0] < 0.01 and errs[1] < 0.15, errs  # measured 0.003, 0.078


def test_unsupported_ops_are_named(tmp_path, digits_setup):
    calib = digits_setup[2]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="the_conv", kernel_shape=[1, 1]),
             helper.make_node("Erf", ["c"], ["y"], name="the_erf")]
    m = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", None)], [init("W", np.ones((2, 2, 1, 1), np.float32))])
    # the planner's pre-flight knows what the writer translates ...
    with pytest.raises(UnsupportedOpError, match=r"op Erf is not supported by tflite.*\(1 layer: the_erf\)"):
        make_plan(analyze(save(m, tmp_path / "erf.onnx")), load_target("android-mid"), backend="tflite", precision="fp32")
    grouped = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="grouped", kernel_shape=[1, 1], group=2)],
                         [vi("x", [1, 4, 4, 4])], [vi("y", None)], [init("W", np.ones((4, 2, 1, 1), np.float32))])
    with pytest.raises(UnsupportedOpError, match=r"Conv is a grouped convolution \(group=2\).*\(1 layer: grouped\)"):
        make_plan(analyze(save(grouped, tmp_path / "g.onnx")), load_target("android-mid"), backend="tflite", precision="fp32")
    # ... and the writer itself still names what it refuses
    plan = make_plan(digits_setup[1], load_target("android-mid"), backend="tflite", precision="fp32")
    with pytest.raises(UnsupportedOpError, match=r"node 'the_erf' \(op Erf\): not supported by the TFLite writer"):
        build_artifact(m, plan, tmp_path / "a", None)
    assert not (tmp_path / "a").exists()
    with pytest.raises(UnsupportedOpError, match=r"node 'grouped' \(op Conv\): grouped convolution \(group=2\)"):
        build_artifact(grouped, plan, tmp_path / "b", None)
    plan = make_plan(digits_setup[1], load_target("android-mid"), backend="tflite", precision="int8")
    with pytest.raises(EdgeoptError, match="calibration"):
        build_artifact(digits_setup[0], plan, tmp_path / "c", None)
    assert calib is not None


def test_ppocr_cls_fp32_and_int8(tmp_path, ppocr_cls):
    """HardSwish (Add/Clip/Mul/Div), SE blocks (HardSigmoid fused into the conv), stride-(2,1) convs, MatMul+Add,
    Softmax, and the Shape->Slice->Concat->Reshape subgraph folded at the fixed input shape."""
    from edgeopt.backends import _tflite_writer as writer
    from edgeopt.zoo import imagenet_samples

    model = onnx.load(str(ppocr_cls))
    strips = np.ascontiguousarray(imagenet_samples(24, size=192, seed=3)[:, :, 72:120, :])
    x, xc = strips[:12], strips[12:]
    ref = session(model).run(None, {"x": x})[0]
    for precision in ("fp32", "int8"):
        conv = writer.convert(model, input_shapes={"x": [1, 3, 48, 192]}, default=precision,
                              calib=as_calibration(xc, model), full_integer=precision == "int8")
        assert conv.info["ops"]["HARD_SWISH"] == 18 and "DIV" not in conv.info["ops"]
        (tmp_path / f"{precision}.tflite").write_bytes(conv.data)
        got = TfliteRunner(tmp_path / f"{precision}.tflite", conv.info).run({"x": x})[0]
        if precision == "fp32":
            assert float(np.abs(got - ref).max()) < 1e-4  # measured 6e-6
        else:
            f = compare_outputs([ref], [got], None)
            assert f.max_abs_error < 0.5 and f.snr_db > 8, f  # measured (32 samples): 0.35, 13.8 dB


@pytest.fixture(scope="module")
def mobilenet():
    from edgeopt.zoo import imagenet_samples, mobilenetv2_path

    path = mobilenetv2_path()
    model = onnx.load(str(path))
    x = imagenet_samples(32, seed=1)
    return model, analyze(path), x, session(model).run(None, {"input": x})[0]


@pytest.mark.slow
def test_mobilenetv2_fp32_and_fp16(tmp_path, mobilenet):
    model, analysis, x, ref = mobilenet
    for precision in ("fp32", "fp16"):
        plan = make_plan(analysis, load_target("android-mid"), backend="tflite", precision=precision)
        art, out, runner = _build(tmp_path, model, plan, None, precision)
        record = json.loads((out / "tflite.json").read_text())
        assert record["ops"]["DEPTHWISE_CONV_2D"] == 17 and record["ops"]["MEAN"] == 1 and "RELU6" not in record["ops"]
        got = runner.run({"input": x})[0]
        f = compare_outputs([ref], [got], None)
        if precision == "fp32":
            assert f.max_abs_error < 1e-3 and f.top1_agreement == 1.0, f  # measured 3e-5
            assert 13.5e6 < art.size_bytes < 14.5e6
        else:
            assert f.top1_agreement == 1.0 and f.snr_db > 35, f  # measured: max error 0.17
            assert art.size_bytes < 7.5e6


@pytest.mark.slow
def test_mobilenetv2_int8(tmp_path, mobilenet):
    from edgeopt.zoo import imagenet_samples

    model, analysis, x, ref = mobilenet
    calib = as_calibration(imagenet_samples(64, seed=0), model)
    plan = make_plan(analysis, load_target("android-mid"), backend="tflite", precision="int8")
    art, out, runner = _build(tmp_path, model, plan, calib)
    assert art.size_bytes < 4.2e6  # measured 3.98 MB
    f = compare_outputs([ref], [runner.run({"input": x})[0]], None)
    # measured: top-1 agreement 0.875, SNR 11.3 dB (onnxruntime's int8 pass, min-max, on the same data: 0.84, 14.6 dB)
    assert f.top1_agreement >= 0.75 and f.snr_db >= 8, f
