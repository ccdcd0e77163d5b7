"""Hostile ONNX model files: every one ends in exit 0 or a one-line ``error:`` (exit 2), never a traceback or an
internal error (exit 1), and never unbounded memory; ``analyze`` stays fast on a 50k-node graph.

The models are generated here (small, a fixed seed): each kind of damage the loader checks (external-data offsets
and lengths, data sizes against dims, opsets, dtypes, names, sub-graphs, sparse initializers), byte flips and
truncations of a small valid model, memory bombs (``ConstantOfShape``/``Expand``/``Tile`` driven by a computed
shape, which shape inference cannot see and a run would allocate gigabytes for) and a sparse 10 GiB external-data
file (``truncate``: no disk space).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as H
from onnx import numpy_helper as NH

from edgeopt.cli import main
from edgeopt.graph import analyze, load_model, plan_arena

# ------------------------------------------------------------------ generators


def _vi(name, shape, dtype=TP.FLOAT):
    return H.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=(), *, opset=17, ir=8, sparse=(), extra_opsets=()):
    g = H.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits), sparse_initializer=list(sparse))
    m = H.make_model(g, opset_imports=[H.make_opsetid("", opset), *extra_opsets])
    m.ir_version = ir
    return m


def _base():
    """x[1,16] -> MatMul(w[16,16]) -> Relu -> y: valid, runs everywhere."""
    w = NH.from_array(np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16), "w")
    return _model([H.make_node("MatMul", ["x", "w"], ["h"], name="mm"), H.make_node("Relu", ["h"], ["y"], name="relu")],
                  [_vi("x", [1, 16])], [_vi("y", [1, 16])], [w])


def _conv():
    """A small valid conv model (the byte-flip seed)."""
    w = NH.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = NH.from_array(np.zeros(4, np.float32), "b")
    return _model([H.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                   H.make_node("Relu", ["c"], ["r"], name="relu"), H.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
                   H.make_node("Flatten", ["g"], ["y"], name="flat")],
                  [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4])], [w, b])


def _save(m, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())  # not onnx.save: no checks, no external-data rewriting
    return path


def _external(d: Path, fields: dict, *, data: bytes = b"\0" * 1024, size: int | None = None, rows: int = 16) -> Path:
    """x[1,rows] @ w[rows,16] with w in external data; ``fields`` override location/offset/length (None: left out)."""
    m = _model([H.make_node("MatMul", ["x", "w"], ["h"], name="mm"), H.make_node("Relu", ["h"], ["y"], name="relu")],
               [_vi("x", [1, rows])], [_vi("y", [1, 16])], [TP(name="w", dims=[rows, 16], data_type=TP.FLOAT)])
    t = m.graph.initializer[0]
    t.data_location = TP.EXTERNAL
    for k, v in {"location": "w.bin", "offset": "0", "length": "1024", **fields}.items():
        if v is not None:
            e = t.external_data.add()
            e.key, e.value = k, v
    d.mkdir(parents=True)
    with open(d / "w.bin", "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)  # sparse: takes no disk space
    return _save(m, d / "m.onnx")


def _with(edit):
    m = _base()
    edit(m)
    return m


def _if_model(then_nodes, then_inits=()):
    then_g = H.make_graph(then_nodes, "then", [], [_vi("t", [1, 16])], initializer=list(then_inits))
    else_g = H.make_graph([H.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", [1, 16])])
    return _model([H.make_node("ReduceSum", ["x"], ["s"], keepdims=0), H.make_node("Greater", ["s", "z"], ["c"]),
                   H.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                  [_vi("x", [1, 16])], [_vi("y", [1, 16])], [NH.from_array(np.array(0, np.float32), "z")])


def _raw(t, data):
    t.raw_data = data


def _set_const_raw_long(m):
    c = NH.from_array(np.ones((16, 16), np.float32), "wc")
    c.raw_data += b"\0" * 4
    m.graph.initializer.pop()
    m.graph.node.insert(0, H.make_node("Constant", [], ["w"], value=c))


#: name -> (model builder taking the case folder, a fragment the analyze error must contain)
def _refused_cases() -> dict:
    sparse_bad = H.make_sparse_tensor(NH.from_array(np.array([1.0, 2.0], np.float32), "w"),
                                      NH.from_array(np.array([0, 9999], np.int64), ""), [16, 16])
    bad_conv = _conv()
    bad_conv.graph.initializer[0].dims[:] = [4, 3, 9]  # weight rank 3 against a 4-D input
    bad_conv.graph.initializer[0].raw_data = np.zeros((4, 3, 9), np.float32).tobytes()
    short_k = NH.from_array(np.ones(16, np.float32), "k")
    short_k.raw_data = short_k.raw_data[:4]
    return {
        "ext_negative_offset": (lambda d: _external(d, {"offset": "-5"}), "offset '-5'"),
        "ext_non_numeric_offset": (lambda d: _external(d, {"offset": "abc"}), "offset 'abc'"),
        "ext_negative_length": (lambda d: _external(d, {"length": "-1"}), "length '-1'"),
        "ext_non_numeric_length": (lambda d: _external(d, {"length": "1k"}), "length '1k'"),
        "ext_offset_past_end": (lambda d: _external(d, {"offset": "4096"}), "truncated"),
        "ext_length_vs_dims": (lambda d: _external(d, {"length": "512"}), "length 512"),
        "ext_absolute_location": (lambda d: _external(d, {"location": "/etc/passwd"}), "outside the model's folder"),
        "ext_parent_location": (lambda d: _external(d, {"location": "../x.bin"}), "outside the model's folder"),
        "ext_missing_file": (lambda d: _external(d, {"location": "nope.bin"}), "not found"),
        "raw_data_longer": (lambda d: _save(_with(lambda m: _raw(m.graph.initializer[0], m.graph.initializer[0].raw_data + b"\0" * 8)),
                                            d / "m.onnx"), "1032 bytes of raw_data"),
        "raw_data_shorter": (lambda d: _save(_with(lambda m: _raw(m.graph.initializer[0], m.graph.initializer[0].raw_data[:100])),
                                             d / "m.onnx"), "100 bytes of raw_data"),
        "float_data_shorter": (lambda d: _save(_with(lambda m: (m.graph.initializer[0].ClearField("raw_data"),
                                                                 m.graph.initializer[0].float_data.extend([1.0] * 10))),
                                               d / "m.onnx"), "float_data"),
        "constant_raw_data_longer": (lambda d: _save(_with(_set_const_raw_long), d / "m.onnx"), "attribute 'value'"),
        "negative_dims": (lambda d: _save(_with(lambda m: m.graph.initializer[0].dims.__setitem__(0, -16)), d / "m.onnx"),
                          "negative dimension"),
        "unknown_data_type": (lambda d: _save(_with(lambda m: setattr(m.graph.initializer[0], "data_type", 77)), d / "m.onnx"),
                              "data type 77"),
        "opset_99": (lambda d: _save(_with(lambda m: setattr(m.opset_import[0], "version", 99)), d / "m.onnx"), "opset 99"),
        "opset_3": (lambda d: _save(_with(lambda m: setattr(m.opset_import[0], "version", 3)), d / "m.onnx"), "opsets 7 to"),
        "ml_opset_99": (lambda d: _save(_with(lambda m: m.opset_import.append(H.make_opsetid("ai.onnx.ml", 99))), d / "m.onnx"),
                        "'ai.onnx.ml'"),
        "ir_version_99": (lambda d: _save(_with(lambda m: setattr(m, "ir_version", 99)), d / "m.onnx"), "ir_version 99"),
        "sparse_index_out_of_range": (lambda d: _save(_model([H.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", [1, 16])],
                                                             [_vi("y", [1, 16])], sparse=[sparse_bad]), d / "m.onnx"),
                                      "out of range"),
        "duplicate_initializer": (lambda d: _save(_with(lambda m: m.graph.initializer.append(NH.from_array(np.zeros((16, 16), np.float32), "w"))),
                                                  d / "m.onnx"), "used twice"),
        "duplicate_tensor": (lambda d: _save(_with(lambda m: (m.graph.node[1].output.__setitem__(0, "h"),
                                                              setattr(m.graph.output[0], "name", "h"))), d / "m.onnx"),
                             "produced twice"),
        "duplicate_input": (lambda d: _save(_with(lambda m: m.graph.input.append(_vi("x", [1, 16]))), d / "m.onnx"), "used twice"),
        "string_input": (lambda d: _save(_model([H.make_node("Identity", ["x"], ["y"])], [_vi("x", [1, 4], TP.STRING)],
                                                [_vi("y", [1, 4], TP.STRING)]), d / "m.onnx"), "is string"),
        "complex_input": (lambda d: _save(_model([H.make_node("Identity", ["x"], ["y"])], [_vi("x", [1, 4], TP.COMPLEX64)],
                                                 [_vi("y", [1, 4], TP.COMPLEX64)]), d / "m.onnx"), "complex64"),
        "bfloat16_input": (lambda d: _save(_model([H.make_node("Identity", ["x"], ["y"])], [_vi("x", [1, 4], TP.BFLOAT16)],
                                                  [_vi("y", [1, 4], TP.BFLOAT16)]), d / "m.onnx"), "bfloat16"),
        "sequence_input": (lambda d: _save(_model([H.make_node("Relu", ["x"], ["y"])],
                                                  [H.make_value_info("x", H.make_sequence_type_proto(H.make_tensor_type_proto(TP.FLOAT, [1])))],
                                                  [_vi("y", [1])]), d / "m.onnx"), "sequence"),
        "missing_output": (lambda d: _save(_with(lambda m: setattr(m.graph.output[0], "name", "nope")), d / "m.onnx"),
                           "graph output 'nope'"),
        "no_outputs": (lambda d: _save(_with(lambda m: m.graph.ClearField("output")), d / "m.onnx"), "no outputs"),
        "undefined_tensor": (lambda d: _save(_with(lambda m: m.graph.node[1].input.__setitem__(0, "ghost")), d / "m.onnx"),
                             "'ghost'"),
        "cycle": (lambda d: _save(_with(lambda m: m.graph.node[0].input.__setitem__(0, "y")), d / "m.onnx"), "topological order"),
        "unknown_op": (lambda d: _save(_with(lambda m: setattr(m.graph.node[0], "op_type", "FooBar")), d / "m.onnx"), "FooBar"),
        "subgraph_undefined_tensor": (lambda d: _save(_if_model([H.make_node("Relu", ["ghost"], ["t"])]), d / "m.onnx"),
                                      "sub-graph 'then_branch'"),
        "subgraph_raw_data_short": (lambda d: _save(_if_model([H.make_node("Add", ["x", "k"], ["t"])], [short_k]), d / "m.onnx"),
                                    "sub-graph 'then_branch'"),
        "invalid_utf8_name": (lambda d: _invalid_utf8(d / "m.onnx"), "UTF-8"),
        "shapes_contradict": (lambda d: _save(bad_conv, d / "m.onnx"), "shape inference fails at Conv node 'conv'"),
    }


def _invalid_utf8(path: Path) -> Path:
    data = _base().SerializeToString().replace(b"relu", b"r\xecl\xff")  # node and tensor names, not valid UTF-8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _sparse_init_model():
    vals = NH.from_array(np.array([1.5, -2.0], np.float32), "w")
    idx = NH.from_array(np.array([0, 17], np.int64), "")
    return _model([H.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_vi("x", [1, 16])], [_vi("y", [1, 16])],
                  sparse=[H.make_sparse_tensor(vals, idx, [16, 16])])


def _accepted_cases() -> dict:
    sp = H.make_sparse_tensor(NH.from_array(np.array([1.0], np.float32), "s"), NH.from_array(np.array([3], np.int64), ""), [16])
    body = H.make_graph([H.make_node("Add", ["v", "one"], ["v2"]), H.make_node("Identity", ["cond"], ["cond2"])], "body",
                        [_vi("i", [], TP.INT64), _vi("cond", [], TP.BOOL), _vi("v", [1, 16])],
                        [_vi("cond2", [], TP.BOOL), _vi("v2", [1, 16])], initializer=[NH.from_array(np.ones((1, 16), np.float32), "one")])
    return {
        "valid": lambda d: _save(_base(), d / "m.onnx"),
        "sparse_initializer": lambda d: _save(_sparse_init_model(), d / "m.onnx"),
        "sparse_constant": lambda d: _save(_model([H.make_node("Constant", [], ["s"], sparse_value=sp), H.make_node("Add", ["x", "s"], ["y"])],
                                                  [_vi("x", [1, 16])], [_vi("y", [1, 16])]), d / "m.onnx"),
        "duplicate_node_names": lambda d: _save(_with(lambda m: setattr(m.graph.node[1], "name", "mm")), d / "m.onnx"),
        "if_subgraph": lambda d: _save(_if_model([H.make_node("Relu", ["x"], ["t"])]), d / "m.onnx"),
        "loop": lambda d: _save(_model([H.make_node("Loop", ["n", "", "x"], ["y"], body=body)], [_vi("x", [1, 16])], [_vi("y", [1, 16])],
                                       [NH.from_array(np.array(3, np.int64), "n")]), d / "m.onnx"),
        "float16_io": lambda d: _save(_model([H.make_node("Relu", ["x"], ["y"])], [_vi("x", [1, 4], TP.FLOAT16)],
                                             [_vi("y", [1, 4], TP.FLOAT16)]), d / "m.onnx"),
        # no length: the 10 GiB (sparse) file is read only as far as the dims need, not to its end
        "ext_no_length_10gib_file": lambda d: _external(d, {"length": None}, size=10 * 2**30),
    }


# ------------------------------------------------------------------ helpers


def _run(capsys, argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _check(rc: int, out: str, err: str, fragment: str | None = None) -> None:
    assert rc in (0, 2), (rc, err[-2000:])
    assert "Traceback" not in out + err and "internal error" not in err, err[-2000:]
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        if fragment:
            assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ the cases


@pytest.mark.parametrize("case", sorted(_refused_cases()))
def test_hostile_model_is_refused_in_one_line(case, tmp_path, capsys):
    build, fragment = _refused_cases()[case]
    path = build(tmp_path / case)
    rc, out, err = _run(capsys, ["analyze", path])
    assert rc == 2, (out, err)
    _check(rc, out, err, fragment)
    rc, out, err = _run(capsys, ["plan", path, "--target", "x86-cpu"])  # the same load: refused the same way
    assert rc == 2
    _check(rc, out, err, fragment)


@pytest.mark.parametrize("case", sorted(_accepted_cases()))
def test_odd_but_valid_model_analyses_plans_and_builds(case, tmp_path, capsys):
    path = _accepted_cases()[case](tmp_path / case)
    rc, out, err = _run(capsys, ["analyze", path])
    _check(rc, out, err)
    assert rc == 0, err
    for argv in (["plan", path, "--target", "x86-cpu"], ["build", path, "--target", "x86-cpu", "-o", tmp_path / "out"]):
        rc, out, err = _run(capsys, argv)
        _check(rc, out, err)
        assert rc == 0, err
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_sparse_initializers_become_dense_and_duplicate_node_names_unique(tmp_path):
    p = _save(_sparse_init_model(), tmp_path / "sparse.onnx")
    m = load_model(p)
    assert not m.graph.sparse_initializer
    w = NH.to_array(m.graph.initializer[0])
    expected = np.zeros(256, np.float32)
    expected[[0, 17]] = [1.5, -2.0]
    assert w.shape == (16, 16) and np.array_equal(w.reshape(-1), expected)
    a = analyze(p)
    assert a.total_params == 256 and a.total_weight_bytes == 1024
    p = _save(_with(lambda m: setattr(m.graph.node[1], "name", "mm")), tmp_path / "dup.onnx")
    assert [ly.name for ly in analyze(p).layers] == ["mm", "mm_1"]


def _fuzz_seed_models() -> list[bytes]:
    """The conv model, and one with a Constant node and an If with sub-graphs.  (No Loop: a flipped trip count is a
    compute bomb that plan and build would run for hours; their runs have no time limit.)"""
    c = NH.from_array(np.full((1, 16), 0.5, np.float32), "cc")
    m = _if_model([H.make_node("Relu", ["x"], ["t"])])
    m.graph.node.insert(0, H.make_node("Constant", [], ["cc"], value=c, name="const"))
    m.graph.node.append(H.make_node("Mul", ["y0", "cc"], ["y"], name="mul"))
    m.graph.node[3].output[0] = "y0"
    onnx.checker.check_model(m)
    return [_conv().SerializeToString(), m.SerializeToString()]


@pytest.mark.parametrize("seed_model", [0, 1])
def test_byte_flips_and_truncations_never_crash(seed_model, tmp_path, capsys):
    data = _fuzz_seed_models()[seed_model]
    rng = random.Random(20240601 + seed_model)
    built = 0
    for k in range(80):
        d = bytearray(data)
        kind = k % 4
        if kind == 0:
            d = d[: rng.randrange(1, len(d))]
        elif kind == 1:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(d))
                d[i] ^= 1 << rng.randrange(8)
        elif kind == 2:
            for _ in range(rng.randint(1, 3)):
                d[rng.randrange(len(d))] = rng.randrange(256)
        else:
            i = rng.randrange(len(d))
            d[i:i] = d[i : i + rng.randint(1, 40)]
        p = tmp_path / f"f{k}.onnx"
        p.write_bytes(bytes(d))
        rc, out, err = _run(capsys, ["analyze", p])
        _check(rc, out, err)
        if rc != 0:
            continue  # refused at load: plan and build load it the same way
        _check(*_run(capsys, ["plan", p, "--target", "x86-cpu"]))
        if built < 8:  # builds are the slow part; a few of the survivors
            built += 1
            _check(*_run(capsys, ["build", p, "--target", "x86-cpu", "-o", tmp_path / f"out{k}"]))


# ------------------------------------------------------------------ memory


def _bomb(op: str, n: int = 40000):
    """x[1,16] -> a computed shape [n, n] (ReduceMax(x)*0 + n: shape inference cannot see it) -> ``op`` allocates
    n*n floats (40000: 6.4 GB) -> ReduceSum -> scalar y.  A 1 KB file."""
    k = NH.from_array(np.array([0.0], np.float32), "k")
    big = NH.from_array(np.array([float(n)], np.float32), "big")
    one = NH.from_array(np.array([1], np.int64), "one")
    x11 = NH.from_array(np.ones((1, 1), np.float32), "x11")
    shape_nodes = [H.make_node("ReduceMax", ["x"], ["mx0"], keepdims=0), H.make_node("Reshape", ["mx0", "one"], ["mx"]),
                   H.make_node("Mul", ["mx", "k"], ["z"]), H.make_node("Add", ["z", "big"], ["n"]),
                   H.make_node("Cast", ["n"], ["ni"], to=TP.INT64), H.make_node("Concat", ["ni", "ni"], ["shp"], axis=0)]
    grow = {"ConstantOfShape": H.make_node("ConstantOfShape", ["shp"], ["buf"], value=NH.from_array(np.array([1.0], np.float32), "v")),
            "Expand": H.make_node("Expand", ["x11", "shp"], ["buf"]),
            "Tile": H.make_node("Tile", ["x11", "shp"], ["buf"])}[op]
    return _model([*shape_nodes, grow, H.make_node("ReduceSum", ["buf"], ["y"], keepdims=0)],
                  [_vi("x", [1, 16])], [_vi("y", [])], [k, big, one, x11])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shape-finding run is capped with RLIMIT_AS on Linux")
def test_memory_bombs_and_huge_external_data_stay_bounded(tmp_path):
    """In a child process: every bomb refused in one line under --max-memory, the peak RSS of the process and of its
    children (the capped shape-finding run) far below what the bombs ask for."""
    cases = []
    for op, n in (("ConstantOfShape", 40000), ("Expand", 40000), ("Tile", 30000)):  # onnxruntime's Tile stops at 4 GiB
        p = _save(_bomb(op, n), tmp_path / f"bomb_{op}.onnx")
        assert p.stat().st_size < 1024
        cases += [(["analyze", p, "--max-memory", "512MiB"], 2, "memory limit of 512.0 MiB"),
                  (["--max-memory", "512MiB", "build", p, "--target", "x86-cpu", "-o", tmp_path / "out"], 2, "memory limit")]
    # inputs whose declared size alone is over the limit, and a data-dependent op: refused before anything runs
    huge = _save(_model([H.make_node("NonZero", ["x"], ["nz"]), H.make_node("ReduceSum", ["nz"], ["y"], keepdims=0)],
                        [_vi("x", [1, 30000, 30000])], [_vi("y", [], TP.INT64)]), tmp_path / "huge_input.onnx")
    cases.append((["analyze", huge, "--max-memory", "1GiB"], 2, "needs at least 3.4 GiB"))
    # a bomb the limit allows runs (its shape is then known): 2000x2000 floats = 16 MB
    small = _save(_bomb("ConstantOfShape", 2000), tmp_path / "small_bomb.onnx")
    cases.append((["analyze", small, "--max-memory", "512MiB", "--json"], 0, None))
    # a 10 GiB external-data file whose dims want all of it: analyze reads none of it, plan/compress refuse to
    ext = _external(tmp_path / "ext10g", {"length": str(10 * 2**30)}, data=b"", size=10 * 2**30, rows=10 * 2**30 // 64)
    cases += [(["analyze", ext], 0, None),
              (["plan", ext, "--target", "x86-cpu", "--max-memory", "4GiB"], 2, "of external data"),
              (["compress", ext, "--pass", "fp16", "-o", tmp_path / "c.onnx"], 2, "memory limit")]
    code = textwrap.dedent("""
        import contextlib, io, json, resource, sys
        from edgeopt.cli import main
        results = []
        for argv in json.loads(sys.argv[1]):
            err, out = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                rc = main(argv)
            results.append([rc, err.getvalue(), out.getvalue()])
        peak = {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
        print(json.dumps({"results": results, "peak_kib": peak}))
    """)
    argvs = [[str(a) for a in argv] for argv, _, _ in cases]
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, want_rc, fragment), (rc, err, out) in zip(cases, res["results"]):
        assert rc == want_rc, (argv, rc, err, out[-500:])
        _check(rc, out, err, fragment)
    small_analysis = json.loads(res["results"][next(i for i, c in enumerate(cases) if small in c[0])][2])
    assert [2000, 2000] in [ly["output_shapes"][0] for ly in small_analysis["layers"]]  # found by the capped run
    peak = res["peak_kib"]
    print("peak RSS KiB", peak)
    assert peak["self"] < 1_500_000 and peak["children"] < 1_500_000, peak  # KiB: under ~1.5 GB, bombs ask 6.4 GB


# ------------------------------------------------------------------ a huge graph


def _chain(n: int):
    """x[1,16] -> n nodes alternating Add(c), Relu, Mul(c) -> y."""
    nodes, prev = [], "x"
    for i in range(n):
        op = ("Add", "Relu", "Mul")[i % 3]
        out = f"t{i}" if i < n - 1 else "y"
        nodes.append(onnx.NodeProto(op_type=op, input=[prev] if op == "Relu" else [prev, "c"], output=[out], name=f"n{i}"))
        prev = out
    return _model(nodes, [_vi("x", [1, 16])], [_vi("y", [1, 16])], [NH.from_array(np.ones((1, 16), np.float32), "c")])


def test_analyze_50k_node_chain(tmp_path, capsys):
    """A regression guard for the quadratic parts (arena planning scanned every placed buffer per buffer; rendering
    formatted every row): 122 s before on the probe's machine, a few seconds now."""
    n = 50_000
    p = _save(_chain(n), tmp_path / "chain.onnx")
    a = analyze(p)
    assert len(a.layers) == n and len(a.tensors) == n + 1
    assert a.total_flops == 16 * n and a.total_macs == 0
    assert a.total_params == 16 * sum(1 for i in range(n) if i % 3 != 1)  # Add and Mul read c, stored once
    assert a.total_weight_bytes == 64
    arena = plan_arena(a.tensors, lambda t: t.elems * 4)
    assert arena.peak_live_bytes == 128 and arena.arena_bytes == 128  # a chain needs two buffers
    rc, out, err = _run(capsys, ["analyze", p, "--top", "5"])
    assert rc == 0, err
    assert "top 5 layers by arithmetic" in out and "layers 50000" in out and "n49999" not in out


def _runtime_failures() -> dict:
    """Models the ONNX checker and strict shape inference accept but onnxruntime cannot run."""
    w = NH.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    bias5 = NH.from_array(np.ones(5, np.float32), "b")
    then_g = H.make_graph([H.make_node("Relu", ["x"], ["t"])], "then", [], [_vi("t", [1, 16])])
    else_g = H.make_graph([H.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", [1, 16])])
    return {
        "global_pool_rank2": _model([H.make_node("GlobalAveragePool", ["x"], ["y"])], [_vi("x", [1, 16])],
                                    [_vi("y", [1, 16])]),
        "conv_bias_size": _model([H.make_node("Conv", ["x", "w", "b"], ["y"])], [_vi("x", [1, 3, 8, 8])],
                                 [_vi("y", [1, 4, 6, 6])], [w, bias5]),
        "if_condition_many_elements": _model(
            [H.make_node("Greater", ["x", "z"], ["c"]), H.make_node("If", ["c"], ["y"], then_branch=then_g,
                                                                    else_branch=else_g)],
            [_vi("x", [1, 16])], [_vi("y", [1, 16])], [NH.from_array(np.array(0, np.float32), "z")]),
    }


@pytest.mark.parametrize("case", sorted(_runtime_failures()))
def test_model_onnxruntime_cannot_run_is_refused_before_planning(case, tmp_path, capsys):
    path = _save(_runtime_failures()[case], tmp_path / "m.onnx")
    for argv in (["plan", path, "--target", "x86-cpu"], ["build", path, "--target", "x86-cpu", "-o", tmp_path / "o"]):
        rc, out, err = _run(capsys, argv)
        assert rc == 2, (out, err)
        _check(rc, out, err, "onnxruntime cannot run")
    assert not (tmp_path / "o").exists()
