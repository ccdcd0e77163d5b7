"""Core ML backend op coverage: each ONNX op as a small model (fixed seed), converted to an .mlpackage
through the coreml backend, then the package's ONNX equivalent (rebuilt from its saved MIL program:
the backend's ``reference()``) run in onnxruntime against the original ONNX model.

Tolerances: outputs are compared as ``max|ref - got| / max(1, max|ref|)``.  fp16 packages (fp16 rounding
after every op, as Core ML computes): measured at most 1.3e-3 (the LayerNorm/Einsum/Softmax block; one-node
models <= 1.0e-3, Exp), held to FP16_TOL = 5e-3.  fp32 packages (the translation's semantics without fp16
noise): measured at most 2e-7 (GRU), held to FP32_TOL = 1e-5.

What this checks: ONNX -> MIL (our translator and coremltools' passes, e.g. its GELU fusion) -> saved
.mlpackage -> MIL -> ONNX (our exporter) against the source model.  The exporter encodes the MIL ops'
documented semantics (e.g. resize_bilinear's sampling grids); Core ML itself only runs on macOS.
"""

from __future__ import annotations

import json
import platform

import numpy as np
import onnx
import pytest
from conftest import init, make_model, save, vi
from onnx import TensorProto, helper
from onnx.numpy_helper import to_array as onnx_numpy

from edgeopt.backends import _coreml_mil as cm
from edgeopt.backends import _ops, coreml
from edgeopt.backends.base import RuntimeUnavailable, build_artifact, open_artifact, read_manifest
from edgeopt.calibration import as_calibration
from edgeopt.errors import UnsupportedOpError
from edgeopt.fidelity import session
from edgeopt.graph import analyze
from edgeopt.planner import make_plan
from edgeopt.targets import load_target

pytest.importorskip("coremltools")

FP16_TOL = 5e-3
FP32_TOL = 1e-5


def _rng():
    return np.random.default_rng(0)


def _r(shape, scale=1.0, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _build(tmp_path, model, precision="fp16"):
    """The artifact directory of ``model`` built for ios by the coreml backend."""
    path = save(model, tmp_path / "m.onnx")
    plan = make_plan(analyze(path), load_target("ios"), backend="coreml", precision=precision, enforce_budgets=False)
    out = tmp_path / f"a_{precision}"
    build_artifact(model, plan, out)
    return out


def _error(tmp_path, model, feeds, precision="fp16"):
    """(relative max error of the package's ONNX equivalent vs ``model``, the saved MIL op types)."""
    out = _build(tmp_path, model, precision)
    runner = coreml.BACKEND.reference(read_manifest(out), out)
    assert runner is not None, "the package has no ONNX equivalent"
    got = runner.run(feeds)
    ref = session(model).run(None, feeds)
    err = 0.0
    for a, b in zip(ref, got):
        a = np.asarray(a).astype(np.float32)  # bool/int outputs: the package's are fp32 arrays
        assert a.shape == b.shape, (a.shape, b.shape)
        err = max(err, float(np.abs(a - b).max() / max(1.0, float(np.abs(a).max()))))
    ops = json.loads((out / coreml.RECORD).read_text())["validation"]["ops"]
    return err, ops


def _out(name):
    """A graph output whose type and shape come from shape inference (bool, int64, float16 outputs too)."""
    return helper.make_empty_tensor_value_info(name)


def _one(op, inputs, attrs=None, consts=(), outputs=1, opset=17, out_shape=None):
    """A one-node model: ``inputs`` are (name, array) feeds, ``consts`` (name, array) initializers."""
    names = [n for n, _ in inputs] + [n for n, _ in consts]
    outs = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, names, outs, name=f"{op.lower()}/node", **(attrs or {}))
    ins = [vi(n, list(a.shape)) for n, a in inputs]
    ovi = [_out(o) if out_shape is None else vi(o, out_shape) for o in outs]
    return make_model([node], ins, ovi, [init(n, a) for n, a in consts], opset=opset)


def _check(tmp_path, model, feeds, precisions=("fp16", "fp32")):
    errs = {}
    for p in precisions:
        errs[p], ops = _error(tmp_path, model, feeds, p)
    if "fp16" in errs:
        assert errs["fp16"] <= FP16_TOL, errs
    if "fp32" in errs:
        assert errs["fp32"] <= FP32_TOL, errs
    return errs, ops


# --------------------------------------------------------------------------- one-node models of every accepted op

X4 = (1, 4, 6, 5)


def _x(shape=X4, seed=1, scale=1.0):
    return _r(shape, scale, seed)


def _i64(v):
    return np.array(v, np.int64)


def _f32(v):
    return np.array(v, np.float32)


def _unary(op, positive=False, **attrs):
    def make():
        x = np.abs(_x()) + 0.1 if positive else _x()
        return _one(op, [("x", x)], attrs), {"x": x}
    return make


def _binary(op, positive=False):
    def make():
        x, y = _x(seed=1), _x(seed=2)
        if positive:
            x, y = np.abs(x) + 0.5, y * 0.5
        return _one(op, [("x", x), ("y", y)]), {"x": x, "y": y}
    return make


def _with_consts(op, consts, attrs=None, shape=X4, opset=17, outputs=1, out_shape=None):
    def make():
        x = _x(shape)
        return _one(op, [("x", x)], attrs, consts, outputs=outputs, opset=opset, out_shape=out_shape), {"x": x}
    return make


def _chain(nodes, consts=(), shape=X4, opset=17, out="y"):
    """A small model around one op that needs neighbours (bool/int tensors, folded shape ops)."""
    def make():
        x = _x(shape)
        m = make_model([helper.make_node(*n[:3], name=f"n{i}", **(n[3] if len(n) > 3 else {})) for i, n in enumerate(nodes)],
                       [vi("x", list(shape))], [_out(out)], [init(k, v) for k, v in consts], opset=opset)
        return m, {"x": x}
    return make


def _rnn(op, direction, hidden=5, states=False, peephole=False, layout=0, **attrs):
    """A one-node LSTM/GRU over x [s=4, b=2, I=3] (layout 0; [b, s, I] for layout 1), all outputs used."""
    gates = 4 if op == "LSTM" else 3
    d = 2 if direction == "bidirectional" else 1
    x = _x((2, 4, 3) if layout else (4, 2, 3), scale=1.5)
    consts = [("W", _r((d, gates * hidden, 3), 0.5, seed=11)), ("R", _r((d, gates * hidden, hidden), 0.5, seed=12)),
              ("B", _r((d, 2 * gates * hidden), 0.3, seed=13))]
    names = ["W", "R", "B"]
    if states or peephole:
        consts += [("h0", _r((2, d, hidden) if layout else (d, 2, hidden), 0.5, seed=14))]
        names += ["", "h0"]
        if op == "LSTM":
            consts += [("c0", _r((2, d, hidden) if layout else (d, 2, hidden), 0.5, seed=15))]
            names += ["c0"]
    if peephole:
        consts += [("P", _r((d, 3 * hidden), 0.5, seed=16))]
        names += ["P"]
    outs = ["y", "yh"] + (["yc"] if op == "LSTM" else [])
    node = helper.make_node(op, ["x", *names], outs, name=f"{op.lower()}/node", hidden_size=hidden, direction=direction,
                            layout=layout, **attrs)
    m = make_model([node], [vi("x", list(x.shape))], [_out(o) for o in outs], [init(n, v) for n, v in consts])
    return m, {"x": x}


_W = _r((6, 4, 3, 3), 0.3, seed=3)
SAMPLES = {
    **{op: _unary(op) for op in ("Abs", "Atan", "Ceil", "Cos", "Erf", "Exp", "Floor", "Identity", "Neg", "Relu",
                                 "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Tanh", "Round", "Dropout",
                                 "HardSwish")},
    **{op: _unary(op, positive=True) for op in ("Log", "Sqrt", "Reciprocal")},
    **{op: _binary(op) for op in ("Add", "Sub", "Mul", "Max", "Min")},
    "Div": _binary("Div", positive=True),
    "Pow": _binary("Pow", positive=True),
    "Elu": _unary("Elu", alpha=0.7),
    "Selu": _unary("Selu"),
    "LeakyRelu": _unary("LeakyRelu", alpha=0.2),
    "HardSigmoid": _unary("HardSigmoid", alpha=0.3, beta=0.4),
    "Gelu": _with_consts("Gelu", [], {"approximate": "tanh"}, opset=20),
    "Clip": _with_consts("Clip", [("lo", _f32(-0.5)), ("hi", _f32(0.7))]),
    "PRelu": _with_consts("PRelu", [("s", _r((4, 1, 1), 0.3, seed=4))]),
    "Cast": _with_consts("Cast", [], {"to": TensorProto.FLOAT16}),
    "Conv": _with_consts("Conv", [("w", _W), ("b", _r(6, seed=5))], {"pads": [1, 1, 1, 1]}),
    "ConvTranspose": _with_consts("ConvTranspose", [("w", _r((4, 3, 3, 3), 0.3, seed=6)), ("b", _r(3, seed=7))],
                                  {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    "Gemm": _with_consts("Gemm", [("w", _r((7, 5), 0.3, seed=8)), ("b", _r(7, seed=9))], {"transB": 1}, shape=(3, 5)),
    "MatMul": _with_consts("MatMul", [("w", _r((5, 7), 0.3, seed=8))]),
    "Einsum": _with_consts("Einsum", [("w", _r((5, 3), 0.3, seed=8))], {"equation": "bchw,wk->bckh"}),
    "MaxPool": _with_consts("MaxPool", [], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "AveragePool": _with_consts("AveragePool", [], {"kernel_shape": [2, 2], "strides": [2, 1]}),
    "GlobalAveragePool": _unary("GlobalAveragePool"),
    "GlobalMaxPool": _unary("GlobalMaxPool"),
    "BatchNormalization": _with_consts("BatchNormalization", [
        ("s", _f32([1.0, 0.5, 2.0, 1.5])), ("b", _f32([0.1, -0.2, 0.3, 0.0])), ("m", _f32([0.0, 0.1, -0.1, 0.2])),
        ("v", _f32([1.0, 0.5, 2.0, 0.8]))]),
    "InstanceNormalization": _with_consts("InstanceNormalization", [("s", _f32([1.0, 0.5, 2.0, 1.5])),
                                                                    ("b", _f32([0.1, -0.2, 0.3, 0.0]))]),
    "LayerNormalization": _with_consts("LayerNormalization", [("s", _r((6, 5), seed=4) * 0.2 + 1), ("b", _r((6, 5), 0.1, seed=5))],
                                       {"axis": -2}),
    "GroupNormalization": _with_consts("GroupNormalization", [("s", _f32([1.0, 0.5, 2.0, 1.5])),
                                                              ("b", _f32([0.1, -0.2, 0.3, 0.0]))],
                                       {"num_groups": 2}, opset=21, out_shape=list(X4)),
    "LRN": _with_consts("LRN", [], {"size": 3, "alpha": 1e-2, "beta": 0.75, "bias": 1.0}),
    "LpNormalization": _with_consts("LpNormalization", [], {"axis": 1, "p": 2}),
    "Reshape": _with_consts("Reshape", [("s", _i64([0, -1, 5]))]),
    "Flatten": _with_consts("Flatten", [], {"axis": 2}),
    "Transpose": _with_consts("Transpose", [], {"perm": [0, 2, 3, 1]}),
    "Concat": _with_consts("Concat", [("c", _r((1, 2, 6, 5), seed=3))], {"axis": 1}),
    "Softmax": _with_consts("Softmax", [], {"axis": 1}),
    "LogSoftmax": _with_consts("LogSoftmax", [], {"axis": 2}),
    "Squeeze": _with_consts("Squeeze", [("a", _i64([0]))]),
    "Unsqueeze": _with_consts("Unsqueeze", [("a", _i64([2]))]),
    "Pad": _with_consts("Pad", [("p", _i64([0, 0, 1, 2, 0, 0, 2, 1]))], {"mode": "constant"}),
    "Slice": _with_consts("Slice", [("s", _i64([1, 0])), ("e", _i64([4, 5])), ("a", _i64([1, 3])), ("t", _i64([2, 2]))]),
    "Split": _with_consts("Split", [("s", _i64([1, 3]))], {"axis": 1}, outputs=2),
    "Resize": _with_consts("Resize", [("roi", np.zeros(0, np.float32)), ("sc", _f32([1, 1, 2, 2]))], {"mode": "linear"}),
    "Upsample": _with_consts("Upsample", [("sc", _f32([1, 1, 2, 3]))], {"mode": "nearest"}, opset=9),
    "Gather": _with_consts("Gather", [("i", _i64([[0, 2], [3, -1]]))], {"axis": 2}),
    "GatherElements": _with_consts("GatherElements", [("i", np.random.default_rng(3).integers(0, 6, (1, 4, 2, 5)))],
                                   {"axis": 2}),
    "Tile": _with_consts("Tile", [("r", _i64([1, 2, 1, 3]))]),
    "Expand": _with_consts("Expand", [("s", _i64([2, 1, 4, 1, 1]))], shape=(4, 1, 5)),
    "DepthToSpace": _with_consts("DepthToSpace", [], {"blocksize": 2, "mode": "CRD"}, shape=(1, 8, 3, 2)),
    "SpaceToDepth": _with_consts("SpaceToDepth", [], {"blocksize": 2}, shape=(1, 2, 4, 6)),
    "CumSum": _with_consts("CumSum", [("a", _i64(2))], {"reverse": 1}),
    "TopK": _with_consts("TopK", [("k", _i64([3]))], {"axis": 2}, outputs=2),
    "ArgMax": _with_consts("ArgMax", [], {"axis": 1, "keepdims": 0}),
    "ArgMin": _with_consts("ArgMin", [], {"axis": 3}),
    **{op: _with_consts(op, [("a", _i64([1, 3]))] if op == "ReduceSum" else [], {"keepdims": 1} if op == "ReduceSum" else
                        {"axes": [1, 3], "keepdims": 0})
       for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
                  "ReduceSumSquare", "ReduceLogSumExp")},
    "ReduceLogSum": _chain([("Abs", ["x"], ["a"]), ("ReduceLogSum", ["a"], ["y"], {"axes": [2]})]),
    **{op: _chain([(op, ["x", "z"], ["y"])], [("z", _r(X4, seed=7))])
       for op in ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual")},
    "Where": _chain([("Greater", ["x", "z"], ["c"]), ("Where", ["c", "x", "z"], ["y"])], [("z", _r(X4, seed=7))]),
    "Not": _chain([("Greater", ["x", "z"], ["c"]), ("Not", ["c"], ["y"])], [("z", _f32(0.2))]),
    **{op: _chain([("Greater", ["x", "z"], ["c"]), ("Less", ["x", "w"], ["d"]), (op, ["c", "d"], ["y"])],
                  [("z", _f32(-0.3)), ("w", _f32(0.4))]) for op in ("And", "Or", "Xor")},
    "LSTM": lambda: _rnn("LSTM", "forward", hidden=4),
    "GRU": lambda: _rnn("GRU", "forward", hidden=4),
    # folded before translation (static shapes): each feeds a translated op
    "Shape": _chain([("Shape", ["x"], ["s"]), ("Reshape", ["x", "s"], ["y"])]),
    "Size": _chain([("Size", ["x"], ["s"]), ("Cast", ["s"], ["f"], {"to": TensorProto.FLOAT}), ("Add", ["x", "f"], ["y"])]),
    "Constant": _chain([("Constant", [], ["c"], {"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0])}),
                        ("Mul", ["x", "c"], ["y"])]),
    "ConstantOfShape": _chain([("ConstantOfShape", ["s"], ["c"], {"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [3.0])}),
                               ("Add", ["x", "c"], ["y"])], [("s", _i64([5]))]),
    "Range": _chain([("Range", ["a", "b", "d"], ["c"]), ("Add", ["x", "c"], ["y"])],
                    [("a", _f32(0.0)), ("b", _f32(2.5)), ("d", _f32(0.5))]),
}


def _accepted() -> list[str]:
    return sorted(_ops.COREML_OPS & (cm.SUPPORTED_OPS | coreml.FOLDED_OPS))


def test_every_accepted_op_has_a_sample():
    assert set(SAMPLES) == set(_accepted()), set(SAMPLES) ^ set(_accepted())
    assert not _ops.COREML_OPS - (cm.SUPPORTED_OPS | coreml.FOLDED_OPS), "listed for ios but not translated"


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_each_accepted_op_converts_one_node(tmp_path, op):
    model, feeds = SAMPLES[op]()
    _check(tmp_path, model, feeds, precisions=("fp16",))



# --------------------------------------------------------------------------- variants, fp16 and fp32

def _resize_case(mode, coord, scales=None, sizes=None, nearest=None, shape=(1, 3, 5, 6)):
    def make():
        x = _x(shape)
        attrs = {"mode": mode, "coordinate_transformation_mode": coord, **({"nearest_mode": nearest} if nearest else {})}
        consts = [("roi", np.zeros(0, np.float32)), ("sc", _f32(scales if scales is not None else []))]
        if sizes is not None:
            consts.append(("sz", _i64(sizes)))
        return _one("Resize", [("x", x)], attrs, consts), {"x": x}
    return make


RESIZE = {
    # nearest: integer upscales become upsample_nearest_neighbor, any other sampling an exact gather
    "nearest-half_pixel-x2": (_resize_case("nearest", "half_pixel", [1, 1, 2, 2]), "upsample_nearest_neighbor"),
    "nearest-pytorch_half_pixel-x3x2": (_resize_case("nearest", "pytorch_half_pixel", [1, 1, 3, 2]), "upsample_nearest_neighbor"),
    "nearest-asymmetric-floor-x2": (_resize_case("nearest", "asymmetric", [1, 1, 2, 2], nearest="floor"),
                                    "upsample_nearest_neighbor"),
    "nearest-asymmetric-round-x3": (_resize_case("nearest", "asymmetric", [1, 1, 3, 3]), "gather"),
    "nearest-align_corners-sizes": (_resize_case("nearest", "align_corners", sizes=[1, 3, 9, 7]), "gather"),
    "nearest-half_pixel-down": (_resize_case("nearest", "half_pixel", [1, 1, 0.5, 0.5], shape=(1, 2, 8, 6)), "gather"),
    # linear (bilinear)
    "linear-half_pixel-x2": (_resize_case("linear", "half_pixel", [1, 1, 2, 2]), "upsample_bilinear"),
    "linear-pytorch_half_pixel-x2": (_resize_case("linear", "pytorch_half_pixel", [1, 1, 2, 2]), "upsample_bilinear"),
    "linear-align_corners-x2": (_resize_case("linear", "align_corners", [1, 1, 2, 2]), "upsample_bilinear"),
    "linear-asymmetric-x2": (_resize_case("linear", "asymmetric", [1, 1, 2, 2]), "resize_bilinear"),
    "linear-half_pixel-sizes": (_resize_case("linear", "half_pixel", sizes=[1, 3, 9, 7]), "resize_bilinear"),
    "linear-pytorch_half_pixel-sizes": (_resize_case("linear", "pytorch_half_pixel", sizes=[1, 3, 8, 11]), "resize_bilinear"),
    "linear-align_corners-sizes": (_resize_case("linear", "align_corners", sizes=[1, 3, 9, 7]), "resize_bilinear"),
    "linear-asymmetric-sizes": (_resize_case("linear", "asymmetric", sizes=[1, 3, 7, 9]), "resize_bilinear"),
    "linear-half_pixel-down": (_resize_case("linear", "half_pixel", sizes=[1, 3, 3, 4], shape=(1, 3, 6, 8)), "resize_bilinear"),
    "upsample9-nearest": (_with_consts("Upsample", [("sc", _f32([1, 1, 2, 3]))], {"mode": "nearest"}, opset=9),
                          "upsample_nearest_neighbor"),
    "upsample9-linear": (_with_consts("Upsample", [("sc", _f32([1, 1, 2, 2]))], {"mode": "linear"}, opset=9),
                         "resize_bilinear"),
}


@pytest.mark.parametrize("case", sorted(RESIZE))
def test_resize(tmp_path, case):
    make, mil_op = RESIZE[case]
    model, feeds = make()
    errs, ops = _check(tmp_path, model, feeds)
    assert mil_op in ops, ops


def test_resize_refusals():
    x = _x((1, 3, 5, 6))
    for attrs, consts, why in [
        ({"mode": "cubic"}, [("sc", _f32([1, 1, 2, 2]))], "mode cubic"),
        ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, [("sc", _f32([1, 1, 2, 2]))],
         "tf_crop_and_resize"),
        ({"mode": "nearest"}, [("sc", _f32([1, 2, 2, 2]))], "last two axes"),
    ]:
        model = _one("Resize", [("x", x)], attrs, [("roi", _f32([0, 0, 0, 0, 1, 1, 1, 1])), *consts])
        with pytest.raises(Exception, match=why):
            cm.to_mil(model, {"x": list(x.shape)})


def _gelu_erf_model():
    """GELU as PyTorch/transformers export it: x * 0.5 * (1 + erf(x / sqrt 2)) between two MatMuls."""
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h"], name="fc1"), n("Div", ["h", "sqrt2"], ["d"], name="gelu/div"),
             n("Erf", ["d"], ["e"], name="gelu/erf"), n("Add", ["e", "one"], ["a"], name="gelu/add"),
             n("Mul", ["h", "a"], ["m"], name="gelu/mul"), n("Mul", ["m", "half"], ["g"], name="gelu/mul2"),
             n("MatMul", ["g", "w2"], ["y"], name="fc2")]
    consts = [init("w1", _r((16, 32), 0.3, seed=1)), init("w2", _r((32, 8), 0.3, seed=2)), init("sqrt2", _f32(np.sqrt(2))),
              init("one", _f32(1.0)), init("half", _f32(0.5))]
    return make_model(nodes, [vi("x", [1, 5, 16])], [vi("y", None)], consts)


def _gelu_tanh_model():
    n = helper.make_node
    nodes = [n("Pow", ["x", "three"], ["p"], name="p"), n("Mul", ["p", "c"], ["q"], name="q"), n("Add", ["x", "q"], ["r"], name="r"),
             n("Mul", ["r", "k"], ["s"], name="s"), n("Tanh", ["s"], ["t"], name="t"), n("Add", ["t", "one"], ["u"], name="u"),
             n("Mul", ["x", "half"], ["h"], name="h"), n("Mul", ["h", "u"], ["y"], name="y")]
    consts = [init("three", _f32(3.0)), init("c", _f32(0.044715)), init("k", _f32(np.sqrt(2 / np.pi))), init("one", _f32(1.0)),
              init("half", _f32(0.5))]
    return make_model(nodes, [vi("x", [1, 5, 16])], [vi("y", None)], consts)


@pytest.mark.parametrize("make", [_gelu_erf_model, _gelu_tanh_model], ids=["erf", "tanh"])
def test_gelu_patterns_fused_by_coremltools_are_exported(tmp_path, make):
    model = make()
    x = _x((1, 5, 16), scale=2.0)
    errs, ops = _check(tmp_path, model, {"x": x})
    assert ops.get("gelu") == 1 and "erf" not in ops and "tanh" not in ops, ops


def _transformer_block():
    """LayerNormalization, attention through Einsum, Softmax on a middle axis, Gather of a position table."""
    n = helper.make_node
    nodes = [n("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1, epsilon=1e-5),
             n("Einsum", ["ln", "wq"], ["q"], name="q", equation="btc,hcd->bhtd"),
             n("Einsum", ["ln", "wk"], ["k"], name="k", equation="btc,hcd->bhtd"),
             n("Einsum", ["q", "k"], ["s"], name="scores", equation="bhqd,bhkd->bhqk"),
             n("Softmax", ["s"], ["p"], name="softmax", axis=2),
             n("Einsum", ["p", "q"], ["o"], name="ctx", equation="bhqk,bhkd->bqhd"),
             n("Reshape", ["o", "shape"], ["r"], name="merge"),
             n("Gather", ["pos", "idx"], ["pe"], name="pos", axis=0),
             n("Add", ["r", "pe"], ["y"], name="add")]
    consts = [init("g", _r(8, seed=3) * 0.2 + 1), init("b", _r(8, 0.1, seed=4)), init("wq", _r((2, 8, 4), 0.4, seed=5)),
              init("wk", _r((2, 8, 4), 0.4, seed=6)), init("shape", _i64([1, 6, 8])), init("pos", _r((10, 8), seed=7)),
              init("idx", _i64([0, 1, 2, 3, 4, 5]))]
    return make_model(nodes, [vi("x", [1, 6, 8])], [vi("y", None)], consts)


def test_transformer_block_layernorm_einsum_softmax_gather(tmp_path):
    model = _transformer_block()
    errs, ops = _check(tmp_path, model, {"x": _x((1, 6, 8))})
    assert ops.get("layer_norm") == 1 and ops.get("softmax") == 1 and ops.get("matmul", 0) >= 3, ops


def test_argmax_topk_indices_feed_gather(tmp_path):
    n = helper.make_node
    nodes = [n("ReduceMean", ["x"], ["m"], name="m", axes=[2], keepdims=0),
             n("TopK", ["m", "k"], ["v", "i"], name="topk", axis=1, largest=1),
             n("Gather", ["x", "i"], ["g"], name="gather_topk", axis=1),
             n("ArgMax", ["x"], ["a"], name="argmax", axis=2, keepdims=0),
             n("Cast", ["a"], ["af"], name="cast", to=TensorProto.FLOAT),
             n("Softmax", ["v"], ["sv"], name="softmax0", axis=0)]
    model = make_model(nodes, [vi("x", [2, 6, 5])], [vi("g", None), vi("af", None), vi("sv", None), _out("i")],
                       [init("k", _i64([3]))])
    errs, ops = _check(tmp_path, model, {"x": _x((2, 6, 5))})
    assert ops.get("topk") == 1 and ops.get("reduce_argmax") == 1, ops


def test_masking_with_comparisons(tmp_path):
    n = helper.make_node
    nodes = [n("Greater", ["x", "lo"], ["a"], name="gt"), n("Less", ["x", "hi"], ["b"], name="lt"),
             n("And", ["a", "b"], ["c"], name="and"), n("Equal", ["x", "x"], ["e"], name="eq"),
             n("Not", ["c"], ["nc"], name="not"), n("Or", ["nc", "e"], ["o"], name="or"),
             n("Where", ["c", "x", "fill"], ["w"], name="where"), n("Where", ["o", "w", "x"], ["y"], name="where2")]
    model = make_model(nodes, [vi("x", [1, 4, 6, 5])], [vi("y", None)],
                       [init("lo", _f32(-0.5)), init("hi", _f32(0.8)), init("fill", _f32(-3.0))])
    errs, ops = _check(tmp_path, model, {"x": _x()})
    assert ops.get("select") == 2 and ops.get("logical_and") == 1, ops


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2]},
    {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    {"strides": [1, 2], "dilations": [2, 1], "group": 2},
], ids=["stride2", "pads-output_padding", "grouped-dilated"])
def test_conv_transpose(tmp_path, attrs):
    w = _r((4, 2 if attrs.get("group") else 3, 3, 3), 0.3, seed=6)
    model = _one("ConvTranspose", [("x", _x())], attrs, [("w", w), ("b", _r(w.shape[1] * attrs.get("group", 1), seed=7))])
    _check(tmp_path, model, {"x": _x()})


@pytest.mark.parametrize("eq, a, b", [
    ("ij,jk->ik", (3, 5), (5, 4)),
    ("bij,bkj->bik", (2, 3, 5), (2, 4, 5)),
    ("ij,j->i", (3, 5), (5,)),
    ("bchw,wk->bckh", (1, 4, 6, 5), (5, 3)),
])
def test_einsum_matmul_cases(tmp_path, eq, a, b):
    x, w = _x(a), _r(b, 0.3, seed=2)
    model = _one("Einsum", [("x", x)], {"equation": eq}, [("w", w)])  # a weight, as in exported models
    _check(tmp_path, model, {"x": x})
    both = _one("Einsum", [("x", x), ("w", w)], {"equation": eq})
    if a[0] == b[0]:  # the equivalent's runner slices every input by the first one's batch
        (tmp_path / "both").mkdir()
        _check(tmp_path / "both", both, {"x": x, "w": w})
    else:
        cm.to_mil(both, {"x": list(a), "w": list(b)})


@pytest.mark.parametrize("eq", ["ii->i", "ij->ji", "ij,ij->ij", "...ij,jk->...ik"])
def test_einsum_other_than_matmul_refused(eq):
    x = _x((3, 3))
    model = _one("Einsum", [("x", x)] + ([("y", x)] if "," in eq else []), {"equation": eq})
    with pytest.raises(Exception, match="Einsum"):
        cm.to_mil(model, {"x": [3, 3], "y": [3, 3]})


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_softmax_and_logsoftmax_any_axis(tmp_path, axis):
    n = helper.make_node
    nodes = [n("Softmax", ["x"], ["s"], name="softmax", axis=axis), n("LogSoftmax", ["x"], ["l"], name="logsoftmax", axis=axis)]
    model = make_model(nodes, [vi("x", [2, 5, 7])], [vi("s", None), vi("l", None)])
    _check(tmp_path, model, {"x": _x((2, 5, 7), scale=3.0)})


def test_preflight_refuses_what_the_translator_refuses(tmp_path):
    x = _x((1, 3, 5, 6))
    cases = [
        (_one("Resize", [("x", x)], {"mode": "cubic"}, [("roi", np.zeros(0, np.float32)), ("sc", _f32([1, 1, 2, 2]))]),
         "mode cubic"),
        (_one("Einsum", [("x", _x((3, 3)))], {"equation": "ii->i"}), "not a plain"),
        (_one("TopK", [("x", x)], {"sorted": 0}, [("k", _i64([2]))], outputs=2), "unsorted"),
    ]
    option = load_target("ios").backends[0]
    for i, (model, why) in enumerate(cases):
        reasons = coreml.check_ops(analyze(save(model, tmp_path / f"m{i}.onnx")), option)
        assert len(reasons) == 1 and why in reasons[0], reasons
        with pytest.raises(UnsupportedOpError, match=why):
            cm.to_mil(model, {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input})
    ok = _resize_case("linear", "align_corners", sizes=[1, 3, 9, 7])()[0]
    assert coreml.check_ops(analyze(save(ok, tmp_path / "ok.onnx")), option) == []


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML predicts on macOS")
def test_validation_statement_only_when_validated(tmp_path):
    """A GELU model (exported only since gelu is): built with data its ONNX equivalent runs and the artifact
    says it was validated; built without, it says it was not (it used to claim validation either way)."""
    model = _gelu_erf_model()
    path = save(model, tmp_path / "g.onnx")
    plan = make_plan(analyze(path), load_target("ios"), backend="coreml", precision="fp16", enforce_budgets=False)
    calib = as_calibration(_x((16, 5, 16), scale=2.0), model)  # 16 samples along the batch axis
    art = build_artifact(model, plan, tmp_path / "with", calib)
    rec = json.loads((tmp_path / "with" / coreml.RECORD).read_text())
    assert rec["validation"]["ops"].get("gelu") == 1 and rec["validation"]["onnx_equivalent"]["snr_db"] > 40
    assert art.accuracy["equivalent_snr_db"] > 40
    with pytest.raises(RuntimeUnavailable, match="was validated against its ONNX equivalent"):
        open_artifact(tmp_path / "with")
    build_artifact(model, plan, tmp_path / "without")
    assert "onnx_equivalent" not in json.loads((tmp_path / "without" / coreml.RECORD).read_text())["validation"]
    with pytest.raises(RuntimeUnavailable, match="NOT validated") as e:
        open_artifact(tmp_path / "without")
    assert "validated against" not in str(e.value)


@pytest.mark.parametrize("op, direction, kw", [
    ("LSTM", "forward", {}),
    ("LSTM", "reverse", {"states": True}),
    ("LSTM", "bidirectional", {"states": True, "peephole": True}),
    ("LSTM", "forward", {"states": True, "clip": 0.8}),
    ("GRU", "forward", {"linear_before_reset": 1}),
    ("GRU", "reverse", {"states": True}),
    ("GRU", "bidirectional", {"states": True, "linear_before_reset": 1}),
], ids=["lstm", "lstm-reverse-states", "lstm-bidi-peephole", "lstm-clip", "gru-lbr", "gru-reverse", "gru-bidi"])
def test_lstm_gru_with_state_in_and_out(tmp_path, op, direction, kw):
    model, feeds = _rnn(op, direction, **kw)
    errs, ops = _check(tmp_path, model, feeds)
    assert ("lstm" in ops) == (op == "LSTM"), ops  # GRU: unrolled (MIL's gru resets outside the recurrent bias)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_rnn_layout1_batch_first(tmp_path, op):
    """layout=1 (batch first, onnxruntime has no kernel for it): checked against the layout-0 model."""
    m1, feeds = _rnn(op, "bidirectional", states=True, layout=1)
    out = _build(tmp_path, m1, "fp32")
    got = coreml.BACKEND.reference(read_manifest(out), out).run(feeds)
    # the same weights, states transposed to [D, b, H], input to [s, b, I]
    init0 = {t.name: onnx_numpy(t) for t in m1.graph.initializer}
    init0["h0"] = init0["h0"].transpose(1, 0, 2)
    if op == "LSTM":
        init0["c0"] = init0["c0"].transpose(1, 0, 2)
    node = helper.make_node(op, list(m1.graph.node[0].input), [o.name for o in m1.graph.output], hidden_size=5,
                            direction="bidirectional")
    ref_model = make_model([node], [vi("x", [4, 2, 3])], [_out(o.name) for o in m1.graph.output],
                           [init(k, v) for k, v in init0.items()])
    ref = session(ref_model).run(None, {"x": feeds["x"].transpose(1, 0, 2)})
    assert np.allclose(got[0], ref[0].transpose(2, 0, 1, 3), atol=FP32_TOL)  # Y: [b, s, D, H] vs [s, D, b, H]
    for g, r in zip(got[1:], ref[1:]):
        assert np.allclose(g, r.transpose(1, 0, 2), atol=FP32_TOL)  # states: [b, D, H] vs [D, b, H]


def test_token_ids_embedding_gather_layernorm_gelu(tmp_path):
    """A text encoder's front: int64 token ids (Core ML int32 input) gather rows of an embedding table."""
    n = helper.make_node
    nodes = [n("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
             n("LayerNormalization", ["e", "g", "b"], ["ln"], name="ln", axis=-1),
             n("Div", ["ln", "sqrt2"], ["d"], name="gelu/div"), n("Erf", ["d"], ["er"], name="gelu/erf"),
             n("Add", ["er", "one"], ["a"], name="gelu/add"), n("Mul", ["ln", "a"], ["m"], name="gelu/mul"),
             n("Mul", ["m", "half"], ["y"], name="gelu/mul2")]
    consts = [init("table", _r((50, 16), seed=1)), init("g", _r(16, seed=2) * 0.2 + 1), init("b", _r(16, 0.1, seed=3)),
              init("sqrt2", _f32(np.sqrt(2))), init("one", _f32(1.0)), init("half", _f32(0.5))]
    model = make_model(nodes, [vi("ids", [1, 7], TensorProto.INT64)], [vi("y", None)], consts)
    ids = np.random.default_rng(0).integers(0, 50, (1, 7)).astype(np.int64)
    errs, ops = _check(tmp_path, model, {"ids": ids})
    assert ops.get("gelu") == 1 and ops.get("gather") == 1, ops
    rec = json.loads((tmp_path / "a_fp16" / coreml.RECORD).read_text())
    assert rec["input_types"] == {"ids": "INT32"} and rec["validation"]["inputs"]["ids"]["dtype"] == "INT32"


def _zoo(name):
    from edgeopt import zoo
    from edgeopt.errors import EdgeoptError

    try:
        return getattr(zoo, name)()
    except EdgeoptError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_minilm_gelu_layernorm_int_inputs(tmp_path):
    """all-MiniLM-L6-v2: Erf GELUs fused to gelu, LayerNormalization, token-id Gather; measured SNR 56.5 dB."""
    from edgeopt.zoo import minilm_tokens

    path = _zoo("minilm_path")
    model = onnx.load(str(path))
    plan = make_plan(analyze(path), load_target("ios"), backend="coreml", precision="fp16", enforce_budgets=False)
    build_artifact(model, plan, tmp_path / "a")
    ops = json.loads((tmp_path / "a" / coreml.RECORD).read_text())["validation"]["ops"]
    assert ops["gelu"] == 6 and ops["layer_norm"] == 13, ops
    ids, mask = minilm_tokens(["a quick brown fox jumps", "core ml on linux", "hello world", "edge deployment"])
    fid = coreml.compare_with_onnx(tmp_path / "a", model, {"input_ids": ids, "attention_mask": mask})
    assert fid.snr_db >= 45 and fid.cosine > 0.9999, fid


@pytest.mark.slow
def test_kws_gru_state_in_and_out(tmp_path):
    """A GRU keyword spotter with its hidden state as an input and an output; measured SNR 64 dB."""
    path = _zoo("kws_gru_path")
    model = onnx.load(str(path))
    plan = make_plan(analyze(path), load_target("ios"), backend="coreml", precision="fp16", enforce_budgets=False)
    build_artifact(model, plan, tmp_path / "a")
    rng = np.random.default_rng(0)
    feeds = {"feats": rng.standard_normal((4, 20, 40)).astype(np.float32),
             "h0": (rng.standard_normal((4, 1, 64)) * 0.5).astype(np.float32)}
    ref = session(model).run(None, {k: v[:1] for k, v in feeds.items()})
    got = coreml.OnnxEquivalentRunner(tmp_path / "a").run({k: v[:1] for k, v in feeds.items()})
    assert [o.name for o in model.graph.output] == ["logits", "h"]
    for a, b in zip(ref, got):
        assert a.shape == b.shape and np.abs(a - b).max() <= FP16_TOL * max(1.0, np.abs(a).max())


#: MIL ops coremltools' default passes can put into a program built from our translation (fusions such as
#: fuse_gelu_exact / fuse_gelu_tanh_approximation / fuse_leaky_relu / fuse_reduce_mean, concat_to_pixel_shuffle,
#: detect_concat_interleave, replace_stack_reshape, guard_negative_gather_indices, fp16/int16 casts)
PASS_PRODUCED = ("gelu", "silu", "leaky_relu", "pixel_shuffle", "concat", "reduce_mean", "layer_norm", "instance_norm",
                 "batch_norm", "select", "greater_equal", "less", "add", "cast", "identity", "squeeze", "expand_dims",
                 "stack", "split", "slice_by_size", "pad", "conv", "prelu", "linear", "matmul", "transpose", "reshape")


def test_exporter_covers_every_mil_op_the_translator_or_passes_emit():
    """Every MIL op our translator builds (``mb.<op>(`` in its source, and the op tables) or coremltools'
    passes produce has a branch in the MIL -> ONNX exporter."""
    import inspect
    import re

    src = inspect.getsource(cm)
    cut = src.index("# --------------------------------------------------------------------------- MIL (saved) -> ONNX")
    translator, exporter = src[:cut], src[cut:]
    built = set(re.findall(r"(?:\bmb|_mb\(\))\.(\w+)\(", translator)) - {"TensorSpec", "const"}
    for table in (cm._UNARY, cm._BINARY, cm._REDUCE, cm._COMPARE, cm._LOGICAL):
        built |= set(table.values())
    assert {"gelu", "upsample_bilinear", "resize_bilinear", "upsample_nearest_neighbor", "lstm", "topk"} <= built
    missing = sorted(op for op in built | set(PASS_PRODUCED) if f'"{op}"' not in exporter)
    assert not missing, missing


def _mil_grid(mode: str, n: int, m: int) -> np.ndarray:
    """MIL's documented sampling grid (coremltools resize_bilinear / upsample_bilinear docstrings)."""
    i = np.arange(m, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        g = i * (n - 1) / (m - 1)
    elif mode == "DEFAULT":
        g = i * (n - n / m) / (m - 1)
    elif mode == "UNALIGN_CORNERS":
        g = i * n / m + 0.5 * n / m - 0.5
    else:
        raise ValueError(mode)
    return np.clip(g, 0, n - 1)


def _bilinear(x: np.ndarray, gh: np.ndarray, gw: np.ndarray) -> np.ndarray:
    def axis(v, g, ax):
        lo = np.floor(g).astype(int)
        hi = np.minimum(lo + 1, v.shape[ax] - 1)
        f = (g - lo).reshape([-1 if a == ax else 1 for a in range(v.ndim)])
        return np.take(v, lo, ax) * (1 - f) + np.take(v, hi, ax) * f

    return axis(axis(x.astype(np.float64), gh, 2), gw, 3)


@pytest.mark.parametrize("mode, coord", [("STRICT_ALIGN_CORNERS", "align_corners"), ("DEFAULT", "asymmetric"),
                                         ("UNALIGN_CORNERS", "half_pixel")])
@pytest.mark.parametrize("out", [(10, 12), (9, 7), (3, 4)])
def test_mil_bilinear_grids_are_the_onnx_modes_the_exporter_writes(mode, coord, out):
    """The exporter's reading of MIL's sampling modes, checked against the MIL documentation's grid formulas
    (independently of our translator: the round trip alone cannot catch a consistent misreading)."""
    x = _x((1, 2, 5, 6))
    want = _bilinear(x, _mil_grid(mode, 5, out[0]), _mil_grid(mode, 6, out[1]))
    model = _one("Resize", [("x", x)], {"mode": "linear", "coordinate_transformation_mode": coord},
                 [("roi", np.zeros(0, np.float32)), ("sc", np.zeros(0, np.float32)), ("sz", _i64([1, 2, *out]))])
    got = session(model).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 1e-5
