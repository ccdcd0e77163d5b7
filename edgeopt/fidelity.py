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

    ort.set_default_logger_severity(3)  # nothing from onnxruntime's C++ logger below errors
    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failing run raises; its [E:onnxruntime] lines would only duplicate that on stderr
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


def _stacked_per_sample(sess, feeds: dict[str, np.ndarray]) -> bool:
    """Whether ``feeds`` hold per-sample data stacked on a new leading axis (one rank more than the session's input:
    a scalar input given as ``[N]``, a state ``[L, 1, H]`` as ``[N, L, 1, H]``)."""
    try:
        ranks = {i.name: len(i.shape) for i in sess.get_inputs() if i.shape is not None}
    except (AttributeError, TypeError):
        return False
    return any(k in ranks and np.ndim(v) == ranks[k] + 1 for k, v in feeds.items())


def join_outputs(parts: list[list[np.ndarray]], per_sample: bool = False) -> list[np.ndarray]:
    """Outputs of runs over consecutive batches, joined along the sample axis.  Per-sample runs: an output whose
    leading dim is 1 (a batch of one) is concatenated on it, any other (a scalar, a state ``[L, 1, H]``) is stacked
    on a new leading axis, so that every output has one row per sample."""
    if not parts:
        return []
    out = []
    for j in range(len(parts[0])):
        col = [np.asarray(p[j]) for p in parts]
        if per_sample and not all(c.ndim >= 1 and c.shape[0] == 1 for c in col):
            out.append(np.stack(col))
        elif any(c.ndim == 0 for c in col):
            out.append(np.stack(col))
        else:
            out.append(np.concatenate(col, axis=0))
    return out


def run_feeds(sess, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``sess.run`` over samples stacked on axis 0 (:meth:`CalibrationData.feeds`), in slices of the model's fixed
    batch where it has one (the last slice filled up with the first samples, their outputs dropped), or one sample
    at a time in the model's exact input shapes where the samples are stacked on a new axis (per-sample layout)."""
    n = len(next(iter(feeds.values())))
    if _stacked_per_sample(sess, feeds):
        return join_outputs([sess.run(None, {k: v[i, ...] for k, v in feeds.items()}) for i in range(n)], True)
    b = fixed_batch(sess)
    if b is None or b == n:
        return sess.run(None, feeds)
    parts = []
    for i in range(0, n, b):
        real = min(b, n - i)
        idx = np.arange(i, i + b) % n
        res = sess.run(None, {k: v[idx] for k, v in feeds.items()})
        parts.append([np.asarray(r)[:real] if real < b and np.ndim(r) else r for r in res])
    return join_outputs(parts)


def run(model, data: CalibrationData, limit: int | None = None, *, original: bool = False) -> list[np.ndarray]:
    """All outputs of ``model`` over ``data``, joined along the sample axis (:func:`join_outputs`), fed as the model
    takes them (:meth:`CalibrationData.counted_batches`: the model's fixed batch, or one sample at a time in the
    per-sample layout).

    ``original``: ``model`` is the user's model, so onnxruntime failing on the data is the user's to fix (a
    data-dependent branch that breaks on a sample): a one-line :class:`~edgeopt.errors.EdgeoptError` naming the
    sample, not an internal error."""
    sess = model if hasattr(model, "run") else session(model)
    b = fixed_batch(sess)
    parts: list[list[np.ndarray]] = []
    seen = 0
    for feed, real in data.counted_batches(b, limit=limit):
        try:
            res = sess.run(None, feed)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class
            if not original:
                raise
            from .errors import EdgeoptError

            first = " ".join(str(e).split())[:300] or type(e).__name__
            where = f"sample {seen}" if real == 1 else f"samples {seen}..{seen + real - 1}"
            raise EdgeoptError(f"the model fails in onnxruntime on {where} of {data.description or 'the data'}: "
                               f"{first}") from None
        seen += real
        padded = not data.per_sample and real < len(next(iter(feed.values())))
        parts.append([np.asarray(r)[:real] if padded and np.ndim(r) else np.asarray(r) for r in res])
    return join_outputs(parts, data.per_sample)


#: the relative noise of a candidate whose outputs are not finite (NaN/Inf): worse than any finite candidate
NONFINITE_NOISE = 1e30
#: the max_abs_error reported for a candidate with non-finite outputs (JSON has no NaN/Infinity)
NONFINITE_ERROR = float(np.finfo(np.float32).max)


def check_finite_reference(outputs: list[np.ndarray], what: str = "the original model") -> None:
    """Refuse reference outputs that are not finite: nothing can be compared with NaN, and a NaN reference would
    make every candidate look faithful.

    Raises:
        EdgeoptError: naming the output index and the first sample that is not finite.
    """
    from .errors import EdgeoptError

    for i, o in enumerate(outputs):
        a = np.asarray(o)
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            bad = ~np.isfinite(a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1))
            sample = int(np.argmax(bad.any(axis=1)))
            raise EdgeoptError(f"{what} produces NaN/Inf in output {i} for sample {sample} of the given data; "
                               f"fix the model or the data (nothing can be compared with it)")


def relative_noise(ref: np.ndarray, out: np.ndarray) -> float:
    """Noise power over signal power, ``|ref - out|^2 / |ref|^2`` in float64 (what sensitivity and the int8
    settings choice rank by; additive across layers to first order).  A candidate with NaN/Inf outputs gets
    :data:`NONFINITE_NOISE`, so no search ever prefers it."""
    r = np.asarray(ref, np.float64)
    o = np.asarray(out, np.float64)
    if not np.all(np.isfinite(o)):
        return NONFINITE_NOISE
    return float(np.sum((r - o) ** 2) / max(np.sum(r**2), 1e-30))


def compare_outputs(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None = None) -> Fidelity:
    """Fidelity of ``out`` against the reference outputs ``ref`` (which must be finite: see
    :func:`check_finite_reference`).  Candidate samples with NaN/Inf count as the worst case: SNR at the floor,
    cosine 0, top-1 disagreement, wrong against labels."""
    check_finite_reference(ref)
    r = np.concatenate([x.astype(np.float64).ravel() for x in ref])
    o = np.concatenate([x.astype(np.float64).ravel() for x in out])
    finite = bool(np.all(np.isfinite(o)))
    noise = float(np.sum((r - o) ** 2)) if finite else float("inf")
    signal = float(np.sum(r**2))
    # identical outputs: a finite ceiling (JSON has no infinity; manifests must round-trip)
    if not finite:
        snr = -SNR_CEILING_DB
    else:
        snr = SNR_CEILING_DB if noise == 0 else float(np.clip(10 * np.log10(max(signal, 1e-30) / noise),
                                                              -SNR_CEILING_DB, SNR_CEILING_DB))
    r0 = ref[0].reshape(len(ref[0]), -1).astype(np.float64)
    o0 = out[0].reshape(len(out[0]), -1).astype(np.float64)
    ok = np.all(np.isfinite(o0), axis=1)  # per sample
    o0 = np.where(ok[:, None], o0, 0.0)
    denom = np.linalg.norm(r0, axis=1) * np.linalg.norm(o0, axis=1)
    cos_each = np.where(denom > 0, np.sum(r0 * o0, axis=1) / np.maximum(denom, 1e-30), 1.0)
    cos = float(np.mean(np.where(ok, cos_each, 0.0)))
    top1 = acc = ref_acc = delta = None
    if ref[0].ndim == 2 and ref[0].shape[1] > 1:
        picked = out[0].argmax(1)
        top1 = float(np.mean((ref[0].argmax(1) == picked) & ok))
        if labels is not None:
            ref_acc = float(np.mean(ref[0].argmax(1) == labels[: len(ref[0])]))
            acc = float(np.mean((picked == labels[: len(out[0])]) & ok))
            delta = acc - ref_acc
    err = float(np.max(np.abs(r - o))) if len(r) and finite else (NONFINITE_ERROR if len(r) else 0.0)
    return Fidelity(samples=len(ref[0]), snr_db=round(snr, 3), cosine=round(cos, 6),
                    max_abs_error=min(err, NONFINITE_ERROR),
                    top1_agreement=top1, accuracy=acc, reference_accuracy=ref_acc, accuracy_delta=delta)


def compare(reference, candidate, data: CalibrationData, limit: int | None = None) -> Fidelity:
    """Run both models on ``data`` and compare their outputs (labels from ``data`` give accuracy)."""
    return compare_outputs(run(reference, data, limit), run(candidate, data, limit), data.labels)
