"""Calibration data in the forms users have (edgeopt.datasources): image folders with a declared preprocessing,
WAV folders, Python iterables; and the command line's --preprocess."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import init, make_model, save, vi
from onnx import TensorProto, helper
from PIL import Image

from edgeopt.calibration import CalibrationError, as_calibration
from edgeopt.datasources import AudioFolder, ImageFolder, Preprocess, Samples, wrap, wrap_data
from edgeopt.memory import memory_limit

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def image_model(h: int = 32, w: int = 32, layout: str = "NCHW", c: int = 3, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """Conv -> Relu -> global average pool -> Gemm (5 classes) over an image input (NHWC: a Transpose first)."""
    rng = np.random.default_rng(0)
    shape = [1, c, h, w] if layout == "NCHW" else [1, h, w, c]
    nodes, src = [], "x"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [src], ["xf"], to=TensorProto.FLOAT))
        src = "xf"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [src], ["xt"], perm=[0, 3, 1, 2]))
        src = "xt"
    nodes += [helper.make_node("Conv", [src, "w", "b"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    inits = [init("w", rng.normal(0, 0.3, (4, c, 3, 3)).astype(np.float32)), init("b", np.zeros(4, np.float32)),
             init("fw", rng.normal(0, 0.5, (5, 4)).astype(np.float32)), init("fb", np.zeros(5, np.float32))]
    return make_model(nodes, [vi("x", shape, dtype)], [vi("y", [1, 5])], inits)


def solid(path: Path, rgb, size=(40, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, rgb).save(path)
    return path


def photos(folder: Path, n: int, seed: int = 0, suffix: str = ".jpg") -> list[Path]:
    """``n`` random crops of scikit-image's bundled photos, written with Pillow."""
    from skimage import data as skd

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = (skd.astronaut, skd.coffee, skd.chelsea)[i % 3]()
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 0.9))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        p = folder / f"img{i:03d}{suffix}"
        Image.fromarray(img[y : y + side, x : x + side + int(rng.integers(0, 40))]).save(p)
        out.append(p)
    return out


# --------------------------------------------------------------------------- Preprocess


def test_presets():
    p = Preprocess.preset("imagenet")
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert p.resize_ratio == pytest.approx(256 / 224) and p.scale == pytest.approx(1 / 255)
    assert Preprocess.preset("unit").scale == pytest.approx(1 / 255) and Preprocess.preset("unit").mean == (0.0,)
    assert Preprocess.preset("raw").scale == 1.0 == Preprocess.preset("none").scale
    assert Preprocess.preset("imagenet", channel_order="BGR").channel_order == "BGR"
    with pytest.raises(CalibrationError, match="unknown preprocessing preset 'vgg'; valid: imagenet, unit, raw, none"):
        Preprocess.preset("vgg")
    with pytest.raises(ValueError):
        Preprocess(std=(0.0,))
    with pytest.raises(CalibrationError, match="^preprocess layout: Input should be 'NCHW' or 'NHWC'$"):
        Preprocess.preset("unit", layout="CHW")
    with pytest.raises(CalibrationError, match="^preprocess std: Value error, std must not be 0$"):
        ImageFolder(".", {"std": (0.0,)})
    with pytest.raises(ValueError):  # frozen
        p.scale = 1.0  # type: ignore[misc]


def test_solid_colour_through_imagenet_preset_nchw_and_nhwc(tmp_path):
    solid(tmp_path / "imgs" / "a.png", (255, 0, 128))
    expect = (np.array([255, 0, 128], np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    cd = as_calibration(ImageFolder(tmp_path / "imgs", "imagenet"), image_model(24, 20))
    x = cd.feeds()["x"]
    assert x.shape == (1, 3, 24, 20) and x.dtype == np.float32
    np.testing.assert_allclose(x[0].reshape(3, -1), np.repeat(expect[:, None], 480, 1), atol=1e-5)
    x = as_calibration(ImageFolder(tmp_path / "imgs", "imagenet"), image_model(24, 20, "NHWC")).feeds()["x"]
    assert x.shape == (1, 24, 20, 3)
    np.testing.assert_allclose(x[0, 3, 5], expect, atol=1e-5)
    bgr = Preprocess.preset("unit", channel_order="BGR")
    x = as_calibration(ImageFolder(tmp_path / "imgs", bgr), image_model(8, 8)).feeds()["x"]
    np.testing.assert_allclose(x[0, :, 0, 0], [128 / 255, 0, 1], atol=1e-6)
    raw = as_calibration(ImageFolder(tmp_path / "imgs", "raw"), image_model(8, 8, dtype=TensorProto.UINT8)).feeds()["x"]
    assert raw.dtype == np.uint8 and raw[0, :, 0, 0].tolist() == [255, 0, 128]


def test_resize_keeps_the_aspect_and_crops_the_centre(tmp_path):
    img = np.zeros((32, 64, 3), np.uint8)  # 64 wide: left half black, right half white
    img[:, 32:] = 255
    (tmp_path / "imgs").mkdir()
    Image.fromarray(img).save(tmp_path / "imgs" / "half.png")
    x = as_calibration(ImageFolder(tmp_path / "imgs", "unit"), image_model(16, 16)).feeds()["x"][0, 0]
    # scaled to 32x16, the centre 16 columns: 8 black then 8 white (one blended column at the edge at most)
    assert x.shape == (16, 16)
    assert (x[:, :7] < 0.05).all() and (x[:, 9:] > 0.95).all()


def test_png_alpha_and_grayscale_are_converted(tmp_path):
    solid(tmp_path / "imgs" / "a_rgba.png", (10, 20, 30, 0), mode="RGBA")
    solid(tmp_path / "imgs" / "b_gray.png", 77, mode="L")
    solid(tmp_path / "imgs" / "c_pal.png", 5, mode="P")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(tmp_path / "imgs" / "d_16bit.png")
    x = as_calibration(ImageFolder(tmp_path / "imgs", "raw"), image_model(8, 8)).feeds()["x"]
    assert x.shape == (4, 3, 8, 8)
    assert x[0, :, 0, 0].tolist() == [10, 20, 30]  # alpha dropped (as torchvision's loader does)
    assert x[1, :, 0, 0].tolist() == [77, 77, 77]
    assert x[3, :, 0, 0].tolist() == [255, 255, 255]
    gray = as_calibration(ImageFolder(tmp_path / "imgs", "raw"), image_model(8, 8, c=1)).feeds()["x"]
    assert gray.shape == (4, 1, 8, 8) and gray[1, 0, 0, 0] == 77


def test_photos_feed_calibration_recursively_sorted(tmp_path):
    photos(tmp_path / "imgs" / "b", 3)
    photos(tmp_path / "imgs" / "a", 2, seed=1, suffix=".PNG")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    src = ImageFolder(tmp_path / "imgs", "imagenet")
    assert [p.relative_to(tmp_path / "imgs").as_posix() for p in src.files()] == [
        "a/img000.PNG", "a/img001.PNG", "b/img000.jpg", "b/img001.jpg", "b/img002.jpg"]
    cd = as_calibration(src, image_model(32, 32))
    x = cd.feeds()["x"]
    assert len(cd) == 5 and x.shape == (5, 3, 32, 32) and np.isfinite(x).all()
    assert -2.2 < x.min() < 0 < x.max() < 2.7  # ImageNet-normalized photos
    assert cd.labels is None  # sub-folders named "a", "b": not class indices, no classes= given
    assert "image folder" in cd.description


def test_class_folders_give_labels(tmp_path):
    for cls, colour in (("3", (255, 0, 0)), ("7", (0, 255, 0))):
        for i in range(2):
            solid(tmp_path / "idx" / cls / f"{i}.png", colour)
            solid(tmp_path / "named" / ("cat" if cls == "3" else "dog") / f"{i}.png", colour)
    m = image_model(8, 8)
    assert as_calibration(ImageFolder(tmp_path / "idx", "unit"), m).labels.tolist() == [3, 3, 7, 7]
    assert as_calibration(ImageFolder(tmp_path / "named", "unit"), m).labels is None
    assert as_calibration(ImageFolder(tmp_path / "named", "unit", classes="sorted"), m).labels.tolist() == [0, 0, 1, 1]
    assert as_calibration(ImageFolder(tmp_path / "named", "unit", classes=["dog", "cat"]), m).labels.tolist() == [1, 1, 0, 0]
    with pytest.raises(CalibrationError, match=r"class folder\(s\) \['dog'\] are not in classes="):
        as_calibration(ImageFolder(tmp_path / "named", "unit", classes=["cat"]), m)
    # given labels win over the folders'
    assert as_calibration(ImageFolder(tmp_path / "idx", "unit"), m, labels=np.array([0, 1, 2, 3])).labels.tolist() == [0, 1, 2, 3]


def test_corrupt_jpeg_is_refused_in_one_line_naming_the_file(tmp_path):
    good = photos(tmp_path / "imgs", 2)[0]
    bad = tmp_path / "imgs" / "img001.jpg"
    bad.write_bytes(good.read_bytes()[:600])  # truncated
    with pytest.raises(CalibrationError) as e:
        as_calibration(ImageFolder(tmp_path / "imgs", "imagenet"), image_model())
    msg = str(e.value)
    assert "\n" not in msg and f"image {bad}: cannot be read as an image" in msg
    bad.write_bytes(b"\xff\xd8\xff" + b"garbage" * 10)
    with pytest.raises(CalibrationError, match="img001.jpg: cannot be read as an image"):
        as_calibration(ImageFolder(tmp_path / "imgs", "imagenet"), image_model())


def test_empty_or_missing_folders_and_unfit_models_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(CalibrationError, match="holds no JPEG or PNG files"):
        as_calibration(ImageFolder(tmp_path / "empty", "unit"), image_model())
    with pytest.raises(CalibrationError, match="does not exist or is not a folder"):
        as_calibration(ImageFolder(tmp_path / "nope", "unit"), image_model())
    solid(tmp_path / "imgs" / "a.png", (1, 2, 3))
    vec = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1, 16])], [vi("y", [1, 16])])
    with pytest.raises(CalibrationError, match=r"has shape \[1, 16\]; images feed a rank-4 input"):
        as_calibration(ImageFolder(tmp_path / "imgs", "unit"), vec)
    dyn = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1, 3, "h", "w"])], [vi("y", [1, 3, "h", "w"])])
    with pytest.raises(CalibrationError, match=r"does not fix H x W; give Preprocess\(size=\(H, W\)\)"):
        as_calibration(ImageFolder(tmp_path / "imgs", "unit"), dyn)
    x = as_calibration(ImageFolder(tmp_path / "imgs", Preprocess.preset("unit", size=(6, 5))), dyn).feeds()["x"]
    assert x.shape == (1, 3, 6, 5)


def test_image_folder_within_the_memory_limit(tmp_path):
    photos(tmp_path / "imgs", 3)
    with memory_limit(100_000), pytest.raises(CalibrationError, match="over the memory limit"):
        as_calibration(ImageFolder(tmp_path / "imgs", "imagenet"), image_model(224, 224))  # 3 x 588 KiB


# --------------------------------------------------------------------------- audio


def write_wav(path: Path, x: np.ndarray, rate: int, width: int = 2) -> Path:
    """``x`` [frames, channels] in [-1, 1] as PCM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.atleast_2d(x.T).T
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(x.shape[1])
        wf.setsampwidth(width)
        wf.setframerate(rate)
        if width == 2:
            wf.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
        else:
            wf.writeframes(np.round(x * 127 + 128).astype(np.uint8).tobytes())
    return path


def write_float_wav(path: Path, x: np.ndarray, rate: int) -> Path:
    data = x.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                     + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)
    return path


def wave_model(length: int = 800, rank: int = 3) -> onnx.ModelProto:
    shape = [1, 1, length] if rank == 3 else [1, length]
    return make_model([helper.make_node("Abs", ["x"], ["y"])], [vi("x", shape)], [vi("y", shape)])


def test_wav_folder_mono_mixdown_crop_and_pad(tmp_path):
    t = np.arange(1200) / 8000
    sine = 0.5 * np.sin(2 * np.pi * 440 * t)
    write_wav(tmp_path / "wavs" / "a_long_stereo.wav", np.stack([sine, -sine * 0 + sine], 1), 8000)
    write_wav(tmp_path / "wavs" / "b_short.wav", sine[:300], 8000)
    write_wav(tmp_path / "wavs" / "c_8bit.wav", sine[:800], 8000, width=1)
    write_float_wav(tmp_path / "wavs" / "d_float.wav", sine[:800], 8000)
    cd = as_calibration(AudioFolder(tmp_path / "wavs"), wave_model(800))
    x = cd.feeds()["x"]
    assert x.shape == (4, 1, 800)
    np.testing.assert_allclose(x[0, 0], sine[:800], atol=1e-4)  # the first 800 samples of the mixdown
    np.testing.assert_allclose(x[1, 0, :300], sine[:300], atol=1e-4)
    assert (x[1, 0, 300:] == 0).all()  # zero-padded
    np.testing.assert_allclose(x[2, 0], sine[:800], atol=0.015)  # 8-bit
    np.testing.assert_allclose(x[3, 0], sine[:800], atol=1e-6)  # IEEE float
    assert as_calibration(AudioFolder(tmp_path / "wavs"), wave_model(800, rank=2)).feeds()["x"].shape == (4, 800)


def test_wav_rates_must_agree_or_be_resampled(tmp_path):
    sine16 = np.sin(2 * np.pi * 100 * np.arange(1600) / 16000)
    sine8 = np.sin(2 * np.pi * 100 * np.arange(800) / 8000)
    write_wav(tmp_path / "wavs" / "a.wav", sine16, 16000)
    write_wav(tmp_path / "wavs" / "b.wav", sine8, 8000)
    with pytest.raises(CalibrationError, match=r"b.wav: 8000 Hz, but .*a.wav is 16000 Hz; give sample_rate="):
        as_calibration(AudioFolder(tmp_path / "wavs"), wave_model(1600))
    x = as_calibration(AudioFolder(tmp_path / "wavs", sample_rate=16000), wave_model(1600)).feeds()["x"]
    np.testing.assert_allclose(x[1, 0, :1590], sine16[:1590], atol=0.01)  # linear interpolation up to 16 kHz


def test_wav_refusals(tmp_path):
    (tmp_path / "wavs").mkdir()
    (tmp_path / "wavs" / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(CalibrationError, match=r"audio file .*bad.wav: not a readable WAV file"):
        as_calibration(AudioFolder(tmp_path / "wavs"), wave_model())
    write_wav(tmp_path / "ok" / "a.wav", np.zeros(10), 8000)
    img = image_model(8, 8)
    with pytest.raises(CalibrationError, match=r"a raw waveform feeds a float input \[N, L\] or \[N, 1, L\]"):
        as_calibration(AudioFolder(tmp_path / "ok"), img)
    (tmp_path / "none").mkdir()
    with pytest.raises(CalibrationError, match="holds no .wav files"):
        as_calibration(AudioFolder(tmp_path / "none"), wave_model())


# --------------------------------------------------------------------------- iterables


def test_iterables_of_arrays_dicts_and_labelled_pairs():
    m = image_model(8, 8)
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 8, 8)).astype(np.float32) for _ in range(4)]
    cd = as_calibration(Samples(arrays), m)
    assert len(cd) == 4 and cd.labels is None
    np.testing.assert_array_equal(cd.feeds()["x"][2], arrays[2])
    cd = as_calibration(Samples((a[None], i % 5) for i, a in enumerate(arrays)), m)  # a generator of pairs
    assert cd.labels.tolist() == [0, 1, 2, 3]
    two = make_model([helper.make_node("Add", ["a", "b"], ["y"])], [vi("a", [1, 4]), vi("b", [1, 4])], [vi("y", [1, 4])])
    cd = as_calibration(Samples([{"a": np.ones((1, 4)), "b": np.full((1, 4), i)} for i in range(3)]), two)
    assert cd.feeds()["b"][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(CalibrationError, match="sample 1 of the list: no label, unlike sample 0"):
        as_calibration(Samples([(arrays[0], 1), arrays[1]], "list"), m)
    with pytest.raises(CalibrationError, match="is empty"):
        as_calibration(Samples([]), m)
    with pytest.raises(CalibrationError, match=r"has inputs \['a', 'c'\], the model takes \['a', 'b'\]"):
        as_calibration(Samples([{"a": np.ones((1, 4)), "c": np.ones((1, 4))}]), two)
    with memory_limit(1000), pytest.raises(CalibrationError, match="more than the memory limit"):
        as_calibration(Samples(arrays), m)


def test_wrap_picks_the_source():
    assert isinstance(wrap([np.zeros(3)]), Samples)
    assert isinstance(wrap(x for x in [np.zeros(3)]), Samples)
    arr = np.zeros((2, 3))
    assert wrap(arr) is arr and wrap(None) is None


def test_wrap_folders(tmp_path):
    solid(tmp_path / "imgs" / "a.jpg", (1, 2, 3))
    write_wav(tmp_path / "wavs" / "a.wav", np.zeros(10), 8000)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "a.npy", np.zeros((1, 4), np.float32))
    assert isinstance(wrap(tmp_path / "imgs", preprocess="unit"), ImageFolder)
    assert isinstance(wrap(str(tmp_path / "wavs")), AudioFolder)
    assert wrap(tmp_path / "npy") == tmp_path / "npy"
    with pytest.raises(CalibrationError) as e:
        wrap(tmp_path / "imgs")
    assert str(e.value) == (f"calibration folder {tmp_path / 'imgs'} holds images: pass --preprocess "
                            "imagenet|unit|raw to say how they become model inputs")
    with pytest.raises(CalibrationError, match="--preprocess is for a folder of JPEG/PNG images"):
        wrap_data(tmp_path / "npy", None, preprocess="imagenet")


# --------------------------------------------------------------------------- command line


def test_cli_calib_image_folder_needs_preprocess(tmp_path, capsys):
    from edgeopt.cli import main

    photos(tmp_path / "imgs", 4)
    model = save(image_model(32, 32), tmp_path / "m.onnx")
    assert main(["plan", str(model), "--target", "x86-cpu", "--calib", str(tmp_path / "imgs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds images: pass --preprocess imagenet|unit|raw" in err
    out = tmp_path / "plan.json"
    assert main(["plan", str(model), "--target", "x86-cpu", "--calib", str(tmp_path / "imgs"), "--preprocess",
                 "imagenet", "-o", str(out), "--json"]) == 0
    assert out.is_file() and '"backend"' in out.read_text()
