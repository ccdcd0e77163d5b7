"""Recovery wired into planning and building: ``--recover`` plans pruning / 4-bit weights at their predicted
post-recovery noise, the build fine-tunes the compressed model before the backend, and the manifest records the run;
``edgeopt recover`` runs it on a model compressed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from edgeopt import technique  # noqa: E402
from edgeopt.datasets import default_model_path, digits  # noqa: E402
from edgeopt.pipeline import BuildInputs, build, plan_for, recoverable  # noqa: E402
from edgeopt.planner import after_recovery  # noqa: E402
from edgeopt.sensitivity import Sensitivity  # noqa: E402
from edgeopt.targets import load_target  # noqa: E402
from edgeopt.types import RecoverySettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = {"PYTHONPATH": str(ROOT)}
    import os

    return subprocess.run([sys.executable, "-m", "edgeopt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={**os.environ, **env})


def test_after_recovery_scales_only_what_recovery_trains():
    s = {("a", "channel"): Sensitivity(layer="a", option="channel", noise=0.1, flips=0.2),
         ("a", "int8"): Sensitivity(layer="a", option="int8", noise=0.1, flips=0.2),
         ("a", "wint4"): Sensitivity(layer="a", option="wint4", noise=0.1, flips=None),
         ("b", "2:4"): Sensitivity(layer="b", option="2:4", noise=1.0, flips=0.5, applicable=False)}
    r = after_recovery(s)
    assert r[("a", "channel")].noise == pytest.approx(0.1 * technique.get("channel").recovered_noise)
    assert r[("a", "channel")].noise < 0.1
    assert r[("a", "channel")].flips < 0.2 and r[("a", "int8")] == s[("a", "int8")]
    assert r[("a", "wint4")] == s[("a", "wint4")]  # no recovery prior for block-wise 4-bit weights
    assert r[("b", "2:4")] == s[("b", "2:4")]  # not applicable: untouched
    assert all(technique.get(t).recovered_noise < 1 for t in ("2:4", "unstructured", "channel"))
    assert all(technique.get(t).recovered_noise == 1 for t in ("fp32", "fp16", "int8", "wint4"))


def test_build_recovers_a_pruned_plan_and_records_it(tmp_path):
    inputs = BuildInputs.default_model()
    target = load_target("x86-cpu")
    plan = plan_for(inputs, target, backend="onnxruntime", precision="fp32")
    convs = [lp.name for lp in plan.layers if lp.op_type == "Conv"]
    pruned = [lp.model_copy(update={"sparsity": "channel", "sparsity_ratio": 0.5}) if lp.name in convs[:2] else lp
              for lp in plan.layers]
    plan = plan.model_copy(update={"layers": pruned})
    assert recoverable(plan)
    art = build(inputs, target, tmp_path / "post", plan=plan, profile=False)
    rec = build(inputs, target, tmp_path / "rec", plan=plan, profile=False,
                recover=RecoverySettings(steps=120, time_budget_s=120))
    assert art.recovery is None and rec.recovery is not None and rec.recovery.steps > 0
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    assert manifest["recovery"]["steps"] == rec.recovery.steps and manifest["recovery"]["loss_curve"]
    # the build keeps the recovered model only when it beats post-training on held-out samples
    r = rec.recovery
    assert r.heldout_before and r.heldout_after
    first = "accuracy" if "accuracy" in r.heldout_after else "top1_agreement"
    assert r.kept == ((r.heldout_after[first], r.heldout_after["snr_db"]) >= (r.heldout_before[first],
                                                                               r.heldout_before["snr_db"]))
    assert rec.accuracy["top1_agreement"] >= art.accuracy["top1_agreement"] - 0.01


def test_cli_recover_flag_needs_calibration_data(tmp_path):
    p = _cli("build", default_model_path(), "--target", "x86-cpu", "--recover", "-o", tmp_path / "o")
    assert p.returncode == 2 and p.stderr.strip() == "error: --recover fine-tunes on the calibration data: give --calib"
    assert not (tmp_path / "o").exists()


def test_cli_recover_command(tmp_path):
    x, y = digits("calib")
    np.save(tmp_path / "x.npy", x[:128])
    np.save(tmp_path / "y.npy", y[:128])
    p = _cli("compress", default_model_path(), "--pass", "prune", "--set", "pattern=n:m", "-o", tmp_path / "p.onnx")
    assert p.returncode == 0, p.stderr
    p = _cli("recover", tmp_path / "p.onnx", "--teacher", default_model_path(), "--calib", tmp_path / "x.npy",
             "--labels", tmp_path / "y.npy", "--steps", "40", "-o", tmp_path / "r.onnx", "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["steps"] == 40 and rec["labels_used"] and (tmp_path / "r.onnx").exists()
    p = _cli("recover", tmp_path / "p.onnx", "--teacher", default_model_path(), "--calib", tmp_path / "x.npy",
             "--steps", "0", "-o", tmp_path / "r2.onnx")
    assert p.returncode == 2 and "--steps must be at least 1" in p.stderr


def _tiny_mcu(ram: int, storage: int):
    t = load_target("mcu-cortex-m7")
    return t.model_copy(update={"name": "tiny-mcu", "budgets": t.budgets.model_copy(update={"ram": ram, "storage": storage})})


def test_build_fits_a_model_over_the_flash_then_recovers_it(tmp_path):
    """A digits CNN over a tiny MCU's flash: refused post-training; with recovery the build prunes channels to fit,
    recovers, builds the TFLM artifact within the limits and records the fit."""
    from edgeopt.errors import BudgetError
    from edgeopt.planner import candidate_options, evaluate

    inputs = BuildInputs.default_model()
    mcu = load_target("mcu-cortex-m7")
    ev = evaluate(inputs.analysis, mcu, candidate_options(mcu, None)[0], "int8")
    target = _tiny_mcu(10**7, int(ev.storage * 0.55))  # below what the planner's 30% channel pruning reaches
    with pytest.raises(BudgetError):
        build(inputs, target, tmp_path / "post", profile=False)
    art = build(inputs, target, tmp_path / "fit", profile=False, recover=RecoverySettings(steps=80, time_budget_s=60))
    assert art.fit is not None and art.fit.params_after < art.fit.params_before and art.fit.resolution is None
    assert art.fit.recovery is not None and art.fit.agreement_recovered is not None
    assert art.size_bytes <= target.budgets.storage
    manifest = json.loads((tmp_path / "fit" / "manifest.json").read_text())
    assert manifest["fit"]["summary"] == art.fit.summary and manifest["backend"] == "tflm"
    # the refusal without recovery says what would help; --allow-resolution needs --recover
    with pytest.raises(Exception, match="needs --recover"):
        build(inputs, target, tmp_path / "x", allow_resolution=True)


def test_build_lowers_the_resolution_only_when_allowed(tmp_path):
    """A 32x32 conv net whose activations are over a tiny MCU's RAM: channels alone cannot fit, so the build refuses
    (saying --allow-resolution would help); with it the input shrinks, the artifact takes the smaller input, and the
    calibration images were resampled for it."""
    import onnx
    from test_fit import conv_net

    from edgeopt.errors import BudgetError
    from edgeopt.graph import analyze
    from edgeopt.planner import candidate_options, evaluate

    path = tmp_path / "net.onnx"
    onnx.save(conv_net(), path)
    mcu = load_target("mcu-cortex-m7")
    ev = evaluate(analyze(path), mcu, candidate_options(mcu, None)[0], "int8")
    target = _tiny_mcu(int(ev.ram * 0.3), 10**7)
    x = np.random.default_rng(0).uniform(0, 1, size=(48, 3, 32, 32)).astype(np.float32)
    inputs = BuildInputs.prepare(path, calib=x[:32], eval_data=x[32:])
    settings = RecoverySettings(steps=20, time_budget_s=30)
    with pytest.raises(BudgetError, match="allow-resolution"):
        build(inputs, target, tmp_path / "a", profile=False, recover=settings)
    art = build(inputs, target, tmp_path / "b", profile=False, recover=settings, allow_resolution=True)
    side = art.fit.resolution
    assert side is not None and side < 32 and art.fit.original_side == 32
    assert art.plan.input_shapes["x"] == [1, 3, side, side]
    assert art.fit.heldout_samples == 16 and art.fit.agreement_recovered is not None
