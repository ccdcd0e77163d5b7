from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgeopt.backends.base import build_artifact
from edgeopt.datasets import default_model_path, digits
from edgeopt.errors import EdgeoptError
from edgeopt.graph import analyze
from edgeopt.planner import make_plan
from edgeopt.profiling import (
    calibrate,
    calibrated_latency,
    load_profiles,
    save_profile,
)
from edgeopt.remote import profile_artifact
from edgeopt.targets import load_target
from edgeopt.types import Profile

FAST = {"threads": 1, "warmup": 2, "repeats": 20, "op_repeats": 3}


@pytest.fixture(scope="module")
def ort_artifact(tmp_path_factory):
    plan = make_plan(analyze(default_model_path()), load_target("x86-cpu"), backend="onnxruntime", precision="fp32")
    out = tmp_path_factory.mktemp("prof") / "digits-ort"
    art = build_artifact(onnx.load(str(default_model_path())), plan, out)
    return out, art


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "edgeopt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def test_profile_local_measures_and_saves(tmp_path, ort_artifact):
    art_dir, art = ort_artifact
    p = profile_artifact(art_dir, **FAST)
    lat = p.latency_ms
    assert set(lat) == {"p50", "p90", "p99", "mean", "min"}
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
    assert (p.device, p.threads, p.warmup, p.repeats, p.target, p.backend) == ("local", 1, 2, 20, "x86-cpu", "onnxruntime")
    assert p.predicted_latency_ms == art.predicted_latency_ms and p.host["unit"] == "cpu"
    assert p.ops and abs(sum(o.share for o in p.ops) - 1) < 1e-6
    if sys.platform.startswith("linux"):
        assert p.peak_memory_bytes and p.peak_memory_bytes > 0
    path = save_profile(p, tmp_path / "profiles")
    assert path.parent == tmp_path / "profiles" / "x86-cpu"
    assert path.name.startswith(f"onnxruntime-{p.artifact_sha256[:12]}-local-") and path.suffix == ".json"
    assert save_profile(p, tmp_path / "profiles") != path  # same second: a new name, never overwritten
    assert load_profiles(tmp_path / "profiles", "x86-cpu") == [p, p]
    assert Profile.model_validate_json(path.read_text()) == p


def test_given_inputs_and_bad_counts(tmp_path, ort_artifact):
    art_dir, _ = ort_artifact
    x, _ = digits("test")
    p = profile_artifact(art_dir, inputs={"image": x[:1]}, **FAST)
    assert p.latency_ms["p50"] > 0
    np.savez(tmp_path / "in.npz", image=x[:1])
    assert profile_artifact(art_dir, inputs=tmp_path / "in.npz", **{**FAST, "op_repeats": 0}).ops == []
    with pytest.raises(EdgeoptError, match="image"):
        profile_artifact(art_dir, inputs={"x": x[:1]}, **FAST)
    with pytest.raises(EdgeoptError, match="repeats"):
        profile_artifact(art_dir, repeats=0)
    with pytest.raises(EdgeoptError, match="not an edgeopt artifact"):
        profile_artifact(tmp_path)


def test_peak_memory_sees_an_allocation():
    if not sys.platform.startswith("linux"):
        pytest.skip("the high-water reset is Linux's /proc/self/clear_refs")
    # a fresh interpreter: what an earlier test left in this process's heap must not blur the reading
    code = ("import numpy as np; from edgeopt.profiling import PeakMemory\n"
            "with PeakMemory() as m:\n    a = np.ones(64 * 2**20, np.uint8)\n    del a\n"
            "print(m.method, m.bytes)")
    method, peak = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert method == "vmhwm" and int(peak) >= 60 * 2**20


def _prof(target, backend, unit, measured, predicted, t="2026-01-01T00:00:00+00:00", on_target=True, device="local"):
    return Profile(artifact_sha256="ab" * 32, target=target, backend=backend, device=device, host={"unit": unit},
                   threads=1, warmup=1, repeats=1, latency_ms={"p50": measured, "mean": measured}, ops=[],
                   predicted_latency_ms=predicted, on_target_class=on_target, created_utc=t)


def test_only_profiles_of_the_target_class_calibrate():
    """A host's figure never calibrates a device: profiles taken on another class of machine are left out; older
    profiles without the record count when taken on a device, not when taken locally."""
    good = _prof("android-mid", "tflite", "cpu", 2.0, 1.0)
    host = _prof("android-mid", "tflite", "cpu", 0.5, 1.0, on_target=False)
    legacy_local = _prof("android-mid", "tflite", "cpu", 0.1, 1.0, on_target=None)
    legacy_device = _prof("android-mid", "tflite", "cpu", 8.0, 1.0, on_target=None, device="adb://R58M")
    cals = calibrate([good, host, legacy_local, legacy_device], "android-mid")
    c = cals[("android-mid", "tflite", "cpu")]
    assert c.profiles == 2 and c.factor == pytest.approx(4.0)
    assert calibrate([host, legacy_local], "android-mid") == {}


def test_local_profile_of_another_class_is_labelled_and_capped(tmp_path):
    """Profiling an MCU or phone artifact on this host records that the host is not of the target's class, and
    never runs more threads than this machine has (the artifact's setting is the device's core count)."""
    from edgeopt.calibration import as_calibration
    from edgeopt.hostinfo import detect, host_stands_for
    from edgeopt.profiling import profile_local, usable_cpus

    model = onnx.load(str(default_model_path()))
    xc, _ = digits("calib")
    plan = make_plan(analyze(default_model_path()), load_target("android-mid"), backend="tflite", precision="fp32")
    out = tmp_path / "tfl"
    build_artifact(model, plan, out, as_calibration(xc, model))
    prof = profile_local(out, warmup=0, repeats=2, op_repeats=0)
    assert prof.threads <= usable_cpus()
    assert prof.on_target_class is host_stands_for(plan.target_definition, plan.unit)
    if detect().arch == "x86_64":
        assert prof.on_target_class is False
    assert not host_stands_for(load_target("mcu-cortex-m7"))


def test_calibrate_geometric_mean_per_backend_and_unit(tmp_path):
    profiles = [_prof("x86-cpu", "onnxruntime", "cpu", 2.0, 1.0), _prof("x86-cpu", "onnxruntime", "cpu", 8.0, 1.0),
                _prof("x86-cpu", "openvino", "cpu", 0.5, 1.0), _prof("x86-cpu", "onnxruntime", "cpu", 3.0, None),
                _prof("android-mid", "tflite", "cpu", 9.0, 1.0)]
    cals = calibrate(profiles, "x86-cpu")
    assert set(cals) == {("x86-cpu", "onnxruntime", "cpu"), ("x86-cpu", "openvino", "cpu")}
    c = cals[("x86-cpu", "onnxruntime", "cpu")]
    assert c.factor == pytest.approx(4.0) and c.profiles == 2 and c.spread == pytest.approx(2.0)
    assert cals[("x86-cpu", "openvino", "cpu")].factor == pytest.approx(0.5)

    plan = make_plan(analyze(default_model_path()), load_target("x86-cpu"), backend="onnxruntime", precision="fp32")
    assert calibrated_latency(plan, tmp_path) is None
    for p in profiles:
        save_profile(p, tmp_path)
    (tmp_path / "x86-cpu" / "junk.json").write_text("{not a profile")
    assert calibrated_latency(plan, tmp_path) == pytest.approx(4.0 * plan.predicted_latency_ms)


def test_cli_profile_table_json_and_errors(tmp_path, ort_artifact):
    art_dir, _ = ort_artifact
    args = ("profile", art_dir, "--threads", 1, "--warmup", 2, "--repeats", 20, "--profiles-dir", tmp_path / "pr")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    for word in ("p50", "p99", "predicted", "calibrated", "peak memory", "Conv", "saved "):
        assert word in first.stdout, first.stdout
    assert "no earlier profile" in first.stdout
    second = cli(*args, "--top", 2)
    assert "calibrated = predicted x" in second.stdout and "over 2 profile(s)" in second.stdout
    js = cli(*args, "--json", "--no-save")
    assert js.returncode == 0, js.stderr
    assert Profile.model_validate_json(js.stdout).threads == 1
    assert len(list((tmp_path / "pr" / "x86-cpu").glob("*.json"))) == 2

    bad = cli("profile", art_dir, "--device", "telnet://box")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "valid forms: local, ssh://[user@]host[:port], adb:SERIAL, http://host:port" in bad.stderr
    bad = cli("profile", art_dir, "--repeats", 0)
    assert bad.returncode == 2 and "repeats must be at least 1" in bad.stderr
    bad = cli("profile", tmp_path, "--no-save")
    assert bad.returncode == 2 and "not an edgeopt artifact" in bad.stderr
    assert json.loads(js.stdout)["device"] == "local"
