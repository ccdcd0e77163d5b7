from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeopt.types import Plan


def run(*args, check_rc=None):
    p = subprocess.run([sys.executable, "-m", "edgeopt.cli", *map(str, args)], capture_output=True, text=True, timeout=120)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def one_line_error(p, *fragments):
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_import_is_light():
    code = "import sys, edgeopt, edgeopt.cli; print(sorted(m for m in ('onnx','rich','onnxruntime','openvino','numpy','yaml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_and_version():
    assert "analyze" in run("--help", check_rc=0).stdout
    assert run("--version", check_rc=0).stdout.startswith("edgeopt ")


def test_targets_list_and_show(tmp_path):
    out = run("targets", "list", check_rc=0).stdout
    for name in ("gpu-server", "jetson-orin", "x86-cpu", "android-mid", "ios", "mcu-cortex-m7"):
        assert name in out
    shown = json.loads(run("targets", "show", "mcu-cortex-m7", "--json", check_rc=0).stdout)
    assert shown["budgets"]["ram"] == 524288
    assert "latency_ms: 100" in run("targets", "show", "mcu-cortex-m7", check_rc=0).stdout
    one_line_error(run("targets", "show", "nano"), "unknown target 'nano'", "mcu-cortex-m7")


def test_analyze_real_model_with_target(ppocr_cls):
    p = run("analyze", ppocr_cls, "--input-shape", "x=1x3x48x192", "--target", "android-mid", check_rc=0)
    assert "params 133,628" in p.stdout and "tflite/cpu(xnnpack)" in p.stdout and "fit" in p.stdout
    one_line_error(run("analyze", ppocr_cls), "x=1x3x?x?", "--input-shape")
    data = json.loads(run("analyze", ppocr_cls, "--input-shape", "x=1x3x48x192", "--json", check_rc=0).stdout)
    assert data["total_macs"] > 15_000_000


def test_plan_writes_json_that_validates(tmp_path, digits_model):
    out = tmp_path / "sub" / "plan.json"
    p = run("plan", digits_model, "--target", "mcu-cortex-m7", "-o", out, check_rc=0)
    assert "int8" in p.stdout
    plan = Plan.model_validate_json(out.read_text())
    assert plan.target == "mcu-cortex-m7" and plan.backend == "tflm"
    assert [f.name for f in out.parent.iterdir()] == ["plan.json"]  # no temp files left behind


@pytest.mark.parametrize("args,fragments", [
    (("analyze", "/nonexistent/m.onnx"), ("does not exist",)),
    (("plan", "{model}", "--target", "pixel-9"), ("unknown target 'pixel-9'", "android-mid")),
    (("plan", "{model}", "--target", "ios", "--precision", "int3"), ("precision 'int3'", "fp16")),
    (("plan", "{model}", "--target", "x86-cpu", "--backend", "coreml"), ("no backend 'coreml'", "onnxruntime")),
])
def test_bad_input_exits_2_with_one_line(digits_model, args, fragments):
    one_line_error(run(*[a.format(model=digits_model) for a in args]), *fragments)


def test_corrupt_and_non_onnx_inputs(tmp_path, digits_model):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(digits_model.read_bytes()[:5000])
    one_line_error(run("analyze", cut), str(cut))
    tfl = tmp_path / "m.tflite"
    tfl.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    one_line_error(run("analyze", tfl), "TFLite flatbuffer", "not an ONNX model")


def test_demo_prints_analysis_accuracy_and_plan():
    p = run("demo", check_rc=0)
    assert "params 40,394" in p.stdout
    assert "accuracy on 360 held-out digits: 0.99" in p.stdout
    assert "plan for target mcu-cortex-m7 on tflm/cpu" in p.stdout and "int8 x12" in p.stdout


def test_compress_writes_model_and_reports(tmp_path, digits_model):
    import numpy as np

    from edgeopt.datasets import digits

    x, y = digits("test")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "o" / "m16.onnx"
    p = run("compress", digits_model, "--pass", "fp16", "--calib", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
            "--set", 'exclude=["/14/Gemm"]', "-o", out, check_rc=0)
    assert "fp16: 11 node(s) changed" in p.stdout and "accuracy 0.9917 (+0.0000)" in p.stdout
    from edgeopt.graph import load_model

    assert len(load_model(out).graph.node) > 0
    one_line_error(run("compress", digits_model, "--pass", "fp16", "--set", "bogus=1", "-o", tmp_path / "b.onnx"), "bogus")
    one_line_error(run("compress", digits_model, "--pass", "int3", "-o", tmp_path / "b.onnx"), "unknown pass 'int3'")
    assert not (tmp_path / "b.onnx").exists()


def test_build_replay_and_fleet_commands(tmp_path):
    out = tmp_path / "art"
    p = run("build", "default", "--target", "x86-cpu", "--precision", "int8", "-o", out, check_rc=0)
    assert "measured on this host" in p.stdout and "accuracy_delta" in p.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and set(manifest["files"]) == {"model.onnx", "session.json"}
    run("build", "default", "--target", "x86-cpu", "--plan", out / "plan.json", "-o", tmp_path / "again", check_rc=0)
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["plan"] == manifest["plan"]
    one_line_error(run("build", "default", "--target", "gpu-server", "--plan", out / "plan.json", "-o", tmp_path / "x"),
                   "for target x86-cpu")
    assert not (tmp_path / "x").exists()
    fl = run("fleet", "default", "--targets", "x86-cpu,jetson-orin,mcu-cortex-m7", "-o", tmp_path / "fleet", check_rc=0)
    assert "report:" in fl.stdout and (tmp_path / "fleet" / "report.html").is_file()
    # the MCU artifact ran on this host: its figure is labelled as the host's, never shown as the device's
    assert "(this machine, not a mcu-cortex-m7)" in fl.stdout, fl.stdout
    assert (tmp_path / "fleet" / "jetson-orin" / "build_engine.py").is_file()


def test_internal_errors_exit_1_with_a_hint_and_traceback_on_debug(monkeypatch, capsys):
    """A bug is not a user error: exit 1, one line naming it as a bug, the traceback only with --debug."""
    import edgeopt.cli as cli
    from edgeopt.errors import InternalError

    def broken(args):
        raise KeyError("layer x")

    monkeypatch.setattr(cli, "_cmd_targets", broken)
    assert cli.main(["targets", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("internal error: KeyError: 'layer x' (a bug in edgeopt")
    assert "--debug" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        cli.main(["--debug", "targets", "list"])

    def invariant(args):
        raise InternalError("tflite writer: tensor t used before it is produced")

    monkeypatch.setattr(cli, "_cmd_targets", invariant)
    assert cli.main(["targets", "list"]) == 1
    assert capsys.readouterr().err.startswith("internal error: InternalError: tflite writer: tensor t used before")


def test_sensitivity_records_inapplicable_options_but_raises_bugs(digits_data):
    import edgeopt.sensitivity as sens

    m, cal, _ = digits_data
    res = sens.measure(m, cal.subset(16), options=("wint8",), cache=False)
    convs = [s for (name, opt), s in res.items() if "Conv" in name]
    assert convs and all(not s.applicable and s.reason == "wint8 applies to Gemm, MatMul, not Conv" for s in convs)

    def bug(*a, **k):
        raise TypeError("simulate bug")

    from dataclasses import replace

    from edgeopt import technique

    fp16 = technique.get("fp16")
    technique.register(replace(fp16, simulate=bug), replace=True)
    try:
        with pytest.raises(TypeError, match="simulate bug"):
            sens.measure(m, cal.subset(16), options=("fp16",), cache=False)
    finally:
        technique.register(fp16, replace=True)


def test_builds_print_no_runtime_noise(tmp_path):
    """coremltools' import notices and MIL progress bars and LiteRT's XNNPACK INFO line stay out of the output."""
    p = run("fleet", "default", "--targets", "ios,android-mid", "-o", tmp_path / "f", check_rc=0)
    for noise in ("Torch version", "scikit-learn version", "libcoremlpython", "Running MIL", "XNNPACK"):
        assert noise not in p.stderr + p.stdout, noise
