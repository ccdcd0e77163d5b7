from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeopt.errors import TargetFileError, UnknownTargetError
from edgeopt.targets import builtin_names, load_target, load_targets, target_sha256
from edgeopt.types import Target

REQUIRED = {"gpu-server", "jetson-orin", "x86-cpu", "android-mid", "ios", "mcu-cortex-m7"}


def test_builtin_targets_cover_the_device_classes():
    assert REQUIRED <= set(builtin_names())
    for name in builtin_names():
        t = load_target(name)
        assert t.name == name
        assert t.budgets.ram > 0 and t.budgets.storage > 0 and t.budgets.latency_ms > 0
        for opt in t.backends:
            unit = t.compute_units[opt.unit]
            for p in opt.precisions:
                assert unit.peak_ops_per_s[opt.compute_precision(p)] > 0


def test_target_specifics():
    mcu = load_target("mcu-cortex-m7")
    assert mcu.budgets.ram == 512 * 1024 and mcu.budgets.storage == 2 * 1024 * 1024
    assert mcu.backends[0].backend == "tflm" and mcu.backends[0].precisions == ["int8"]
    assert mcu.backends[0].requires_full_integer and not mcu.budgets.weights_in_ram
    android = load_target("android-mid")
    assert [(o.backend, o.options.get("delegate")) for o in android.backends] == [("tflite", "xnnpack"), ("tflite", "nnapi")]
    assert android.backends[1].requires_full_integer
    ios = load_target("ios")
    assert ios.backends[0].backend == "coreml" and "fp32" not in ios.backends[0].precisions
    assert {o.backend for o in load_target("jetson-orin").backends} == {"tensorrt"}
    assert any(s.pattern == "2:4" for s in load_target("gpu-server").backends[0].sparsity)
    assert [o.backend for o in load_target("x86-cpu").backends] == ["onnxruntime", "openvino"]


def test_unknown_target_lists_valid_ones():
    with pytest.raises(UnknownTargetError) as e:
        load_target("jetson-nano")
    msg = str(e.value)
    assert "jetson-nano" in msg and all(n in msg for n in REQUIRED) and "\n" not in msg


def test_user_target_file_with_base(tmp_path):
    f = tmp_path / "tiny.yaml"
    f.write_text("base: mcu-cortex-m7\nname: m7-tiny\nbudgets: {ram: 96KiB}\n")
    t = load_target(str(f))
    assert t.name == "m7-tiny" and t.budgets.ram == 96 * 1024
    assert t.budgets.storage == load_target("mcu-cortex-m7").budgets.storage  # merged, not replaced
    assert target_sha256(t) != target_sha256(load_target("mcu-cortex-m7"))


def test_user_target_rejects_unknown_fields_and_bad_values(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("base: x86-cpu\nname: x\nbudgets: {ram: 1GiB, ramm: 2GiB}\n")
    with pytest.raises(TargetFileError, match="budgets.ramm"):
        load_target(f)
    f.write_text("base: x86-cpu\nname: x\nbackends: [{backend: onnxruntime, unit: npu, precisions: [fp32]}]\n")
    with pytest.raises(TargetFileError, match="npu"):
        load_target(f)
    f.write_text("base: x86-cpu\nname: x\ncompute_units: {cpu: {peak_ops_per_s: {fp64: 1.0}}}\n")
    with pytest.raises(TargetFileError, match="fp64"):
        load_target(f)
    f.write_text("- just\n- a list\n")
    with pytest.raises(TargetFileError, match="mapping"):
        load_target(f)
    f.write_text("name: [unclosed\n")
    with pytest.raises(TargetFileError, match="not valid YAML"):
        load_target(f)
    with pytest.raises(TargetFileError, match="does not exist"):
        load_target(tmp_path / "missing.yaml")
    f.write_text("base: no-such-base\nname: x\n")
    with pytest.raises(UnknownTargetError, match="no-such-base"):
        load_target(f)


def test_targets_are_frozen():
    t = load_target("ios")
    with pytest.raises(ValidationError, match="frozen"):
        t.name = "other"  # type: ignore[misc]
    assert Target.model_config["extra"] == "forbid"


def test_load_targets_all_and_list():
    # all: the default member of each family, one per family (a fleet build stays small); every: every device
    assert [t.name for t in load_targets("all")] == ["android-mid", "arm64-rpi5", "gpu-server", "ios", "jetson-orin",
                                                     "mcu-cortex-m7", "x86-cpu"]
    assert [t.name for t in load_targets("every")] == builtin_names()
    assert [t.name for t in load_targets("ios, x86-cpu")] == ["ios", "x86-cpu"]
    assert [t.name for t in load_targets("jetson,orin-nano,agx-orin")] == ["jetson-orin", "jetson-orin-nano"]
    assert [t.name for t in load_targets("all,gpu-t4")][-1] == "gpu-t4"
    with pytest.raises(UnknownTargetError):
        load_targets("ios,bogus")
    with pytest.raises(UnknownTargetError):
        load_targets(" , ")


@pytest.mark.parametrize("options,message", [
    ("{thredas: 2}", r"unknown option\(s\) \['thredas'\] for backend onnxruntime; valid: \['channel_multiple', 'provider', 'threads'\]"),
    ("{threads: 0}", r"backend onnxruntime option threads: Input should be greater than or equal to 1"),
    ("{provider: CUDAExcutionProvider}", r"backend onnxruntime option provider"),
])
def test_backend_options_are_typed(tmp_path, options, message):
    f = tmp_path / "t.yaml"
    f.write_text(f"base: x86-cpu\nname: x\nbackends: [{{backend: onnxruntime, unit: cpu, precisions: [fp32], options: {options}}}]\n")
    with pytest.raises(TargetFileError, match=message):
        load_target(str(f))


def test_every_builtin_option_reads_as_typed_settings():
    from edgeopt.types import BACKEND_SETTINGS

    assert set(BACKEND_SETTINGS) == set(__import__("edgeopt.backends", fromlist=["BACKENDS"]).BACKENDS)
    for name in builtin_names():
        for opt in load_target(name).backends:
            s = opt.settings
            assert all(getattr(s, k) == v for k, v in opt.options.items())
    assert load_target("jetson-orin").backends[1].settings.device == "dla"
