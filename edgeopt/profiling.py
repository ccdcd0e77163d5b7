"""Measuring latency of ONNX models in onnxruntime on this machine."""

from __future__ import annotations

import time

import numpy as np


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "min": float(a.min())}


def ort_latency(model, feed: dict[str, np.ndarray], *, threads: int = 1, warmup: int = 10, repeats: int = 50,
                min_seconds: float = 0.0) -> dict[str, float]:
    """Latency in ms of one ``session.run`` on ``feed`` (a proto, a path or an existing session).

    ``threads`` fixes intra-op threads (one inter-op thread) so runs compare like with like.
    """
    from .fidelity import session

    sess = model if hasattr(model, "run") else session(model, threads=threads)
    for _ in range(warmup):
        sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return percentiles(times)


def interleaved_latency(models: dict[str, object], feed: dict[str, np.ndarray], *, threads: int = 1, rounds: int = 5,
                        repeats: int = 20, warmup: int = 10) -> dict[str, dict[str, float]]:
    """Latency of several models measured in alternating rounds, so machine noise hits all alike."""
    from .fidelity import session

    sessions = {k: session(m, threads=threads) for k, m in models.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(repeats):
                t = time.perf_counter()
                s.run(None, feed)
                samples[k].append((time.perf_counter() - t) * 1e3)
    return {k: percentiles(v) for k, v in samples.items()}
