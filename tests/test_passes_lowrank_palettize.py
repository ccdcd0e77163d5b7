from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import init, make_model, vi
from onnx import TensorProto, helper, numpy_helper

from edgeopt.calibration import as_calibration
from edgeopt.datasets import default_model_path, digits
from edgeopt.fidelity import compare_outputs, run
from edgeopt.passes import PassError, run_pass
from edgeopt.passes.palettize import kmeans_rows


def ort_run(model, feed, outputs=None):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def skip_reason(report, node):
    return next(s.reason for s in report.skipped if s.node == node)


# ----------------------------------------------------------------------------- lowrank: tiny graphs


def gemm_model(w, *, trans_b=1, alpha=1.0, beta=1.0, trans_a=0, bias=True, batch="N"):
    k = w.shape[1] if trans_b else w.shape[0]
    n = w.shape[0] if trans_b else w.shape[1]
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", np.linspace(-1, 1, n, dtype=np.float32))] if bias else [])
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    xshape = [k, batch] if trans_a else [batch, k]
    return make_model([node], [vi("x", xshape)], [vi("y", None)], inits)


def matmul_model(w):
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model([node], [vi("x", [2, 3, w.shape[0]])], [vi("y", None)], [init("w", w)])


def conv1x1_model(w, stride=2, pads=(1, 1, 1, 1)):
    b = np.linspace(-1, 1, w.shape[0], dtype=np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="pw", kernel_shape=[1, 1], strides=[stride, stride], pads=list(pads))
    return make_model([node], [vi("x", [2, w.shape[1], 9, 9])], [vi("y", None)], [init("w", w), init("b", b)])


FULL = {"rank_ratio": 1.0, "min_saving": -1.0, "round_to": 1}


@pytest.mark.parametrize("kind", ["gemm_tb1", "gemm_tb0", "matmul", "conv"])
def test_lowrank_full_rank_reproduces_output(kind):
    rng = np.random.default_rng(0)
    if kind.startswith("gemm"):
        tb = int(kind[-1])
        w = rng.standard_normal((24, 40) if tb else (40, 24)).astype(np.float32)
        m = gemm_model(w, trans_b=tb, alpha=0.5, beta=2.0)
        x = rng.standard_normal((5, 40)).astype(np.float32)
    elif kind == "matmul":
        m = matmul_model(rng.standard_normal((40, 24)).astype(np.float32))
        x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    else:
        m = conv1x1_model(rng.standard_normal((24, 40, 1, 1)).astype(np.float32))
        x = rng.standard_normal((2, 40, 9, 9)).astype(np.float32)
    r = run_pass("lowrank", m, FULL)
    name = m.graph.node[0].name
    assert r.report.applied == [name]
    assert [n.name for n in r.model.graph.node] == [f"{name}/lowrank_a", f"{name}/lowrank_b"]
    assert f"{name}: rank 24 of 24" in r.report.notes[0]
    onnx.checker.check_model(r.model)
    ref, out = ort_run(m, {"x": x})[0], ort_run(r.model, {"x": x})[0]
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_lowrank_recovers_exact_rank_and_rounds_up():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((96, 3)) @ rng.standard_normal((3, 80))).astype(np.float32)  # rank 3, [out, in] for transB=1
    m = gemm_model(w)
    x = rng.standard_normal((5, 80)).astype(np.float32)
    ref = ort_run(m, {"x": x})[0]
    r = run_pass("lowrank", m, {"round_to": 1})
    assert "fc: rank 3 of 80 (weight energy 1.000), params 7680 -> 528" in r.report.notes
    inits = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    assert "w" not in inits and inits["w/lowrank_a"].shape == (3, 80) and inits["w/lowrank_b"].shape == (96, 3)
    np.testing.assert_allclose(ort_run(r.model, {"x": x})[0], ref, atol=1e-4, rtol=1e-4)
    assert r.report.size_after < r.report.size_before * 0.2
    r8 = run_pass("lowrank", m, {})  # round_to=8: rank 3 -> 8, still exact
    assert "fc: rank 8 of 80" in r8.report.notes[0]
    np.testing.assert_allclose(ort_run(r8.model, {"x": x})[0], ref, atol=1e-4, rtol=1e-4)
    r_ratio = run_pass("lowrank", m, {"rank_ratio": 0.3, "round_to": 1})
    assert "fc: rank 24 of 80" in r_ratio.report.notes[0]  # ceil(0.3 * 80)


def test_lowrank_skips_with_reasons():
    rng = np.random.default_rng(2)
    r = run_pass("lowrank", gemm_model(rng.standard_normal((24, 40)).astype(np.float32), trans_a=1, trans_b=1))
    assert not r.report.applied and "transA=1" in skip_reason(r.report, "fc")
    r = run_pass("lowrank", gemm_model(rng.standard_normal((6, 8)).astype(np.float32)))
    assert "too small" in skip_reason(r.report, "fc")
    r = run_pass("lowrank", gemm_model(rng.standard_normal((64, 64)).astype(np.float32)))  # full rank random: energy 0.95 needs ~50
    assert "saves only" in skip_reason(r.report, "fc") and r.model.graph.node[0].op_type == "Gemm"
    r = run_pass("lowrank", conv1x1_model(rng.standard_normal((24, 40, 3, 3)).astype(np.float32)))
    assert "not 1x1" in skip_reason(r.report, "pw")
    dw = helper.make_node("Conv", ["x", "w"], ["y"], name="g", kernel_shape=[1, 1], group=2)
    m = make_model([dw], [vi("x", [1, 32, 4, 4])], [vi("y", None)], [init("w", rng.standard_normal((32, 16, 1, 1)).astype(np.float32))])
    assert "group=2" in skip_reason(run_pass("lowrank", m, FULL).report, "g")
    dyn = helper.make_node("MatMul", ["x", "x2"], ["y"], name="dyn")
    m = make_model([dyn], [vi("x", [4, 32]), vi("x2", [32, 32])], [vi("y", None)])
    assert "not constant" in skip_reason(run_pass("lowrank", m, FULL).report, "dyn")
    r = run_pass("lowrank", gemm_model(rng.standard_normal((24, 40)).astype(np.float32)), {**FULL, "exclude": ["fc"]})
    assert not r.report.applied and not r.report.skipped


def test_lowrank_data_aware_uses_the_input_subspace():
    """Inputs on an 8-dim affine subspace: the data-aware rank-8 factorization is exact on them, plain SVD is not."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 96)).astype(np.float32)  # Gemm transB=1: 96 inputs -> 64 outputs
    m = gemm_model(w)
    basis, mean = rng.standard_normal((8, 96)), rng.standard_normal(96) * 3

    def sample(n, seed):
        return (np.random.default_rng(seed).standard_normal((n, 8)) @ basis + mean).astype(np.float32)

    calib, test = as_calibration(sample(200, 4), m), as_calibration(sample(100, 5), m)
    cfg = {"rank_ratio": 8 / 64, "round_to": 1}
    plain = run_pass("lowrank", m, cfg, test)
    aware = run_pass("lowrank", m, {**cfg, "data_aware": True}, calib, evaluate=False)
    ref, out = run(m, test), run(aware.model, test)
    fid = compare_outputs(ref, out)
    assert "fc: rank 8 of 64" in aware.report.notes[1]
    assert fid.snr_db > 50 and plain.report.fidelity.snr_db < 15
    assert abs(aware.report.size_after - plain.report.size_after) < 100  # same rank; the bias is rewritten in place
    with pytest.raises(PassError, match="data_aware=True needs calibration"):
        run_pass("lowrank", m, {"data_aware": True})


# ----------------------------------------------------------------------------- palettize: k-means and tiny graphs


def test_kmeans_rows_exact_for_few_values_and_beats_uniform():
    rng = np.random.default_rng(0)
    levels = np.array([-1.5, -0.2, 0.0, 0.7, 3.0], np.float32)
    x = levels[rng.integers(0, 5, (3, 500))]
    cent, idx = kmeans_rows(x, 8)  # at most k distinct values: lossless (up to float64 rounding of the means)
    np.testing.assert_array_equal(np.take_along_axis(cent, idx, 1).astype(np.float32), x)
    g = rng.standard_normal((2, 5000))
    g[1] *= 10
    for k in (16, 64):
        cent, idx = kmeans_rows(g, k, 25)
        rec = np.take_along_axis(cent, idx, 1)
        for r in range(2):  # centroids are the means of their members
            for j in np.unique(idx[r]):
                assert np.isclose(cent[r, j], g[r][idx[r] == j].mean())
        lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
        step = (hi - lo) / (k - 1)
        uniform = np.round((g - lo) / step) * step + lo
        assert np.sum((rec - g) ** 2) < 0.8 * np.sum((uniform - g) ** 2)
    # Lloyd-Max 4-bit on a Gaussian: relative RMS error ~0.097
    assert np.linalg.norm(np.take_along_axis(*kmeans_rows(g[:1], 16), 1) - g[:1]) / np.linalg.norm(g[:1]) < 0.105


def decoded_weight(model, node_name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == node_name)
    m.graph.output.append(helper.make_tensor_value_info(node.input[1], TensorProto.FLOAT, None))
    feed = {i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim], np.float32) for i in m.graph.input}
    return ort_run(m, feed, [node.input[1]])[0]


def luts(model):
    return [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("/palette_lut")]


@pytest.mark.parametrize("packing,bits", [("bitplanes", 3), ("uint8", 3), ("uint4", 3), ("auto", 8)])
def test_palettize_per_tensor_decodes_to_kmeans_centroids(packing, bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 41)).astype(np.float32)  # 1517 elements: not a multiple of 8
    m = gemm_model(w)
    r = run_pass("palettize", m, {"bits": bits, "packing": packing})
    assert r.report.applied == ["fc"]
    onnx.checker.check_model(r.model, full_check=True)
    dec = decoded_weight(r.model, "fc")
    (lut,) = luts(r.model)
    assert lut.shape == (2**bits,) and len(np.unique(dec)) <= 2**bits and set(np.unique(dec)) <= set(lut)
    cent, idx = kmeans_rows(w.reshape(1, -1), 2**bits, 25)
    np.testing.assert_array_equal(dec.ravel(), cent[0][idx[0]].astype(np.float32))
    x = rng.standard_normal((5, 41)).astype(np.float32)
    expect = x @ dec.T + np.linspace(-1, 1, 37, dtype=np.float32)
    np.testing.assert_allclose(ort_run(r.model, {"x": x})[0], expect, rtol=1e-5, atol=1e-5)
    assert f"fc: {bits}-bit per_tensor (1 LUT of {2**bits}" in r.report.notes[-2]
    if packing == "uint4":
        assert r.model.opset_import[0].version == 21 and "opset 17 to 21" in r.report.notes[0]
        assert any(t.data_type == TensorProto.UINT4 for t in r.model.graph.initializer)


@pytest.mark.parametrize("kind", ["conv", "matmul", "gemm_tb0"])
def test_palettize_per_channel_one_lut_per_output_channel(kind):
    rng = np.random.default_rng(1)
    if kind == "conv":
        w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * np.linspace(0.1, 3, 32, dtype=np.float32)[:, None, None, None]
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="n", kernel_shape=[3, 3])
        m = make_model([node], [vi("x", [1, 16, 5, 5])], [vi("y", None)], [init("w", w)])
        channels, per_channel = 32, w.reshape(32, -1)
    elif kind == "matmul":
        w = rng.standard_normal((128, 48)).astype(np.float32) * np.linspace(0.1, 3, 48, dtype=np.float32)
        m = matmul_model(w)
        m.graph.node[0].name = "n"
        channels, per_channel = 48, w.T
    else:
        w = rng.standard_normal((128, 48)).astype(np.float32)
        m = gemm_model(w, trans_b=0, bias=False)
        m.graph.node[0].name = "n"
        channels, per_channel = 48, w.T
    r = run_pass("palettize", m, {"bits": 2, "granularity": "per_channel"})
    assert r.report.applied == ["n"] and f"{channels} LUTs of 4" in r.report.notes[0]
    (lut,) = luts(r.model)
    assert lut.shape == (channels * 4,)
    dec = decoded_weight(r.model, "n")
    dec_rows = dec.reshape(32, -1) if kind == "conv" else dec.T
    cent, idx = kmeans_rows(per_channel, 4, 25)
    np.testing.assert_array_equal(dec_rows, np.take_along_axis(cent, idx, 1).astype(np.float32))
    assert all(len(np.unique(row)) <= 4 for row in dec_rows)
    np.testing.assert_array_equal(np.unique(dec_rows[0]), np.unique(lut.reshape(channels, 4)[0]))


def test_palettize_storage_shrinks_by_bits():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((512, 512)).astype(np.float32)
    m = gemm_model(w)
    fp32 = m.ByteSize()
    sizes = {}
    for packing, bits in [("uint4", 4), ("bitplanes", 4), ("bitplanes", 3), ("bitplanes", 6), ("uint8", 4)]:
        r = run_pass("palettize", m, {"bits": bits, "packing": packing})
        sizes[(packing, bits)] = r.report.size_after
        assert r.report.size_before == fp32
    assert 7.5 < fp32 / sizes[("uint4", 4)] < 8.05
    assert 7.5 < fp32 / sizes[("bitplanes", 4)] < 8.05
    assert 10 < fp32 / sizes[("bitplanes", 3)] < 32 / 3 + 0.05
    assert 5.2 < fp32 / sizes[("bitplanes", 6)] < 32 / 6 + 0.05
    assert 3.9 < fp32 / sizes[("uint8", 4)] < 4.05


def test_palettize_skips_with_reasons():
    rng = np.random.default_rng(3)
    r = run_pass("palettize", gemm_model(rng.standard_normal((16, 32)).astype(np.float32)))
    assert "min_elements" in skip_reason(r.report, "fc") and r.model.graph.node[0].input[1] == "w"
    # per-channel 8-bit on a depthwise-like weight: 256-entry LUTs for 9 values each would grow it
    dw = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", kernel_shape=[3, 3], group=256)
    m = make_model([dw], [vi("x", [1, 256, 5, 5])], [vi("y", None)], [init("w", rng.standard_normal((256, 1, 3, 3)).astype(np.float32))])
    r = run_pass("palettize", m, {"bits": 8, "granularity": "per_channel", "min_elements": 1})
    assert "not smaller than the weight" in skip_reason(r.report, "dw") and r.report.size_after == r.report.size_before
    # a weight also read by a node outside the scope stays as it is
    w = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"), helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    m = make_model(nodes, [vi("x", [2, 64])], [vi("y", None)], [init("w", w)])
    r = run_pass("palettize", m, {"nodes": ["a"]})
    assert "outside the pass's scope" in skip_reason(r.report, "a") and not r.report.applied
    r = run_pass("palettize", m, {})  # both readers in scope: decoded once, shared
    assert r.report.applied == ["a", "b"] and len(luts(r.model)) == 1
    with pytest.raises(PassError, match="uint4 holds at most 4 bits"):
        run_pass("palettize", m, {"bits": 6, "packing": "uint4"})
    with pytest.raises(PassError, match="not Relu"):
        run_pass("palettize", m, {"op_types": ["Relu"]})


# ----------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def digits_data():
    m = onnx.load(str(default_model_path()))
    x, y = digits("test")
    return m, as_calibration(x, m, labels=y)


def test_lowrank_on_digits_gemm(digits_data):
    m, cal = digits_data
    r = run_pass("lowrank", m, {}, cal)  # energy 0.95: rank 48 of 64 saves too little
    assert not r.report.applied and "saves only" in skip_reason(r.report, "/12/Gemm")
    assert "too small" in skip_reason(r.report, "/14/Gemm")
    r = run_pass("lowrank", m, {"rank_ratio": 0.25}, cal)
    assert r.report.applied == ["/12/Gemm"] and "/12/Gemm: rank 16 of 64" in r.report.notes[0]
    f = r.report.fidelity  # measured: size 163325 -> 118424, agreement 1.0, accuracy 0.992 (= reference)
    assert r.report.size_after < 0.75 * r.report.size_before
    assert f.top1_agreement >= 0.98 and f.accuracy >= f.reference_accuracy - 0.01
    xc, yc = digits("calib")
    aware = run_pass("lowrank", m, {"rank_ratio": 0.125, "data_aware": True}, as_calibration(xc, m, labels=yc), evaluate=False)
    fa = compare_outputs(run(m, cal), run(aware.model, cal), cal.labels)  # measured: agreement 0.992, accuracy 0.989
    assert fa.top1_agreement >= 0.97 and fa.accuracy >= fa.reference_accuracy - 0.02


@pytest.mark.parametrize("bits,max_ratio,min_agree,max_acc_drop", [(4, 0.2, 0.97, 0.03), (6, 0.27, 0.98, 0.015)])
def test_palettize_on_digits(digits_data, bits, max_ratio, min_agree, max_acc_drop):
    m, cal = digits_data
    r = run_pass("palettize", m, {"bits": bits}, cal)
    # measured: 4-bit 163325 -> 30347 bytes, agreement 0.992, accuracy 0.984 (ref 0.992); 6-bit 40809, 0.996, 0.996
    assert sorted(r.report.applied) == ["/12/Gemm", "/3/Conv", "/7/Conv"]
    assert {s.node for s in r.report.skipped} == {"/0/Conv", "/14/Gemm"}  # fewer than 1024 weights
    assert r.report.size_after < max_ratio * r.report.size_before
    f = r.report.fidelity
    assert f.top1_agreement >= min_agree and f.accuracy >= f.reference_accuracy - max_acc_drop


@pytest.fixture(scope="module")
def mobilenet():
    from edgeopt.zoo import imagenet_samples, mobilenetv2_path

    m = onnx.load(str(mobilenetv2_path()))
    test = as_calibration(imagenet_samples(48, seed=1), m)
    return m, test, run(m, test)


def agreement(mobilenet, model):
    _, test, ref = mobilenet
    return compare_outputs(ref, run(model, test)).top1_agreement


@pytest.mark.slow
def test_lowrank_on_mobilenetv2(mobilenet):
    from edgeopt.zoo import imagenet_samples

    m = mobilenet[0]
    r = run_pass("lowrank", m, {})
    # energy 0.95: only the classifier is worth factoring (rank 432 of 1000); the 1x1 convs are nearly full rank
    assert r.report.applied == ["/classifier/classifier.1/Gemm"]
    assert "rank 432 of 1000" in r.report.notes[0]
    assert "saves only" in skip_reason(r.report, "/features/features.18/features.18.0/Conv")
    assert r.report.size_after < 0.93 * r.report.size_before  # measured 0.915
    assert agreement(mobilenet, r.model) >= 0.75  # measured 0.875 (48 samples)
    # classifier + last 1x1 convs at weight energy 0.9; data-aware SVD keeps more of the outputs at the same size
    sel = [r"/classifier/.*", r"/features/features\.18/.*", r"/features/features\.1[4-7]/conv/conv\.(0/conv\.0\.0|2)/Conv"]
    plain = run_pass("lowrank", m, {"nodes": sel, "energy": 0.9})
    calib = as_calibration(imagenet_samples(32, seed=0), m)
    aware = run_pass("lowrank", m, {"nodes": sel, "energy": 0.9, "data_aware": True}, calib, evaluate=False)
    assert len(plain.report.applied) == len(aware.report.applied) == 4
    assert plain.report.size_after < 0.83 * plain.report.size_before  # measured 0.814
    a_plain, a_aware = agreement(mobilenet, plain.model), agreement(mobilenet, aware.model)
    assert a_plain >= 0.58 and a_aware >= 0.72 and a_aware > a_plain  # measured 0.708 and 0.854


@pytest.mark.slow
@pytest.mark.parametrize("cfg,max_ratio,min_agree", [
    ({"bits": 4}, 0.145, 0.25),  # measured: 13992273 -> 1938775 bytes (0.139), agreement 0.375 (48 samples)
    ({"bits": 6}, 0.21, 0.68),  # measured: 2815496 bytes (0.201), agreement 0.79
    ({"bits": 6, "granularity": "per_channel"}, 0.42, 0.88),  # measured: 5554586 bytes (0.397), agreement 0.958
])
def test_palettize_on_mobilenetv2(mobilenet, cfg, max_ratio, min_agree):
    m = mobilenet[0]
    r = run_pass("palettize", m, cfg)
    # 52 convs + Gemm: the first conv and small depthwise convs are under min_elements; per channel, the expand
    # convs and depthwise convs are skipped too (64 LUT entries per channel would outweigh the weight)
    assert len(r.report.applied) >= (20 if cfg.get("granularity") == "per_channel" else 45)
    assert r.report.size_after < max_ratio * r.report.size_before
    assert agreement(mobilenet, r.model) >= min_agree
