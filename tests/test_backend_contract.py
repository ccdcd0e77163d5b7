"""One contract, every backend: plan the digits CNN for a target the backend serves, convert, verify the manifest,
load (with threads where the runtime takes them) and run, compare with the ONNX model; where the runtime cannot run
here, the backend says why and its exact-numerics reference (if it has one) stands in."""

from __future__ import annotations

import platform
from importlib.util import find_spec

import numpy as np
import onnx
import pytest

from edgeopt.backends import BACKENDS, get
from edgeopt.backends.base import RuntimeUnavailable, build_artifact, read_verified
from edgeopt.calibration import as_calibration
from edgeopt.datasets import default_model_path, digits
from edgeopt.errors import BackendNotInstalledError, EdgeoptError
from edgeopt.fidelity import session
from edgeopt.graph import analyze
from edgeopt.planner import make_plan
from edgeopt.targets import load_target

#: backend -> (target, precision, least top-1 agreement with the fp32 ONNX model on 360 test digits)
CASES = {
    "onnxruntime": ("x86-cpu", "int8", 0.98),
    "openvino": ("x86-cpu", "fp32", 0.995),
    "tflite": ("android-mid", "fp32", 0.995),
    "tflm": ("mcu-cortex-m7", "int8", 0.97),
    "coreml": ("ios", "fp16", 0.99),
    "tensorrt": ("gpu-server", "int8", 0.98),
}


def test_every_backend_has_a_case():
    assert set(CASES) == set(BACKENDS)


def _top1(runner, x: np.ndarray) -> np.ndarray:
    name = runner.input_names[0]
    return np.array([int(np.asarray(runner.run({name: x[i:i + 1]})[0]).argmax()) for i in range(len(x))])


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_contract(tmp_path, name):
    target, precision, least = CASES[name]
    backend = get(name).BACKEND
    if backend.convert_requires_sdk and not backend.is_available():
        pytest.fail(f"{name}'s SDK is part of the test extra: pip install -e '.[test]'")
    model = onnx.load(str(default_model_path()))
    xc, _ = digits("calib")
    x, _ = digits("test")
    plan = make_plan(analyze(default_model_path()), load_target(target), backend=name, precision=precision)
    art = build_artifact(model, plan, tmp_path / name, as_calibration(xc, model))
    assert read_verified(tmp_path / name) == art and art.backend == name
    assert art.primary in art.files or (tmp_path / name / art.primary).is_dir()  # a file, or a package (Core ML)
    ref = session(model).run(None, {"image": x})[0].argmax(1)
    runnable = name != "tensorrt" or find_spec("tensorrt") is not None
    runnable = runnable and (name != "coreml" or platform.system() == "Darwin")
    if runnable:
        runner = backend.load(art, tmp_path / name, threads=1 if backend.threaded else None)
        with runner:
            assert float((_top1(runner, x) == ref).mean()) >= least
            assert isinstance(runner.op_profile({"image": x[:1]}, repeats=2), list)
        if not backend.threaded:
            with pytest.raises(EdgeoptError, match="--threads applies to"):
                backend.load(art, tmp_path / name, threads=2)
    else:
        with pytest.raises((BackendNotInstalledError, RuntimeUnavailable)):
            backend.load(art, tmp_path / name)
    reference = backend.reference(art, tmp_path / name)
    if reference is not None:  # exact numerics, on any machine
        with reference:
            assert float((_top1(reference, x) == ref).mean()) >= least
    else:
        assert name not in ("onnxruntime", "tensorrt")
