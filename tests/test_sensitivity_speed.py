"""Sensitivity's fast path (edited span + tail from cached reference activations) gives what running every simulated
model whole gives."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import init, make_model, vi
from onnx import helper

import edgeopt._suffix as suffix
import edgeopt.sensitivity as sens
from edgeopt.calibration import as_calibration
from edgeopt.inputs import BuildInputs


def _both(monkeypatch, model, calib, **kw):
    monkeypatch.setattr(sens, "_WHOLE_MODEL", True)
    whole = sens.measure(model, calib, cache=False, **kw)
    monkeypatch.setattr(sens, "_WHOLE_MODEL", False)
    fast = sens.measure(model, calib, cache=False, **kw)
    return whole, fast, dict(sens._last_stats)


def _assert_same(whole, fast):
    assert list(whole) == list(fast)
    for key, a in whole.items():
        b = fast[key]
        assert (a.applicable, a.reason, a.flips) == (b.applicable, b.reason, b.flips), key
        assert b.noise == pytest.approx(a.noise, rel=1e-3, abs=1e-9), key


@pytest.fixture(scope="module")
def digits():
    return BuildInputs.default_model()


def test_fast_path_matches_whole_model_on_digits(monkeypatch, digits):
    whole, fast, stats = _both(monkeypatch, digits.model, digits.calib)
    _assert_same(whole, fast)
    measured = sum(s.applicable for s in fast.values())
    assert measured > 20 and stats.get("fast") == measured, stats  # every applicable one took the fast path
    assert stats.get("reference runs") == 2, stats  # one optimized, one as written (for the QDQ simulations)


def _residual_model(seed: int = 0):
    """conv -> relu -> conv -> relu -> conv, + the first relu (skip), -> relu -> pool -> Gemm."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r0"], ["s"], name="skip"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="head", transB=1),
    ]
    inits = [init("w0", w(8, 3, 3, 3)), init("b0", w(8) * 0.1), init("w1", w(12, 8, 3, 3)), init("b1", w(12) * 0.1),
             init("w2", w(8, 12, 3, 3)), init("b2", w(8) * 0.1), init("wg", w(10, 8)), init("bg", w(10) * 0.1)]
    model = make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", None)], inits)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    return model, as_calibration(x, model)


def test_fast_path_matches_whole_model_on_a_residual_graph(monkeypatch):
    model, calib = _residual_model()
    whole, fast, stats = _both(monkeypatch, model, calib)
    _assert_same(whole, fast)
    measured = sum(s.applicable for s in fast.values())
    assert measured >= 10 and stats.get("fast") == measured, stats
    assert any(s.noise > 0 for s in fast.values())


def test_chunks_within_the_budget_and_falls_back_on_failure(monkeypatch):
    model, calib = _residual_model(1)
    monkeypatch.setattr(sens, "_WHOLE_MODEL", True)
    whole = sens.measure(model, calib, options=("int8", "fp16", "channel"), cache=False)
    monkeypatch.setattr(sens, "_WHOLE_MODEL", False)
    # a budget too small for any tensor: reference runs per layer (per mode), same results
    monkeypatch.setattr(suffix, "BUDGET", 1)
    chunked = sens.measure(model, calib, options=("int8", "fp16", "channel"), cache=False)
    assert sens._last_stats.get("reference runs") == 6, sens._last_stats  # conv1, conv2, head (conv0 reads x)
    _assert_same(whole, chunked)

    # whatever goes wrong in the fast path, the model runs whole
    def broken(self, sim, layer, exact):
        raise RuntimeError("boom")

    monkeypatch.setattr(suffix.SuffixRunner, "_run", broken)
    fallen = sens.measure(model, calib, options=("int8", "fp16", "channel"), cache=False)
    assert "fast" not in sens._last_stats and any("boom" in k for k in sens._last_stats), sens._last_stats
    _assert_same(whole, fallen)


def test_unsupported_models_run_whole(monkeypatch):
    model, calib = _residual_model(2)
    from onnx import numpy_helper

    # a QDQ model already: every simulation runs as written, whole
    q = helper.make_node("QuantizeLinear", ["x", "qs", "qz"], ["xq"], name="q")
    dq = helper.make_node("DequantizeLinear", ["xq", "qs", "qz"], ["xd"], name="dq")
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "qs"),
                                    numpy_helper.from_array(np.uint8(128), "qz")])
    model.graph.node[0].input[0] = "xd"
    model.graph.node.insert(0, dq)
    model.graph.node.insert(0, q)
    whole, fast, stats = _both(monkeypatch, model, calib, options=("int8", "fp16"))
    _assert_same(whole, fast)
    assert "fast" not in stats and any(k.startswith("whole model") for k in stats), stats
