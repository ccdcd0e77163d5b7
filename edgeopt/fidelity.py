"""How far a transformed model's outputs are from the original's, on real inputs."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from .calibration import CalibrationData

if TYPE_CHECKING:  # pragma: no cover
    import onnx


class Fidelity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    samples: int
    snr_db: float  # 10 log10(|ref|^2 / |ref - out|^2) over all outputs
    cosine: float  # mean per-sample cosine similarity of the first output
    max_abs_error: float
    top1_agreement: float | None = None  # first output, when it is [N, classes]
    accuracy: float | None = None  # candidate's top-1 accuracy against labels
    reference_accuracy: float | None = None
    accuracy_delta: float | None = None  # candidate - reference


#: the SNR reported for outputs identical to the reference (or closer than this)
SNR_CEILING_DB = 300.0


def session(model: onnx.ModelProto | str | os.PathLike, threads: int | None = None, optimize: bool = True):
    """An onnxruntime CPU session for a proto (saved to a temp file when it is too big for bytes) or a path."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    if model.ByteSize() < 1_900_000_000:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    import onnx

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        onnx.save(model, path, save_as_external_data=True, location="model.data")
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def fixed_batch(sess) -> int | None:
    """The batch size a session's inputs are fixed to (most exported models: 1), or None where it is free."""
    try:
        dims = [i.shape[0] for i in sess.get_inputs() if i.shape]
    except AttributeError:  # a runner, not a session: it batches itself
        return None
    fixed = [d for d in dims if isinstance(d, int) and d > 0]
    return min(fixed) if fixed else None


def run_feeds(sess, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``sess.run`` over samples stacked on axis 0, in slices of the model's fixed batch where it has one."""
    b = fixed_batch(sess)
    n = len(next(iter(feeds.values())))
    if b is None or b >= n:
        return sess.run(None, feeds)
    parts = [sess.run(None, {k: v[i:i + b] for k, v in feeds.items()}) for i in range(0, n, b)]
    return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(parts[0]))]


def run(model, data: CalibrationData, limit: int | None = None) -> list[np.ndarray]:
    """All outputs of ``model`` over ``data``, concatenated along the sample axis (in batches of the model's fixed
    batch size where it has one)."""
    sess = model if hasattr(model, "run") else session(model)
    outs: list[list[np.ndarray]] = []
    for feed in data.batches(fixed_batch(sess), limit=limit):
        res = sess.run(None, feed)
        if not outs:
            outs = [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(np.asarray(r))
    return [np.concatenate(o, axis=0) for o in outs]


def relative_noise(ref: np.ndarray, out: np.ndarray) -> float:
    """Noise power over signal power, ``|ref - out|^2 / |ref|^2`` in float64 (what sensitivity and the int8
    settings choice rank by; additive across layers to first order)."""
    r = np.asarray(ref, np.float64)
    return float(np.sum((r - np.asarray(out, np.float64)) ** 2) / max(np.sum(r**2), 1e-30))


def compare_outputs(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> Fidelity:
    r = np.concatenate([x.astype(np.float64).ravel() for x in ref])
    o = np.concatenate([x.astype(np.float64).ravel() for x in out])
    noise = float(np.sum((r - o) ** 2))
    signal = float(np.sum(r**2))
    # identical outputs: a finite ceiling (JSON has no infinity; manifests must round-trip)
    snr = SNR_CEILING_DB if noise == 0 else min(SNR_CEILING_DB, 10 * np.log10(max(signal, 1e-30) / noise))
    r0 = ref[0].reshape(len(ref[0]), -1).astype(np.float64)
    o0 = out[0].reshape(len(out[0]), -1).astype(np.float64)
    denom = np.linalg.norm(r0, axis=1) * np.linalg.norm(o0, axis=1)
    cos = float(np.mean(np.where(denom > 0, np.sum(r0 * o0, axis=1) / np.maximum(denom, 1e-30), 1.0)))
    top1 = acc = ref_acc = delta = None
    if ref[0].ndim == 2 and ref[0].shape[1] > 1:
        top1 = float(np.mean(ref[0].argmax(1) == out[0].argmax(1)))
        if labels is not None:
            ref_acc = float(np.mean(ref[0].argmax(1) == labels[: len(ref[0])]))
            acc = float(np.mean(out[0].argmax(1) == labels[: len(out[0])]))
            delta = acc - ref_acc
    return Fidelity(samples=len(ref[0]), snr_db=round(snr, 3), cosine=round(cos, 6),
                    max_abs_error=float(np.max(np.abs(r - o))) if len(r) else 0.0,
                    top1_agreement=top1, accuracy=acc, reference_accuracy=ref_acc, accuracy_delta=delta)


def compare(reference, candidate, data: CalibrationData, limit: int | None = None) -> Fidelity:
    """Run both models on ``data`` and compare their outputs (labels from ``data`` give accuracy)."""
    return compare_outputs(run(reference, data, limit), run(candidate, data, limit), data.labels)
