"""GRU/LSTM unrolled into plain ops (edgeopt.passes.unroll_rnn) computes what onnxruntime's kernels compute."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.fidelity import session
from edgeopt.passes.unroll_rnn import unroll_rnns


def _rnn_model(op: str, direction: str, lbr: int, with_state: bool, seq=5, batch=2, inp=6, hidden=4, seed=0):
    rng = np.random.default_rng(seed)
    g = 3 if op == "GRU" else 4
    dirs = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (dirs, g * hidden, inp)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.5, (dirs, g * hidden, hidden)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.normal(0, 0.3, (dirs, 2 * g * hidden)).astype(np.float32), "B")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, inp])]
    node_in = ["x", "W", "R", "B", ""]
    if with_state:
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [dirs, batch, hidden]))
        node_in.append("h0")
        if op == "LSTM":
            inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [dirs, batch, hidden]))
            node_in.append("c0")
    outs = ["y", "yh"] + (["yc"] if op == "LSTM" else [])
    attrs = {"hidden_size": hidden, "direction": direction}
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(op, node_in, outs, name="rnn", **attrs)
    out_vi = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [seq, dirs, batch, hidden]),
              helper.make_tensor_value_info("yh", TensorProto.FLOAT, [dirs, batch, hidden])]
    if op == "LSTM":
        out_vi.append(helper.make_tensor_value_info("yc", TensorProto.FLOAT, [dirs, batch, hidden]))
    graph = helper.make_graph([node], "g", inputs, out_vi, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = [("GRU", d, lbr, s) for d in ("forward", "reverse", "bidirectional") for lbr in (0, 1) for s in (False, True)]
CASES += [("LSTM", d, 0, s) for d in ("forward", "reverse", "bidirectional") for s in (False, True)]


@pytest.mark.parametrize(("op", "direction", "lbr", "with_state"), CASES)
def test_unrolled_rnn_matches_onnxruntime(op, direction, lbr, with_state):
    model = _rnn_model(op, direction, lbr, with_state)
    onnx.checker.check_model(model)
    unrolled, notes = unroll_rnns(model)
    assert notes == [] and op not in {n.op_type for n in unrolled.graph.node}
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.normal(size=[d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    ref = session(model).run(None, feeds)
    got = session(unrolled).run(None, feeds)
    for r, o in zip(ref, got):
        assert r.shape == o.shape and float(np.max(np.abs(r - o))) < 1e-5


def test_torch_gru_and_lstm_exports_unroll_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    for cls in (torch.nn.GRU, torch.nn.LSTM):
        torch.manual_seed(0)
        net = cls(8, 16, num_layers=2, batch_first=True)
        x = torch.randn(1, 7, 8)
        path = tmp_path / f"{cls.__name__}.onnx"
        torch.onnx.export(net, (x,), str(path), input_names=["x"], opset_version=17, dynamo=False)
        model = onnx.load(str(path))
        unrolled, notes = unroll_rnns(model)
        assert notes == [] and not {"GRU", "LSTM"} & {n.op_type for n in unrolled.graph.node}
        feeds = {"x": x.numpy()}
        for r, o in zip(session(model).run(None, feeds), session(unrolled).run(None, feeds)):
            assert float(np.max(np.abs(r - o))) < 1e-5


def test_refusals_keep_the_node_with_a_reason():
    model = _rnn_model("GRU", "forward", 1, False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    unrolled, notes = unroll_rnns(model)
    assert "GRU" in {n.op_type for n in unrolled.graph.node} and "not static" in notes[0]
    unrolled, notes = unroll_rnns(model, {"x": [5, 2, 6]})
    assert notes == []
    lstm = _rnn_model("LSTM", "forward", 0, False)
    lstm.graph.node[0].attribute.append(helper.make_attribute("clip", 3.0))
    assert "clip" in unroll_rnns(lstm)[1][0]


def test_long_sequences_concat_in_a_tree():
    model = _rnn_model("GRU", "forward", 1, True, seq=23)
    unrolled, _ = unroll_rnns(model)
    assert max(len(n.input) for n in unrolled.graph.node if n.op_type == "Concat") <= 8
    feeds = {"x": np.random.default_rng(0).normal(size=(23, 2, 6)).astype(np.float32),
             "h0": np.zeros((1, 2, 4), np.float32)}
    for r, o in zip(session(model).run(None, feeds), session(unrolled).run(None, feeds)):
        assert float(np.max(np.abs(r - o))) < 1e-5


def test_stateful_gru_builds_for_phone_and_mcu(tmp_path, capsys):
    """A streaming GRU (state in, state out, batch on the state's axis 1, fixed batch 1) goes to TFLite and TFLite
    Micro as its unrolled steps, calibrated with per-sample data that carries the state."""
    torch = pytest.importorskip("torch")
    from edgeopt.backends.base import read_verified
    from edgeopt.cli import main

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(12, 16, batch_first=True)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x, h0):
            y, h = self.gru(x, h0)
            return self.head(y[:, -1]), h

    torch.manual_seed(0)
    path = tmp_path / "gru.onnx"
    torch.onnx.export(Step().eval(), (torch.zeros(1, 12, 12), torch.zeros(1, 1, 16)), str(path),
                      input_names=["x", "h0"], output_names=["logits", "h"], opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(24):
        np.savez(calib / f"{i:03d}.npz", x=rng.normal(size=(1, 12, 12)).astype(np.float32),
                 h0=rng.normal(0, 0.5, (1, 1, 16)).astype(np.float32))
    for target in ("android-mid", "mcu-cortex-m7"):
        out = tmp_path / target
        rc = main(["build", str(path), "--target", target, "--calib", str(calib), "-o", str(out),
                   "--max-accuracy-drop", "0.1"])
        assert rc == 0, capsys.readouterr().err
        art = read_verified(out)
        assert art.accuracy["snr_db"] > 25, art.accuracy
        assert art.size_bytes < 4 * (12 * 48 + 16 * 48 + 96 + 16 * 3 + 3) + 60_000  # weights once, not per step
