"""An op refusal also says when the model could not fit the device anyway (what a device states first)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.errors import UnsupportedOpError
from edgeopt.graph import analyze
from edgeopt.planner import make_plan
from edgeopt.targets import load_target


def _model(path, cols: int):
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(1024, cols)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
         helper.make_node("Cast", ["y"], ["z"], name="cast", to=TensorProto.INT32)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("z", TensorProto.INT32, [1, cols])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, path)
    return analyze(path)


def test_op_refusal_adds_what_would_not_fit(tmp_path):
    target = load_target("mcu-cortex-m7")
    with pytest.raises(UnsupportedOpError) as e:
        make_plan(_model(tmp_path / "big.onnx", 4096), target)  # 4 M parameters: 4 MiB in int8 > 2 MiB of flash
    msg = str(e.value)
    assert "op Cast is not supported by tflm (1 layer: cast)" in msg
    assert "would not fit even in int8: storage at least 4.0 MiB > 2.0 MiB" in msg
    with pytest.raises(UnsupportedOpError) as e:
        make_plan(_model(tmp_path / "small.onnx", 16), target)
    assert "op Cast" in str(e.value) and "would not fit" not in str(e.value)
