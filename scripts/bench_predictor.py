"""Is the latency predictor honest about this machine (the ``host`` target)?

    python scripts/bench_predictor.py [--refresh] [--models digits,mobilenetv2,ppocr-det] [--ppocr-size 640]
                                      [--no-int8] [--rounds 5]

Prints the host's ISA (``edgeopt.hostinfo.detect()``), the micro-benchmark behind the
``host`` target's compute model, and per model and precision (fp32, int8 as edgeopt's
int8 pass emits it): the planner's predicted latency (``make_plan(..., backend=
"onnxruntime")``), the measured median (onnxruntime CPU, batch 1, the target's thread
count, all variants measured interleaved with ``profiling.time_runs``), their ratio and
PASS/FAIL for +-25%; then the prediction after one saved profile calibrates it (the
factor ``profiling.calibration_for`` derives per (target, backend, unit)) and
PASS/FAIL for +-10%.  The profile that calibrates a model's prediction is the one of
the *next* model in the list (same precision): calibrating a model with its own
profile would reproduce its measurement by construction.

Models: the digits CNN (embedded), MobileNetV2 (ImageNet weights, ``edgeopt.zoo``) and
PP-OCRv4 det (``rapidocr_onnxruntime``'s models folder, static input 1x3xSxS).
Other processes' CPU load during the measurements is printed: on a shared machine it
moves measured times (and the micro-benchmark) more than the predictor's error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from edgeopt import hostinfo, microbench  # noqa: E402
from edgeopt.graph import analyze  # noqa: E402
from edgeopt.planner import make_plan  # noqa: E402
from edgeopt.profiling import calibration_for, save_profile, time_runs  # noqa: E402
from edgeopt.targets import load_target  # noqa: E402
from edgeopt.types import Profile  # noqa: E402


def ppocr_det_path() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("rapidocr-onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "ch_PP-OCRv4_det_infer.onnx"


def model_spec(name: str, size: int):
    """(path, input shapes or None, calibration samples)."""
    rng = np.random.default_rng(0)
    if name == "digits":
        from edgeopt.datasets import default_model_path, digits

        return default_model_path(), None, digits("calib")[0][:64]
    if name == "mobilenetv2":
        from edgeopt.zoo import imagenet_samples, mobilenetv2_path

        return mobilenetv2_path(), None, imagenet_samples(16, seed=0)
    if name == "ppocr-det":
        return ppocr_det_path(), {"x": [1, 3, size, size]}, rng.random((2, 3, size, size), dtype=np.float32)
    raise SystemExit(f"unknown model {name}; valid: digits, mobilenetv2, ppocr-det")


def int8_model(path: Path, calib_x: np.ndarray, shapes):
    """The model as edgeopt's int8 pass emits it (after cleanup: Constant weights become initializers)."""
    import onnx

    from edgeopt.calibration import as_calibration
    from edgeopt.graph import fix_input_shapes
    from edgeopt.passes import run_pass

    m = onnx.load(str(path))
    if shapes:
        fix_input_shapes(m, shapes)
    m = run_pass("cleanup", m, evaluate=False).model
    return run_pass("int8", m, {}, as_calibration(calib_x, m), evaluate=False).model


def busy_cpus(fn):
    """(result of fn(), CPUs other processes kept busy meanwhile)."""
    before, t = microbench._cpu_seconds(), time.perf_counter()
    out = fn()
    return out, microbench.other_load(before, microbench._cpu_seconds(), time.perf_counter() - t)


def fmt_load(x) -> str:
    return "n/a" if x is None else f"{x:.2f} CPUs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,mobilenetv2,ppocr-det")
    ap.add_argument("--ppocr-size", type=int, default=640)
    ap.add_argument("--refresh", action="store_true", help="run the micro-benchmark again instead of using its cache")
    ap.add_argument("--no-int8", dest="int8", action="store_false")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds")
    ap.add_argument("--seconds", type=float, default=0.3, help="timed seconds per variant per round")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    cpu = hostinfo.detect()
    print(f"host: {cpu.model_name} | arch {cpu.arch} | microarchitecture {cpu.microarchitecture} | "
          f"kernel class {cpu.kernel_class} | {cpu.cores} core(s) | features {' '.join(cpu.features)} ({cpu.source})")
    scheme = hostinfo.int8_scheme("onnxruntime", cpu.arch, cpu.features)
    print(f"int8 scheme: {scheme.activation_type} activations, {scheme.weight_bits}-bit weights; "
          f"bf16 {'native' if hostinfo.bf16_native(cpu.arch, cpu.features) else 'not native'}")
    bench = microbench.load_or_run(refresh=args.refresh)
    microbench._host_target_cached.cache_clear()
    target = load_target("host")
    threads = int(target.backends[0].options["threads"])
    print(f"micro-benchmark ({microbench.cache_path()}; {bench['seconds']:.1f} s, other processes "
          f"{fmt_load(bench.get('other_load'))}), {threads} thread(s), onnxruntime {bench['versions']['onnxruntime']}:")
    for p, kinds in bench["rates_ops_per_s"].items():
        print(f"  {p:5} Gop/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in kinds.items()))
    for k, v in (bench.get("openvino_conv_ops_per_s") or {}).items():
        print(f"  openvino {k} conv: {v / 1e9:.0f} Gop/s")
    print(f"  bandwidth {bench['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (tensors of "
          f"{bench['bandwidth_tensor_bytes'] / 2**20:.0f} MiB, L2 {bench['l2_bytes_per_core'] / 2**20:.1f} MiB/core); "
          f"per-node overhead {bench['layer_overhead_us']:.2f} us; per-run overhead {bench['run_overhead_us']:.2f} us "
          f"(not in the prediction); MatMulNBits overhead wint8 {bench['wint8_overhead_us']:.1f} us, "
          f"wint4 {bench['wint4_overhead_us']:.1f} us")

    from edgeopt.fidelity import session

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    precisions = ["fp32", "int8"] if args.int8 else ["fp32"]
    variants: dict[tuple[str, str], dict] = {}
    for name in names:
        path, shapes, calib_x = model_spec(name, args.ppocr_size)
        a = analyze(path, shapes)
        feed_shape = {k: [d if d > 0 else 1 for d in v] for k, v in a.inputs.items()}
        feed = {k: np.random.default_rng(1).random(v, dtype=np.float32) for k, v in feed_shape.items()}
        for p in precisions:
            plan = make_plan(a, target, backend="onnxruntime", precision=p, enforce_budgets=False)
            model = str(path) if p == "fp32" else int8_model(path, calib_x, shapes)
            sess = session(model, threads=threads)
            time_runs(lambda s=sess, f=feed: s.run(None, f), warmup=5, repeats=0)
            variants[(name, p)] = {"plan": plan, "sess": sess, "feed": feed, "samples": [], "sha": a.sha256}

    def measure():
        for _ in range(args.rounds):
            for v in variants.values():
                v["samples"] += time_runs(lambda s=v["sess"], f=v["feed"]: s.run(None, f), repeats=3,
                                          min_seconds=args.seconds)

    _, load = busy_cpus(measure)
    print(f"\nmeasured interleaved, {args.rounds} rounds; other processes kept {fmt_load(load)} busy meanwhile")

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for v in variants.values():
            v["measured"] = statistics.median(v["samples"])
            v["predicted"] = v["plan"].predicted_latency_ms
        for i, name in enumerate(names):
            for p in precisions:
                v = variants[(name, p)]
                other = names[(i + 1) % len(names)]
                src = variants[(other, p)]
                cal_dir = Path(d) / f"{name}-{p}"
                prof = Profile(artifact_sha256=src["sha"], target="host", backend="onnxruntime", unit="cpu",
                               device="local", host={"unit": "cpu"}, threads=threads, warmup=5,
                               repeats=len(src["samples"]), latency_ms={"p50": src["measured"]},
                               predicted_latency_ms=src["predicted"], created_utc=microbench._now())
                save_profile(prof, cal_dir)
                cal = calibration_for(v["plan"], cal_dir)
                calibrated = cal.apply(v["predicted"]) if cal else None
                ratio = v["predicted"] / v["measured"]
                cal_ratio = calibrated / v["measured"] if calibrated else None
                rows.append({"model": name, "precision": p, "predicted_ms": v["predicted"], "measured_ms": v["measured"],
                             "predicted_over_measured": ratio, "pass_25": abs(ratio - 1) <= 0.25,
                             "calibrated_by": other, "calibrated_ms": calibrated, "calibrated_over_measured": cal_ratio,
                             "pass_10": cal_ratio is not None and abs(cal_ratio - 1) <= 0.10})
    hdr = f"{'model':12} {'prec':5} {'predicted':>10} {'measured':>10} {'pred/meas':>9} {'+-25%':>5}   " \
          f"{'calibrated (by)':>26} {'cal/meas':>8} {'+-10%':>5}"
    print(hdr)
    for r in rows:
        print(f"{r['model']:12} {r['precision']:5} {r['predicted_ms']:10.3f} {r['measured_ms']:10.3f} "
              f"{r['predicted_over_measured']:9.2f} {'PASS' if r['pass_25'] else 'FAIL':>5}   "
              f"{r['calibrated_ms']:11.3f} ({r['calibrated_by']:>12}) {r['calibrated_over_measured']:8.2f} "
              f"{'PASS' if r['pass_10'] else 'FAIL':>5}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": cpu.model_dump(), "bench": bench, "other_load": load,
                                               "rows": rows}, indent=2))
    return 0 if all(r["pass_25"] and r["pass_10"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
