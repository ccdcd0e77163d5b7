"""Peers for scripts/bench_planner.py: the int8 quantizers a competent user would reach for, each configured as its
documentation recommends, plus the runtimes (onnxruntime sessions, OpenVINO compiled models) and an interleaved
timer that treats every variant alike.  Each builder takes calibration feeds (a list of ``{input: array[1, ...]}``)
and returns an ONNX model path (or an OpenVINO IR path)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

Feed = dict[str, np.ndarray]


# --------------------------------------------------------------------------- runtimes

def ort_session(path: str | Path, threads: int):
    """An onnxruntime CPU session: ``threads`` intra-op threads, one inter-op thread, all graph optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ov_config(threads: int) -> dict:
    """One OpenVINO CPU config for every variant: latency hint, one stream, fixed threads, fp32 for what stays float
    (on AVX512-BF16/AMX CPUs OpenVINO otherwise runs float parts in bf16).  Quantized (QDQ / FakeQuantize) parts
    still run in int8."""
    return {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY"}


class OvModel:
    """An OpenVINO compiled model with ``run(feed) -> [outputs]``, from an ONNX or IR file."""

    def __init__(self, path: str | Path, threads: int):
        import openvino as ov

        self.compiled = ov.Core().compile_model(str(path), "CPU", ov_config(threads))
        self.request = self.compiled.create_infer_request()
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]

    def run(self, feed: Feed) -> list[np.ndarray]:
        res = self.request.infer({k: np.ascontiguousarray(feed[k]) for k in self.inputs})
        return [np.array(res[o]) for o in self.compiled.outputs]


class OrtModel:
    def __init__(self, path: str | Path, threads: int):
        self.session = ort_session(path, threads)

    def run(self, feed: Feed) -> list[np.ndarray]:
        return self.session.run(None, feed)


def run_all(runner, feeds: Sequence[Feed]) -> list[np.ndarray]:
    """Every output of ``runner`` over ``feeds`` (batch 1 each), concatenated along axis 0."""
    outs: list[list[np.ndarray]] = []
    for f in feeds:
        res = runner.run(f)
        outs = outs or [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(np.asarray(r, dtype=np.float32))
    return [np.concatenate(o) for o in outs]


def interleaved(calls: dict[str, Callable[[], object]], *, rounds: int = 5, repeats: int = 20,
                warmup: int = 10) -> dict[str, dict[str, float]]:
    """Latency (ms) of each call, measured round-robin (``rounds`` x ``repeats`` per call after ``warmup``), so that
    machine noise hits every variant alike.  Same scheme as :func:`edgeopt.profiling.interleaved_latency`, for any
    callable (onnxruntime sessions, OpenVINO requests, edgeopt runners)."""
    from edgeopt.profiling import percentiles, time_runs

    for c in calls.values():
        time_runs(c, warmup=warmup, repeats=0)
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, c in calls.items():
            samples[k] += time_runs(c, repeats=repeats)
    return {k: percentiles(v) for k, v in samples.items()}


# --------------------------------------------------------------------------- onnxruntime quantize_static

def _reader(feeds: Sequence[Feed]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return Reader()


def ort_default(src: Path, feeds: Sequence[Feed], dst: Path) -> Path:
    """``quantize_static`` with every default: QDQ, MinMax, per-tensor, uint8 activations / int8 weights."""
    from onnxruntime.quantization import quantize_static

    with contextlib.redirect_stdout(sys.stderr):  # the calibrators print progress
        quantize_static(str(src), str(dst), _reader(feeds))
    return dst


def ort_preprocess(src: Path, dst: Path) -> Path:
    """``quant_pre_process`` (symbolic + ONNX shape inference, ORT basic optimizations), as the docs ask before
    quantizing; falls back to skipping symbolic shape inference where that fails on the model."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
    except Exception:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


#: calibrate methods tried for "onnxruntime best" -> extra_options (documented in quantize.py's StaticQuantConfig)
BEST_METHODS = {
    "percentile": ("Percentile", {"CalibPercentile": 99.999}),
    "percentile99.99": ("Percentile", {"CalibPercentile": 99.99}),
    "entropy": ("Entropy", {}),
    "minmax": ("MinMax", {}),
}


def ort_best(pre: Path, feeds: Sequence[Feed], dst: Path, method: str, reduce_range: bool, src: Path | None = None) -> Path:
    """``quantize_static`` on the pre-processed model: QDQ, per-channel weights, uint8 activations / int8 weights,
    ``reduce_range`` on x86 CPUs without VNNI (as onnxruntime's docs advise), the given calibrate method."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name, extra = BEST_METHODS[method]

    def quantize(src: Path) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(str(src), str(dst), _reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, name),
                            extra_options={**extra, **({} if name == "MinMax" else {"CalibMaxIntermediateOutputs": 16})})

    quantize(pre)
    try:
        ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    except Exception:  # pre-processing's optimizer can fuse nodes the quantized model cannot load (PP-OCR: "ConvBn");
        # a user then pre-processes without it, as quant_pre_process's own option allows
        plain = dst.with_name(dst.stem + "_pre_noopt.onnx")
        quant_pre_process(str(src or pre), str(plain), skip_optimization=True, skip_symbolic_shape=True)
        quantize(plain)
    return dst


# --------------------------------------------------------------------------- nncf

def _quiet_nncf() -> None:
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)


def nncf_onnx(src: Path, feeds: Sequence[Feed], dst: Path) -> Path:
    """``nncf.quantize`` on the ONNX model (nncf's ONNX backend), defaults, all calibration samples."""
    import nncf

    _quiet_nncf()
    with contextlib.redirect_stdout(sys.stderr):  # progress bars
        q = nncf.quantize(onnx.load(str(src)), nncf.Dataset(list(feeds)), subset_size=len(feeds))
    onnx.save(q, str(dst))
    return dst


def nncf_onnx_accuracy_control(src: Path, feeds: Sequence[Feed], val_items: Sequence[tuple[Feed, object]],
                               metric: Callable[[list[list[np.ndarray]], list[object]], float], max_drop: float,
                               dst: Path, max_iterations: int | None = None) -> Path:
    """``nncf.quantize_with_accuracy_control`` on the ONNX model: ``metric(outputs per item, targets)`` (higher is
    better) on ``val_items`` ((feed, target) pairs), ``max_drop`` absolute; ``max_iterations`` caps the layers it
    reverts to float (each one re-ranks every quantizer group: minutes on MobileNetV2)."""
    import nncf
    import onnxruntime as ort
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    _quiet_nncf()
    cache: list[tuple[object, object]] = []  # (model, session): nncf validates the same proto several times

    def session_for(model):
        for m, s in cache:
            if m is model:
                return s
        so = ort.SessionOptions()
        so.log_severity_level = 3
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        cache[:] = [*cache[-1:], (model, s)]
        return s

    def validate(model, data) -> tuple[float, list[float]]:
        sess = session_for(model)
        outs, targets, per_item = [], [], []
        for feed, target in data:
            o = sess.run(None, feed)
            outs.append(o)
            targets.append(target)
            per_item.append(metric([o], [target]))
        return metric(outs, targets), per_item

    with contextlib.redirect_stdout(sys.stderr):
        q = nncf.quantize_with_accuracy_control(
            onnx.load(str(src)), nncf.Dataset(list(feeds)), nncf.Dataset(list(val_items)), validate,
            max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(feeds),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                **({"max_num_iterations": max_iterations} if max_iterations else {})))
    onnx.save(q, str(dst))
    return dst


def nncf_openvino(src: Path, feeds: Sequence[Feed], dst_xml: Path) -> Path:
    """``nncf.quantize`` on the model converted to OpenVINO (``ov.convert_model``), defaults: what OpenVINO's docs
    recommend for OpenVINO deployment.  Saved as IR with fp32 weights for the float parts."""
    import nncf
    import openvino as ov

    _quiet_nncf()
    with contextlib.redirect_stdout(sys.stderr):
        q = nncf.quantize(ov.convert_model(str(src)), nncf.Dataset(list(feeds)), subset_size=len(feeds))
    ov.save_model(q, str(dst_xml), compress_to_fp16=False)
    return dst_xml


def file_size(path: Path) -> int:
    p = Path(path)
    return p.stat().st_size + (p.with_suffix(".bin").stat().st_size if p.suffix == ".xml" else 0)


def timed(fn: Callable[[], Path]) -> tuple[Path | None, float, str | None]:
    """(result, seconds, error)."""
    t = time.perf_counter()
    try:
        return fn(), time.perf_counter() - t, None
    except Exception as e:  # a peer failing is a result
        return None, time.perf_counter() - t, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
