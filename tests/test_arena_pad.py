"""The arena prediction counts the PAD copies the TFLite writer inserts (ONNX padding TFLite's SAME cannot express):
for a stride-2 conv chain it equals the head TFLite Micro measures (issue 12: a 224x224 classifier was predicted at
1.4 MiB and measured at 2.64 MB)."""

from __future__ import annotations

import json

import numpy as np
from conftest import init, make_model, save, vi
from onnx import helper

from edgeopt import costmodel
from edgeopt.cli import main
from edgeopt.graph import analyze
from edgeopt.targets import load_target


def _strided_convs():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                              name="c1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                              name="c2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W3", "B3"], ["y"], transB=1)]
    inits = [init("W1", rng.normal(0, 0.2, (32, 3, 3, 3)).astype(np.float32)), init("B1", np.zeros(32, np.float32)),
             init("W2", rng.normal(0, 0.1, (64, 32, 3, 3)).astype(np.float32)), init("B2", np.zeros(64, np.float32)),
             init("W3", rng.normal(0, 0.1, (10, 64)).astype(np.float32)), init("B3", np.zeros(10, np.float32))]
    return make_model(nodes, [vi("x", [1, 3, 96, 96])], [vi("y", [1, 10])], inits)


def test_pad_copies_are_in_the_arena_and_match_tflite_micro(tmp_path, capsys):
    path = save(_strided_convs(), tmp_path / "m.onnx")
    a = analyze(path)
    pads = costmodel.tflite_pad_tensors(a)
    assert [t.shape for t, _ in pads] == [[1, 3, 98, 98], [1, 32, 50, 50]]  # symmetric pad 1 on even inputs
    option = load_target("mcu-cortex-m7").backends[0]
    int8 = {ly.name: "int8" for ly in a.layers}
    predicted = costmodel.arena(a, int8, option).arena_bytes
    assert predicted == 48 * 48 * 32 + 50 * 50 * 32  # conv1's output and its padded copy, at the PAD step
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "x.npy", np.random.default_rng(1).normal(size=(16, 3, 96, 96)).astype(np.float32))
    rc = main(["build", str(path), "--target", "mcu-cortex-m7", "--calib", str(tmp_path / "c"), "-o", str(tmp_path / "out"),
               "--max-accuracy-drop", "0.5"])
    assert rc == 0, capsys.readouterr().err
    arena = json.loads((tmp_path / "out" / "arena.json").read_text())
    if arena.get("source") == "measured by tflite-micro":
        assert arena["measured"]["head_bytes"] == arena["predicted_bytes"] == predicted


def test_tflm_size_counts_the_flatbuffer_once(tmp_path, capsys):
    """model_data.cc renders the .tflite as C text (about 6x its bytes): the artifact's size is what the device
    stores, the flatbuffer once (plus the small arena record)."""
    from edgeopt.backends.base import read_verified

    rc = main(["build", "default", "--target", "mcu-cortex-m7", "-o", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    art = read_verified(tmp_path / "out")
    on_disk = {f: (tmp_path / "out" / f).stat().st_size for f in art.files}
    assert "model_data.cc" in on_disk and on_disk["model_data.cc"] > on_disk[art.primary]
    assert art.size_bytes == sum(n for f, n in on_disk.items() if f not in ("model_data.cc", "model_data.h"))
