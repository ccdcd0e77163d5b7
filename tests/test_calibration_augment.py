"""CalibrationData.augmented: random crops and flips that fill image calibration data up to a sample count."""

from __future__ import annotations

import numpy as np

from edgeopt.calibration import CalibrationData


def _data(feeds: dict[str, np.ndarray], labels=None, **kw) -> CalibrationData:
    cd = CalibrationData(lambda: [feeds], labels, description="cal", **kw)
    return cd


def test_originals_first_then_crops_of_the_same_sample_for_every_input():
    n, h, w = 5, 40, 48
    ids = np.arange(n, dtype=np.float32)
    # image i is constant i: every crop of it is i again, so the pairing with the sample's other inputs shows
    img = np.broadcast_to(ids[:, None, None, None], (n, 3, h, w)).astype(np.float32).copy()
    cd = _data({"img": img, "mask": img[:, :1].copy(), "id": ids[:, None].copy()}, labels=np.arange(n) + 10)
    out = cd.augmented(23, seed=1)
    f = out.feeds()
    assert len(out) == 23 and f["img"].shape == (23, 3, h, w) and f["mask"].shape == (23, 1, h, w)
    np.testing.assert_array_equal(f["img"][:n], img)
    src = f["id"][:, 0].astype(int)
    np.testing.assert_array_equal(src[:n], np.arange(n))
    assert sorted(set(src[n:])) == list(range(n))  # every sample gives crops
    np.testing.assert_allclose(f["img"][n:], np.broadcast_to(src[n:, None, None, None], (23 - n, 3, h, w)), atol=1e-6)
    np.testing.assert_allclose(f["mask"][n:, 0], f["img"][n:, 0], atol=1e-6)
    np.testing.assert_array_equal(out.labels, src + 10)
    assert "18 random crops/flips" in out.description


def test_crops_zoom_in_and_flip_left_right():
    n, h, w = 4, 32, 64
    ramp = np.broadcast_to(np.arange(w, dtype=np.float32), (n, 1, h, w)).copy()  # increasing to the right
    out = _data({"x": ramp}).augmented(204, seed=0).feeds()["x"][n:, 0]
    slope = out[:, :, -1].mean(1) - out[:, :, 0].mean(1)
    flipped = slope < 0
    assert 0.35 < flipped.mean() < 0.65  # half of them
    span = np.abs(slope)
    assert span.max() <= w - 1 + 1e-4 and span.min() >= 0.6 * (w - 1) - 1  # 60-100% of the side
    assert span.std() > 1  # the crop size varies
    assert np.all(out >= 0) and np.all(out <= w - 1)  # inside the image: no padding
    rows = out.std(axis=1)  # every row of a crop the same (the ramp is constant down the columns)
    assert rows.max() < 1e-4


def test_unchanged_when_enough_samples_small_maps_non_images_or_per_sample():
    rng = np.random.default_rng(0)
    big = _data({"x": rng.random((8, 3, 32, 32), dtype=np.float32)})
    assert big.augmented(8) is big and big.augmented(4) is big
    small = _data({"x": rng.random((8, 3, 16, 16), dtype=np.float32)})  # below 32x32: not an image
    assert small.augmented(100) is small
    seq = _data({"x": rng.random((8, 20, 64), dtype=np.float32)})  # 3-D: a sequence
    assert seq.augmented(100) is seq
    ints = _data({"x": rng.integers(0, 9, (8, 3, 64, 64))})
    assert ints.augmented(100) is ints
    per = _data({"x": rng.random((8, 1, 3, 64, 64), dtype=np.float32)}, per_sample=True)
    assert per.augmented(100) is per


def test_prune_refit_fills_image_data_up_with_crops_within_the_memory_limit():
    """The 2:4 re-fit reads calib_samples samples: random crops/flips of image calibration data fill it up, fewer
    when the memory limit says so, none for non-image data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.calibration import as_calibration
    from edgeopt.memory import memory_limit
    from edgeopt.passes import prune

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cal = as_calibration(rng.standard_normal((8, 8, 32, 32)).astype(np.float32), m)
    cfg = prune.Config(pattern="n:m", reconstruct=True, calib_samples=40)

    def notes(limit=None):
        with memory_limit(limit):
            out = prune.apply(onnx.ModelProto.FromString(m.SerializeToString()), cfg, cal)
        return [n for n in out.notes if "crops/flips" in n]

    assert notes() == ["re-fit on 8 calibration samples and 32 random crops/flips of them"]
    per = 8 * 32 * 32 * 4
    assert notes(24 * 12 * per) == ["re-fit on 8 calibration samples and 16 random crops/flips of them (fewer than "
                                    "calib_samples: the memory limit)"]
    out = prune.apply(onnx.ModelProto.FromString(m.SerializeToString()), cfg.model_copy(update={"augment": False}), cal)
    assert not [n for n in out.notes if "crops/flips" in n]
