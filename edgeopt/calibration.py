"""Calibration data: what passes feed through a model to collect activation
statistics, reconstruct pruned layers and measure fidelity.

Accepted forms (see :func:`as_calibration`):

* a numpy array (the model's single input) or a dict ``{input_name: array}``,
  samples along axis 0;
* a folder of ``.npy`` files (single-input models: each file one sample or a
  batch) or ``.npz`` files (``{input_name: array}`` each), or one such file;
* a callable returning an iterable of arrays or dicts (called each time the data is read);
* a :class:`CalibrationData`;
* an object with a ``for_model(model)`` method returning ``(callable, labels or None, description)``: the image and
  audio folders and iterables of :mod:`edgeopt.datasources`.

Labels (for accuracy) ride along optionally.

Two layouts, chosen from the model's inputs (:func:`per_sample_layout`):

* **stacked** (most models: every input has its batch on axis 0, e.g. ``[N, 3, 224, 224]``): samples are
  concatenated along axis 0 of each input, and a file may hold one sample or a batch of them.  A model exported with a
  fixed batch (``[1, 3, 224, 224]``, most exports) is fed in batches of exactly that size (the last one filled up by
  repeating samples, whose outputs are dropped): never one big batch.
* **per-sample** (models whose samples cannot be stacked on axis 0: a scalar (rank-0) input such as a sample rate or
  gain, or inputs whose leading dims differ, such as a recurrent state ``h0 [layers, B, hidden]`` beside
  ``x [B, T, features]``): each item (an ``.npz`` file, a dict, an array) is **one sample, its arrays exactly in the
  model's input shapes** (no sample axis: ``x [1, T, F]``, ``h0 [L, 1, H]``, ``rate []``), or several samples stacked
  on a *new* leading axis (``x [N, 1, T, F]``, ``h0 [N, L, 1, H]``, ``rate [N]``).  A folder of such ``.npz`` files is
  the usual form.  Every stage then runs the model one sample at a time, in exactly its input shapes.

:meth:`CalibrationData.feeds` holds every input with a leading sample axis in both layouts (in the per-sample layout
that axis is the new one); :meth:`CalibrationData.batches` yields what the model takes (per-sample: one sample in its
exact shapes; fixed batch: exactly that many samples); :func:`edgeopt.fidelity.run_feeds` runs either.

Files are read defensively (they come from users): regular files only, ``allow_pickle`` never, the ``.npy`` header
(and each ``.npz`` member's) checked against the file's size and the memory limit (:func:`edgeopt.memory.max_memory`) before any
array is allocated, numbers only (no object, string or structured dtypes), and every float sample finite.  Whatever
is wrong ends in one :class:`CalibrationError` naming the file and the problem.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from .errors import EdgeoptError
from .memory import limit_hint, max_memory

if TYPE_CHECKING:  # pragma: no cover
    import onnx

Feed = dict[str, np.ndarray]


class CalibrationError(EdgeoptError):
    """Calibration data that does not fit the model."""


def _fmt_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------- reading files

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
#: Most members an .npz may hold, and most files a calibration folder may hold.
MAX_NPZ_MEMBERS = 1024
MAX_FOLDER_FILES = 100_000
#: numpy's own limit on an .npy header (a Python literal; bigger ones are refused unparsed)
MAX_NPY_HEADER = 10_000
#: dtype kinds calibration data and labels may have: bool, signed/unsigned integers, floats
NUMERIC_KINDS = "biuf"


def _short(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


#: What reading a broken, hostile or vanished file can raise (numpy's header parser, zipfile, zlib, lzma, the OS).
def _read_errors() -> tuple[type[BaseException], ...]:
    import lzma
    import zipfile
    import zlib

    return (OSError, ValueError, TypeError, KeyError, IndexError, EOFError, RuntimeError, NotImplementedError,
            OverflowError, RecursionError, MemoryError, SyntaxError, zipfile.BadZipFile, zlib.error, lzma.LZMAError)


def _open_regular(path: Path, where: str) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (a FIFO or device must neither block nor stream forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CalibrationError(f"{where}: cannot open: {_short(e)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CalibrationError(f"{where}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _Budget:
    """Bytes of array data still allowed to be read (:func:`edgeopt.memory.max_memory` for one loading of a data set)."""

    def __init__(self, limit: int | None = None):
        self.limit = max_memory() if limit is None else limit
        self.left = self.limit

    def take(self, n: int, where: str, shape: tuple[int, ...]) -> None:
        if n > self.left:
            already = self.limit - self.left
            more = f" (after {_fmt_bytes(already)} already read)" if already else ""
            raise CalibrationError(
                f"{where}: the array (shape {list(shape)}) needs {_fmt_bytes(n)}, over the memory limit of "
                f"{_fmt_bytes(self.limit)}{more}; {limit_hint()}")
        self.left -= n


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.hasobject:
        raise CalibrationError(f"{where}: holds Python objects (a pickle), which edgeopt never loads; save numeric "
                               "arrays (np.save of a float/int array)")
    if dtype.kind not in NUMERIC_KINDS or dtype.subdtype is not None:
        raise CalibrationError(f"{where}: has dtype {dtype.str if dtype.names is None else 'structured'}; "
                               "data must be numbers (bool, int, uint or float arrays)")


def _read_npy(fp: IO[bytes], where: str, budget: _Budget, available: int | None) -> np.ndarray:
    """One .npy array from ``fp``: header checked (numeric dtype, declared size within ``available`` bytes of the
    file and within ``budget``) before the array is allocated; pickles never."""
    fmt = np.lib.format
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            start = fp.tell()
            version = fmt.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)
            elif version in ((2, 0), (3, 0)):  # 3.0: the header is UTF-8; its keys and values are ASCII
                shape, fortran, dtype = fmt.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)
            else:
                raise CalibrationError(f"{where}: .npy format version {version} is not supported (1.0-3.0 are)")
            header = fp.tell() - start
        except CalibrationError:
            raise
        except _read_errors() as e:
            raise CalibrationError(f"{where}: not a valid .npy file: {_short(e)}") from None
    _check_dtype(dtype, where)
    if any(d < 0 for d in shape):
        raise CalibrationError(f"{where}: header declares a negative dimension {list(shape)}")
    count = 1
    for d in shape:
        count *= d
    nbytes = count * dtype.itemsize
    if available is not None and nbytes > available - header:
        raise CalibrationError(f"{where}: truncated or corrupt: the header declares shape {list(shape)} "
                               f"({_fmt_bytes(nbytes)}), the file holds {_fmt_bytes(max(available - header, 0))}")
    if count == 0:
        raise CalibrationError(f"{where}: holds no data (shape {list(shape)})")
    budget.take(nbytes, where, tuple(shape))
    try:
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            n = fp.readinto(view[got:])
            if not n:
                break
            got += n
    except _read_errors() as e:
        raise CalibrationError(f"{where}: cannot read the array data: {_short(e)}") from None
    if got < nbytes:
        raise CalibrationError(f"{where}: truncated: the header declares {_fmt_bytes(nbytes)} of data, the file holds "
                               f"{_fmt_bytes(got)}")
    arr = np.frombuffer(buf, dtype=dtype, count=count)
    return arr.reshape(shape, order="F" if fortran else "C")


def _read_npz(fp: IO[bytes], where: str, budget: _Budget) -> dict[str, np.ndarray]:
    import zipfile

    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(fp) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_NPZ_MEMBERS:
                raise CalibrationError(f"{where}: holds {len(infos)} members; an .npz of model inputs holds one "
                                       f"array per input (at most {MAX_NPZ_MEMBERS})")
            for info in infos:
                member = f"{where} member {info.filename[:60]!r}"
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise CalibrationError(f"{member}: not an .npy array (an .npz holds name.npy members)")
                if info.flag_bits & 0x1:
                    raise CalibrationError(f"{member}: encrypted")
                key = info.filename[: -len(".npy")]
                if key in out:
                    raise CalibrationError(f"{member}: appears twice")
                with zf.open(info) as m:  # zipfile stops at the declared size (and checks the CRC): no zip bombs
                    out[key] = _read_npy(m, member, budget, info.file_size)
    except CalibrationError:
        raise
    except _read_errors() as e:
        raise CalibrationError(f"{where}: not a valid .npz file: {_short(e)}") from None
    if not out:
        raise CalibrationError(f"{where}: an .npz with no arrays")
    return out


def _read_file(path: Path, where: str, budget: _Budget) -> np.ndarray | dict[str, np.ndarray]:
    with _open_regular(path, where) as fp:
        try:
            size = os.fstat(fp.fileno()).st_size
            magic = fp.read(6)
            fp.seek(0)
        except OSError as e:
            raise CalibrationError(f"{where}: cannot read: {_short(e)}") from None
        if magic == NPY_MAGIC:
            return _read_npy(fp, where, budget, size)
        if magic[:4] in ZIP_MAGICS:
            return _read_npz(fp, where, budget)
        what = "an empty file" if size == 0 else "neither .npy nor .npz data"
        raise CalibrationError(f"{where}: {what} (np.save / np.savez write them)")


def load_array_file(path: str | Path) -> np.ndarray | dict[str, np.ndarray]:
    """An .npy file (an array) or an .npz file (``{name: array}``), read with every check of this module."""
    p = Path(path)
    return _read_file(p, f"data file {p}", _Budget())


def load_labels(path: str | Path) -> np.ndarray:
    """Class labels from an .npy file (or an .npz with one array): one integer per sample, as int64."""
    p = Path(path)
    where = f"labels file {p}"
    data = _read_file(p, where, _Budget())
    if isinstance(data, dict):
        if len(data) != 1:
            raise CalibrationError(f"{where}: an .npz with {len(data)} arrays {sorted(data)[:5]}; labels are one array")
        data = next(iter(data.values()))
    return check_labels(data, where)


def check_labels(labels: Any, where: str = "labels") -> np.ndarray:
    """``labels`` as an int64 vector: one class index per sample (shape [N] or [N, 1]), integers (or integral,
    finite floats)."""
    try:
        arr = np.asarray(labels)
    except (ValueError, TypeError) as e:
        raise CalibrationError(f"{where}: not an array of class indices: {_short(e)}") from None
    _check_dtype(arr.dtype, where)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise CalibrationError(f"{where}: shape {list(arr.shape)}; labels are one class index per sample, shape [N] "
                               "(one-hot labels: save labels.argmax(1))")
    if len(arr) == 0:
        raise CalibrationError(f"{where}: holds no labels")
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if len(bad):
            raise CalibrationError(f"{where}: label {int(bad[0])} is {arr[bad[0]]}; labels are whole class indices")
    if arr.dtype.kind in "iuf" and len(arr) and (arr.min() < 0 or arr.max() > 2**31):
        i = int(np.argmin(arr)) if arr.min() < 0 else int(np.argmax(arr))
        raise CalibrationError(f"{where}: label {i} is {arr[i]}; class indices are from 0 to 2^31")
    return arr.astype(np.int64)


def _folder_files(folder: Path, where: str) -> list[Path]:
    try:
        with os.scandir(folder) as it:
            names = []
            for entry in it:
                if entry.name.endswith((".npy", ".npz")):
                    names.append(entry.name)
                    if len(names) > MAX_FOLDER_FILES:
                        raise CalibrationError(f"{where}: more than {MAX_FOLDER_FILES:,} .npy/.npz files")
    except OSError as e:
        raise CalibrationError(f"{where}: cannot list: {_short(e)}") from None
    return [folder / n for n in sorted(names)]


@dataclass
class CalibrationData:
    """Samples for a model, as dicts of arrays with a leading sample axis (see the module docstring's layouts).

    ``fixed_batch``: the batch size the model's inputs are fixed to (batches are exactly that big); ``per_sample``:
    the per-sample layout (a sample is fed alone, in the model's exact input shapes, without the sample axis)."""

    source: Callable[[], Iterable[Feed]]
    labels: np.ndarray | None = None
    batch_size: int = 32
    description: str = ""
    _cache: Feed | None = field(default=None, repr=False)
    fixed_batch: int | None = None
    per_sample: bool = False

    def feeds(self) -> Feed:
        """All samples, concatenated per input along the sample axis (not for feeding a model as is: see
        :meth:`batches` and :func:`edgeopt.fidelity.run_feeds`)."""
        if self._cache is None:
            parts: dict[str, list[np.ndarray]] = {}
            for feed in self.source():
                for k, v in feed.items():
                    parts.setdefault(k, []).append(np.asarray(v))
            if not parts:
                raise CalibrationError(f"calibration data {self.description or ''} is empty".replace("  ", " "))
            self._cache = {}
            for k, v in parts.items():
                shapes = {a.shape[1:] for a in v}
                if any(a.ndim == 0 for a in v):
                    raise CalibrationError(f"calibration data {self.description}: input '{k}' has a scalar sample "
                                           "where samples are stacked on axis 0")
                if len(shapes) > 1:
                    raise CalibrationError(f"calibration data {self.description}: input '{k}' has samples of "
                                           f"different shapes {sorted(map(list, shapes))[:3]}")
                self._cache[k] = np.concatenate(v, axis=0)
            counts = {len(a) for a in self._cache.values()}
            if len(counts) > 1:
                raise CalibrationError(f"calibration data {self.description}: inputs have different sample counts "
                                       f"{ {k: len(a) for k, a in self._cache.items()} }")
        return self._cache

    def __len__(self) -> int:
        return len(next(iter(self.feeds().values())))

    def counted_batches(self, batch_size: int | None = None, limit: int | None = None) -> Iterator[tuple[Feed, int]]:
        """``(feed, samples)``: what the model takes, and how many of the feed's samples are real (the rest repeat
        samples to fill a fixed batch; drop their outputs).  Per-sample layout: one sample at a time in the model's
        exact input shapes; fixed batch: exactly ``fixed_batch`` samples whatever ``batch_size`` asks."""
        feeds = self.feeds()
        n = len(self) if limit is None else min(limit, len(self))
        if self.per_sample:
            for i in range(n):
                yield {k: v[i, ...] for k, v in feeds.items()}, 1  # [i, ...]: a 0-d array, not a numpy scalar
            return
        bs = self.fixed_batch or batch_size or self.batch_size
        for i in range(0, n, bs):
            real = min(bs, n - i)
            if real < bs and self.fixed_batch:
                idx = np.arange(i, i + bs) % n  # the real ones, then the first samples again
                yield {k: v[idx] for k, v in feeds.items()}, real
            else:
                yield {k: v[i : i + real] for k, v in feeds.items()}, real

    def batches(self, batch_size: int | None = None, limit: int | None = None) -> Iterator[Feed]:
        """Feeds the model takes as they are, over the first ``limit`` samples (see :meth:`counted_batches`)."""
        for feed, _ in self.counted_batches(batch_size, limit):
            yield feed

    def first(self) -> Feed:
        """The first sample, as the model takes it (a whole batch of the model's fixed size; the per-sample layout's
        exact shapes): what timing and smoke runs feed."""
        return next(self.batches(1))

    def subset(self, n: int, start: int = 0) -> CalibrationData:
        """Samples ``start`` to ``start + n`` (fewer where the data ends)."""
        stop = start + n
        feeds = {k: v[start:stop] for k, v in self.feeds().items()}
        labels = None if self.labels is None else self.labels[start:stop]
        cd = CalibrationData(lambda: [feeds], labels, self.batch_size, f"{self.description}[{start}:{stop}]",
                             fixed_batch=self.fixed_batch, per_sample=self.per_sample)
        cd._cache = feeds
        return cd

    def augmented(self, count: int, seed: int = 0) -> CalibrationData:
        """These samples, then random crops and flips of them up to ``count`` samples in all (image data only).

        A least-squares re-fit on a few hundred samples fits them almost exactly and generalizes poorly (MobileNetV2
        2:4 re-fitted on 128 crops reproduces the teacher on those at 40 dB and on other crops of the same photos at
        12.4 dB; on 1,024 crops, 15 dB): more views of the same images are what the fit lacks.  Each extra sample is a
        random crop of 60-100% of one sample's side at a random position, resampled bilinearly to the full size, and
        flipped left-right half of the time; every image input of a sample gets the same crop, other inputs are
        repeated.  Image inputs: 4-D float ``[N, C, H, W]`` with ``H, W >= 32``.  Unchanged (self) when there are
        ``count`` samples already, in the per-sample layout, or without an image input.

        Args:
            count: samples wanted in all.
            seed: seeds the crops.

        Returns:
            The extended data (labels repeated with their samples).
        """
        n = len(self)
        feeds = self.feeds()
        image = {k for k, v in feeds.items() if v.ndim == 4 and np.issubdtype(v.dtype, np.floating)
                 and v.shape[2] >= 32 and v.shape[3] >= 32}
        if self.per_sample or n >= count or not image:
            return self
        rng = np.random.default_rng(seed)
        src = np.arange(count - n) % n
        frac = rng.uniform(0.6, 1.0, len(src))
        pos = rng.uniform(0.0, 1.0, (len(src), 2))
        flip = rng.random(len(src)) < 0.5
        extra: dict[str, np.ndarray] = {}
        for k, v in feeds.items():
            if k not in image:
                extra[k] = v[src]
                continue
            h, w = v.shape[2:]
            out = np.empty((len(src), *v.shape[1:]), v.dtype)
            for j, i in enumerate(src):
                ch, cw = frac[j] * h, frac[j] * w
                y = pos[j, 0] * (h - ch) + (np.arange(h) + 0.5) * ch / h - 0.5
                x = pos[j, 1] * (w - cw) + (np.arange(w) + 0.5) * cw / w - 0.5
                if flip[j]:
                    x = x[::-1]
                y0 = np.clip(np.floor(y).astype(int), 0, h - 1)
                x0 = np.clip(np.floor(x).astype(int), 0, w - 1)
                y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
                fy = np.clip(y - y0, 0, 1)[:, None].astype(v.dtype)
                fx = np.clip(x - x0, 0, 1)[None, :].astype(v.dtype)
                r0, r1 = v[i][:, y0], v[i][:, y1]  # the two source rows of every output row
                top = r0[:, :, x0] * (1 - fx) + r0[:, :, x1] * fx
                bot = r1[:, :, x0] * (1 - fx) + r1[:, :, x1] * fx
                out[j] = top * (1 - fy) + bot * fy
            extra[k] = out
        both = {k: np.concatenate([feeds[k], extra[k]]) for k in feeds}
        labels = None if self.labels is None else np.concatenate([self.labels[:n], self.labels[:n][src]])
        what = f"{self.description or 'calibration data'} + {count - n} random crops/flips of it"
        cd = CalibrationData(lambda: [both], labels, self.batch_size, what, fixed_batch=self.fixed_batch)
        cd._cache = both
        return cd

    def ort_reader(self, batch_size: int | None = None):
        """An ``onnxruntime.quantization.CalibrationDataReader`` over these samples."""
        from onnxruntime.quantization import CalibrationDataReader

        data = self

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = data.batches(batch_size)

            def get_next(self):
                return next(self._it, None)

            def rewind(self) -> None:
                self._it = data.batches(batch_size)

        return _Reader()


def model_inputs(model: onnx.ModelProto) -> list[tuple[str, list[int], np.dtype]]:
    import onnx

    inits = {i.name for i in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
        out.append((i.name, dims, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return out


Inputs = list[tuple[str, list[int], np.dtype]]


def _first_bad_sample(arr: np.ndarray) -> int | None:
    """The index of the first sample holding NaN or Inf (in chunks: no full-size temporary), or None."""
    step = max(1, (64 << 20) // max(1, arr[0].nbytes if len(arr) else 1))
    for i in range(0, len(arr), step):
        ok = np.isfinite(arr[i : i + step]).reshape(min(step, len(arr) - i), -1).all(axis=1)
        if not ok.all():
            return i + int(np.argmin(ok))
    return None


def per_sample_layout(inputs: Inputs) -> bool:
    """Whether this model's samples cannot be stacked on axis 0 (the module docstring's per-sample layout): it has a
    scalar (rank-0) input, or its inputs' leading dims differ (fixed values that differ, or a fixed one beside a free
    one: a recurrent state ``[layers, B, hidden]`` beside ``[B, T, features]``)."""
    if any(len(dims) == 0 for _, dims, _ in inputs):
        return True
    return len({dims[0] for _, dims, _ in inputs}) > 1


def model_fixed_batch(inputs: Inputs) -> int | None:
    """The batch the model's inputs are fixed to in the stacked layout (their common fixed leading dim), else None."""
    if not inputs or per_sample_layout(inputs):
        return None
    d = inputs[0][1][0]
    return d if d > 0 else None


def _check_feed(feed: Mapping[str, Any], inputs: Inputs, where: str,
                seen: dict[str, tuple[tuple[int, ...], str]] | None = None, per_sample: bool = False) -> Feed:
    """One item of calibration data checked against the model: its inputs, numeric dtypes, ranks and fixed dims,
    at least one sample, every float sample finite (after the cast to the model's dtype), and (with ``seen``) the
    same per-sample shape as earlier items.  ``per_sample``: the per-sample layout (an array in the model's exact
    input shape is one sample and gets a new leading sample axis; one with that axis already is several)."""
    if per_sample:
        feed = _per_sample_item(feed, inputs, where)
    names = [n for n, _, _ in inputs]
    if set(feed) != set(names):
        raise CalibrationError(f"{where}: has inputs {sorted(map(str, feed))[:8]}, the model takes {names}")
    out: Feed = {}
    for name, dims, dtype in inputs:
        what = f"{where} input '{name}'" if len(inputs) > 1 or where.endswith(".npz") else where
        try:
            arr = np.asarray(feed[name])
        except (ValueError, TypeError) as e:
            raise CalibrationError(f"{what}: not an array: {_short(e)}") from None
        _check_dtype(arr.dtype, what)
        if per_sample:
            if any(d > 0 and d != a for d, a in zip(dims, arr.shape[1:])):
                raise CalibrationError(f"{what}: a sample of shape {list(arr.shape[1:])}, the model takes {dims} "
                                       "(-1: any; one sample per file, in exactly the model's input shape)")
        elif arr.ndim != len(dims) or any(d > 0 and d != a for d, a in zip(dims[1:], arr.shape[1:])):
            raise CalibrationError(f"{what}: shape {list(arr.shape)}, the model expects {dims} (-1: any; "
                                   "the first dim counts samples)")
        if arr.shape[0] == 0 or arr.size == 0:
            raise CalibrationError(f"{what}: holds no samples (shape {list(arr.shape)})")
        if seen is not None:
            first = seen.setdefault(name, (arr.shape[1:], where))
            if first[0] != arr.shape[1:]:
                raise CalibrationError(f"{what}: samples of shape {list(arr.shape[1:])}, but {first[1]} has "
                                       f"{list(first[0])}; every sample of an input must have one shape")
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                arr = arr.astype(dtype, copy=False)
            except (ValueError, TypeError, OverflowError) as e:
                raise CalibrationError(f"{what}: cannot be read as {np.dtype(dtype)}: {_short(e)}") from None
        if arr.dtype.kind == "f":
            bad = _first_bad_sample(arr)
            if bad is not None:
                raise CalibrationError(f"{what}: sample {bad} holds NaN or Inf (or a value out of "
                                       f"{np.dtype(dtype)} range); calibration data must be finite")
        out[name] = arr
    return out


def _per_sample_item(feed: Mapping[str, Any], inputs: Inputs, where: str) -> Feed:
    """One item of per-sample data with a leading sample axis on every input (added where an array is exactly one
    sample); the same number of samples for every input of the item."""
    dims_of = {n: d for n, d, _ in inputs}
    out: Feed = {}
    for k, v in feed.items():
        if k not in dims_of:
            out[k] = v  # named by _check_feed
            continue
        what = f"{where} input '{k}'" if len(inputs) > 1 or where.endswith(".npz") else where
        try:
            arr = np.asarray(v)
        except (ValueError, TypeError) as e:
            raise CalibrationError(f"{what}: not an array: {_short(e)}") from None
        rank = len(dims_of[k])
        if arr.ndim == rank:
            arr = arr[None]
        elif arr.ndim != rank + 1:
            raise CalibrationError(
                f"{what}: shape {list(arr.shape)}, the model takes {dims_of[k]}: this model's samples are given one "
                f"per file in exactly its input shapes (rank {rank}), or stacked on a new leading axis (rank "
                f"{rank + 1})")
        out[k] = arr
    counts = {k: len(a) for k, a in out.items() if k in dims_of}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{where}: inputs hold different numbers of samples {counts}; give each sample's "
                               "arrays in the model's exact input shapes (one .npz per sample)")
    return out


def _calibration_path(path: Path, inputs: Inputs, one: Callable[[Any, str], Feed],
                      per_sample: bool = False) -> tuple[Callable[[], Iterator[Feed]], str]:
    """A source reading a folder of .npy/.npz files, or one such file, with every check of this module."""
    try:
        is_dir = path.is_dir()
        exists = is_dir or path.exists() or path.is_symlink()
    except (OSError, ValueError):
        is_dir, exists = False, False
    if not exists:
        raise CalibrationError(f"calibration data {path} does not exist")
    if is_dir:
        files = _folder_files(path, f"calibration folder {path}")
        if not files:
            raise CalibrationError(f"calibration folder {path} holds no .npy or .npz files")
    else:
        files = [path]

    def load() -> Iterator[Feed]:
        budget = _Budget()
        seen: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in files:
            where = f"calibration file {f}"
            data = _read_file(f, where, budget)
            yield _check_feed(data if isinstance(data, dict) else one(data, where), inputs, where, seen, per_sample)

    return load, str(path)


def as_calibration(data: Any, model: onnx.ModelProto, labels: np.ndarray | str | Path | None = None,
                   batch_size: int | None = None, labels_name: str | None = None) -> CalibrationData:
    """Turn any accepted form of calibration data into :class:`CalibrationData` checked against ``model``.

    Args:
        data: an array, a dict of arrays, a folder of .npy/.npz files or one such file, a callable, or
            :class:`CalibrationData`.
        model: the model the data feeds.
        labels: class labels of the samples (an array, or an .npy file).
        batch_size: samples per batch (the model's fixed batch where it has one).
        labels_name: where ``labels`` came from, for messages.

    Raises:
        CalibrationError: data or labels that cannot be read, do not fit the model, or hold NaN/Inf (the message
            names the file or item, the input and the sample).
    """
    inputs = model_inputs(model)
    per_sample = per_sample_layout(inputs)
    fixed_batch = model_fixed_batch(inputs)
    bs = 1 if per_sample else fixed_batch or batch_size or 32
    bind = getattr(data, "for_model", None)
    if callable(bind) and not isinstance(data, CalibrationData):
        # an image or audio folder, or an iterable (edgeopt.datasources): bound to this model's inputs; its own
        # labels (class sub-folders, (sample, label) pairs) unless labels are given
        data, found, desc = bind(model)
        if labels is None and found is not None:
            labels, labels_name = found, f"labels of {desc}"
    if isinstance(labels, (str, Path)):
        labels_name = labels_name or f"labels file {labels}"
        labels = load_labels(labels)
    elif labels is not None:
        labels = check_labels(labels, labels_name or "labels")

    def one(item: Any, where: str) -> Feed:
        if isinstance(item, Mapping):
            return dict(item)
        if len(inputs) != 1:
            raise CalibrationError(f"{where}: the model has {len(inputs)} inputs {[n for n, _, _ in inputs]}; give "
                                   "calibration samples as dicts {name: array} (.npz files)")
        try:
            arr = np.asarray(item)
        except (ValueError, TypeError) as e:
            raise CalibrationError(f"{where}: not an array: {_short(e)}") from None
        if arr.ndim == len(inputs[0][1]) - 1 and not per_sample:
            arr = arr[None]
        return {inputs[0][0]: arr}

    if isinstance(data, CalibrationData):
        # its feeds hold a sample axis already (per-sample data: stacked on a new axis, one rank more than the input)
        feeds = _check_feed(data.feeds(), inputs, f"calibration data {data.description}".rstrip(),
                            per_sample=per_sample)
        cd = CalibrationData(lambda: [feeds], data.labels if labels is None else labels,
                             1 if per_sample else fixed_batch or data.batch_size, data.description,
                             fixed_batch=fixed_batch, per_sample=per_sample)
        cd._cache = feeds
    else:
        if isinstance(data, (str, Path)):
            source, desc = _calibration_path(Path(data), inputs, one, per_sample)
        elif callable(data):
            desc = getattr(data, "__name__", "callable")

            def source() -> Iterator[Feed]:
                seen: dict[str, tuple[tuple[int, ...], str]] = {}
                for i, item in enumerate(data()):
                    where = f"calibration item {i} of {desc}"
                    yield _check_feed(one(item, where), inputs, where, seen, per_sample)
        else:
            feed = _check_feed(one(data, "calibration data"), inputs, "calibration data", per_sample=per_sample)
            desc = "arrays"

            def source() -> Iterator[Feed]:
                yield feed

        cd = CalibrationData(source, labels, bs, desc, fixed_batch=fixed_batch, per_sample=per_sample)
        cd.feeds()
    if cd.labels is not None and len(cd.labels) != len(cd):
        raise CalibrationError(f"{labels_name or 'labels'}: {len(cd.labels)} labels for {len(cd)} samples of "
                               f"calibration data {cd.description}; give one label per sample")
    return cd


def as_sample(data: Any, model: onnx.ModelProto, where: str = "inputs") -> Feed:
    """One run's inputs (``--inputs``: an .npz ``{name: array}``, an .npy for a single-input model, or a mapping),
    checked like calibration data and returned in the model's exact input shapes: one sample (a batch of the model's
    fixed size where it has one; a single-input model's sample may leave out a leading batch of 1).

    Raises:
        CalibrationError: unreadable, wrong names, dtypes, shapes, or NaN/Inf (one line naming the problem).
    """
    inputs = model_inputs(model)
    if isinstance(data, (str, Path)):
        p = Path(data)
        where = f"{where} {p}"
        try:
            regular = p.is_file()
        except (OSError, ValueError):
            regular = False
        if not regular:
            raise CalibrationError(f"{where} does not exist or is not a file (give an .npz, or an .npy for one input)")
        data = _read_file(p, where, _Budget())
    if not isinstance(data, Mapping):
        if len(inputs) != 1:
            raise CalibrationError(f"{where}: the model takes {len(inputs)} inputs {[n for n, _, _ in inputs]}; give "
                                   "them as an .npz {name: array}")
        data = {inputs[0][0]: data}
    dims_of = {n: d for n, d, _ in inputs}
    item = {}
    for k, v in data.items():
        try:
            arr = np.asarray(v)
        except (ValueError, TypeError) as e:
            raise CalibrationError(f"{where} input '{k}': not an array: {_short(e)}") from None
        dims = dims_of.get(k)
        if dims is not None and arr.ndim == len(dims) - 1 and len(inputs) == 1 and dims[0] in (1, -1):
            arr = arr[None]
        if dims is not None and arr.ndim != len(dims):
            raise CalibrationError(f"{where} input '{k}': shape {list(arr.shape)}, the model takes {dims} (-1: any); "
                                   "give one sample in exactly the model's input shapes")
        item[k] = arr
    # checked as one per-sample item: names, dtypes, every fixed dim, finite values
    feed = _check_feed(item, inputs, where, per_sample=True)
    return {k: v[0, ...] for k, v in feed.items()}  # [0, ...]: a 0-d array for a scalar input


def fingerprint(model: onnx.ModelProto | bytes | str, data: CalibrationData, settings: object) -> str:
    """A key for results computed from a model, its data and some settings (sensitivity, int8 choices, ranges).

    Args:
        model: the model, its serialized bytes, or an identifying string (e.g. its sha256).
        data: the data the result was computed on (every sample and input name count).
        settings: anything JSON can write (sorted keys; ``str`` for the rest) that changes the result.

    Returns:
        A hex sha256.
    """
    import hashlib
    import json

    blob = model if isinstance(model, bytes) else model.encode() if isinstance(model, str) else model.SerializeToString()
    h = hashlib.sha256(blob)
    for k, v in sorted(data.feeds().items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()
