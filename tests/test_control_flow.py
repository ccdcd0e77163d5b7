"""Control flow in real (torch-exported) models: ``If``/``Loop`` static at the input shapes are folded into the
graph, data-dependent ones stay (onnxruntime runs them, TFLite/Core ML refuse them in one line), and nothing from
onnxruntime's logger reaches stderr."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgeopt import cli  # noqa: E402
from edgeopt.graph import analyze  # noqa: E402
from edgeopt.passes.cleanup import normalize  # noqa: E402
from edgeopt.passes.fold_control import fold_control_flow  # noqa: E402

nn = torch.nn


class ShapeIf(nn.Module):
    """``if x.shape[1] > 16``: static once x's shape is known; both branches run on any width >= 16."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        if x.shape[1] > 16:
            return self.a(x[:, :16]) * 2.0
        return torch.relu(self.b(x[:, -16:])) - 1.0


class ValueIf(nn.Module):
    """``if x.sum() > 0``: the condition is computed from the input's values."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 8)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        if bool(x.sum() > 0):
            return self.a(x)
        return self.b(x) * 0.5


class Stream(nn.Module):
    """A streaming LSTM with state inputs/outputs, a shape-dependent window and a value-dependent state reset."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.out = nn.Linear(24, 4)

    def forward(self, x, h0, c0):
        if x.shape[1] > 8:
            x = x[:, -8:]
        if bool(c0.abs().sum() > 100.0):
            c0 = c0 * 0.0
        y, (h, c) = self.lstm(x, (h0, c0))
        return self.out(y), h, c


class WidthSwitch(nn.Module):
    """The branch not taken at width 32 cannot run at width 32 (shape inference of the whole If fails on it)."""

    def forward(self, x):
        if x.shape[1] == 14:
            return x.reshape(1, 7, 2).sum(2)
        return x[:, :7] * 3.0


class StepLoop(nn.Module):
    """``for t in range(x.shape[1])``: a Loop whose trip count is static once x's shape is known."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(16, 8)

    def forward(self, x, h):
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(x[:, t]) + h) + t
        return h


def _export(module, args, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(module.eval()), args, str(path), dynamo=False, opset_version=17, **kw)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("control_flow")
    return {
        "shape_if": _export(ShapeIf(), (torch.randn(1, 32),), d / "shape_if.onnx", input_names=["x"],
                            output_names=["y"], dynamic_axes={"x": {1: "width"}}),
        "value_if": _export(ValueIf(), (torch.randn(1, 32),), d / "value_if.onnx", input_names=["x"], output_names=["y"]),
        "stream": _export(Stream(), (torch.randn(1, 10, 16), torch.zeros(1, 1, 24), torch.zeros(1, 1, 24)),
                          d / "stream.onnx", input_names=["x", "h0", "c0"], output_names=["y", "hN", "cN"],
                          dynamic_axes={"x": {1: "T"}}),
        "width_switch": _export(WidthSwitch(), (torch.randn(1, 14),), d / "width_switch.onnx", input_names=["x"],
                                output_names=["y"], dynamic_axes={"x": {1: "width"}}),
        "loop": _export(StepLoop(), (torch.randn(1, 5, 16), torch.zeros(1, 8)), d / "loop.onnx", input_names=["x", "h"],
                        output_names=["hN"], dynamic_axes={"x": {1: "T"}}),
    }


def _run(model: onnx.ModelProto, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _pin(model: onnx.ModelProto, shapes) -> None:
    for vi in model.graph.input:
        if vi.name in shapes:
            for d, v in zip(vi.type.tensor_type.shape.dim, shapes[vi.name]):
                d.Clear()
                d.dim_value = v


@pytest.mark.parametrize("width", [32, 16])
def test_static_if_folded_by_normalize(models, width):
    """Shapes fixed (as the TFLite/Core ML translators fix them): normalize inlines the taken branch."""
    original = onnx.load(str(models["shape_if"]))
    assert "If" in _ops(original)
    m = onnx.ModelProto()
    m.CopyFrom(original)
    _pin(m, {"x": [1, width]})
    done = normalize(m)
    assert done["control"] and "If" not in _ops(m)
    onnx.checker.check_model(m, full_check=True)
    x = np.random.default_rng(width).standard_normal((1, width)).astype(np.float32)
    want, got = _run(original, {"x": x}), _run(m, {"x": x})
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    assert ("Relu" in _ops(m)) == (width <= 16)  # the else branch, for 16


def test_static_if_folded_with_given_shapes_pins_the_inputs(models):
    original = onnx.load(str(models["stream"]))
    m = onnx.ModelProto()
    m.CopyFrom(original)
    folded = fold_control_flow(m, {"x": [1, 10, 16]})
    assert len(folded) == 1 and _ops(m).count("If") == 1  # the value-dependent state reset stays
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [1, 10, 16]
    onnx.checker.check_model(m, full_check=True)
    rng = np.random.default_rng(1)
    for scale in (0.1, 50.0):  # both sides of the state reset
        feeds = {"x": rng.standard_normal((1, 10, 16)).astype(np.float32),
                 "h0": rng.standard_normal((1, 1, 24)).astype(np.float32),
                 "c0": (scale * rng.standard_normal((1, 1, 24))).astype(np.float32)}
        for w, g in zip(_run(original, feeds), _run(m, feeds)):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


def test_value_dependent_if_stays(models):
    m = onnx.load(str(models["value_if"]))
    assert normalize(m)["control"] == []
    assert "If" in _ops(m)
    a = analyze(models["value_if"])
    assert [ly.op_type for ly in a.layers].count("If") == 1


def test_analyze_folds_and_keeps_shapes(models):
    m = onnx.load(str(models["stream"]))
    a = analyze(models["stream"], {"x": [1, 10, 16]}, model=m)
    ops = [ly.op_type for ly in a.layers]
    assert ops.count("If") == 1 and "LSTM" in ops
    assert any("folded" in n for n in a.notes)
    lstm = next(ly for ly in a.layers if ly.op_type == "LSTM")
    assert lstm.output_shapes[0] == [8, 1, 1, 24]  # the window the folded branch cut, seen by shape inference
    assert a.outputs["y"] == [1, 8, 4]
    assert _ops(m).count("If") == 1  # the model given is the one analysed (and built)


def test_untaken_branch_invalid_at_these_shapes(models):
    """Folding comes before shape inference: the branch a width of 32 does not take (a reshape to 7x2) is gone."""
    a = analyze(models["width_switch"], {"x": [1, 32]})
    ops = [ly.op_type for ly in a.layers]
    assert "If" not in ops and "Reshape" not in ops and ops[-1] == "Mul" and a.outputs["y"] == [1, 7]


def test_torch_loop_unrolled(models):
    original = onnx.load(str(models["loop"]))
    assert "Loop" in _ops(original)
    m = onnx.ModelProto()
    m.CopyFrom(original)
    assert fold_control_flow(m, {"x": [1, 5, 16]}) and "Loop" not in _ops(m)
    assert _ops(m).count("Gemm") == 5 and len([t for t in m.graph.initializer if len(t.dims) == 2]) == 1  # one weight
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 5, 16)).astype(np.float32),
             "h": np.ones((1, 8), np.float32)}
    np.testing.assert_allclose(_run(m, feeds)[0], _run(original, feeds)[0], rtol=0, atol=1e-6)
    a = analyze(models["loop"], {"x": [1, 5, 16]})
    assert [ly.op_type for ly in a.layers].count("Gemm") == 5 and a.outputs["hN"] == [1, 8]


def test_dynamo_exported_cond_folds(tmp_path):
    """torch.export's ``torch.cond`` on a shape (the dynamo exporter, which needs onnxscript)."""
    pytest.importorskip("onnxscript")

    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 8)

        def forward(self, x):
            return torch.cond(x.shape[1] > 16, lambda t: self.a(t[:, :16]) * 2, lambda t: torch.relu(self.a(t[:, -16:])), (x,))

    path = tmp_path / "cond.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Cond(), (torch.randn(1, 32),), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes={"x": {1: torch.export.Dim("w", min=2, max=1024)}})
    original = onnx.load(str(path))
    assert "If" in _ops(original)
    for width in (32, 16):
        m = onnx.ModelProto()
        m.CopyFrom(original)
        assert fold_control_flow(m, {"x": [1, width]}) and "If" not in _ops(m)
        x = np.random.default_rng(width).standard_normal((1, width)).astype(np.float32)
        np.testing.assert_allclose(_run(m, {"x": x})[0], _run(original, {"x": x})[0], rtol=0, atol=1e-6)


def test_nested_static_ifs_and_name_collisions():
    """Two static Ifs whose branches define the same names (one holding a static If of its own): all fold, the
    second copy renamed."""
    vi = helper.make_tensor_value_info

    def branch(tag: str, nested: bool) -> onnx.GraphProto:
        nodes = [helper.make_node("Add", ["x", "one"], ["t"], name="add")]
        if nested:
            inner_then = helper.make_graph([helper.make_node("Mul", ["t", "x"], ["u"], name="mul")], "inner_then", [],
                                           [vi("u", TensorProto.FLOAT, [1, 4])])
            inner_else = helper.make_graph([helper.make_node("Sub", ["t", "x"], ["u2"], name="sub")], "inner_else", [],
                                           [vi("u2", TensorProto.FLOAT, [1, 4])])
            nodes.append(helper.make_node("If", ["yes"], ["r"], then_branch=inner_then, else_branch=inner_else,
                                          name="inner"))
        else:
            nodes.append(helper.make_node("Sigmoid", ["t"], ["r"], name="sig"))
        return helper.make_graph(nodes, f"then_{tag}", [], [vi("r", TensorProto.FLOAT, [1, 4])])

    other = helper.make_graph([helper.make_node("Neg", ["x"], ["n"], name="neg")], "else", [],
                              [vi("n", TensorProto.FLOAT, [1, 4])])
    g = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"], start=1), helper.make_node("ReduceMax", ["s"], ["w"], keepdims=0),
         helper.make_node("Greater", ["w", "two"], ["c"]),
         helper.make_node("If", ["c"], ["y1"], then_branch=branch("a", True), else_branch=other, name="if_a"),
         helper.make_node("If", ["c"], ["y2"], then_branch=branch("b", False), else_branch=other, name="if_b"),
         helper.make_node("Add", ["y1", "y2"], ["z"], name="sum")],
        "g", [vi("x", TensorProto.FLOAT, [1, 4])], [vi("z", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.array(2, np.int64), "two"),
                     numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                     numpy_helper.from_array(np.array(True), "yes")])
    original = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    original.ir_version = 8
    m = onnx.ModelProto()
    m.CopyFrom(original)
    assert fold_control_flow(m) == ["if_a", "if_b", "inner"]
    assert "If" not in _ops(m)
    onnx.checker.check_model(m, full_check=True)
    names = [n.name for n in m.graph.node]
    outputs = [o for n in m.graph.node for o in n.output]
    assert len(set(names)) == len(names) and len(set(outputs)) == len(outputs)
    x = np.array([[-1.0, 0.5, 2.0, -3.0]], np.float32)
    np.testing.assert_allclose(_run(m, {"x": x})[0], _run(original, {"x": x})[0], rtol=0, atol=1e-6)


def _loop_model(trips: int) -> onnx.ModelProto:
    """acc = x; for i in range(trips): acc = acc * 2 + i; scan out acc."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["acc_in", "two"], ["m"]),
         helper.make_node("Add", ["m", "fi"], ["acc_out"]),
         helper.make_node("Identity", ["acc_out"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("scan", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    g = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
         helper.make_node("Add", ["n", "trip_extra"], ["trips"]),
         helper.make_node("Loop", ["trips", "", "x"], ["final", "stacked"], body=body, name="loop")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("final", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("stacked", TensorProto.FLOAT, [trips, 2, 3])],
        initializer=[numpy_helper.from_array(np.array(0, np.int64), "zero"),
                     numpy_helper.from_array(np.array(trips - 2, np.int64), "trip_extra")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("trips,unrolled", [(3, True), (40, False)])
def test_loop_with_static_trip_count(trips, unrolled):
    original = _loop_model(trips)
    m = onnx.ModelProto()
    m.CopyFrom(original)
    folded = fold_control_flow(m)
    assert bool(folded) == unrolled and ("Loop" in _ops(m)) != unrolled
    onnx.checker.check_model(m, full_check=True)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for w, g in zip(_run(original, {"x": x}), _run(m, {"x": x})):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


def test_long_static_loop_refused_by_tflite(tmp_path, capfd):
    path = tmp_path / "loop40.onnx"
    onnx.save(_loop_model(40), str(path))
    capfd.readouterr()
    rc, out, err = _cli(capfd, "plan", path, "--target", "android-mid")
    assert rc == 2, (out, err)
    assert "`Loop` of a static trip count edgeopt does not unroll (node loop: over 16 iterations or 4096 nodes" in err
    assert "tflite cannot run control flow" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _cli(capfd, "plan", path, "--target", "x86-cpu")
    assert rc == 0, (out, err)


def _cli(capfd, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def _quiet(err: str) -> None:
    """Nothing from onnxruntime's C++ logger (``[E:onnxruntime:...]``, source paths) and no traceback."""
    for mark in (":onnxruntime:", "onnxruntime_src", "sequential_executor", "Traceback"):
        assert mark not in err, err


@pytest.mark.parametrize("name,shape", [("stream", "x=1x10x16"), ("value_if", "x=1x32")])
def test_x86_cpu_analyze_plan_build_quiet(models, name, shape, capfd, tmp_path):
    capfd.readouterr()
    for argv in (["analyze", models[name], "--input-shape", shape],
                 ["plan", models[name], "--target", "x86-cpu", "--input-shape", shape],
                 ["build", models[name], "--target", "x86-cpu", "--input-shape", shape, "-o", tmp_path / "out"]):
        rc, out, err = _cli(capfd, *argv)
        assert rc == 0, (argv, out, err)
        _quiet(err)
    built = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert "If" in _ops(built)  # onnxruntime runs the value-dependent If as it is


@pytest.mark.parametrize("target,backend", [("android-mid", "tflite"), ("ios", "coreml")])
def test_value_dependent_if_refused_in_one_line(models, target, backend, capfd):
    capfd.readouterr()
    rc, out, err = _cli(capfd, "plan", models["value_if"], "--target", target, "--input-shape", "x=1x32")
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"`If` on a condition computed from input values (node /If): {backend} cannot run data-dependent control flow" \
        in lines[0]
    assert "Greater" not in lines[0]  # the ops around the If are not listed
    _quiet(err)


def test_tensorrt_runs_if_on_the_gpu_not_on_a_dla_alone(models):
    """TensorRT has conditional layers (onnx-tensorrt parses If); the DLA has none, unless it may fall back."""
    from edgeopt.backends import tensorrt
    from edgeopt.targets import load_target

    a = analyze(models["value_if"])
    gpu, dla = load_target("jetson-orin").backends
    assert tensorrt.check_ops(a, gpu) == [] and tensorrt.check_ops(a, dla) == []
    alone = dla.model_copy(update={"options": {**dla.options, "gpu_fallback": False}})
    assert alone.settings.gpu_fallback is False
    (reason,) = tensorrt.check_ops(a, alone)
    assert "tensorrt cannot run data-dependent control flow (the DLA has no conditional or loop layers" in reason


def test_static_if_plans_on_tflite(models, capfd):
    capfd.readouterr()
    rc, out, err = _cli(capfd, "plan", models["shape_if"], "--target", "android-mid", "--input-shape", "x=1x32")
    assert rc == 0, (out, err)
    assert "tflite" in out and " If " not in out
    _quiet(err)


def test_failing_run_logs_nothing(capfd):
    """A run onnxruntime fails (the taken branch cannot reshape) raises, with nothing from its C++ logger."""
    from edgeopt.fidelity import session

    then = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y1"])], "then", [],
                             [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["r"], keepdims=0), helper.make_node("Greater", ["r", "z"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
              helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(0, np.float32), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    capfd.readouterr()
    with pytest.raises(Exception, match="If"):
        session(m).run(None, {"x": np.ones((2, 3), np.float32), "s": np.array([5, 5])})
    _quiet(capfd.readouterr().err)


def test_int8_keeps_what_an_if_body_reads_from_the_outer_scope():
    """onnxruntime's quantizer folds a Relu into the next quantization range and renames the producer's output to the
    Relu's; a branch reading that name would see the tensor before the Relu.  The int8 pass routes outer reads through
    an Identity, and branch-only weights are kept (they were dropped as 'unused' before)."""
    import onnxruntime as ort

    from edgeopt.calibration import as_calibration
    from edgeopt.passes import run_pass

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * 0.1, n)
             for n, s in (("W", (64, 64)), ("W2", (64, 32)), ("W3", (64, 32)))]
    inits.append(numpy_helper.from_array(np.array(0, np.float32), "zero"))

    def branch(name, w):
        return helper.make_graph([helper.make_node("MatMul", ["h", w], [name], name=f"{name}_mm")], name, [],
                                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 32])])

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"], name="mm0"), helper.make_node("Relu", ["h0"], ["h"], name="relu"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="rs", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("t", "W2"), else_branch=branch("e", "W3"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(40, 1, 64)).astype(np.float32)
    r = run_pass("int8", m, {}, as_calibration(x.reshape(40, 64), m))
    assert "relu" in r.report.applied and any("routed through an Identity" in n for n in r.report.notes)
    ref = ort.InferenceSession(m.SerializeToString())
    q = ort.InferenceSession(r.model.SerializeToString())
    a = np.concatenate([ref.run(None, {"x": v})[0] for v in x])
    b = np.concatenate([q.run(None, {"x": v})[0] for v in x])
    snr = 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2))
    assert snr > 25, snr  # before the fix: about -1 dB (the branches read h without its Relu)
