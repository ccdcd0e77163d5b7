"""MCU fit (edgeopt.fit): channel keep ratios and, when allowed, a smaller input side that make a model's predicted
int8 RAM/flash fit a small target; apply_fit makes the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import init, make_model, vi
from onnx import helper

from edgeopt.calibration import as_calibration
from edgeopt.fidelity import session
from edgeopt.fit import FitError, FitProposal, apply_fit, fit_search, resize_input
from edgeopt.graph import analyze
from edgeopt.planner import candidate_options, evaluate
from edgeopt.targets import load_target


def rand(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def conv_net(side: int = 32, seed: int = 0) -> onnx.ModelProto:
    """conv3x3 3->32 (Relu) -> conv3x3/2 32->64 (Relu) -> conv1x1 64->64 (Relu) -> GlobalAveragePool -> Flatten -> Gemm 10."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)]
    inits = [init("w1", rand(rng, 32, 3, 3, 3)), init("b1", rand(rng, 32)), init("w2", rand(rng, 64, 32, 3, 3, scale=0.1)),
             init("b2", rand(rng, 64)), init("w3", rand(rng, 64, 64, 1, 1)), init("b3", rand(rng, 64)),
             init("wg", rand(rng, 10, 64)), init("bg", rand(rng, 10))]
    return make_model(nodes, [vi("x", [1, 3, side, side])], [vi("y", None)], inits)


def pinned_net(side: int = 16) -> onnx.ModelProto:
    """conv 3->16 -> Flatten of the 16xHxW map -> Gemm: the head pins the input size."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Flatten", ["r1"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)]
    inits = [init("w1", rand(rng, 16, 3, 3, 3)), init("b1", rand(rng, 16)), init("wg", rand(rng, 10, 16 * side * side)),
             init("bg", rand(rng, 10))]
    return make_model(nodes, [vi("x", [1, 3, side, side])], [vi("y", None)], inits)


def tiny_mcu(ram: int, storage: int):
    t = load_target("mcu-cortex-m7")
    return t.model_copy(update={"name": "tiny-mcu", "budgets": t.budgets.model_copy(update={"ram": ram, "storage": storage})})


@pytest.fixture
def net(tmp_path: Path):
    m = conv_net()
    p = tmp_path / "net.onnx"
    onnx.save(m, str(p))
    a = analyze(p)
    t = load_target("mcu-cortex-m7")
    opt = candidate_options(t, None)[0]
    ev = evaluate(a, t, opt, "int8")
    return m, a, opt, ev


def search(m, a, target, opt, allow, **kw):
    why: list[str] = []
    return fit_search(m, a, target, opt, allow_resolution=allow, why=why, **kw), why


def fits(p: FitProposal, target) -> bool:
    return (p.predicted_ram <= 0.9 * target.budgets.ram and p.predicted_storage <= 0.9 * target.budgets.storage)


def test_channels_alone_fit_ram_input_unchanged_even_when_resolution_allowed(net):
    m, a, opt, ev = net
    target = tiny_mcu(int(ev.ram * 0.8), 10**7)
    for allow in (False, True):
        p, why = search(m, a, target, opt, allow)
        assert p is not None, why
        assert p.resolution is None and fits(p, target)
        assert p.predicted_ram < ev.ram * 0.75
        assert any(b < c for c, b in p.channels.values())
        assert all(b >= 0.5 * c - 8 for c, b in p.channels.values())  # the capacity guard (rounding aside)
        assert p.rationale and "RAM" in " ".join(p.rationale)


def test_storage_fit_prunes_where_the_weights_are(net):
    m, a, opt, ev = net
    target = tiny_mcu(10**8, int(ev.storage * 0.85))
    p, why = search(m, a, target, opt, True)
    assert p is not None, why
    assert p.resolution is None and fits(p, target)
    # conv2's group (its own 32x3x3 weights per channel + conv3's inputs) holds the most weight bytes
    assert p.channels["conv2"][1] < p.channels["conv2"][0]
    assert p.params_after < p.params_before


def test_resolution_only_when_channels_cannot_fit(net):
    m, a, opt, ev = net
    target = tiny_mcu(int(ev.ram * 0.3), 10**7)
    p, why = search(m, a, target, opt, False)
    assert p is None
    assert why and any("RAM" in w for w in why) and any("resolution was not allowed" in w for w in why)
    p, why = search(m, a, target, opt, True)
    assert p is not None, why
    assert p.resolution is not None and p.resolution < 32 and p.original_side == 32
    assert fits(p, target)
    assert any("32x32" in line and f"{p.resolution}x{p.resolution}" in line for line in p.rationale)


def test_apply_fit_runs_in_onnxruntime_with_new_shapes(net):
    m, a, opt, ev = net
    target = tiny_mcu(int(ev.ram * 0.3), int(ev.storage * 0.9))
    p, why = search(m, a, target, opt, True)
    assert p is not None and p.resolution, why
    rng = np.random.default_rng(3)
    calib = as_calibration(rng.standard_normal((16, 3, 32, 32)).astype(np.float32), m)
    out = apply_fit(m, p, calib)
    onnx.checker.check_model(out)
    dims = [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims[2:] == [p.resolution, p.resolution]
    y = session(out).run(None, {"x": rng.standard_normal((1, 3, p.resolution, p.resolution)).astype(np.float32)})[0]
    assert y.shape == (1, 10) and np.all(np.isfinite(y))
    w = {t.name: t for t in out.graph.initializer}
    conv = {n.name: n for n in out.graph.node}
    for name, (_, kept) in p.channels.items():
        assert w[conv[name].input[1]].dims[0] == kept, name
    # the predicted fit holds for the model apply_fit made
    p2, _ = search(out, _analysis(out), tiny_mcu(10**9, 10**9), opt, False)
    assert p2 is not None and p2.original_ram <= 0.9 * target.budgets.ram and p2.original_storage <= 0.9 * target.budgets.storage


def _analysis(model):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        onnx.save(model, str(path))
        return analyze(path)


def test_channels_only_apply_keeps_input(net):
    m, a, opt, ev = net
    target = tiny_mcu(int(ev.ram * 0.8), 10**7)
    p, _ = search(m, a, target, opt, False)
    out = apply_fit(m, p, None)
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]
    assert session(out).run(None, {"x": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 10)


def test_head_that_pins_spatial_size_is_refused_in_one_line(tmp_path):
    m = pinned_net()
    with pytest.raises(FitError) as e:
        resize_input(m, 8)
    assert "pins the input size" in str(e.value) and "\n" not in str(e.value)
    p = tmp_path / "pinned.onnx"
    onnx.save(m, str(p))
    a = analyze(p)
    opt = candidate_options(load_target("mcu-cortex-m7"), None)[0]
    ev = evaluate(a, load_target("mcu-cortex-m7"), opt, "int8")
    target = tiny_mcu(int(ev.ram * 0.2), 10**7)
    prop, why = search(m, a, target, opt, True)
    assert prop is None and any("pins the input size" in w for w in why)
    fake = FitProposal(target="t", option="o", precision="int8", input_name="x", original_side=16, resolution=8, ratios={},
                       channels={}, min_keep=0.5, round_to=8, min_channels=8, margin=0.1, predicted_ram=1,
                       predicted_arena=1, predicted_storage=1, ram_budget=1, storage_budget=1, original_ram=1,
                       original_storage=1, params_before=1, params_after=1, rationale=[])
    with pytest.raises(FitError) as e:
        apply_fit(m, fake, None)
    assert "pins the input size" in str(e.value) and "\n" not in str(e.value)


def test_nothing_fits_returns_none_with_reason(net):
    m, a, opt, ev = net
    target = tiny_mcu(10**8, 2048)
    p, why = search(m, a, target, opt, True)
    assert p is None
    assert any("storage" in w for w in why)


def test_already_fitting_model_is_left_alone(net):
    m, a, opt, ev = net
    p, _ = search(m, a, tiny_mcu(10**8, 10**8), opt, True)
    assert p is not None and p.resolution is None and not p.ratios


def test_digits_cnn_fits_a_tiny_mcu():
    from edgeopt.datasets import default_model_path, digits

    path = default_model_path()
    m = onnx.load(str(path))
    a = analyze(path)
    opt = candidate_options(load_target("mcu-cortex-m7"), None)[0]
    ev = evaluate(a, load_target("mcu-cortex-m7"), opt, "int8")
    target = tiny_mcu(10**7, int(ev.storage * 0.8))
    p, why = search(m, a, target, opt, False)
    if p is None:  # a digits CNN without prunable groups: said why
        assert why
        return
    assert fits(p, target)
    xc, _ = digits("calib")
    out = apply_fit(m, p, as_calibration(xc[:32], m))
    name = out.graph.input[0].name
    assert session(out).run(None, {name: xc[:2]})[0].shape[0] == 2


def test_runtime_overheads_counted_for_tflm_only(net):
    from edgeopt.fit import runtime_overheads

    m, a, opt, ev = net
    ram, storage = runtime_overheads(a, opt)
    channels = 32 + 64 + 64 + 10
    assert ram >= 8 * channels and storage >= 20 * channels
    host = load_target("x86-avx2") if "x86-avx2" in _targets() else None
    if host is not None:
        other = [o for o in candidate_options(host, None) if o.backend not in ("tflite", "tflm")]
        if other:
            assert runtime_overheads(a, other[0]) == (0, 0)
    p, _ = search(m, a, tiny_mcu(10**8, 10**8), opt, False)
    assert p.predicted_ram == ev.ram + ram and p.predicted_storage == ev.storage + storage
    p0, _ = search(m, a, tiny_mcu(10**8, 10**8), opt, False, overheads=False)
    assert p0.predicted_ram == ev.ram and p0.runtime_ram == 0


def _targets():
    from edgeopt.targets import builtin_names

    return builtin_names()


def test_flash_goes_below_min_keep_only_down_to_the_storage_floor(net):
    m, a, opt, ev = net
    target = tiny_mcu(10**8, int(ev.storage * 0.4))
    p, why = search(m, a, target, opt, False)
    assert p is not None, why
    kept = [b / c for c, b in p.channels.values()]
    assert 0.25 - 1e-9 <= min(kept) < 0.5
    assert fits(p, target)
    p2, why2 = search(m, a, target, opt, False, storage_floor=0.5)
    assert p2 is None and any("storage" in w and "does not reduce flash" in w for w in why2)
