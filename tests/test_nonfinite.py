"""NaN/Inf never passes as faithful: a reference that is not finite is refused, a candidate that is not finite is the
worst case (issue 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_model, save, vi
from onnx import TensorProto, helper

from edgeopt.cli import main
from edgeopt.errors import EdgeoptError
from edgeopt.fidelity import NONFINITE_NOISE, SNR_CEILING_DB, compare_outputs, relative_noise


def test_nonfinite_candidate_is_the_worst_case():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 10))
    out = ref.copy()
    out[3, 2] = np.nan
    out[5] = np.inf
    labels = ref.argmax(1)
    f = compare_outputs([ref], [out], labels)
    assert f.snr_db == -SNR_CEILING_DB and f.top1_agreement == pytest.approx(6 / 8)
    assert f.accuracy_delta == pytest.approx(-2 / 8) and f.cosine == pytest.approx(6 / 8)
    json.loads(f.model_dump_json(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert relative_noise(ref, out) == NONFINITE_NOISE and relative_noise(ref, ref) == 0.0
    same = compare_outputs([ref], [ref], labels)
    assert same.snr_db == SNR_CEILING_DB and same.top1_agreement == 1.0


def test_nonfinite_reference_is_refused():
    ref = np.ones((4, 3))
    ref[2, 1] = np.nan
    with pytest.raises(EdgeoptError, match="output 0 for sample 2"):
        compare_outputs([ref], [np.ones((4, 3))])


def test_model_producing_nan_on_the_data_is_one_line_error(tmp_path, capsys):
    """Log of negative calibration data: the original model itself produces NaN; plan refuses in one line."""
    model = make_model([helper.make_node("Log", ["x"], ["l"]), helper.make_node("Relu", ["l"], ["y"])],
                       [vi("x", [1, 8])], [vi("y", [1, 8], TensorProto.FLOAT)])
    path = save(model, tmp_path / "log.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", -np.abs(np.random.default_rng(0).normal(size=(16, 8))).astype(np.float32) - 0.1)
    rc = main(["plan", str(path), "--target", "x86-cpu", "--calib", str(calib)])
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "NaN/Inf in output 0" in lines[0], cap.err


def test_model_failing_on_a_later_sample_is_one_line_error(tmp_path, capsys):
    """A data-dependent branch that breaks on some calibration samples (an out-of-range Gather in the branch taken
    when the input sums above 0): refused in one line naming the sample, not an internal error."""
    from onnx import numpy_helper

    then_g = helper.make_graph([helper.make_node("Gather", ["x", "bad"], ["t"], axis=1)], "then", [],
                               [vi("t", [1, 1])], [numpy_helper.from_array(np.array([10], np.int64), "bad")])
    else_g = helper.make_graph([helper.make_node("ReduceMax", ["x"], ["e"], keepdims=1, axes=[1])], "else", [],
                               [vi("e", [1, 1])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "z"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    from conftest import init

    model = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 1])], [init("z", np.array(0, np.float32))], opset=17)
    path = save(model, tmp_path / "branchy.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    x = -np.ones((8, 8), np.float32)
    x[3] = 1.0  # sample 3 takes the broken branch
    np.save(calib / "x.npy", x)
    rc = main(["build", str(path), "--target", "x86-cpu", "--calib", str(calib), "-o", str(tmp_path / "out")])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "sample 3" in lines[0], cap.err
    assert not (tmp_path / "out").exists()
