"""Calibration data: what passes feed through a model to collect activation
statistics, reconstruct pruned layers and measure fidelity.

Accepted forms (see :func:`as_calibration`):

* a numpy array (the model's single input) or a dict ``{input_name: array}``,
  samples along axis 0;
* a folder of ``.npy`` files (single-input models: each file one sample or a
  batch) or ``.npz`` files (``{input_name: array}`` each);
* a callable returning an iterable of arrays or dicts (called each time the data is read);
* a :class:`CalibrationData`.

Labels (for accuracy) ride along optionally.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import EdgeoptError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

Feed = dict[str, np.ndarray]


class CalibrationError(EdgeoptError):
    """Calibration data that does not fit the model."""


@dataclass
class CalibrationData:
    """Samples for a model, as dicts of arrays with a leading sample axis."""

    source: Callable[[], Iterable[Feed]]
    labels: np.ndarray | None = None
    batch_size: int = 32
    description: str = ""
    _cache: Feed | None = field(default=None, repr=False)

    def feeds(self) -> Feed:
        """All samples, concatenated per input."""
        if self._cache is None:
            parts: dict[str, list[np.ndarray]] = {}
            for feed in self.source():
                for k, v in feed.items():
                    parts.setdefault(k, []).append(np.asarray(v))
            if not parts:
                raise CalibrationError(f"calibration data {self.description or ''} is empty".replace("  ", " "))
            self._cache = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
        return self._cache

    def __len__(self) -> int:
        return len(next(iter(self.feeds().values())))

    def batches(self, batch_size: int | None = None, limit: int | None = None) -> Iterator[Feed]:
        bs = batch_size or self.batch_size
        feeds = self.feeds()
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(0, n, bs):
            yield {k: v[i : min(i + bs, n)] for k, v in feeds.items()}

    def subset(self, n: int, start: int = 0) -> CalibrationData:
        """Samples ``start`` to ``start + n`` (fewer where the data ends)."""
        stop = start + n
        feeds = {k: v[start:stop] for k, v in self.feeds().items()}
        labels = None if self.labels is None else self.labels[start:stop]
        return CalibrationData(lambda: [feeds], labels, self.batch_size, f"{self.description}[{start}:{stop}]")

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


def _check(feeds: Feed, model: onnx.ModelProto) -> Feed:
    inputs = model_inputs(model)
    names = [n for n, _, _ in inputs]
    if set(feeds) != set(names):
        raise CalibrationError(f"calibration data has inputs {sorted(feeds)}, the model takes {names}")
    out = {}
    for name, dims, dtype in inputs:
        arr = np.asarray(feeds[name])
        if arr.ndim != len(dims) or any(d > 0 and d != a for d, a in zip(dims[1:], arr.shape[1:])):
            raise CalibrationError(f"calibration input '{name}' has shape {list(arr.shape)}, the model expects {dims} (-1: any)")
        out[name] = arr.astype(dtype, copy=False)
    return out


def as_calibration(data: Any, model: onnx.ModelProto, labels: np.ndarray | None = None,
                   batch_size: int | None = None) -> CalibrationData:
    """Turn any accepted form of calibration data into :class:`CalibrationData` checked against ``model``."""
    inputs = model_inputs(model)
    fixed_batch = inputs[0][1][0] if inputs and inputs[0][1] and inputs[0][1][0] > 0 else None
    bs = fixed_batch or batch_size or 32
    if isinstance(data, CalibrationData):
        feeds = _check(data.feeds(), model)
        return CalibrationData(lambda: [feeds], data.labels if labels is None else labels, fixed_batch or data.batch_size, data.description)

    def one(item: Any) -> Feed:
        if isinstance(item, Mapping):
            return dict(item)
        if len(inputs) != 1:
            raise CalibrationError(f"the model has {len(inputs)} inputs; give calibration samples as dicts {{name: array}}")
        arr = np.asarray(item)
        if arr.ndim == len(inputs[0][1]) - 1:
            arr = arr[None]
        return {inputs[0][0]: arr}

    if isinstance(data, (str, Path)):
        folder = Path(data)
        if not folder.is_dir():
            raise CalibrationError(f"calibration folder {folder} does not exist")
        files = sorted([*folder.glob("*.npy"), *folder.glob("*.npz")])
        if not files:
            raise CalibrationError(f"calibration folder {folder} holds no .npy or .npz files")

        def load_folder() -> Iterator[Feed]:
            for f in files:
                if f.suffix == ".npz":
                    with np.load(f) as z:
                        yield {k: z[k] for k in z.files}
                else:
                    yield one(np.load(f))

        desc = str(folder)
        source: Callable[[], Iterable[Feed]] = load_folder
    elif callable(data):
        desc = getattr(data, "__name__", "callable")

        def source() -> Iterator[Feed]:
            for item in data():
                yield one(item)
    else:
        feed = one(data)
        desc = "arrays"

        def source() -> Iterator[Feed]:
            yield feed

    cd = CalibrationData(source, labels, bs, desc)
    cd._cache = _check(cd.feeds(), model)
    if labels is not None and len(labels) != len(cd):
        raise CalibrationError(f"{len(labels)} labels for {len(cd)} calibration samples")
    return cd


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
