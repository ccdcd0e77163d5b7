from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import init, make_model, vi
from onnx import TensorProto, helper

from edgeopt.calibration import CalibrationError, as_calibration
from edgeopt.datasets import default_model_path, digits
from edgeopt.fidelity import SNR_CEILING_DB, compare_outputs, run
from edgeopt.passes import PassConfig, PassError, make_config, run_pass
from edgeopt.passes.fp16 import _to_bf16_bits
from edgeopt.zoo import ppocr_cls_path


@pytest.fixture(scope="module")
def digits_calib():
    m = onnx.load(str(default_model_path()))
    x, y = digits("test")
    return m, as_calibration(x, m, labels=y)


def test_scoping_by_name_regex_and_exclude():
    c = PassConfig(nodes=["conv1", r"block\d+/.*"], exclude=["block2/dw"])
    assert c.selects("conv1") and c.selects("block1/pw") and not c.selects("block2/dw") and not c.selects("conv2")
    assert PassConfig().selects("anything") and not PassConfig(exclude=[".*"]).selects("x")


def test_unknown_pass_and_bad_config():
    with pytest.raises(PassError, match="unknown pass 'int3'.*cleanup"):
        make_config("int3")
    with pytest.raises(PassError, match="bad config for pass fp16: keep_io_typez"):
        make_config("fp16", {"keep_io_typez": True})


def bn_model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn", epsilon=1e-3),
             helper.make_node("Identity", ["bn"], ["i"], name="id"),
             helper.make_node("Relu", ["i"], ["y"], name="relu")]
    inits = [init("w", w), init("s", rng.uniform(0.5, 2, 4).astype(np.float32)), init("b", rng.standard_normal(4).astype(np.float32)),
             init("m", rng.standard_normal(4).astype(np.float32)), init("v", rng.uniform(0.1, 1, 4).astype(np.float32))]
    return make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", None)], inits)


def test_cleanup_fuses_bn_exactly_and_drops_identity():
    m = bn_model()
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    cal = as_calibration(x, m)
    r = run_pass("cleanup", m, {}, cal)
    assert [n.op_type for n in r.model.graph.node] == ["Conv", "Relu"]
    assert r.report.fidelity.snr_db > 100 and r.report.fidelity.max_abs_error < 1e-4
    assert "conv" in r.report.applied and "id" in r.report.applied


def test_cleanup_on_ppocr_constant_nodes():
    m = onnx.load(str(ppocr_cls_path()))
    x = np.random.default_rng(0).random((4, 3, 48, 192), dtype=np.float32)
    r = run_pass("cleanup", m, {}, as_calibration(x, m))
    ops = [n.op_type for n in r.model.graph.node]
    assert "Constant" not in ops and "BatchNormalization" not in ops
    assert ops.count("Conv") == 53
    assert r.report.size_after < r.report.size_before
    assert r.report.fidelity.snr_db > 80 and r.report.fidelity.top1_agreement == 1.0
    assert any("BatchNormalization fused into Conv: 35" == n for n in r.report.notes)


def test_fp16_halves_weights_and_keeps_accuracy(digits_calib):
    m, cal = digits_calib
    r = run_pass("fp16", m, {}, cal)
    assert r.report.size_after < 0.55 * r.report.size_before
    assert r.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # keep_io_types
    assert r.report.fidelity.top1_agreement >= 0.995 and r.report.fidelity.snr_db > 50
    scoped = run_pass("fp16", m, {"exclude": ["/12/Gemm"]}, cal)
    gemm_w = next(n for n in scoped.model.graph.node if n.name == "/12/Gemm").input[1]
    inits = {t.name: t for t in scoped.model.graph.initializer}
    assert inits[gemm_w].data_type == TensorProto.FLOAT and "/12/Gemm" not in scoped.report.applied


def test_fp16_keeps_out_of_range_weights_in_fp32():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="big")]
    m = make_model(nodes, [vi("x", [1, 2])], [vi("y", None)], [init("W", np.array([[1e5, 1.0], [2.0, 3.0]], np.float32))])
    r = run_pass("fp16", m, {})
    assert [s.node for s in r.report.skipped] == ["big"] and "fp16 range" in r.report.skipped[0].reason
    out = run(r.model, as_calibration(np.ones((1, 2), np.float32), m))[0]
    np.testing.assert_allclose(out, [[1e5 + 2, 4.0]])


def test_bf16_rounding_and_pass(digits_calib):
    assert _to_bf16_bits(np.array([1.0, -2.0], np.float32)).tolist() == [0x3F80, 0xC000]
    # 1 + 2^-8 lies halfway between two bf16 values: ties go to even (1.0)
    assert _to_bf16_bits(np.array([1.0 + 2**-8], np.float32)).tolist() == [0x3F80]
    assert _to_bf16_bits(np.array([1.0 + 3 * 2**-8], np.float32)).tolist() == [0x3F82]
    m, cal = digits_calib
    r = run_pass("bf16", m, {"activations": True}, cal)
    assert r.report.size_after < 0.55 * r.report.size_before
    assert any(t.data_type == TensorProto.BFLOAT16 for t in r.model.graph.initializer)
    f = r.report.fidelity
    assert 30 < f.snr_db < 60 and f.top1_agreement >= 0.99  # bf16 is coarser than fp16, still close


def test_calibration_forms(tmp_path):
    m = onnx.load(str(default_model_path()))
    x, y = digits("calib")
    a = as_calibration(x, m, labels=y)
    assert len(a) == 256 and [len(b["image"]) for b in a.batches(100)] == [100, 100, 56]
    d = as_calibration({"image": x[:10]}, m)
    assert len(d) == 10
    for i in range(5):
        np.save(tmp_path / f"s{i}.npy", x[i])  # single samples, no batch axis
    np.save(tmp_path / "batch.npy", x[5:9])
    np.savez(tmp_path / "z.npz", image=x[9:12])
    f = as_calibration(tmp_path, m)
    assert len(f) == 12
    c = as_calibration(lambda: (x[i : i + 3] for i in range(0, 9, 3)), m)
    assert len(c) == 9 and np.array_equal(c.feeds()["image"], x[:9])
    with pytest.raises(CalibrationError, match="shape"):
        as_calibration(np.zeros((4, 1, 9, 9), np.float32), m)
    with pytest.raises(CalibrationError, match="inputs"):
        as_calibration({"img": x}, m)
    with pytest.raises(CalibrationError, match="labels"):
        as_calibration(x, m, labels=y[:3])
    with pytest.raises(CalibrationError, match="does not exist"):
        as_calibration(tmp_path / "nope", m)


def test_fidelity_metrics():
    ref = [np.array([[1.0, 0.0], [0.0, 2.0]])]
    same = compare_outputs(ref, ref, labels=np.array([0, 1]))
    assert same.snr_db == SNR_CEILING_DB and same.cosine == 1.0 and same.top1_agreement == 1.0 and same.accuracy_delta == 0.0
    noisy = compare_outputs(ref, [ref[0] + 0.1], labels=np.array([0, 0]))
    # signal 5, noise 4 * 0.01 -> 10 log10(125) dB
    assert noisy.snr_db == pytest.approx(10 * np.log10(125), abs=1e-3)
    flipped = compare_outputs(ref, [ref[0][:, ::-1]], labels=np.array([0, 1]))
    assert flipped.top1_agreement == 0.0 and flipped.accuracy == 0.0 and flipped.accuracy_delta == -1.0
