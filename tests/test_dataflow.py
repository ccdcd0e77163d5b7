"""Real data through every stage for models as they come from the wild: a fixed batch of 1 (torch.onnx.export without
dynamic_axes), scalar inputs, recurrent state with its batch on axis 1, an integer input that selects a branch, and
real samples (never zeros, unless there is no data at all) for timing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from edgeopt import cli
from edgeopt.calibration import CalibrationError, as_calibration, as_sample, model_inputs, per_sample_layout
from edgeopt.fidelity import run, run_feeds, session

torch = pytest.importorskip("torch")


def _export(module, args, path: Path, names: list[str], outputs: list[str], dynamic_axes=None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, input_names=names, output_names=outputs,
                          dynamic_axes=dynamic_axes)
    return path


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class _Gru(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.GRU(8, 16, num_layers=2, batch_first=True)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x, h0):
        y, h = self.rnn(x, h0)
        return self.fc(y), h


class _Lstm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(8, 16, batch_first=True)

    def forward(self, x, h0, c0):
        y, (h, c) = self.rnn(x, (h0, c0))
        return y, h, c


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x, gain):
        return self.fc(x) * gain


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tmp_path_factory.mktemp("dataflow")


@pytest.fixture(scope="module")
def fixed_batch_1(work) -> tuple[Path, Path]:
    """A classifier exported with a fixed batch of 1 and a folder of 24 samples, one [1, 3, 8, 8] file each."""
    model = _export(_Classifier(), torch.randn(1, 3, 8, 8), work / "fb1.onnx", ["x"], ["y"])
    cal = work / "fb1-cal"
    cal.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        np.save(cal / f"{i:03d}.npy", rng.standard_normal((1, 3, 8, 8)).astype(np.float32))
    return model, cal


@pytest.fixture(scope="module")
def gru(work) -> tuple[Path, Path]:
    """A GRU with its state h0 [layers=2, batch=1, hidden=16] (batch on axis 1) and a folder of per-sample .npz."""
    model = _export(_Gru(), (torch.randn(1, 5, 8), torch.randn(2, 1, 16)), work / "gru.onnx", ["x", "h0"], ["out", "hN"])
    cal = work / "gru-cal"
    cal.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        np.savez(cal / f"{i:03d}.npz", x=rng.standard_normal((1, 5, 8)).astype(np.float32),
                 h0=rng.standard_normal((2, 1, 16)).astype(np.float32))
    return model, cal


@pytest.fixture(scope="module")
def scalar(work) -> tuple[Path, Path]:
    """A model with a scalar (rank-0) gain input and a folder of per-sample .npz."""
    model = _export(_Scaled(), (torch.randn(1, 16), torch.tensor(2.0)), work / "scalar.onnx", ["x", "gain"], ["y"])
    cal = work / "scalar-cal"
    cal.mkdir()
    rng = np.random.default_rng(2)
    for i in range(12):
        np.savez(cal / f"{i:03d}.npz", x=rng.standard_normal((1, 16)).astype(np.float32),
                 gain=np.array(rng.uniform(0.5, 2.0), np.float32))
    return model, cal


def _mode_model(path: Path) -> Path:
    """y = x @ W when the int64 scalar input ``rate`` is 16000; any other rate takes a branch that cannot run (a
    Reshape of 16 values to [3, 7]), as a model whose mode input selects a branch does on a wrong mode."""
    rng = np.random.default_rng(3)
    w = nh.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W")
    then = oh.make_graph([oh.make_node("Constant", [], ["Wc"], value=w), oh.make_node("MatMul", ["x", "Wc"], ["t"])],
                         "then", [], [oh.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])])
    other = oh.make_graph([oh.make_node("Reshape", ["x", "bad"], ["e"])], "else", [],
                          [oh.make_tensor_value_info("e", TensorProto.FLOAT, None)],
                          initializer=[nh.from_array(np.array([3, 7], np.int64), "bad")])
    g = oh.make_graph([oh.make_node("Equal", ["rate", "r16k"], ["cond"]),
                       oh.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)], "mode",
                      [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
                       oh.make_tensor_value_info("rate", TensorProto.INT64, [])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                      initializer=[nh.from_array(np.array(16000, np.int64), "r16k")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def _build(model: Path, out: Path, *args: str) -> int:
    return cli.main(["build", str(model), *args, "-o", str(out)])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# --------------------------------------------------------------------------- 1. fixed batch 1


@pytest.mark.parametrize("target,extra,needs", [
    ("x86-cpu", ["--precision", "int8"], None),
    ("x86-cpu", ["--backend", "openvino", "--precision", "int8"], "openvino"),
    ("android-mid", ["--precision", "int8"], "ai_edge_litert"),
    ("mcu-cortex-m7", ["--max-accuracy-drop", "0.5"], "ai_edge_litert"),
    ("ios", [], "coremltools"),
    ("gpu-server", [], None),
])
def test_fixed_batch_1_builds_on_every_backend(fixed_batch_1, tmp_path, capsys, target, extra, needs):
    """A batch-1 export with 24 calibration samples builds (exit 0) on each backend: no stage feeds a batch of 24."""
    if needs:
        pytest.importorskip(needs)
    model, cal = fixed_batch_1
    rc = _build(model, tmp_path / "out", "--target", target, "--calib", str(cal), *extra)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Got invalid dimensions" not in err
    man = _manifest(tmp_path / "out")
    assert "24 evaluation sample" in man["fidelity"] or man["fidelity"].startswith("not measured")


def test_fixed_batch_feeds_exact_batches_and_drops_the_filler(tmp_path):
    """A model fixed to batch 4 with 10 samples: every batch has exactly 4 samples, and run/run_feeds return the 10
    outputs the model gives sample by sample (the filler samples' outputs are dropped)."""
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])
    w = nh.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "w")
    m = oh.make_model(oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                      opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    data = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    cd = as_calibration(data, m)
    assert len(cd) == 10 and cd.fixed_batch == 4 and not cd.per_sample
    assert all(len(b["x"]) == 4 for b in cd.batches(1)) and all(len(b["x"]) == 4 for b in cd.batches(16))
    expect = data @ np.arange(6, dtype=np.float32).reshape(3, 2)
    sess = session(m)
    np.testing.assert_allclose(run(m, cd)[0], expect, rtol=1e-5)
    np.testing.assert_allclose(run_feeds(sess, cd.feeds())[0], expect, rtol=1e-5)
    np.testing.assert_allclose(run(m, cd, limit=3)[0], expect[:3], rtol=1e-5)


# --------------------------------------------------------------------------- 2. scalar inputs, recurrent state


def test_recurrent_state_is_per_sample_data(gru):
    """h0 [2, 1, 16] beside x [1, 5, 8]: per-sample layout; each .npz is one sample in the model's exact shapes, fed
    as is, and outputs join to one row per sample (hN [2, 1, 16] stacked to [N, 2, 1, 16])."""
    model, cal = gru
    m = onnx.load(model)
    assert per_sample_layout(model_inputs(m))
    cd = as_calibration(cal, m)
    assert len(cd) == 12 and cd.per_sample
    assert {k: v.shape for k, v in cd.first().items()} == {"x": (1, 5, 8), "h0": (2, 1, 16)}
    out, hn = run(m, cd)
    assert out.shape == (12, 5, 4) and hn.shape == (12, 2, 1, 16)
    sess = session(m)
    one = sess.run(None, {k: v[3] for k, v in cd.feeds().items()})
    np.testing.assert_allclose(hn[3], one[1], rtol=1e-5)
    np.testing.assert_allclose(run_feeds(sess, cd.subset(4).feeds())[1], hn[:4], rtol=1e-5)
    # several samples stacked on a new leading axis in one .npz are the same data
    feeds = cd.feeds()
    stacked = as_calibration(dict(feeds), m)
    assert len(stacked) == 12
    np.testing.assert_array_equal(stacked.feeds()["h0"], feeds["h0"])


def test_recurrent_state_of_the_wrong_shape_is_one_line(gru, tmp_path, capsys):
    model, _ = gru
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "0.npz", x=np.zeros((1, 5, 8), np.float32), h0=np.zeros((1, 1, 16), np.float32))
    with pytest.raises(CalibrationError, match="h0"):
        as_calibration(bad, onnx.load(model))
    assert _build(model, tmp_path / "out", "--target", "x86-cpu", "--calib", str(bad)) == 2
    assert "h0" in _one_line_error(capsys)


@pytest.mark.parametrize("extra", [["--precision", "int8"], []])
def test_recurrent_model_builds_with_int8_and_planning(gru, tmp_path, capsys, extra):
    """The GRU builds on x86-cpu forced to int8 and when planned (sensitivity, int8 settings choice, validation)."""
    model, cal = gru
    rc = _build(model, tmp_path / "out", "--target", "x86-cpu", "--calib", str(cal), *extra)
    assert rc == 0, capsys.readouterr().err
    man = _manifest(tmp_path / "out")
    assert man["fidelity"].startswith("measured on 12 evaluation sample")
    assert man["numerics"]["timed_with"] == "the first evaluation sample"


def test_lstm_with_dynamic_axes_is_per_sample(work):
    """x [B, T, 8] beside h0/c0 [1, B, 16]: the leading dims differ, so samples are not stacked on axis 0."""
    model = _export(_Lstm(), (torch.randn(1, 5, 8), torch.randn(1, 1, 16), torch.randn(1, 1, 16)), work / "lstm.onnx",
                    ["x", "h0", "c0"], ["y", "hN", "cN"],
                    dynamic_axes={"x": {0: "B"}, "h0": {1: "B"}, "c0": {1: "B"}, "y": {0: "B"}, "hN": {1: "B"},
                                  "cN": {1: "B"}})
    m = onnx.load(model)
    rng = np.random.default_rng(4)
    samples = [{"x": rng.standard_normal((1, 5, 8)).astype(np.float32),
                "h0": rng.standard_normal((1, 1, 16)).astype(np.float32),
                "c0": rng.standard_normal((1, 1, 16)).astype(np.float32)} for _ in range(6)]
    cd = as_calibration(lambda: samples, m)
    assert cd.per_sample and len(cd) == 6
    y, hn, cn = run(m, cd)
    assert y.shape == (6, 5, 16) and hn.shape == (6, 1, 16) and cn.shape == (6, 1, 16)
    ref = session(m).run(None, samples[5])
    np.testing.assert_allclose(y[5], ref[0][0], rtol=1e-5)


def test_scalar_input_is_per_sample_data(scalar, tmp_path, capsys):
    """A rank-0 input: each .npz holds gain as a 0-d array (or [N] stacked); every stage feeds it as a 0-d array."""
    model, cal = scalar
    m = onnx.load(model)
    cd = as_calibration(cal, m)
    assert cd.per_sample and len(cd) == 12 and cd.first()["gain"].shape == ()
    y = run(m, cd)[0]
    assert y.shape == (12, 4)
    feeds = cd.feeds()
    np.savez(tmp_path / "stacked.npz", **feeds)  # x [12, 1, 16], gain [12]
    assert len(as_calibration(tmp_path / "stacked.npz", m)) == 12
    assert _build(model, tmp_path / "out", "--target", "x86-cpu", "--precision", "int8", "--calib", str(cal)) == 0, \
        capsys.readouterr().err
    assert _build(model, tmp_path / "out2", "--target", "x86-cpu", "--calib", str(cal)) == 0, capsys.readouterr().err
    # every backend that runs on this host: OpenVINO and TFLite take the 0-d input as 0-d (calibration included)
    for target, extra in (("x86-cpu", ["--backend", "openvino", "--precision", "int8"]),
                          ("android-mid", ["--precision", "int8"]), ("android-mid", [])):
        rc = _build(model, tmp_path / f"o-{target}-{len(extra)}", "--target", target, *extra, "--calib", str(cal))
        assert rc == 0, (target, extra, capsys.readouterr().err)
    # Core ML takes no rank-0 inputs: one line naming the input, from the pre-flight
    assert _build(model, tmp_path / "o-ios", "--target", "ios", "--calib", str(cal)) == 2
    line = _one_line_error(capsys)
    assert "rank-0" in line and "gain" in line, line


# --------------------------------------------------------------------------- 3. real samples for timing


def test_mode_input_is_timed_and_smoke_run_on_real_samples(work, tmp_path, capsys):
    """A rate input selecting a branch: without data the zeros smoke run fails in one line saying what was fed; with
    --inputs or --calib the build succeeds and the manifest says what was timed."""
    model = _mode_model(work / "mode.onnx")
    assert _build(model, tmp_path / "none", "--target", "x86-cpu") == 2
    line = _one_line_error(capsys)
    assert "zeros" in line and "--inputs" in line
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((1, 16)).astype(np.float32), rate=np.array(16000, np.int64))
    assert _build(model, tmp_path / "a", "--target", "x86-cpu", "--inputs", str(tmp_path / "in.npz")) == 0, \
        capsys.readouterr().err
    assert _manifest(tmp_path / "a")["numerics"]["timed_with"] == "the given --inputs"
    cal = tmp_path / "cal"
    cal.mkdir()
    for i in range(6):
        np.savez(cal / f"{i}.npz", x=rng.standard_normal((1, 16)).astype(np.float32), rate=np.array(16000, np.int64))
    assert _build(model, tmp_path / "b", "--target", "x86-cpu", "--calib", str(cal)) == 0, capsys.readouterr().err
    assert _manifest(tmp_path / "b")["numerics"]["timed_with"] == "the first evaluation sample"
    np.savez(tmp_path / "bad.npz", x=np.zeros((1, 16), np.float32))
    assert _build(model, tmp_path / "c", "--target", "x86-cpu", "--inputs", str(tmp_path / "bad.npz")) == 2
    assert "rate" in _one_line_error(capsys)


def test_without_data_the_manifest_says_zeros_were_timed(fixed_batch_1, tmp_path, capsys):
    model, _ = fixed_batch_1
    assert _build(model, tmp_path / "out", "--target", "x86-cpu", "--precision", "fp32") == 0, capsys.readouterr().err
    assert _manifest(tmp_path / "out")["numerics"]["timed_with"].startswith("zeros")


def test_as_sample_checks_a_single_sample(scalar, tmp_path):
    model, _ = scalar
    m = onnx.load(model)
    s = as_sample({"x": np.ones((1, 16), np.float32), "gain": np.float32(2)}, m)
    assert s["x"].shape == (1, 16) and s["gain"].shape == ()
    with pytest.raises(CalibrationError, match="NaN"):
        as_sample({"x": np.full((1, 16), np.nan, np.float32), "gain": np.float32(2)}, m)
    with pytest.raises(CalibrationError, match="does not exist"):
        as_sample(tmp_path / "missing.npz", m)


# --------------------------------------------------------------------------- 4. shape inference in the int8 quantizer


def test_quantizer_shape_inference_failure_retries_then_is_one_pass_error(gru, monkeypatch):
    """onnxruntime's quantizer runs ONNX shape inference on the model: a first InferenceError is retried without the
    model's declared shapes; a persistent one is a one-line PassError naming the cause, not an InferenceError."""
    from edgeopt.passes import PassError
    from edgeopt.passes import int8 as p

    model, cal = gru
    m = onnx.load(model)
    cd = as_calibration(cal, m)
    real = onnx.shape_inference.infer_shapes_path
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise onnx.shape_inference.InferenceError("[ShapeInferenceError] (op_type:GRU): inferred shape differs")
        return real(*a, **k)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", flaky)
    nodes = [n.name for n in m.graph.node]
    q = p.quantize(m, nodes, p.Config(), cd)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node) and calls["n"] >= 2

    def broken(*a, **k):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] (op_type:GRU): inferred shape differs")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", broken)
    with pytest.raises(PassError, match="shape inference") as e:
        p.quantize(m, nodes, p.Config(), cd)
    assert "\n" not in str(e.value)
    p._RANGES.clear()
    with pytest.raises(PassError, match="shape inference"):
        p.activation_ranges(m, p.Config(), cd)


def test_profile_takes_the_same_inputs_as_build(work, tmp_path, capsys):
    """profile --inputs feeds the artifact one real sample (a scalar as a 0-d array); a wrongly shaped one is a
    one-line error."""
    model = _mode_model(work / "mode-profile.onnx")
    np.savez(tmp_path / "in.npz", x=np.ones((1, 16), np.float32), rate=np.array(16000, np.int64))
    out = tmp_path / "out"
    assert _build(model, out, "--target", "x86-cpu", "--inputs", str(tmp_path / "in.npz")) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["profile", str(out), "--inputs", str(tmp_path / "in.npz"), "--no-save", "--repeats", "3",
                     "--warmup", "1"]) == 0, capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", x=np.ones((2, 16), np.float32), rate=np.array(16000, np.int64))
    assert cli.main(["profile", str(out), "--inputs", str(tmp_path / "bad.npz"), "--no-save"]) == 2
    assert "shape" in _one_line_error(capsys)


def test_suffix_runner_refuses_per_sample_feeds_of_a_scalar_only_model():
    """Sensitivity's fast path must not run per-sample feeds (a scalar input stacked to [N]) as one batch."""
    from edgeopt._suffix import SuffixRunner, Unsupported

    w = nh.from_array(np.ones((16, 4), np.float32), "w")
    shape = nh.from_array(np.array([1, 16], np.int64), "shape")
    g = oh.make_graph([oh.make_node("Expand", ["gain", "shape"], ["e"]), oh.make_node("MatMul", ["e", "w"], ["y"])],
                      "g", [oh.make_tensor_value_info("gain", TensorProto.FLOAT, [])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, shape])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    cd = as_calibration({"gain": np.linspace(0.5, 2, 5, dtype=np.float32)}, m)
    assert cd.per_sample and len(cd) == 5
    with pytest.raises(Unsupported):
        SuffixRunner(m, cd.feeds(), [m.graph.node[1].name or "MatMul"])
    assert run(m, cd)[0].shape == (5, 4)


def test_sensitivity_fast_path_runs_fixed_batch_slices(fixed_batch_1, monkeypatch):
    """On a batch-1 export (16 and 7 samples measured) the fast path is taken, runs each stage one batch-1 slice at
    a time, and gives what running every simulated model whole gives."""
    import edgeopt.sensitivity as sens

    model, cal = fixed_batch_1
    m = onnx.load(model)
    cd = as_calibration(cal, m)
    for samples in (16, 7):
        monkeypatch.setattr(sens, "_WHOLE_MODEL", True)
        whole = sens.measure(m, cd, samples=samples, options=("int8", "fp16", "wint8"), cache=False)
        monkeypatch.setattr(sens, "_WHOLE_MODEL", False)
        fast = sens.measure(m, cd, samples=samples, options=("int8", "fp16", "wint8"), cache=False)
        assert sens._last_stats.get("fast", 0) > 0, dict(sens._last_stats)
        assert list(whole) == list(fast)
        for key, a in whole.items():
            assert (a.applicable, a.flips) == (fast[key].applicable, fast[key].flips), key
            assert fast[key].noise == pytest.approx(a.noise, rel=1e-3, abs=1e-9), key


def test_suffix_runner_fills_the_last_fixed_batch_slice():
    from edgeopt._suffix import SuffixRunner

    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])
    w1 = nh.from_array(np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32), "w1")
    w2 = nh.from_array(np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32), "w2")
    g = oh.make_graph([oh.make_node("MatMul", ["x", "w1"], ["h"], name="a"), oh.make_node("Relu", ["h"], ["r"], name="b"),
                       oh.make_node("MatMul", ["r", "w2"], ["y"], name="c")], "g", [x], [y], [w1, w2])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    feeds = {"x": np.random.default_rng(2).standard_normal((10, 3)).astype(np.float32)}
    r = SuffixRunner(m, feeds, ["c"])
    assert r.batch == 4 and [real for _, real in r.slices] == [4, 4, 2]
    sim = onnx.ModelProto()
    sim.CopyFrom(m)
    sim.graph.initializer[1].CopyFrom(nh.from_array(2 * nh.to_array(m.graph.initializer[1]), "w2"))
    out = r.run(sim, "c", False)
    np.testing.assert_allclose(out, run_feeds(session(sim), feeds)[0], rtol=1e-5)
    assert out.shape == (10, 2)


def test_per_sample_data_with_labels(gru, tmp_path, capsys):
    """--labels with --calib re-reads the calibration data with its labels: per-sample data keeps its layout."""
    model, cal = gru
    m = onnx.load(model)
    cd = as_calibration(cal, m)
    again = as_calibration(cd, m, labels=np.arange(12) % 4)
    assert again.per_sample and len(again) == 12 and again.labels is not None
    np.save(tmp_path / "labels.npy", np.arange(12) % 4)
    rc = _build(model, tmp_path / "out", "--target", "x86-cpu", "--calib", str(cal), "--labels",
                str(tmp_path / "labels.npy"))
    assert rc == 0, capsys.readouterr().err
