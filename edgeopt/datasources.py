"""Calibration and evaluation data in the forms users have, turned into what :mod:`edgeopt.calibration` reads.

* :class:`ImageFolder`: JPEG/PNG files under a folder (recursive, sorted by path) with a declared
  :class:`Preprocess` (resize and centre-crop to the model's input H x W, scale, mean/std, layout, channel order,
  dtype; presets ``imagenet``, ``unit``, ``raw``).  Class sub-folders named by class index (``0/``, ``207/``) give
  labels; sub-folders named by class name give labels only with ``classes=`` (a list of names, or ``"sorted"``:
  torchvision's ImageFolder convention, index = position in the sorted names).
* :class:`AudioFolder`: WAV files (PCM 8/16/24/32-bit or IEEE float), mixed down to mono, resampled to one rate
  (linear interpolation) and cropped or zero-padded to the model's input length: the raw waveform, for models whose
  input is ``[N, L]`` or ``[N, 1, L]`` (no log-mel or other features are computed).
* :class:`Samples`: a Python iterable of samples: numpy arrays, dicts ``{input_name: array}``, or ``(sample, label)``
  pairs.

Each is bound to a model by :func:`edgeopt.calibration.as_calibration` (through their ``for_model`` method), which
then checks every sample like any other calibration data.  Sizes are checked against the memory limit
(:func:`edgeopt.memory.max_memory`) before images or sounds are decoded; unreadable files are refused in one line
naming the file.  :func:`wrap` picks the right one for a path, iterable or array (the API and ``--preprocess``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .calibration import MAX_FOLDER_FILES, CalibrationError, model_inputs
from .memory import limit_hint, max_memory

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png")
AUDIO_SUFFIXES = (".wav",)
PRESETS = ("imagenet", "unit", "raw", "none")


def _fmt(n: int) -> str:
    from .units import fmt_bytes

    return fmt_bytes(n)


def _short(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------- preprocessing


class Preprocess(BaseModel):
    """How an image becomes a model input.

    The image is converted to RGB (alpha dropped, grayscale replicated, as torchvision's loader does) or to one
    gray channel for a 1-channel model; scaled, aspect kept, so that it just covers the model's H x W times
    ``resize_ratio``; centre-cropped to H x W; then ``x * scale``, ``(x - mean) / std`` per channel, put in
    ``channel_order`` and ``layout`` and cast to ``dtype`` (default: the model input's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize_ratio: float = Field(1.0, ge=1.0, description="scale to cover H x W times this, then centre-crop "
                                                         "(256/224: ImageNet's resize 256, crop 224)")
    size: tuple[int, int] | None = Field(None, description="(H, W) when the model's input does not fix them")
    scale: float = Field(1 / 255, gt=0, description="pixel values (0..255) are multiplied by this first")
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Literal["NCHW", "NHWC"] | None = Field(None, description="None: from the model's input shape")
    channel_order: Literal["RGB", "BGR"] = "RGB"
    dtype: str | None = Field(None, description="numpy dtype name; None: the model input's")

    @field_validator("std")
    @classmethod
    def _std_nonzero(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s == 0 for s in v):
            raise ValueError("std must not be 0")
        return v

    @field_validator("size")
    @classmethod
    def _size_positive(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError("size must be positive (H, W)")
        return v

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Preprocess:
        """``imagenet``: resize 256 / crop 224 (scaled to the model's size), [0, 1], ImageNet mean/std, RGB;
        ``unit``: centre crop, [0, 1]; ``raw`` (or ``none``): centre crop, 0..255.  ``overrides`` replace fields."""
        base = {
            "imagenet": {"resize_ratio": 256 / 224, "scale": 1 / 255, "mean": (0.485, 0.456, 0.406),
                         "std": (0.229, 0.224, 0.225)},
            "unit": {"scale": 1 / 255},
            "raw": {"scale": 1.0},
            "none": {"scale": 1.0},
        }.get(str(name).lower())
        if base is None:
            raise CalibrationError(f"unknown preprocessing preset '{name}'; valid: {', '.join(PRESETS)}")
        return _validated(cls, {**base, **overrides})


def _validated(cls: type[Preprocess], fields: dict) -> Preprocess:
    from pydantic import ValidationError

    try:
        return cls(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise CalibrationError(f"preprocess {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def as_preprocess(p: str | Preprocess | Mapping | None) -> Preprocess | None:
    """A preset name, a :class:`Preprocess`, or a dict of its fields."""
    if p is None or isinstance(p, Preprocess):
        return p
    if isinstance(p, str):
        return Preprocess.preset(p)
    if isinstance(p, Mapping):
        return _validated(Preprocess, dict(p))
    raise CalibrationError(f"preprocess must be a preset name ({', '.join(PRESETS)}) or a Preprocess, "
                           f"not {type(p).__name__}")


# --------------------------------------------------------------------------- folders


def _scan(folder: Path, suffixes: tuple[str, ...], where: str) -> list[Path]:
    """Files under ``folder`` (recursive, hidden names skipped) with one of ``suffixes``, sorted by relative path."""
    out: list[Path] = []
    try:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in files:
                if not f.startswith(".") and f.lower().endswith(suffixes):
                    out.append(Path(root) / f)
                    if len(out) > MAX_FOLDER_FILES:
                        raise CalibrationError(f"{where}: more than {MAX_FOLDER_FILES:,} files")
    except OSError as e:
        raise CalibrationError(f"{where}: cannot list: {_short(e)}") from None
    return sorted(out, key=lambda p: p.relative_to(folder).parts)


def _folder_labels(folder: Path, files: list[Path], classes: list[str] | str | None,
                   where: str) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from class sub-folders: every file one level down (``folder/<class>/...``), at least two classes.
    Folder names that are integers are class indices; other names need ``classes``."""
    tops = [f.relative_to(folder).parts for f in files]
    if any(len(t) < 2 for t in tops):
        if classes is not None:
            raise CalibrationError(f"{where}: classes= given, but some files are not in class sub-folders")
        return None, None
    names = sorted({t[0] for t in tops})
    if classes is None:
        if len(names) < 2 or not all(n.isdigit() for n in names):
            return None, None
        return np.array([int(t[0]) for t in tops], np.int64), names
    if isinstance(classes, str) and classes != "sorted":
        raise CalibrationError(f"classes must be a list of class names or 'sorted', not {classes!r}")
    order = names if classes == "sorted" else list(classes)
    index = {n: i for i, n in enumerate(order)}
    missing = [n for n in names if n not in index]
    if missing:
        raise CalibrationError(f"{where}: class folder(s) {missing[:5]} are not in classes= ({len(order)} names)")
    return np.array([index[t[0]] for t in tops], np.int64), order


def _single_input(inputs, where: str) -> tuple[str, list[int], np.dtype]:
    if len(inputs) != 1:
        raise CalibrationError(f"{where}: the model takes {len(inputs)} inputs {[n for n, _, _ in inputs]}; a folder "
                               "of images or sounds feeds one input (give per-sample .npz files or dicts instead)")
    return inputs[0]


def _check_total(n: int, per_sample: int, where: str) -> None:
    limit = max_memory()
    if n * per_sample > limit:
        raise CalibrationError(f"{where}: {n} samples of {_fmt(per_sample)} need {_fmt(n * per_sample)}, over the "
                               f"memory limit of {_fmt(limit)}; use fewer files, or {limit_hint()}")


class ImageFolder:
    """JPEG/PNG files under ``folder`` (recursive, sorted) preprocessed for the model's image input.

    Args:
        folder: the folder.
        preprocess: a preset name (``imagenet``, ``unit``, ``raw``), a :class:`Preprocess` or a dict of its fields.
        classes: class names of the sub-folders in label order, or ``"sorted"`` (see the module docstring); folders
            named by class index need none.
    """

    def __init__(self, folder: str | Path, preprocess: str | Preprocess | Mapping = "imagenet",
                 classes: list[str] | str | None = None):
        self.folder = Path(folder)
        self.preprocess = as_preprocess(preprocess)
        self.classes = classes
        self.where = f"image folder {self.folder}"

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.folder)!r})"

    def files(self) -> list[Path]:
        if not self.folder.is_dir():
            raise CalibrationError(f"{self.where} does not exist or is not a folder")
        files = _scan(self.folder, IMAGE_SUFFIXES, self.where)
        if not files:
            raise CalibrationError(f"{self.where} holds no JPEG or PNG files ({', '.join(IMAGE_SUFFIXES)})")
        return files

    def geometry(self, inputs) -> tuple[str, str, int, int, int, np.dtype]:
        """(input name, layout, channels, H, W, dtype) of the model's image input."""
        name, dims, dtype = _single_input(inputs, self.where)
        pp = self.preprocess
        if len(dims) != 4:
            raise CalibrationError(f"{self.where}: the model's input '{name}' has shape {dims}; images feed a rank-4 "
                                   "input [N, C, H, W] or [N, H, W, C]")
        layout = pp.layout
        if layout is None:
            nchw, nhwc = dims[1] in (1, 3), dims[3] in (1, 3)
            if nchw == nhwc:
                raise CalibrationError(f"{self.where}: cannot tell the layout of input '{name}' {dims}; give "
                                       "Preprocess(layout='NCHW' or 'NHWC')")
            layout = "NCHW" if nchw else "NHWC"
        c, h, w = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
        if c not in (1, 3):
            raise CalibrationError(f"{self.where}: input '{name}' {dims} ({layout}) has {c} channels; images give 1 "
                                   "(gray) or 3 (RGB/BGR)")
        if pp.size is not None:
            if (h > 0 and h != pp.size[0]) or (w > 0 and w != pp.size[1]):
                raise CalibrationError(f"{self.where}: Preprocess size {list(pp.size)} differs from the model's "
                                       f"input '{name}' {dims}")
            h, w = pp.size
        if h <= 0 or w <= 0:
            raise CalibrationError(f"{self.where}: the model's input '{name}' {dims} does not fix H x W; give "
                                   "Preprocess(size=(H, W)) or --input-shape")
        for what, v in (("mean", pp.mean), ("std", pp.std)):
            if len(v) not in (1, c):
                raise CalibrationError(f"{self.where}: preprocess {what} has {len(v)} values for {c} channel(s)")
        out_dtype = np.dtype(pp.dtype) if pp.dtype is not None else np.dtype(dtype)
        return name, layout, c, h, w, out_dtype

    def load(self, path: Path, layout: str, c: int, h: int, w: int, dtype: np.dtype) -> np.ndarray:
        """One image as a [1, ...] array in the model's layout."""
        from PIL import Image

        pp = self.preprocess
        where = f"image {path}"
        try:
            with Image.open(path) as im:
                iw, ih = im.size
                if iw * ih * 4 * 4 > max_memory():  # RGBA decoded, plus float copies
                    raise CalibrationError(f"{where}: {iw}x{ih} pixels is over the memory limit of "
                                           f"{_fmt(max_memory())}; {limit_hint()}")
                im.load()
                if im.mode.startswith("I;16") or im.mode in ("I", "F"):  # 16-bit / float gray: to 0..255 first
                    deep = np.asarray(im, np.float32)
                    deep = deep / 257.0 if im.mode.startswith("I;16") else deep
                    im = Image.fromarray(np.clip(deep, 0, 255).astype(np.uint8))
                im = im.convert("L" if c == 1 else "RGB")
                scale = max(h / ih, w / iw) * pp.resize_ratio
                nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
                if (nw, nh) != (iw, ih):
                    im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - w) // 2, (nh - h) // 2
                im = im.crop((left, top, left + w, top + h))
                x = np.asarray(im, np.float32)
        except CalibrationError:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken files (OSError, SyntaxError, ...)
            raise CalibrationError(f"{where}: cannot be read as an image: {_short(e)}") from None
        if x.ndim == 2:
            x = x[..., None]
        if c == 3 and pp.channel_order == "BGR":
            x = x[..., ::-1]
        x = (x * pp.scale - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
        if layout == "NCHW":
            x = x.transpose(2, 0, 1)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            x = np.clip(np.round(x), info.min, info.max)
        return np.ascontiguousarray(x[None].astype(dtype))

    def for_model(self, model) -> tuple[Callable[[], Iterator[np.ndarray]], np.ndarray | None, str]:
        """A source of this folder's samples for ``model`` (checked: input geometry, count within the memory
        limit), its labels, and a description."""
        inputs = model_inputs(model)
        _, layout, c, h, w, dtype = self.geometry(inputs)
        files = self.files()
        _check_total(len(files), c * h * w * dtype.itemsize, self.where)
        labels, _ = _folder_labels(self.folder, files, self.classes, self.where)

        def images() -> Iterator[np.ndarray]:
            for f in files:
                yield self.load(f, layout, c, h, w, dtype)

        images.__name__ = f"{self.where} ({len(files)} images)"
        return images, labels, images.__name__


# --------------------------------------------------------------------------- audio


def _read_wav(path: Path, where: str) -> tuple[np.ndarray, int]:
    """A WAV file as float32 mono in [-1, 1] and its sample rate."""
    import wave

    limit = max_memory()
    try:
        with wave.open(str(path), "rb") as wf:
            ch, width, rate, n = wf.getnchannels(), wf.getsampwidth(), wf.getframerate(), wf.getnframes()
            if n * ch * (width + 4) > limit:
                raise CalibrationError(f"{where}: {n} frames need {_fmt(n * ch * (width + 4))}, over the memory limit "
                                       f"of {_fmt(limit)}; {limit_hint()}")
            raw = wf.readframes(n)
        kind = "pcm"
    except CalibrationError:
        raise
    except wave.Error as e:
        if "unknown format: 3" not in str(e):  # 3: IEEE float, which the wave module does not read
            raise CalibrationError(f"{where}: not a readable WAV file: {_short(e)}") from None
        raw, ch, width, rate = _read_float_wav(path, where)
        kind = "float"
    except (OSError, EOFError, ValueError) as e:
        raise CalibrationError(f"{where}: not a readable WAV file: {_short(e)}") from None
    if ch < 1 or rate < 1:
        raise CalibrationError(f"{where}: {ch} channels at {rate} Hz")
    frames = len(raw) // (ch * width)
    if frames == 0:
        raise CalibrationError(f"{where}: holds no audio frames")
    raw = raw[: frames * ch * width]
    if kind == "float":
        x = np.frombuffer(raw, "<f4" if width == 4 else "<f8").astype(np.float32)
    elif width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise CalibrationError(f"{where}: {8 * width}-bit samples are not supported (8, 16, 24, 32-bit PCM or float)")
    x = x.reshape(frames, ch).mean(axis=1)
    if not np.isfinite(x).all():
        raise CalibrationError(f"{where}: holds NaN or Inf samples")
    return x, rate


def _read_float_wav(path: Path, where: str) -> tuple[bytes, int, int, int]:
    """The data of an IEEE-float WAV file (format 3): (bytes, channels, bytes per sample, rate)."""
    import struct

    try:
        size = path.stat().st_size
        if size > max_memory():
            raise CalibrationError(f"{where}: {_fmt(size)} is over the memory limit of {_fmt(max_memory())}; "
                                   f"{limit_hint()}")
        blob = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"{where}: cannot read: {_short(e)}") from None
    if blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise CalibrationError(f"{where}: not a RIFF/WAVE file")
    pos, fmt, data = 12, None, None
    while pos + 8 <= len(blob):
        cid, n = blob[pos : pos + 4], struct.unpack("<I", blob[pos + 4 : pos + 8])[0]
        body = blob[pos + 8 : pos + 8 + n]
        if cid == b"fmt " and len(body) >= 16:
            fmt = struct.unpack("<HHIIHH", body[:16])
        elif cid == b"data":
            data = body
        pos += 8 + n + (n & 1)
    if fmt is None or data is None:
        raise CalibrationError(f"{where}: a WAV file without a fmt or data chunk")
    tag, ch, rate, _, _, bits = fmt
    if tag != 3 or bits not in (32, 64):
        raise CalibrationError(f"{where}: WAV format {tag} with {bits}-bit samples is not supported")
    return data, ch, bits // 8, rate


def _resample(x: np.ndarray, rate: int, to: int) -> np.ndarray:
    """Linear interpolation from ``rate`` to ``to`` Hz (no anti-aliasing filter: for calibration statistics)."""
    if rate == to:
        return x
    n = max(1, round(len(x) * to / rate))
    return np.interp(np.arange(n) * (rate / to), np.arange(len(x)), x).astype(np.float32)


class AudioFolder:
    """WAV files under ``folder`` (recursive, sorted) as raw mono waveforms for a model whose input is
    ``[N, L]`` or ``[N, 1, ..., L]``: resampled to ``sample_rate`` (default: the files' one rate; files at different
    rates are refused without it), then the first L samples, zero-padded when shorter.  No features (log-mel, MFCC)
    are computed.  Class sub-folders give labels as for :class:`ImageFolder`."""

    def __init__(self, folder: str | Path, sample_rate: int | None = None, classes: list[str] | str | None = None):
        if sample_rate is not None and sample_rate < 1:
            raise CalibrationError(f"sample_rate must be a positive number of Hz, not {sample_rate}")
        self.folder = Path(folder)
        self.sample_rate = sample_rate
        self.classes = classes
        self.where = f"audio folder {self.folder}"

    def __repr__(self) -> str:
        return f"AudioFolder({str(self.folder)!r})"

    def files(self) -> list[Path]:
        if not self.folder.is_dir():
            raise CalibrationError(f"{self.where} does not exist or is not a folder")
        files = _scan(self.folder, AUDIO_SUFFIXES, self.where)
        if not files:
            raise CalibrationError(f"{self.where} holds no .wav files")
        return files

    def for_model(self, model) -> tuple[Callable[[], Iterator[np.ndarray]], np.ndarray | None, str]:
        name, dims, dtype = _single_input(model_inputs(model), self.where)
        if len(dims) < 2 or any(d != 1 for d in dims[1:-1]) or np.dtype(dtype).kind != "f":
            raise CalibrationError(f"{self.where}: the model's input '{name}' is {np.dtype(dtype)} {dims}; a raw "
                                   "waveform feeds a float input [N, L] or [N, 1, L] (features such as log-mel are "
                                   "not computed: give them as .npy files)")
        length = dims[-1]
        if length <= 0:
            raise CalibrationError(f"{self.where}: the model's input '{name}' {dims} does not fix its length; give "
                                   "--input-shape")
        files = self.files()
        _check_total(len(files), length * np.dtype(dtype).itemsize, self.where)
        labels, _ = _folder_labels(self.folder, files, self.classes, self.where)
        shape = [1, *dims[1:]]
        first: dict[str, tuple[int, Path]] = {}

        def sounds() -> Iterator[np.ndarray]:
            for f in files:
                x, rate = _read_wav(f, f"audio file {f}")
                if self.sample_rate is None:
                    r0, f0 = first.setdefault("rate", (rate, f))
                    if rate != r0:
                        raise CalibrationError(f"audio file {f}: {rate} Hz, but {f0} is {r0} Hz; give sample_rate= "
                                               "to resample every file to the model's rate")
                else:
                    x = _resample(x, rate, self.sample_rate)
                out = np.zeros(length, np.float32)
                out[: min(length, len(x))] = x[:length]
                yield out.reshape(shape).astype(dtype)

        sounds.__name__ = f"{self.where} ({len(files)} files)"
        return sounds, labels, sounds.__name__


# --------------------------------------------------------------------------- iterables


def _is_label(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    return isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "iu"


class Samples:
    """A Python iterable of samples: arrays (a single-input model's; with or without the batch axis), dicts
    ``{input_name: array}``, or ``(sample, label)`` pairs (labels for all or none).  Read once, within the memory
    limit; generators are fine."""

    def __init__(self, items: Iterable[Any], name: str = "iterable"):
        self.items = items
        self.name = name
        self._read: tuple[list[Any], np.ndarray | None] | None = None

    def __repr__(self) -> str:
        return f"Samples({self.name})"

    def read(self) -> tuple[list[Any], np.ndarray | None]:
        if self._read is not None:
            return self._read
        left = limit = max_memory()
        samples: list[Any] = []
        labels: list[int] = []
        try:
            for i, item in enumerate(self.items):
                where = f"sample {i} of the {self.name}"
                pair = isinstance(item, tuple) and len(item) == 2 and _is_label(item[1])
                if i and pair != bool(labels):
                    raise CalibrationError(f"{where}: {'a' if pair else 'no'} label, unlike sample 0; give "
                                           "(sample, label) pairs for all samples or none")
                if pair:
                    item, label = item
                    labels.append(int(label))
                if isinstance(item, Mapping):
                    arrays = {str(k): np.asarray(v) for k, v in item.items()}
                    size = sum(a.nbytes for a in arrays.values())
                    item = arrays
                else:
                    item = np.asarray(item)
                    size = item.nbytes
                left -= size
                if left < 0:
                    raise CalibrationError(f"{where}: the samples so far need more than the memory limit of "
                                           f"{_fmt(limit)}; use fewer samples, or {limit_hint()}")
                samples.append(item)
        except CalibrationError:
            raise
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"the {self.name} of samples cannot be read: {_short(e)}") from None
        if not samples:
            raise CalibrationError(f"the {self.name} of samples is empty")
        self._read = samples, (np.array(labels, np.int64) if labels else None)
        return self._read

    def for_model(self, model) -> tuple[Callable[[], Iterator[Any]], np.ndarray | None, str]:
        samples, labels = self.read()

        def items() -> Iterator[Any]:
            yield from samples

        items.__name__ = f"{self.name} ({len(samples)} samples)"
        return items, labels, items.__name__


# --------------------------------------------------------------------------- choosing


def _folder_kind(folder: Path) -> str | None:
    """``npy`` (a folder of .npy/.npz files, read by :mod:`edgeopt.calibration`), ``image``, ``audio`` or None."""
    try:
        with os.scandir(folder) as it:
            if any(e.name.endswith((".npy", ".npz")) for e in it):
                return "npy"
    except OSError:
        return None
    if _scan(folder, IMAGE_SUFFIXES, f"folder {folder}"):
        return "image"
    if _scan(folder, AUDIO_SUFFIXES, f"folder {folder}"):
        return "audio"
    return None


def wrap(data: Any, *, preprocess: str | Preprocess | Mapping | None = None, sample_rate: int | None = None,
         classes: list[str] | str | None = None, flag: str = "--preprocess") -> Any:
    """Calibration/eval data as :func:`edgeopt.calibration.as_calibration` takes it.

    A folder of JPEG/PNG files becomes an :class:`ImageFolder` (``preprocess`` required: without it the error says
    to pass ``flag``), one of WAV files an :class:`AudioFolder`; a list, tuple, generator or other iterable (not an
    array, dict or callable) becomes :class:`Samples`; everything else passes through (folders and files of
    .npy/.npz, arrays, dicts, callables, :class:`~edgeopt.calibration.CalibrationData`)."""
    from .calibration import CalibrationData

    if data is None or isinstance(data, (ImageFolder, AudioFolder, Samples, CalibrationData, np.ndarray, Mapping)):
        return data
    if isinstance(data, (str, Path)):
        p = Path(data)
        kind = _folder_kind(p) if p.is_dir() else None
        if kind == "image":
            if preprocess is None:
                raise CalibrationError(f"calibration folder {p} holds images: pass {flag} imagenet|unit|raw to say "
                                       "how they become model inputs")
            return ImageFolder(p, preprocess, classes)
        if kind == "audio":
            return AudioFolder(p, sample_rate, classes)
        return p
    if callable(data):
        return data
    if isinstance(data, Iterable) and not isinstance(data, (bytes, str)):
        return Samples(data, type(data).__name__)
    return data


def wrap_data(calib: Any, eval_data: Any, *, preprocess: str | Preprocess | Mapping | None = None,
              sample_rate: int | None = None, classes: list[str] | str | None = None,
              flag: str = "--preprocess") -> tuple[Any, Any]:
    """:func:`wrap` for a run's calibration and evaluation data; ``preprocess`` given without any image folder is
    refused (it would be ignored)."""
    out = tuple(wrap(d, preprocess=preprocess, sample_rate=sample_rate, classes=classes, flag=flag)
                for d in (calib, eval_data))
    if preprocess is not None and not any(isinstance(d, ImageFolder) for d in out):
        raise CalibrationError(f"{flag} is for a folder of JPEG/PNG images; neither the calibration nor the "
                               "evaluation data is one")
    return out[0], out[1]
