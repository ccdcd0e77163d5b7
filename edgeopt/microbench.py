"""The ``host`` target: the machine edgeopt runs on, with a compute model measured here.

:func:`host_target` builds a :class:`~edgeopt.types.Target` named ``host`` from
:func:`edgeopt.hostinfo.detect` (architecture, ISA features, cores, RAM) and from a
short micro-benchmark (:func:`run_microbench`, about ten seconds, once per machine) run with
onnxruntime at the target's thread count:

* fp32 and int8 kernel models of the kinds the cost model tells apart
  (:data:`edgeopt.types.KERNEL_KINDS`: dense, pointwise and depthwise convolutions,
  matrix products, elementwise ops): each kind is timed on a grid of synthetic layers
  spanning the sizes of real networks (:data:`GRID`, chains of four so layout reorders
  amortize as inside a network) and a line ``fixed + per-MMAC + per-MB`` is fitted
  (:func:`fit_kernel_model`); the host target's cost model uses these lines.  int8 is
  the QDQ form edgeopt's ``int8`` pass emits (uint8 activations, per-channel int8
  weights, 7-bit weights where :func:`edgeopt.hostinfo.int8_scheme` says so), which
  onnxruntime fuses into ``QLinearConv``/``QLinearMatMul``;
* weight-only int8/int4 (``MatMulNBits``) at batch 1;
* bf16 through OpenVINO (``INFERENCE_PRECISION_HINT=bf16``) only where the CPU has
  native bf16 (:func:`edgeopt.hostinfo.bf16_native`) and openvino imports;
* the bandwidth beyond the L2 caches: a chain of ``Add`` ops (each with its own
  constant operand of the same size, as residual adds and unfused activations
  stream) on tensors twice the L2 capacity of the threads' cores, so every op reads
  and writes L3/DRAM, as a large activation does inside a graph (the roofline's memory
  term is for traffic that does not stay in a core's cache);
* the fixed cost of one more node in a graph (a chain of tiny convolutions, which go
  through the thread pool as real layers do).

The result is cached as JSON under ``$EDGEOPT_CACHE/host/`` (default
``~/.cache/edgeopt/host/``), keyed by the CPU model name, ISA features, core count
and the runtimes' versions, so the benchmark runs once per machine and runtime.

No constants here come from the models edgeopt is evaluated on: every rate, the
bandwidth and the overheads are measured on synthetic single-kernel graphs.
Importing this module is cheap: onnx, numpy, onnxruntime and openvino are imported
by the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

#: Bump when what the benchmark measures changes (old cache files are then ignored).
SCHEMA = 4
#: Timed seconds per measurement (after warm-up); the whole benchmark stays within a few seconds.
MEASURE_SECONDS = 0.12
#: Adds chained in the bandwidth measurement.
BANDWIDTH_CHAIN = 6
#: L2 per core assumed where the OS does not say (bytes).
DEFAULT_L2_BYTES = 1 << 20


# --------------------------------------------------------------------------- the cache


def host_threads() -> int:
    from .hostinfo import detect

    return max(1, detect().cores)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("onnxruntime", "openvino"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "none"
    return out


def cache_key() -> str:
    """What the measured numbers depend on: CPU model, ISA features, cores, threads and runtime versions."""
    from .hostinfo import detect

    cpu = detect()
    blob = json.dumps({"schema": SCHEMA, "arch": cpu.arch, "model": cpu.model_name, "features": cpu.features,
                       "cores": cpu.cores, "threads": host_threads(), **_versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path() -> Path:
    from .zoo import cache_dir

    return cache_dir() / "host" / f"microbench-{cache_key()}.json"


def load_or_run(*, refresh: bool = False) -> dict[str, Any]:
    """The cached micro-benchmark of this machine, running (and caching) it when there is none."""
    from .io import atomic_write_text

    path = cache_path()
    if not refresh and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("schema") == SCHEMA and data.get("key") == cache_key():
                return data
        except (OSError, ValueError):
            pass  # unreadable or half-written: measure again
    data = run_microbench()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


# --------------------------------------------------------------------------- synthetic graphs


def _model(nodes, inputs, outputs, inits, ms_domain: bool = False):
    from onnx import helper

    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ms_domain else [])
    m = helper.make_model(helper.make_graph(nodes, "microbench", inputs, outputs, initializer=inits), opset_imports=opsets)
    m.ir_version = 8
    return m


def _vi(name: str, shape: list[int]):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _qdq(nodes: list, inits: list, x: str, tag: str, scale: float, zero_point: int = 0) -> str:
    """Append uint8 ``QuantizeLinear -> DequantizeLinear`` on ``x`` (as the int8 pass places on activations);
    returns the dequantized tensor's name."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"s_{tag}"),
              numpy_helper.from_array(np.array(zero_point, np.uint8), f"z_{tag}")]
    nodes += [helper.make_node("QuantizeLinear", [x, f"s_{tag}", f"z_{tag}"], [f"q_{tag}"]),
              helper.make_node("DequantizeLinear", [f"q_{tag}", f"s_{tag}", f"z_{tag}"], [f"dq_{tag}"])]
    return f"dq_{tag}"


def _matmul(m: int, k: int, n: int, *, int8: bool = False, weight_bits: int = 8, seed: int = 0):
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    if int8:
        wmax = (1 << (weight_bits - 1)) - 1
        inits = [numpy_helper.from_array(rng.integers(-wmax - 1, wmax + 1, (k, n)).astype(np.int8), "wq"),
                 numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"), numpy_helper.from_array(np.zeros(n, np.int8), "wz")]
        nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1)]
        dq = _qdq(nodes, inits, "x", "in", 0.02, 128)
        nodes.append(helper.make_node("MatMul", [dq, "w"], ["y"]))
        out = _qdq(nodes, inits, "y", "out", 0.05, 128)
    else:
        inits = [numpy_helper.from_array((rng.standard_normal((k, n)) * 0.1).astype(np.float32), "w")]
        nodes, out = [helper.make_node("MatMul", ["x", "w"], ["y"])], "y"
    model = _model(nodes, [_vi("x", [m, k])], [_vi(out, [m, n])], inits)
    return model, {"x": rng.random((m, k), dtype=np.float32)}, m * k * n


def _matmul_nbits(k: int, n: int, bits: int, block: int = 32, seed: int = 0):
    """A batch-1 ``MatMulNBits`` (weight-only int8/int4, accuracy_level 4 as edgeopt's weight_only pass sets)."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    blocks = k // block
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8)).astype(np.uint8), "wq"),
             numpy_helper.from_array(np.full(n * blocks, 0.01, np.float32), "ws")]
    node = helper.make_node("MatMulNBits", ["x", "wq", "ws"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    model = _model([node], [_vi("x", [1, k])], [_vi("y", [1, n])], inits, ms_domain=True)
    return model, {"x": rng.random((1, k), dtype=np.float32)}, k * n


def l2_bytes_per_core() -> int:
    """The L2 cache of one core (Linux sysfs), else :data:`DEFAULT_L2_BYTES`."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for d in sorted(root.glob("index*")) if root.is_dir() else []:
        try:
            if (d / "level").read_text().strip() == "2" and (d / "type").read_text().strip() in ("Unified", "Data"):
                size = (d / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * mult
        except (OSError, ValueError):
            continue
    return DEFAULT_L2_BYTES


def _conv_chain(layers: list[tuple[int, ...]], hw: int, *, int8: bool = False, weight_bits: int = 8, seed: int = 0):
    """Convolutions ``(cin, cout, k, groups[, stride])`` in a chain with a fused Relu each (fp32, or QDQ int8 as the
    int8 pass emits: every conv reads a quantized input); (model, feed, [per-layer (MACs, bytes moved)])."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    wmax = (1 << (weight_bits - 1)) - 1
    act = 1 if int8 else 4
    sizes = []
    hw_in = hw
    for i, (cin, cout, k, g, *rest) in enumerate(layers):
        stride = rest[0] if rest else 1
        hw_out = (hw + 2 * (k // 2) - k) // stride + 1
        wshape = (cout, cin // g, k, k)
        if int8:
            inits += [numpy_helper.from_array(rng.integers(-wmax - 1, wmax + 1, wshape).astype(np.int8), f"wq{i}"),
                      numpy_helper.from_array(np.full(cout, 0.01, np.float32), f"ws{i}"),
                      numpy_helper.from_array(np.zeros(cout, np.int8), f"wz{i}")]
            nodes.append(helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"wz{i}"], [f"w{i}"], axis=0))
            src = _qdq(nodes, inits, x, str(i), 0.02)
        else:
            inits.append(numpy_helper.from_array((rng.standard_normal(wshape) * 0.1).astype(np.float32), f"w{i}"))
            src = x
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}"))
        nodes += [helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [f"c{i}"], pads=[k // 2] * 4, group=g,
                                   strides=[stride, stride]),
                  helper.make_node("Relu", [f"c{i}"], [f"y{i}"])]
        x = f"y{i}"
        macs = cout * (cin // g) * k * k * hw_out * hw_out
        sizes.append((macs, (cin * hw * hw + cout * hw_out * hw_out) * act + int(np.prod(wshape)) * (1 if int8 else 4)
                      + cout * 4))
        hw = hw_out
    if int8:
        x = _qdq(nodes, inits, x, "out", 0.05)
    cin0, cout_last = layers[0][0], layers[-1][1]
    model = _model(nodes, [_vi("x", [1, cin0, hw_in, hw_in])], [_vi(x, [1, cout_last, hw, hw])], inits)
    return model, {"x": rng.random((1, cin0, hw_in, hw_in), dtype=np.float32)}, sizes


def _add_chain(elems: int, chain: int = 4, *, int8: bool = False, seed: int = 0):
    """``chain`` Adds of two same-size tensors, each with its own second operand (streamed from memory as a residual
    branch is): out_i = out_{i-1} + c_i, fp32 or QDQ uint8."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, y = [], [], "x"
    for i in range(chain):
        inits.append(numpy_helper.from_array(rng.random((1, elems), dtype=np.float32), f"c{i}"))
        a, b = y, f"c{i}"
        if int8:
            a, b = _qdq(nodes, inits, y, f"a{i}", 0.05), _qdq(nodes, inits, f"c{i}", f"b{i}", 0.05)
        nodes.append(helper.make_node("Add", [a, b], [f"y{i}"]))
        y = f"y{i}"
    if int8:
        y = _qdq(nodes, inits, y, "out", 0.2)
    model = _model(nodes, [_vi("x", [1, elems])], [_vi(y, [1, elems])], inits)
    return model, {"x": rng.random((1, elems), dtype=np.float32)}, [(0, 3 * elems * (1 if int8 else 4))] * chain


def _upsample(kind: str, cin: int, cout: int, hw: int, factor: int, *, int8: bool = False, weight_bits: int = 8,
              seed: int = 0):
    """One upsampling layer: ``ConvTranspose`` (kernel = stride = ``factor``, as FPN/U-Net heads use) or nearest
    ``Resize`` by ``factor``; fp32 or with QDQ on its input and output.  (model, feed, [(MACs, bytes moved)])."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    out_hw = hw * factor
    act = 1 if int8 else 4
    nodes, inits, x = [], [], "x"
    if int8:
        x = _qdq(nodes, inits, x, "in", 0.02)
    if kind == "convtranspose":
        wshape = (cin, cout, factor, factor)
        if int8:
            wmax = (1 << (weight_bits - 1)) - 1
            inits += [numpy_helper.from_array(rng.integers(-wmax - 1, wmax + 1, wshape).astype(np.int8), "wq"),
                      numpy_helper.from_array(np.array(0.01, np.float32), "ws"), numpy_helper.from_array(np.array(0, np.int8), "wz")]
            nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]))
        else:
            inits.append(numpy_helper.from_array((rng.standard_normal(wshape) * 0.1).astype(np.float32), "w"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), "b"))
        nodes.append(helper.make_node("ConvTranspose", [x, "w", "b"], ["y"], kernel_shape=[factor, factor],
                                      strides=[factor, factor]))
        macs, wbytes = cin * cout * factor * factor * hw * hw, int(np.prod(wshape)) * (1 if int8 else 4)
    else:
        cout = cin
        inits.append(numpy_helper.from_array(np.array([1, 1, factor, factor], np.float32), "scales"))
        nodes.append(helper.make_node("Resize", [x, "", "scales"], ["y"], mode="nearest"))
        macs, wbytes = 0, 0
    y = _qdq(nodes, inits, "y", "out", 0.05) if int8 else "y"
    model = _model(nodes, [_vi("x", [1, cin, hw, hw])], [_vi(y, [1, cout, out_hw, out_hw])], inits)
    moved = (cin * hw * hw + cout * out_hw * out_hw) * act + wbytes
    return model, {"x": rng.random((1, cin, hw, hw), dtype=np.float32)}, [(macs, moved)]


#: Synthetic layers per kernel kind, spanning the sizes of real networks (mobile to server-class):
#: convolutions as (layers [(cin, cout, k, groups)], hw), chains of 4 so the layout reorders a runtime puts at a
#: graph's edges are shared as they are inside a network; gemm as (m, k, n); elementwise as element counts.
GRID = {
    "conv": [([(c, c, 3, 1)] * 4, hw) for c, hw in
             ((8, 8), (16, 16), (16, 112), (32, 56), (64, 56), (96, 28), (128, 14), (256, 7))]
            + [([(3, 32, 3, 1, 2)] + [(32, 32, 3, 1)] * 3, 224), ([(3, 16, 3, 1)] + [(16, 16, 3, 1)] * 3, 96)],  # RGB in
    "pointwise": [([(a, b, 1, 1), (b, a, 1, 1)] * 2, hw) for a, b, hw in
                  ((8, 16, 8), (16, 32, 16), (16, 96, 112), (24, 144, 56), (32, 192, 28), (64, 384, 14), (160, 960, 7),
                   (128, 512, 28))],
    "depthwise": [([(c, c, 3, c)] * 4, hw) for c, hw in
                  ((16, 8), (32, 16), (32, 112), (144, 56), (192, 28), (384, 14), (960, 7), (64, 160))]
                 + [([(c, c, 3, c, 2)] + [(c, c, 3, c)] * 3, hw) for c, hw in ((96, 112), (144, 56), (192, 28), (576, 14))],
    "gemm": [(1, 64, 10), (1, 256, 256), (1, 1280, 1000), (1, 1024, 4096), (16, 512, 512), (64, 1024, 1024),
             (128, 256, 768)],
    "elementwise": [1 << 10, 1 << 12, 1 << 15, 1 << 17, 1 << 19, 1 << 21, 1 << 22, 1 << 23],
    # upsampling as detection/segmentation necks and heads do it: (cin, cout, hw, factor)
    "convtranspose": [(16, 16, 20, 2), (64, 64, 20, 2), (32, 32, 40, 2), (24, 24, 80, 2), (24, 8, 160, 2), (96, 96, 40, 2)],
    "resize": [(16, 0, 10, 2), (96, 0, 20, 2), (96, 0, 40, 2), (96, 0, 80, 2), (24, 0, 40, 4), (24, 0, 20, 8)],
}


def fit_kernel_model(samples: list[tuple[float, float, float]]) -> dict[str, float]:
    """Least squares of ``us = fixed + a * MMACs + b * MB`` weighted by 1/us (relative error), coefficients >= 0
    (a negative one is dropped and the rest refitted); samples are (MMACs, MB, us)."""
    import numpy as np

    x = np.array([[1.0, m, b] for m, b, _ in samples])
    t = np.array([u for _, _, u in samples])
    cols = [0, 1, 2] if x[:, 1].any() else [0, 2]
    while True:
        w = 1.0 / np.maximum(t, 1e-3)
        coef, *_ = np.linalg.lstsq(x[:, cols] * w[:, None], t * w, rcond=None)
        if (coef >= 0).all() or len(cols) == 1:
            break
        cols = [c for c, v in zip(cols, coef) if v >= 0] or [0]
    full = np.zeros(3)
    full[cols] = np.maximum(coef, 0)
    pred = x @ full
    return {"fixed_us": float(full[0]), "us_per_mmac": float(full[1]), "us_per_mb": float(full[2]),
            "samples": len(samples), "max_rel_error": float(np.max(np.abs(pred - t) / np.maximum(t, 1e-9)))}


def measure_kernel_models(threads: int, weight_bits: int, run_overhead_us: float,
                          seconds: float = 0.04) -> tuple[dict[str, dict[str, float]], dict[str, list]]:
    """Time every grid layer at fp32 and int8 and fit one :func:`fit_kernel_model` per (precision, kind)."""
    models: dict[str, dict[str, float]] = {}
    raw: dict[str, list] = {}
    for precision in ("fp32", "int8"):
        q = precision == "int8"
        for kind, configs in GRID.items():
            samples = []
            for cfg in configs:
                if kind == "gemm":
                    model, feed, macs = _matmul(*cfg, int8=q, weight_bits=weight_bits)
                    m, k, n = cfg
                    sizes = [(macs, (m * k + m * n) * (1 if q else 4) + k * n * (1 if q else 4))]
                elif kind == "elementwise":
                    model, feed, sizes = _add_chain(cfg, int8=q)
                elif kind in ("convtranspose", "resize"):
                    model, feed, sizes = _upsample(kind, *cfg, int8=q, weight_bits=weight_bits)
                else:
                    layers, hw = cfg
                    model, feed, sizes = _conv_chain(layers, hw, int8=q, weight_bits=weight_bits)
                ms = _ort_ms(model, feed, threads, seconds)
                total_us = max(1e-3, ms * 1e3 - run_overhead_us)
                macs = sum(m for m, _ in sizes)
                per_layer_us = total_us / len(sizes)
                samples.append((macs / len(sizes) / 1e6, sum(b for _, b in sizes) / len(sizes) / 1e6, per_layer_us))
            models[f"{precision}:{kind}"] = fit_kernel_model(samples)
            raw[f"{precision}:{kind}"] = [[round(v, 5) for v in smp] for smp in samples]
    return models, raw


# --------------------------------------------------------------------------- timing


def _median_ms(run, seconds: float = MEASURE_SECONDS) -> float:
    import statistics

    from .profiling import time_runs

    time_runs(run, warmup=3, repeats=0)
    return statistics.median(time_runs(run, repeats=5, min_seconds=seconds))


def _ort_ms(model, feed, threads: int, seconds: float = MEASURE_SECONDS) -> float:
    from .fidelity import session

    sess = session(model, threads=threads)
    return _median_ms(lambda: sess.run(None, feed), seconds)


def _ov_ms(model, feed, threads: int, hint: str, seconds: float = MEASURE_SECONDS) -> float:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
                                   "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    return _median_ms(lambda: req.infer(feed), seconds)


#: The synthetic layer of each kernel kind: (cin, cout, hw, k, groups) for convolutions, (m, k, n) for gemm.
CONV_SHAPES = {"conv": (64, 64, 56, 3, 1), "pointwise": (128, 128, 28, 1, 1), "depthwise": (128, 128, 56, 3, 128)}
#: Tiny convolutions (8 channels, 4x4) chained to measure the cost of one more node.
_CHAIN = 33


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy seconds of all CPUs, seconds of this process) now; None where /proc/stat is missing."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / tick
    t = os.times()
    return busy, t.user + t.system


def other_load(before: tuple[float, float] | None, after: tuple[float, float] | None, seconds: float) -> float | None:
    """CPUs kept busy by other processes between two :func:`_cpu_seconds` readings (0: none, 1: one whole CPU)."""
    if before is None or after is None or seconds <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / seconds)


#: Other processes' load (in CPUs) above which a measurement is repeated once (the quieter one is kept).
BUSY_RETRY = 0.25


def run_microbench(threads: int | None = None) -> dict[str, Any]:
    """Measure this machine's kernel rates, bandwidth and per-node overhead (a few seconds).

    Other processes' CPU load during the run is recorded (``other_load``, in CPUs); on a
    busy machine the benchmark runs a second time and the quieter run is kept.
    """
    first = _measure(threads)
    if (first.get("other_load") or 0.0) <= BUSY_RETRY:
        return first
    second = _measure(threads)
    return min(first, second, key=lambda r: r.get("other_load") or 0.0)


def _measure(threads: int | None) -> dict[str, Any]:
    import onnxruntime as ort

    from .hostinfo import bf16_native, detect, int8_scheme

    cpu = detect()
    n = threads or host_threads()
    start = time.perf_counter()
    cpu_before = _cpu_seconds()
    scheme = int8_scheme("onnxruntime", cpu.arch, cpu.features)
    wbits = scheme.weight_bits
    rates: dict[str, dict[str, float]] = {"fp32": {}, "int8": {}}
    times_ms: dict[str, float] = {}

    # per-node overhead first (it is taken out of the kernel times below)
    m1, f1, _ = _conv_chain([(8, 8, 1, 1)], 4)
    mc, fc, _ = _conv_chain([(8, 8, 1, 1)] * _CHAIN, 4)
    t1, tc = _ort_ms(m1, f1, n), _ort_ms(mc, fc, n)
    overhead_us = max(0.0, (tc - t1) / (_CHAIN - 1) * 1e3)
    times_ms["chain1"], times_ms[f"chain{_CHAIN}"] = t1, tc
    run_overhead_us = max(0.0, t1 * 1e3 - overhead_us)

    l2 = l2_bytes_per_core()
    elems = max(1 << 18, min(1 << 24, 2 * l2 * n // 4))
    ms_, fs_, sizes = _add_chain(elems, BANDWIDTH_CHAIN)
    moved = sum(b for _, b in sizes)
    t_stream = _ort_ms(ms_, fs_, n)
    times_ms["stream"] = t_stream
    bandwidth = moved / max(1e-9, (t_stream - (run_overhead_us + BANDWIDTH_CHAIN * overhead_us) / 1e3) / 1e3)

    def kernel_ms(ms: float) -> float:
        return max(1e-6, ms - (run_overhead_us + overhead_us) / 1e3)

    kernel_models, kernel_samples = measure_kernel_models(n, wbits, run_overhead_us)
    for key, samples in kernel_samples.items():  # the best rate each MAC-carrying kind reached on the grid
        precision, kind = key.split(":")
        if kind not in ("elementwise", "resize", "convtranspose"):
            rates[precision][kind] = max(2 * mmac * 1e6 / (us * 1e-6) for mmac, _, us in samples)

    # weight-only MatMulNBits at batch 1: the time beyond streaming its packed weights is its overhead
    weight_only: dict[str, float] = {}
    k_, n_ = 1024, 1024
    for bits, name in ((8, "wint8"), (4, "wint4")):
        model, feed, _ = _matmul_nbits(k_, n_, bits)
        ms = _ort_ms(model, feed, n)
        times_ms[name] = ms
        stream_us = (k_ * n_ * bits / 8 + k_ * n_ / 32 * 4) / bandwidth * 1e6
        weight_only[f"{name}_overhead_us"] = max(0.0, kernel_ms(ms) * 1e3 - stream_us)

    bf16: dict[str, float] = {}
    from importlib.util import find_spec

    if cpu.arch == "x86_64" and find_spec("openvino") is not None:
        cin, cout, hw, k, g = CONV_SHAPES["conv"]
        model, feed, sizes = _conv_chain([(cin, cout, k, g)], hw)
        macs = sizes[0][0]
        for hint, key in (("f32", "fp32"), ("bf16", "bf16")):
            if key == "bf16" and not bf16_native(cpu.arch, cpu.features):
                continue
            ms = _ov_ms(model, feed, n, hint)
            times_ms[f"openvino:{key}:conv"] = ms
            bf16[key] = 2 * macs / (kernel_ms(ms) / 1e3)

    elapsed = time.perf_counter() - start
    load = other_load(cpu_before, _cpu_seconds(), elapsed)
    return {
        "schema": SCHEMA, "key": cache_key(), "created_utc": _now(), "threads": n,
        "cpu": {"arch": cpu.arch, "model_name": cpu.model_name, "microarchitecture": cpu.microarchitecture,
                "kernel_class": cpu.kernel_class, "features": cpu.features, "cores": cpu.cores},
        "versions": {"onnxruntime": ort.__version__, **{k: v for k, v in _versions().items() if k != "onnxruntime"}},
        "int8_weight_bits": wbits,
        "kernel_models": kernel_models,
        "kernel_samples_mmac_mb_us": kernel_samples,
        "rates_ops_per_s": rates,
        "openvino_conv_ops_per_s": bf16,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "bandwidth_tensor_bytes": elems * 4,
        "l2_bytes_per_core": l2,
        "layer_overhead_us": overhead_us,
        "run_overhead_us": run_overhead_us,
        **weight_only,
        "times_ms": times_ms,
        "other_load": None if load is None else round(load, 3),
        "seconds": round(elapsed, 3),
    }


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the target


#: What onnxruntime's CPU provider folds into a preceding Conv/Gemm (activation fusion, BatchNormalization), checked
#: on its optimized graphs.  An Add/Div by a constant stays a node of its own, and so does a Mul by a constant
#: unless the constant is an initializer of a per-channel shape (PaddlePaddle's scale blocks, Constant nodes, are not
#: folded): counted as a layer.
ORT_FUSES = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "BatchNormalization")


def host_target(bench: dict[str, Any] | None = None):
    """The ``host`` :class:`~edgeopt.types.Target` (runs or loads the cached micro-benchmark)."""
    return _host_target_cached() if bench is None else _build(bench)


@lru_cache(maxsize=1)
def _host_target_cached():
    return _build(load_or_run())


def _build(b: dict[str, Any]):
    from .hostinfo import bf16_native, detect
    from .types import Target

    cpu = detect()
    arch = cpu.arch if cpu.arch in ("x86_64", "arm64") else None
    family = {"x86_64": "x86-cpu", "arm64": "arm64-cpu"}.get(cpu.arch)
    threads = int(b["threads"])
    rates = b["rates_ops_per_s"]
    peak = {p: max(rates[p].values()) for p in ("fp32", "int8")}
    ov = b.get("openvino_conv_ops_per_s") or {}
    bf16 = "bf16" in ov and bf16_native(cpu.arch, cpu.features)
    if bf16:
        peak["bf16"] = ov["bf16"]

    def eff(p: str, kind: str) -> float:
        return min(1.0, rates[p][kind] / peak[p])

    ort_eff: dict[str, float] = {"fp32": eff("fp32", "gemm"), "int8": eff("int8", "gemm"),
                                 "wint8": eff("fp32", "gemm"), "wint4": eff("fp32", "gemm")}
    wide = "avx512f" in cpu.features
    backends: list[dict[str, Any]] = [{
        "backend": "onnxruntime", "unit": "cpu",
        "options": {"provider": "CPUExecutionProvider", "threads": threads, "channel_multiple": 16 if wide else 8},
        "precisions": ["fp32", "int8", "wint8", "wint4"],
        "efficiency_by_precision": ort_eff,
        "kernel_models": b["kernel_models"],
        "fuses": list(ORT_FUSES),
        "nchwc": cpu.arch == "x86_64",
        "overhead_us_by_precision": {"wint8": round(b.get("wint8_overhead_us", 0.0), 2),
                                     "wint4": round(b.get("wint4_overhead_us", 0.0), 2)},
        "sparsity": [{"pattern": "channel"}],
    }]
    if cpu.arch == "x86_64" and "fp32" in ov:
        ov_eff = {"fp32": round(min(1.0, ov["fp32"] / rates["fp32"]["conv"]), 4), "int8": 1.0}
        if bf16:
            ov_eff["bf16"] = 1.0
        backends.append({
            "backend": "openvino", "unit": "cpu", "options": {"device": "CPU", "threads": threads},
            "precisions": ["fp32", "int8"] + (["bf16"] if bf16 else []),
            "efficiency_by_precision": ov_eff,
            "sparsity": [{"pattern": "channel"},
                         {"pattern": "unstructured", "speedup": 1.0, "precisions": ["int8"], "compresses_storage": True}],
        })
    ram = max(1 << 28, cpu.ram_bytes // 2)
    data = {
        "name": "host",
        "description": f"this machine: {cpu.model_name} ({cpu.microarchitecture}, {cpu.kernel_class} kernels), "
                       f"{threads} thread(s); compute model measured by edgeopt's micro-benchmark",
        "device_class": "cpu",
        "family": family,
        "budgets": {"ram": ram, "storage": min(max(1 << 30, ram), 16 << 30), "latency_ms": 100, "weights_in_ram": True},
        "compute_units": {"cpu": {
            "description": (f"{threads} thread(s); measured peaks: "
                            + ", ".join(f"{p} {v / 1e9:.0f} Gop/s" for p, v in peak.items())
                            + f"; {b['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s elementwise bandwidth"),
            "peak_ops_per_s": {p: float(f"{v:.4g}") for p, v in peak.items()},
            "memory_bandwidth_bytes_per_s": float(f"{b['memory_bandwidth_bytes_per_s']:.4g}"),
            "efficiency": 1.0,
            "layer_overhead_us": round(b["layer_overhead_us"], 3),
            "run_overhead_us": round(b.get("run_overhead_us", 0.0), 3),
            "arch": arch,
            "isa": cpu.features if arch else [],
        }},
        "backends": backends,
    }
    return Target.model_validate(data)
