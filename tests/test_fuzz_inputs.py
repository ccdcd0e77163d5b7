"""Hostile inputs end in one line: target files and calibration/label data that are corrupt, huge, non-finite,
pickled, of the wrong shape or not files at all make ``edgeopt`` print ``error: <one line naming the file>`` and
exit 2, never a traceback (exit 1) and never output before the refusal; NaN/Inf numbers are refused, and a .npy
header claiming terabytes is refused before anything is allocated."""

from __future__ import annotations

import io
import math
import os
import random
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import init, make_model, save, vi
from onnx import helper
from pydantic import ValidationError

from edgeopt.cli import main
from edgeopt.targets import BUILTIN_DIR, MAX_TARGET_FILE_BYTES
from edgeopt.types import Target

TIB = 1 << 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """MatMul + Relu on a [1, 8] input: plans in milliseconds."""
    d = tmp_path_factory.mktemp("tiny")
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
                   [vi("x", [1, 8])], [vi("z", [1, 4])], [init("w", w)])
    return save(m, d / "tiny.onnx")


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory) -> Path:
    """Relu on a [1, d] input (d free): samples of different widths across files reach the loader."""
    d = tmp_path_factory.mktemp("dyn")
    m = make_model([helper.make_node("Relu", ["x"], ["z"])], [vi("x", [1, "d"])], [vi("z", [1, "d"])])
    return save(m, d / "dyn.onnx")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean(rc: int, out: str, err: str, names: str | None = None) -> None:
    """Exit 0, or exit 2 with one ``error:`` line on stderr naming ``names`` and nothing on stdout."""
    assert rc in (0, 2), f"exit {rc}: {err[-800:]}"
    assert "Traceback" not in err and "internal error" not in err, err[-800:]
    if rc == 2:
        assert out == "", f"printed before refusing: {out[:300]}"
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("error: "), err[-800:]
        if names is not None:
            assert names in lines[0], (names, lines[0])


# --------------------------------------------------------------------------- target files

BASE = "base: x86-cpu\nname: x\n"
CPU = "compute_units: {cpu: {peak_ops_per_s: {fp32: %s, bf16: 1e12, int8: 1e12}, memory_bandwidth_bytes_per_s: %s}}\n"
BACKEND = "backends: [{backend: onnxruntime, unit: cpu, precisions: [fp32], %s}]\n"

TARGET_CASES: dict[str, tuple[bytes, str]] = {  # name -> (file content, text the error must contain)
    "binary": (bytes(range(256)) * 4, "UTF-8"),
    "latin1": ("name: caf\xe9\ndescription: d\n".encode("latin-1"), "UTF-8"),
    "utf16": ("name: x\n".encode("utf-16"), "UTF-8"),
    "nul_byte": (b"name: a\x00b\n", "YAML"),
    "deep_flow": (b"a: " + b"[" * 3000 + b"]" * 3000, "nested"),
    "deep_block": ("".join(" " * i + f"k{i}:\n" for i in range(400)).encode(), "nested"),
    "deep_valid_yaml": (b"name: " + b"[" * 30 + b"]" * 30 + b"\n", "nested"),
    "alias_bomb": (b"a: &a [1,1,1,1,1,1,1,1,1,1]\n" + b"".join(
        b"%c: &%c [%s]\n" % (c, c, b",".join([b"*" + bytes([c - 1])] * 10)) for c in b"bcdefg") + b"h: [*g,*g]\n",
        "more than"),
    "huge_file": (b"# " + b"x" * (MAX_TARGET_FILE_BYTES + 10) + b"\n", "larger than"),
    "empty": (b"", "empty"),
    "only_comment": (b"# nothing here\n", "empty"),
    "scalar": (b"42\n", "mapping"),
    "list_top": (b"- a\n- b\n", "mapping"),
    "python_tag": (b"!!python/object/apply:os.system ['true']\n", "YAML"),
    "int_key": (BASE.encode() + b"1: 2\n", "not a string"),
    "unknown_key": (BASE.encode() + b"colour: red\n", "colour"),
    "extends": (b"extends: x86-cpu\nname: x\n", "base: NAME"),
    "missing_base": (b"base: no-such-target\nname: x\n", "no-such-target"),
    "base_list": (b"base: [x86-cpu]\nname: x\n", "base"),
    "base_self_named": (b"base: x\nname: x\n", "base"),
    "ram_400_digits": (BASE.encode() + b"budgets: {ram: " + b"9" * 400 + b"}\n", "budgets.ram"),
    "ram_zero": ((BASE + "budgets: {ram: 0}\n").encode(), "budgets.ram"),
    "storage_zero": ((BASE + "budgets: {storage: 0}\n").encode(), "budgets.storage"),
    "ram_negative": ((BASE + "budgets: {ram: -5}\n").encode(), "budgets.ram"),
    "ram_negative_unit": ((BASE + "budgets: {ram: -5KiB}\n").encode(), "budgets.ram"),
    "ram_bad_unit": ((BASE + "budgets: {ram: 5 parsecs}\n").encode(), "budgets.ram"),
    "ram_fraction": ((BASE + "budgets: {ram: 0.5}\n").encode(), "budgets.ram"),
    "ram_bool": ((BASE + "budgets: {ram: true}\n").encode(), "budgets.ram"),
    "ram_list": ((BASE + "budgets: {ram: [1, 2]}\n").encode(), "budgets.ram"),
    "ram_inf": ((BASE + "budgets: {ram: .inf}\n").encode(), "budgets.ram"),
    "latency_zero": ((BASE + "budgets: {latency_ms: 0}\n").encode(), "budgets.latency_ms"),
    "latency_nan": ((BASE + "budgets: {latency_ms: .nan}\n").encode(), "budgets.latency_ms"),
    "latency_inf": ((BASE + "budgets: {latency_ms: .inf}\n").encode(), "budgets.latency_ms"),
    "latency_bool": ((BASE + "budgets: {latency_ms: false}\n").encode(), "budgets.latency_ms"),
    "budgets_list": ((BASE + "budgets: [1, 2]\n").encode(), "budgets"),
    "units_list": ((BASE + "compute_units: [cpu]\n").encode(), "compute_units"),
    "peak_nan": ((BASE + CPU % (".nan", "1e10")).encode(), "compute_units.cpu.peak_ops_per_s.fp32"),
    "peak_nan_string": ((BASE + CPU % ("NaN", "1e10")).encode(), "compute_units.cpu.peak_ops_per_s.fp32"),
    "peak_inf": ((BASE + CPU % (".inf", "1e10")).encode(), "compute_units.cpu.peak_ops_per_s.fp32"),
    "peak_zero": ((BASE + CPU % ("0", "1e10")).encode(), "compute_units.cpu.peak_ops_per_s.fp32"),
    "peak_negative": ((BASE + CPU % ("-1e11", "1e10")).encode(), "compute_units.cpu.peak_ops_per_s.fp32"),
    "peak_bool": ((BASE + CPU % ("true", "1e10")).encode(), "compute_units.cpu.peak_ops_per_s.fp32"),
    "peak_tiny": ((BASE + CPU % ("1e-300", "1e10")).encode(), "compute_units.cpu.peak_ops_per_s.fp32"),
    "bandwidth_nan": ((BASE + CPU % ("1e11", ".nan")).encode(), "memory_bandwidth_bytes_per_s"),
    "bandwidth_inf": ((BASE + CPU % ("1e11", ".inf")).encode(), "memory_bandwidth_bytes_per_s"),
    "bandwidth_zero": ((BASE + CPU % ("1e11", "0")).encode(), "memory_bandwidth_bytes_per_s"),
    "bandwidth_string": ((BASE + CPU % ("1e11", "fast")).encode(), "memory_bandwidth_bytes_per_s"),
    "efficiency_nan": ((BASE + "compute_units: {cpu: {efficiency: .nan}}\n").encode(), "efficiency"),
    "efficiency_two": ((BASE + "compute_units: {cpu: {efficiency: 2}}\n").encode(), "efficiency"),
    "overhead_negative": ((BASE + "compute_units: {cpu: {layer_overhead_us: -1}}\n").encode(), "layer_overhead_us"),
    "overhead_inf": ((BASE + "compute_units: {cpu: {run_overhead_us: .inf}}\n").encode(), "run_overhead_us"),
    "backend_eff_nan": ((BASE + BACKEND % "efficiency_by_precision: {fp32: .nan}").encode(), "efficiency_by_precision"),
    "backend_eff_unknown": ((BASE + BACKEND % "efficiency_by_precision: {fp64: 0.5}").encode(), "fp64"),
    "backend_overhead_inf": ((BASE + BACKEND % "overhead_us_by_precision: {fp32: .inf}").encode(),
                             "overhead_us_by_precision"),
    "option_nan": ((BASE + BACKEND % "options: {threads: .nan}").encode(), "threads"),
    "option_bool": ((BASE + BACKEND % "options: {threads: true}").encode(), "threads"),
    "option_huge": ((BASE + BACKEND % ("options: {threads: " + "9" * 50 + "}")).encode(), "threads"),
    "option_list": ((BASE + BACKEND % "options: {threads: [1]}").encode(), "threads"),
    "sparsity_speedup_inf": ((BASE + BACKEND % "sparsity: [{pattern: channel, speedup: .inf}]").encode(), "speedup"),
    "kernel_model_nan": ((BASE + BACKEND % "kernel_models: {'fp32:gemm': {fixed_us: .nan, us_per_mmac: 1, "
                                           "us_per_mb: 1}}").encode(), "fixed_us"),
    "backends_map": ((BASE + "backends: {backend: onnxruntime}\n").encode(), "backends"),
    "backends_empty": ((BASE + "backends: []\n").encode(), "backends"),
    "json_nan": (b'{"base": "x86-cpu", "name": "x", "budgets": {"latency_ms": NaN}}', "budgets.latency_ms"),
}


@pytest.mark.parametrize("case", sorted(TARGET_CASES))
def test_hostile_target_file_is_one_line_error(tmp_path, capsys, tiny, case):
    content, expected = TARGET_CASES[case]
    f = tmp_path / f"{case}.yaml"
    f.write_bytes(content)
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", f)
    assert rc == 2, (case, rc, out[-300:], err[-300:])
    assert_clean(rc, out, err, names=str(f))
    assert expected in err, (case, err)


@pytest.mark.parametrize("what", ["dir", "fifo", "dev_null", "missing", "symlink_loop", "long_name"])
def test_target_path_that_is_not_a_file(tmp_path, capsys, tiny, what):
    if what == "dir":
        p = tmp_path / "d.yaml"
        p.mkdir()
    elif what == "fifo":
        p = tmp_path / "f.yaml"
        os.mkfifo(p)  # must not block
    elif what == "dev_null":
        p = Path("/dev/null")
    elif what == "missing":
        p = tmp_path / "missing.yaml"
    elif what == "symlink_loop":
        p = tmp_path / "loop.yaml"
        p.symlink_to(p)
    else:
        p = tmp_path / ("a" * 5000 + ".yaml")
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", p)
    assert rc == 2
    assert_clean(rc, out, err, names=str(p)[:100])


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, i = rng.randrange(5), rng.randrange(len(b))
        if op == 0:
            b[i] = rng.randrange(256)
        elif op == 1:
            del b[i : i + rng.randint(1, 8)]
        elif op == 2:
            b[i:i] = bytes([rng.choice(b"{}[]:,-&*!'\"\n #.\x00\xff0123456789")])
        elif op == 3:
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randint(1, 40)]
        else:
            b[i:i] = rng.choice([b".nan", b".inf", b"-1", b"0", b"true", b"1e400", b"9" * 60, b"[", b"{"])
    return bytes(b)


def test_random_mutations_of_a_builtin_target(tmp_path, capsys, tiny):
    """Random byte mutations of x86-cpu.yaml (fixed seed): each plans (exit 0) or is one error line (exit 2)."""
    rng = random.Random(20240611)
    original = (BUILTIN_DIR / "x86-cpu.yaml").read_bytes()
    codes = []
    for k in range(120):
        f = tmp_path / f"m{k}.yaml"
        f.write_bytes(_mutate(original, rng))
        rc, out, err = run_cli(capsys, "plan", tiny, "--target", f)
        assert_clean(rc, out, err, names=str(f) if rc == 2 else None)
        if rc == 0:
            assert "nan" not in out.lower().replace("nanos", "") and "inf ms" not in out
        codes.append(rc)
    assert codes.count(2) > 30 and codes.count(0) > 5  # the mix is a real test of both paths


@pytest.mark.parametrize("field,value", [
    ("budgets.latency_ms", math.nan), ("budgets.latency_ms", math.inf), ("budgets.latency_ms", True),
    ("budgets.ram", 0), ("budgets.storage", -1), ("budgets.ram", 10**400), ("budgets.ram", math.inf),
    ("compute_units.cpu.peak_ops_per_s.fp32", math.nan), ("compute_units.cpu.peak_ops_per_s.fp32", math.inf),
    ("compute_units.cpu.memory_bandwidth_bytes_per_s", math.nan), ("compute_units.cpu.memory_bandwidth_bytes_per_s", 0),
    ("compute_units.cpu.efficiency", math.nan), ("compute_units.cpu.layer_overhead_us", math.inf),
])
def test_targets_built_in_python_refuse_non_finite_and_non_positive(field, value):
    from edgeopt.targets import load_target

    data = load_target("x86-cpu").model_dump(mode="python")
    *path, last = field.split(".")
    node = data
    for p in path:
        node = node[p]
    node[last] = value
    with pytest.raises(ValidationError) as e:
        Target.model_validate(data)
    assert ".".join(map(str, e.value.errors()[0]["loc"])).startswith(field)


# --------------------------------------------------------------------------- calibration data and labels

def _npy_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def _npy_header(shape, descr="<f4", fortran=False, version=(1, 0)) -> bytes:
    buf = io.BytesIO()
    d = {"descr": descr, "fortran_order": fortran, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buf, d)
    else:
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def _raw_npy_header(header: str) -> bytes:
    h = header.encode("latin-1")
    h += b" " * (63 - (len(h) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h


def _npz(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _x(n=4, d=8, seed=0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _with_nan(i: int, value=np.nan, dtype=np.float32) -> np.ndarray:
    a = _x(dtype=dtype)
    a[i, 3] = value
    return a


GOOD = _npy_bytes(_x())
TIB_HEADER = _npy_header((int(2.3 * TIB) // 32, 8))  # 2.3 TiB of float32

#: name -> ({file name in the folder: bytes}, text the error must contain, or None: the data is valid (exit 0))
CALIB_CASES: dict[str, tuple[dict[str, bytes], str | None]] = {
    "valid": ({"a.npy": GOOD, "b.npy": _npy_bytes(_x(seed=1))}, None),
    "valid_single_sample": ({"a.npy": _npy_bytes(_x()[0])}, None),
    "valid_fortran": ({"a.npy": _npy_bytes(np.asfortranarray(_x()))}, None),
    "valid_big_endian": ({"a.npy": _npy_bytes(_x().astype(">f4"))}, None),
    "valid_float64": ({"a.npy": _npy_bytes(_x(dtype=np.float64))}, None),
    "valid_int": ({"a.npy": _npy_bytes(np.arange(32, dtype=np.int16).reshape(4, 8))}, None),
    "valid_v2_header": ({"a.npy": _npy_header((4, 8), version=(2, 0)) + _x().tobytes()}, None),
    "valid_npz": ({"a.npz": _npz({"x.npy": GOOD})}, None),
    "valid_npz_deflated": ({"a.npz": _npz({"x.npy": GOOD}, zipfile.ZIP_DEFLATED)}, None),
    "valid_with_other_files": ({"a.npy": GOOD, "image.png": b"\x89PNG\r\n\x1a\n junk", "notes.txt": b"hi"}, None),
    "tib_header": ({"a.npy": TIB_HEADER + b"\0" * 64}, "truncated"),
    "tib_header_npz_member": ({"a.npz": _npz({"x.npy": TIB_HEADER + b"\0" * 64})}, "truncated"),
    "truncated": ({"a.npy": GOOD[:-7]}, "truncated"),
    "header_only": ({"a.npy": _npy_header((4, 8))}, "truncated"),
    "magic_only": ({"a.npy": b"\x93NUMPY"}, "a.npy"),
    "bad_version": ({"a.npy": b"\x93NUMPY\x09\x00" + GOOD[8:]}, "a.npy"),
    "garbage_header": ({"a.npy": _raw_npy_header("{'descr': <f4, 'shape': (4, 8)}")}, "not a valid .npy"),
    "header_not_dict": ({"a.npy": _raw_npy_header("[1, 2, 3]")}, "not a valid .npy"),
    "header_bad_descr": ({"a.npy": _raw_npy_header("{'descr': 'zz9', 'fortran_order': False, 'shape': (4, 8), }")},
                         "not a valid .npy"),
    "header_negative_shape": ({"a.npy": _raw_npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-4, 8), }")
                               + b"\0" * 128}, "a.npy"),
    "header_huge": ({"a.npy": b"\x93NUMPY\x02\x00" + (10**6).to_bytes(4, "little") + b"{" * 10**6}, "a.npy"),
    "header_deep": ({"a.npy": _raw_npy_header("{'descr': " + "[" * 2000 + "]" * 2000 + "}")}, "a.npy"),
    "object_dtype": ({"a.npy": _npy_bytes(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)}, "pickle"),
    "raw_pickle": ({"a.npy": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94."}, "neither .npy nor .npz"),
    "string_dtype": ({"a.npy": _npy_bytes(np.array([["abc"] * 8] * 4))}, "dtype"),
    "bytes_dtype": ({"a.npy": _npy_bytes(np.array([[b"abc"] * 8] * 4))}, "dtype"),
    "complex_dtype": ({"a.npy": _npy_bytes(_x().astype(np.complex64))}, "dtype"),
    "structured_dtype": ({"a.npy": _npy_bytes(np.zeros((4, 8), dtype=[("a", "<f4"), ("b", "<i4")]))}, "dtype"),
    "subarray_dtype": ({"a.npy": _npy_header((4,), descr=[("a", "<f4", (8,))]) + b"\0" * 128}, "dtype"),
    "datetime_dtype": ({"a.npy": _npy_bytes(np.zeros((4, 8), dtype="datetime64[s]"))}, "dtype"),
    "void_huge_itemsize": ({"a.npy": _npy_header((4, 8), descr="|V1000000000")}, "dtype"),
    "zero_samples": ({"a.npy": _npy_bytes(np.zeros((0, 8), np.float32))}, "no data"),
    "zero_width": ({"a.npy": _npy_bytes(np.zeros((4, 0), np.float32))}, "no data"),
    "scalar": ({"a.npy": _npy_bytes(np.float32(1.0))}, "shape"),
    "wrong_width": ({"a.npy": _npy_bytes(_x(d=9))}, "shape"),
    "wrong_rank": ({"a.npy": _npy_bytes(np.zeros((4, 8, 1), np.float32))}, "shape"),
    "mixed_ranks": ({"a.npy": GOOD, "b.npy": _npy_bytes(np.zeros((2, 2, 8), np.float32))}, "b.npy"),
    "nan_sample": ({"a.npy": GOOD, "b.npy": _npy_bytes(_with_nan(2))}, "sample 2"),
    "inf_sample": ({"a.npy": _npy_bytes(_with_nan(1, np.inf))}, "sample 1"),
    "neg_inf_sample": ({"a.npy": _npy_bytes(_with_nan(3, -np.inf))}, "sample 3"),
    "float64_overflows_float32": ({"a.npy": _npy_bytes(_with_nan(0, 1e300, np.float64))}, "sample 0"),
    "empty_file": ({"a.npy": b""}, "empty"),
    "text_file": ({"a.npy": b"1 2 3 4 5 6 7 8\n"}, "neither .npy nor .npz"),
    "png_named_npy": ({"a.npy": b"\x89PNG\r\n\x1a\n" + bytes(100)}, "neither .npy nor .npz"),
    "jpeg_named_npz": ({"a.npz": b"\xff\xd8\xff\xe0" + bytes(100)}, "neither .npy nor .npz"),
    "npz_corrupt": ({"a.npz": b"PK\x03\x04" + bytes(range(200))}, "not a valid .npz"),
    "npz_truncated": ({"a.npz": _npz({"x.npy": GOOD})[:-30]}, "not a valid .npz"),
    "npz_bad_crc": ({"a.npz": _npz({"x.npy": GOOD}).replace(GOOD[-16:], bytes(16))}, "a.npz"),
    "npz_wrong_name": ({"a.npz": _npz({"y.npy": GOOD})}, "the model takes"),
    "npz_not_npy_member": ({"a.npz": _npz({"x.txt": b"hello"})}, "not an .npy"),
    "npz_empty": ({"a.npz": _npz({})}, "a.npz"),
    "npz_object_member": ({"a.npz": _npz({"x.npy": _npy_bytes(np.array([None, 1], dtype=object),
                                                               allow_pickle=True)})}, "pickle"),
    "npz_nan_member": ({"a.npz": _npz({"x.npy": _npy_bytes(_with_nan(1))})}, "sample 1"),
    "npz_too_many_members": ({"a.npz": _npz({f"m{i}.npy": GOOD[:80] for i in range(1100)})}, "members"),
}


def _make_folder(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("case", sorted(CALIB_CASES))
def test_hostile_calibration_folder(tmp_path, capsys, tiny, case):
    files, expected = CALIB_CASES[case]
    folder = _make_folder(tmp_path / case, files)
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", folder)
    assert_clean(rc, out, err, names=str(folder))
    if expected is None:
        assert rc == 0, err
    else:
        assert rc == 2 and expected in err, (case, err)


@pytest.mark.parametrize("case", ["valid", "valid_npz", "tib_header", "object_dtype", "nan_sample", "npz_corrupt",
                                  "text_file", "zero_samples"])
def test_hostile_calibration_file(tmp_path, capsys, tiny, case):
    """--calib naming one .npy/.npz file: the same checks."""
    files, expected = CALIB_CASES[case]
    name, data = list(files.items())[-1]
    f = tmp_path / name
    f.write_bytes(data)
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", f)
    assert_clean(rc, out, err, names=str(f))
    assert (rc == 0) if expected is None else (rc == 2 and expected in err), err


def test_calibration_paths_that_are_not_files(tmp_path, capsys, tiny):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.npy").write_bytes(GOOD)
    (folder / "loop.npy").symlink_to(folder / "loop.npy")
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", folder)
    assert rc == 2 and "loop.npy" in err
    assert_clean(rc, out, err)
    (folder / "loop.npy").unlink()
    (folder / "dangling.npy").symlink_to(tmp_path / "nowhere.npy")
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", folder)
    assert rc == 2 and "dangling.npy" in err
    assert_clean(rc, out, err)
    (folder / "dangling.npy").unlink()
    (folder / "sub.npy").mkdir()
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", folder)
    assert rc == 2 and "sub.npy" in err and "regular file" in err
    assert_clean(rc, out, err)
    (folder / "sub.npy").rmdir()
    os.mkfifo(folder / "fifo.npy")  # must not block
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", folder)
    assert rc == 2 and "fifo.npy" in err
    assert_clean(rc, out, err)
    (folder / "fifo.npy").unlink()
    for p in (Path("/dev/null"), Path("/dev/zero"), tmp_path / "missing", tmp_path / "empty_dir"):
        if p.name == "empty_dir":
            p.mkdir()
        rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", p)
        assert rc == 2, (p, err)
        assert_clean(rc, out, err, names=str(p))
    loop = tmp_path / "dirloop"
    loop.symlink_to(loop)
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", loop)
    assert rc == 2
    assert_clean(rc, out, err, names=str(loop))


def test_mixed_sample_shapes_across_files(tmp_path, capsys, dynamic):
    folder = _make_folder(tmp_path / "c", {"a.npy": _npy_bytes(_x(d=8)), "b.npy": _npy_bytes(_x(d=5))})
    rc, out, err = run_cli(capsys, "plan", dynamic, "--input-shape", "x=1x8", "--target", "x86-cpu", "--calib", folder)
    assert rc == 2 and "b.npy" in err and "a.npy" in err and "shape" in err, err
    assert_clean(rc, out, err)


LABEL_CASES: dict[str, tuple[bytes | None, str | None]] = {  # labels for the 8 samples of two good files
    "valid": (_npy_bytes(np.arange(8) % 4), None),
    "valid_column": (_npy_bytes((np.arange(8) % 4)[:, None]), None),
    "valid_integral_floats": (_npy_bytes((np.arange(8) % 4).astype(np.float32)), None),
    "wrong_length": (_npy_bytes(np.arange(5)), "5 labels for 8 samples"),
    "float_fraction": (_npy_bytes(np.full(8, 0.5)), "whole class indices"),
    "nan": (_npy_bytes(np.full(8, np.nan)), "whole class indices"),
    "negative": (_npy_bytes(-np.ones(8, np.int64)), "label 0"),
    "one_hot": (_npy_bytes(np.eye(8, 4)), "one class index per sample"),
    "strings": (_npy_bytes(np.array(["cat"] * 8)), "dtype"),
    "object": (_npy_bytes(np.array([1, None] * 4, dtype=object), allow_pickle=True), "pickle"),
    "corrupt": (b"\x93NUMPY\x01\x00garbage", "not a valid .npy"),
    "empty": (b"", "empty"),
    "zero_labels": (_npy_bytes(np.zeros(0, np.int64)), "no data"),
    "tib": (_npy_header((int(2.3 * TIB) // 8,), descr="<i8") + b"\0" * 64, "truncated"),
    "dev_null": (None, "regular file"),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_hostile_labels(tmp_path, capsys, tiny, case):
    content, expected = LABEL_CASES[case]
    folder = _make_folder(tmp_path / "c", {"a.npy": GOOD, "b.npy": _npy_bytes(_x(seed=1))})
    if content is None:
        labels = Path("/dev/null")
    else:
        labels = tmp_path / "labels.npy"
        labels.write_bytes(content)
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", folder, "--labels", labels)
    assert_clean(rc, out, err, names=str(labels))
    assert (rc == 0) if expected is None else (rc == 2 and expected in err), err


def test_memory_limit_is_checked_before_reading(tmp_path, capsys, tiny, monkeypatch):
    """A file within its declared size but over the memory limit ($EDGEOPT_MAX_MEMORY), and an .npz member that
    inflates past it (a zip bomb), are refused from their headers."""
    from edgeopt import memory

    monkeypatch.setenv(memory.MAX_MEMORY_ENV, "64KiB")
    assert memory.max_memory() == 64 * 1024
    big = _npy_bytes(np.zeros((4096, 8), np.float32))  # 128 KiB
    for files in ({"a.npy": big}, {"a.npz": _npz({"x.npy": big}, zipfile.ZIP_DEFLATED)},
                  {"a.npy": _npy_bytes(np.zeros((1500, 8), np.float32)), "b.npy": _npy_bytes(np.zeros((1500, 8),
                                                                                                   np.float32))}):
        folder = _make_folder(tmp_path / f"c{len(list(tmp_path.iterdir()))}", files)
        rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", folder)
        assert rc == 2 and "memory limit" in err and memory.MAX_MEMORY_ENV in err, err
        assert_clean(rc, out, err, names=str(folder))
    monkeypatch.setenv(memory.MAX_MEMORY_ENV, "lots")
    rc, out, err = run_cli(capsys, "plan", tiny, "--target", "x86-cpu", "--calib", folder)
    assert rc == 2 and memory.MAX_MEMORY_ENV in err
    monkeypatch.delenv(memory.MAX_MEMORY_ENV)
    assert 0 < memory.max_memory() <= memory.DEFAULT_MAX_MEMORY


def test_terabyte_header_does_not_allocate(tmp_path):
    """Under a 2 GiB address-space limit, .npy headers claiming 2.3 TiB (in a small file, and in a sparse file of
    that size) are refused from the header: nothing is allocated."""
    small = tmp_path / "small.npy"
    small.write_bytes(TIB_HEADER + b"\0" * 64)
    sparse = tmp_path / "sparse.npy"
    with open(sparse, "wb") as f:
        f.write(TIB_HEADER)
        try:
            f.truncate(len(TIB_HEADER) + int(2.3 * TIB) // 32 * 32)
        except OSError:  # a file system without sparse files this large: the small file still tests the header
            sparse = small
    code = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from edgeopt.calibration import CalibrationError, load_array_file
        for p in sys.argv[1:]:
            try:
                load_array_file(p)
            except CalibrationError as e:
                print(e)
            else:
                print("loaded", p)
    """)
    res = subprocess.run([sys.executable, "-c", code, str(small), str(sparse)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "EDGEOPT_MAX_MEMORY": ""})
    assert res.returncode == 0, res.stderr[-1000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and "truncated" in lines[0] and "small.npy" in lines[0], lines
    assert ("memory limit" in lines[1] if sparse != small else "truncated" in lines[1]), lines


def test_python_api_refuses_non_finite_and_ragged_data(tiny):
    """The same checks for data given in Python: arrays, dicts, callables and CalibrationData."""
    import onnx

    from edgeopt.calibration import CalibrationData, CalibrationError, as_calibration
    from edgeopt.memory import max_memory as max_bytes
    from edgeopt.memory import set_max_memory as set_max_bytes

    m = onnx.load(str(tiny))
    with pytest.raises(CalibrationError, match="sample 2 holds NaN"):
        as_calibration(_with_nan(2), m)
    with pytest.raises(CalibrationError, match="sample 1 holds NaN"):
        as_calibration({"x": _with_nan(1, np.inf)}, m)
    with pytest.raises(CalibrationError, match="item 1 of .*sample 3"):
        as_calibration(lambda: [_x(), _with_nan(3)], m)
    with pytest.raises(CalibrationError, match="sample 0"):
        as_calibration(CalibrationData(lambda: [{"x": _with_nan(0)}], description="mine"), m)
    with pytest.raises(CalibrationError, match="not an array|shape"):
        as_calibration([[1.0] * 8, [1.0] * 3], m)
    with pytest.raises(CalibrationError, match="pickle"):
        as_calibration(np.array([[None] * 8], dtype=object), m)
    with pytest.raises(CalibrationError, match="labels: label 1 is 0.5"):
        as_calibration(_x(n=2), m, labels=np.array([1.0, 0.5]))
    assert len(as_calibration(_x(), m, labels=np.arange(4))) == 4
    try:
        set_max_bytes(1000)
        assert max_bytes() == 1000
    finally:
        set_max_bytes(None)
