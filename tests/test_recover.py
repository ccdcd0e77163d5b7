"""Recovery by distillation (edgeopt.recover) on the embedded digits CNN: masks, channel pruning, LSQ grids, export,
time budget, labels, unsupported ops.  Margins, not exact numbers: any x86 CPU class gives the same verdicts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")

from edgeopt.calibration import as_calibration  # noqa: E402
from edgeopt.datasets import default_model_path, digits  # noqa: E402
from edgeopt.fidelity import compare, session  # noqa: E402
from edgeopt.passes import run_pass  # noqa: E402
from edgeopt.recover import RecoveryError, grid_report, is_n_m, recover, torch_graph  # noqa: E402


@pytest.fixture(scope="module")
def teacher():
    return onnx.load(default_model_path())


@pytest.fixture(scope="module")
def data(teacher):
    xc, yc = digits("calib")
    xt, yt = digits("test")
    return as_calibration(xc, teacher), as_calibration(xt, teacher, labels=yt), yc


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_interpreter_matches_onnxruntime(teacher, data):
    x = data[1].feeds()["image"][:32]
    with torch.no_grad():
        got = torch_graph(teacher)(torch.from_numpy(x))[0][0].numpy()
    ref = session(teacher).run(None, {"image": x})[0]
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_nm_mask_kept_and_fidelity_improves(teacher, data):
    calib, test, _ = data
    pruned = run_pass("prune", teacher, {"pattern": "n:m", "n": 1, "m": 4}, None, evaluate=False).model
    res = recover(teacher, pruned, calib, steps=150, lr=2e-3, batch_size=64, seed=0)
    before, after = _weights(pruned), _weights(res.model)
    masked = [n for n, w in before.items() if w.ndim >= 2 and np.mean(w == 0) > 0.5]
    assert masked and set(masked) <= set(res.record.masked)
    for name in masked:
        assert np.all(after[name][before[name] == 0] == 0), name  # every pruned zero stays zero
        assert is_n_m(after[name], axis=1, n=1, m=4), name  # Conv [O, I, kh, kw] and Gemm(transB) [N, K]: axis 1
        kept = before[name] != 0
        assert np.mean(after[name][kept] != before[name][kept]) > 0.5  # and the kept weights did train
    f0, f1 = compare(teacher, pruned, test), compare(teacher, res.model, test)
    assert f1.snr_db > f0.snr_db + 3
    assert f1.top1_agreement >= f0.top1_agreement + 0.05
    r = res.record
    assert r.steps == 150 and not r.stopped_early and r.device in ("cpu", "cuda")
    assert r.agreement_after > r.agreement_before
    # checkpoints are scored on samples held out of training (the last quarter at most)
    assert r.validation.startswith("the last") and r.validation_samples == min(64, len(calib) // 4)
    assert r.samples == len(calib) - r.validation_samples
    assert r.loss_curve and len(r.loss_curve) <= 50 and np.mean(r.loss_curve[-5:]) < np.mean(r.loss_curve[:5])
    assert r.features_matched  # tensors present with the same shape in both graphs
    assert r.export_max_abs_error < 1e-3


def test_given_validation_samples_score_the_checkpoints(teacher, data):
    calib, test, _ = data
    pruned = run_pass("prune", teacher, {"pattern": "n:m", "n": 1, "m": 4}, None, evaluate=False).model
    r = recover(teacher, pruned, calib, steps=4, batch_size=32, seed=0, validation=test.subset(40),
                checkpoints=2).record
    assert r.validation == "given" and r.validation_samples == 40 and r.samples == len(calib)
    assert r.checkpoint_scores[0][0] == 0 and len(r.checkpoint_scores) >= 2


def test_channel_pruned_student_recovers(teacher, data):
    calib, test, _ = data
    small = run_pass("channel_prune", teacher, {"ratio": 0.5, "reconstruct": False, "min_channels": 4, "round_to": 4},
                     None, evaluate=False).model
    res = recover(teacher, small, calib, steps=150, lr=2e-3, batch_size=64)
    f0, f1 = compare(teacher, small, test), compare(teacher, res.model, test)
    assert f1.top1_agreement >= f0.top1_agreement + 0.3
    assert f1.top1_agreement > 0.8
    shapes0 = {n: w.shape for n, w in _weights(small).items()}
    assert {n: w.shape for n, w in _weights(res.model).items()} == shapes0  # the student's own graph, retrained


def test_lsq_int4_weights_export_on_the_grid(teacher, data):
    calib, test, _ = data
    res = recover(teacher, teacher, calib, steps=120, lr=1e-3, batch_size=64, quantize={"*": 4})
    weights = {n: w for n, w in _weights(teacher).items() if w.ndim >= 2}
    assert set(res.record.quantized) == set(weights) and set(res.record.quantized.values()) == {4}
    grid = grid_report(res.model, res.scales, res.record.quantized)
    for name, g in grid.items():
        assert g["max_off_grid"] < 1e-3, (name, g)
        assert g["max_distinct"] <= 15, (name, g)  # codes -7..7: 4-bit palettization reproduces them exactly
    # round-to-nearest int4 (absmax per channel) as the post-training baseline
    rtn = onnx.ModelProto()
    rtn.CopyFrom(teacher)
    for t in rtn.graph.initializer:
        w = numpy_helper.to_array(t)
        if t.name in weights:
            s = np.abs(w).reshape(len(w), -1).max(1).reshape(-1, *[1] * (w.ndim - 1)) / 7
            t.CopyFrom(numpy_helper.from_array((np.round(w / s) * s).astype(np.float32), t.name))
    assert compare(teacher, res.model, test).snr_db > compare(teacher, rtn, test).snr_db + 1


def test_export_matches_torch(teacher, data):
    calib, test, _ = data
    pruned = run_pass("prune", teacher, {"sparsity": 0.7}, None, evaluate=False).model
    res = recover(teacher, pruned, calib, steps=20, lr=1e-3, batch_size=32)
    assert [i.name for i in res.model.graph.input] == [i.name for i in pruned.graph.input]
    assert [o.name for o in res.model.graph.output] == [o.name for o in pruned.graph.output]
    assert list(res.model.opset_import) == list(pruned.opset_import)
    onnx.checker.check_model(res.model)
    x = test.feeds()["image"][:64]
    with torch.no_grad():
        got = torch_graph(res.model)(torch.from_numpy(x))[0][0].numpy()
    ref = session(res.model).run(None, {"image": x})[0]
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_time_budget_stops_early(teacher, data):
    calib, _, _ = data
    pruned = run_pass("prune", teacher, {"pattern": "n:m"}, None, evaluate=False).model
    res = recover(teacher, pruned, calib, steps=10_000, time_budget_s=0.0)
    r = res.record
    assert r.stopped_early and "time budget" in r.stop_reason
    assert r.steps < r.steps_planned == 10_000
    assert compare(pruned, res.model, calib).snr_db > 100  # nothing trained: the student as it was


def test_labels_add_cross_entropy(teacher, data):
    calib, _, yc = data
    with_labels = recover(teacher, teacher, calib, labels=yc, steps=2, augment=False)
    assert with_labels.record.labels_used and "CE" in with_labels.record.loss
    assert with_labels.record.augmentation == []
    without = recover(teacher, teacher, calib, steps=2)
    assert not without.record.labels_used and "CE" not in without.record.loss
    assert without.record.augmentation  # 8x8 images: crop/shift and jitter, no flips (digits are not symmetric)
    assert not any("flip" in a for a in without.record.augmentation)
    # the digits CNN flattens into a Gemm, so it runs at 8x8 only (fully convolutional models take smaller sides)
    staged = recover(teacher, teacher, calib, steps=4, train_resolution=(8, 8))
    assert "trained at 8x8 then 8x8" in staged.record.augmentation
    with pytest.raises(RecoveryError, match="train_resolution 6"):
        recover(teacher, teacher, calib, steps=2, train_resolution=6)
    labelled = as_calibration(calib.feeds()["image"], teacher, labels=yc)
    assert recover(teacher, teacher, labelled, steps=1).record.labels_used  # the calibration data's own labels


def test_unsupported_op_is_one_line_error(teacher, data):
    calib, _, _ = data
    odd = onnx.ModelProto()
    odd.CopyFrom(teacher)
    last = odd.graph.node[-1]
    out = last.output[0]
    last.output[0] = out + "_pre"
    odd.graph.node.append(helper.make_node("Hardmax", [out + "_pre"], [out], name="odd_hardmax"))
    with pytest.raises(RecoveryError) as e:
        recover(teacher, odd, calib, steps=1)
    msg = str(e.value)
    assert "\n" not in msg and "Hardmax" in msg and "odd_hardmax" in msg


def test_best_checkpoint_keeps_recovery_from_ending_worse(teacher, data):
    """A diverging run (a learning rate far too high) ends worse than its start; with checkpoints the best-scoring
    weights (here: the start) are kept, and the record says which step they came from."""
    calib, _, _ = data
    pruned = run_pass("channel_prune", teacher, {"ratio": 0.3}, calib, evaluate=False).model
    wild = dict(steps=40, lr=3.0, batch_size=64, seed=0, augment=False)
    last = recover(teacher, pruned, calib, checkpoints=0, **wild).record
    best = recover(teacher, pruned, calib, checkpoints=4, **wild).record
    assert last.agreement_after < last.agreement_before - 0.1  # it did diverge
    assert best.agreement_after >= best.agreement_before - 0.02
    assert best.selected_step is not None and best.selected_step < 40
    assert len(best.checkpoint_scores) >= 4 and best.checkpoint_scores[0][0] == 0
    assert last.selected_step == 40 and not last.checkpoint_scores


def _residual_net(seed: int = 0) -> onnx.ModelProto:
    """stem Conv -> Relu -> two residual blocks (Conv 1x1 -> Relu -> Conv 3x3, + skip) -> pool -> Gemm: the
    block boundaries are the stem's Relu and each block's Add."""
    from conftest import init, make_model, vi

    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu")]
    inits = [init("w0", w(16, 3, 3, 3)), init("b0", w(16))]
    prev = "r0"
    for k in (1, 2):
        nodes += [helper.make_node("Conv", [prev, f"wa{k}", f"ba{k}"], [f"a{k}"], name=f"b{k}_expand"),
                  helper.make_node("Relu", [f"a{k}"], [f"ra{k}"], name=f"b{k}_relu"),
                  helper.make_node("Conv", [f"ra{k}", f"wb{k}", f"bb{k}"], [f"p{k}"], name=f"b{k}_project",
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Add", [prev, f"p{k}"], [f"s{k}"], name=f"b{k}_add")]
        inits += [init(f"wa{k}", w(32, 16, 1, 1)), init(f"ba{k}", w(32)), init(f"wb{k}", w(16, 32, 3, 3, scale=0.1)),
                  init(f"bb{k}", w(16))]
        prev = f"s{k}"
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["g"], name="pool"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="head", transB=1)]
    inits += [init("wf", w(10, 16, scale=1.0)), init("bf", w(10))]
    return make_model(nodes, [vi("x", [None, 3, 12, 12])], [vi("logits", None)], inits)


def test_block_phase_segments_at_shared_boundaries_and_recovers():
    from edgeopt.recover import _segments

    teacher = _residual_net()
    x = np.random.default_rng(1).standard_normal((192, 3, 12, 12)).astype(np.float32)
    calib, test = as_calibration(x[:128], teacher), as_calibration(x[128:], teacher)
    t, s = torch_graph(teacher), torch_graph(teacher)
    probe = [torch.from_numpy(x[:2])]
    # pieces: the stem up to its Relu (1 layer), block 1 (2), block 2 with the pool and Flatten after it (2), the
    # head (1); merged until each block holds 3 layers (the remainder joins the last)
    assert [g[4] for g in _segments(t, s, probe, min_layers=1)] == ["r0", "s1", "f", None]
    assert [g[4] for g in _segments(t, s, probe, min_layers=3)] == ["s1", None]
    pruned = run_pass("prune", teacher, {"pattern": "n:m", "n": 1, "m": 4}, None, evaluate=False).model
    res = recover(teacher, pruned, calib, steps=0, block_steps=80, lr=3e-3, batch_size=32, augment=False)
    b = res.record.block_phase
    assert b["blocks"] == 2 and b["steps"] == 160 and b["kept"]
    assert all(row[3] < row[2] for row in b["losses"]), b["losses"]  # every block's loss fell
    assert b["score_after"] > b["score_before"]
    f0, f1 = compare(teacher, pruned, test), compare(teacher, res.model, test)
    assert f1.snr_db > f0.snr_db + 3, (f0.snr_db, f1.snr_db)
    for name in res.record.masked:  # the masks held through the block phase
        assert is_n_m(_weights(res.model)[name], axis=1, n=1, m=4)


def test_busy_cores_sees_a_spinning_thread():
    """Threads default to the cores left idle: a core kept busy (here by a spinning thread of this very process)
    counts as busy, whatever the load average was a minute ago."""
    import os
    import threading
    import time

    from edgeopt.recover import _busy_cores, _threads

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat: the load average is used")
    cores = len(os.sched_getaffinity(0))
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        time.sleep(0.05)
        busy = _busy_cores(cores, window_s=0.5)
    finally:
        stop.set()
        t.join()
    assert 1 <= busy <= cores
    assert 1 <= _threads() <= cores
