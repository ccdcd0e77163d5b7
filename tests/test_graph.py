from __future__ import annotations

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import init, make_model, save, vi
from onnx import TensorProto, helper

from edgeopt.errors import InputShapeError, ModelLoadError
from edgeopt.graph import analyze, load_model, parse_input_shapes, plan_arena
from edgeopt.types import TensorInfo


def conv_model(weight_as_constant=False):
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = np.zeros(4, np.float32)
    nodes, inits = [], [init("b", b)]
    if weight_as_constant:
        nodes.append(helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w, "w")))
    else:
        inits.append(init("w", w))
    nodes += [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", None)], inits)


def test_conv_macs_params_and_bytes(tmp_path):
    a = analyze(save(conv_model(), tmp_path / "m.onnx"))
    conv, relu = a.layers
    assert (conv.op_type, relu.op_type) == ("Conv", "Relu")
    assert conv.macs == 1 * 4 * 8 * 8 * 3 * 3 * 3
    assert conv.params == 4 * 27 + 4 and conv.weight_bytes == (4 * 27 + 4) * 4
    assert conv.weight_shapes == [[4, 3, 3, 3], [4]] and conv.attributes["pads"] == [1, 1, 1, 1]
    assert relu.params == 0 and relu.flops == 4 * 64
    assert a.inputs == {"x": [1, 3, 8, 8]}  # batch dim defaults to 1
    assert a.outputs == {"y": [1, 4, 8, 8]}


def test_constant_node_weights_count_like_initializers(tmp_path):
    a = analyze(save(conv_model(), tmp_path / "a.onnx"))
    b = analyze(save(conv_model(weight_as_constant=True), tmp_path / "b.onnx"))
    assert [ly.op_type for ly in b.layers] == ["Conv", "Relu"]  # the Constant is not a layer
    assert (b.total_params, b.total_weight_bytes, b.total_macs) == (a.total_params, a.total_weight_bytes, a.total_macs)
    assert any("Constant nodes" in n for n in b.notes)


def test_gemm_matmul_and_depthwise_macs(tmp_path):
    nodes = [
        helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["m", "W"], ["mm"], name="mm"),
        helper.make_node("Conv", ["x", "D"], ["dw"], name="dw", group=8, pads=[1, 1, 1, 1]),
    ]
    m = make_model(nodes, [vi("a", [2, 5]), vi("m", [2, 4, 8]), vi("x", [1, 8, 6, 6])],
                   [vi("g", None), vi("mm", None), vi("dw", None)],
                   [init("B", np.ones((3, 5), np.float32)), init("W", np.ones((8, 16), np.float32)),
                    init("D", np.ones((8, 1, 3, 3), np.float32))])
    a = analyze(save(m, tmp_path / "m.onnx"))
    macs = {ly.name: ly.macs for ly in a.layers}
    assert macs == {"gemm": 2 * 3 * 5, "mm": 2 * 4 * 16 * 8, "dw": 8 * 6 * 6 * 9}


def test_int8_weights_behind_dequantizelinear_are_folded(tmp_path):
    q = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    m = make_model(nodes, [vi("x", [1, 4])], [vi("y", None)],
                   [init("wq", q), init("s", np.float32(0.1)), init("z", np.int8(0))])
    a = analyze(save(m, tmp_path / "q.onnx"))
    assert [ly.name for ly in a.layers] == ["mm"]
    assert a.layers[0].params == 16 and a.layers[0].weight_bytes == 16 + 4 + 1


def test_shared_weight_is_counted_once(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="a"), helper.make_node("MatMul", ["h", "W"], ["y"], name="b")]
    m = make_model(nodes, [vi("x", [1, 8])], [vi("y", None)], [init("W", np.ones((8, 8), np.float32))])
    a = analyze(save(m, tmp_path / "s.onnx"))
    assert [ly.weight_bytes for ly in a.layers] == [256, 0]
    assert a.total_weight_bytes == 256 and a.layers[1].params == 64


def test_external_data(tmp_path):
    m = conv_model()
    path = tmp_path / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.bin", size_threshold=0)
    a = analyze(path)
    assert a.total_params == 4 * 27 + 4 and any("external" in n for n in a.notes)
    assert a.file_bytes == path.stat().st_size + (tmp_path / "ext.bin").stat().st_size
    full = load_model(path, load_external_data=True)
    assert len(onnx.numpy_helper.to_array(full.graph.initializer[1]).ravel()) == 108
    data = (tmp_path / "ext.bin").read_bytes()
    (tmp_path / "ext.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        analyze(path)
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(ModelLoadError, match="ext.bin.*not found"):
        analyze(path)


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\x00\x00\x00\x1cTFL3" + b"\x00" * 40, "TFLite flatbuffer"),
    (b"PK\x03\x04" + b"\x00" * 40, "zip archive"),
    (b"\xff\xfe\xfd garbage \x01\x02" * 10, "not a valid ONNX model|does not hold an ONNX graph"),
    (b"hello world, this is text\n", "not a valid ONNX model|does not hold an ONNX graph"),
])
def test_bad_model_files(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match) as e:
        load_model(p)
    assert "\n" not in str(e.value)


def test_truncated_real_model(tmp_path, digits_model):
    data = digits_model.read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 100):
        p = tmp_path / f"cut{cut}.onnx"
        p.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError) as e:
            load_model(p)
        assert "\n" not in str(e.value)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        load_model(tmp_path)


def test_digits_cnn_analysis(digits_model):
    a = analyze(digits_model)
    assert a.total_params == 40394  # conv 160+4640+18496, fc 16448+650
    assert a.total_macs == 9216 + 294912 + 294912 + 16384 + 640
    assert a.total_weight_bytes == 4 * 40394
    assert [ly.op_type for ly in a.layers].count("Conv") == 3
    assert a.inputs == {"image": [1, 1, 8, 8]} and a.outputs == {"logits": [1, 10]}


def test_ppocr_cls_constant_node_model(ppocr_cls):
    with pytest.raises(InputShapeError, match=r"x=1x3x\?x\?"):
        analyze(ppocr_cls)
    a = analyze(ppocr_cls, {"x": [1, 3, 48, 192]})
    assert not [ly for ly in a.layers if ly.op_type == "Constant"]
    model = onnx.load(str(ppocr_cls))
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    conv_w = {n.name: onnx.numpy_helper.to_array(consts[n.input[1]]).shape for n in model.graph.node if n.op_type == "Conv"}
    # independent check of every conv's MACs: run the model in onnxruntime and read the real output shapes
    for n in model.graph.node:
        if n.op_type == "Conv":
            model.graph.output.add().name = n.output[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    conv_nodes = [n for n in model.graph.node if n.op_type == "Conv"]
    outs = sess.run([n.output[0] for n in conv_nodes], {"x": np.zeros((1, 3, 48, 192), np.float32)})
    expected = {n.name: int(np.prod(o.shape) * np.prod(conv_w[n.name][1:])) for n, o in zip(conv_nodes, outs)}
    got = {ly.name: ly.macs for ly in a.layers if ly.op_type == "Conv"}
    assert got == expected and len(got) == 53
    float_const_elems = sum(int(np.prod(t.dims)) for t in consts.values() if t.data_type == TensorProto.FLOAT and len(t.dims) >= 1)
    assert a.total_params == float_const_elems  # every non-scalar float constant is a parameter


def test_input_shape_parsing_and_validation(ppocr_cls):
    assert parse_input_shapes(["x=1x3x48x192", "m=2,5"]) == {"x": [1, 3, 48, 192], "m": [2, 5]}
    for bad in ("x", "x=1xax2", "=1x2", "x=0x3"):
        with pytest.raises(InputShapeError):
            parse_input_shapes([bad])
    with pytest.raises(InputShapeError, match="rank"):
        analyze(ppocr_cls, {"x": [1, 3, 48]})
    with pytest.raises(InputShapeError, match="dim 1"):
        analyze(ppocr_cls, {"x": [1, 4, 48, 192]})
    with pytest.raises(InputShapeError, match="unknown input"):
        analyze(ppocr_cls, {"y": [1, 3, 48, 192]})


# ------------------------------------------------------------------ arena planning


def _t(name, elems, first, last):
    return TensorInfo(name=name, shape=[elems], dtype="float", elems=elems, first=first, last=last)


def test_arena_chain_is_two_buffers():
    ts = [_t("x", 1000, -1, 0), _t("a", 1000, 0, 1), _t("b", 1000, 1, 2), _t("y", 1000, 2, 3)]
    ap = plan_arena(ts, lambda t: t.elems * 4)
    assert ap.peak_live_bytes == 8000 and ap.arena_bytes == 8000


def test_arena_skip_connection_keeps_input_alive():
    # x feeds step 0 and step 2 (residual): x, a, b overlap at step 1-2
    ts = [_t("x", 100, -1, 2), _t("a", 100, 0, 1), _t("b", 100, 1, 2), _t("y", 100, 2, 3)]
    ap = plan_arena(ts, lambda t: t.elems, alignment=1)
    assert ap.peak_live_bytes == 300 and ap.arena_bytes == 300


def test_greedy_arena_is_valid_and_above_the_lower_bound():
    rng = random.Random(0)
    for _ in range(200):
        ts = []
        for i in range(rng.randint(1, 25)):
            first = rng.randint(-1, 15)
            ts.append(_t(f"t{i}", rng.randint(1, 5000), first, first + rng.randint(0, 6)))
        ap = plan_arena(ts, lambda t: t.elems)
        assert ap.arena_bytes >= ap.peak_live_bytes
        for i, a in enumerate(ts):
            for b in ts[i + 1:]:
                if max(a.first, 0) <= b.last and max(b.first, 0) <= a.last:  # alive together
                    oa, ob = ap.offsets[a.name], ap.offsets[b.name]
                    assert oa + ap.sizes[a.name] <= ob or ob + ap.sizes[b.name] <= oa
            assert ap.offsets[a.name] % 16 == 0
