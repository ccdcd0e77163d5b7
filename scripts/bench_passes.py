"""Bench every compression pass on real models: size, onnxruntime CPU latency vs
fp32, output fidelity (top-1 agreement, SNR) and, with labels, accuracy.

    python scripts/bench_passes.py [--models digits,mobilenetv2] [--threads 1] [--out bench.json]

Models: the digits CNN (accuracy on 360 held-out digits) and MobileNetV2 with its
ImageNet weights (agreement with fp32 on crops of scikit-image's photos; calibration
and evaluation use different crops).  onnxruntime's own ``quantize_static`` with
default arguments is measured in the same run as the reference for int8.  Latency
is measured interleaved across models, batch 1, fixed threads.

Not a timed test: numbers depend on the machine; the checks at the end print
PASS/FAIL for the issue's requirements.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeopt.calibration import as_calibration  # noqa: E402
from edgeopt.datasets import default_model_path, digits  # noqa: E402
from edgeopt.fidelity import compare  # noqa: E402
from edgeopt.passes import run_pass  # noqa: E402
from edgeopt.profiling import interleaved_latency  # noqa: E402

RECIPES: list[tuple[str, str, dict]] = [
    ("cleanup", "cleanup", {}),
    ("fp16", "fp16", {}),
    ("bf16 weights", "bf16", {}),
    ("int8 default", "int8", {}),  # percentile 99.99, per-channel, uint8 activations
    ("int8 minmax", "int8", {"calibration": "minmax"}),
    ("int8 percentile", "int8", {"calibration": "percentile"}),
    ("int8 entropy", "int8", {"calibration": "entropy"}),
    ("int8 +bias corr", "int8", {"bias_correction": True}),
    ("int8 +CLE+bias corr", "int8", {"cross_layer_equalization": True, "bias_correction": True}),
    ("weight-only int8", "weight_only", {"bits": 8, "accuracy_level": 4}),
    ("weight-only int4", "weight_only", {"bits": 4, "accuracy_level": 4}),
    ("unstructured 50%", "prune", {"pattern": "unstructured", "sparsity": 0.5}),
    ("2:4", "prune", {"pattern": "n:m"}),
    ("channel 30%", "channel_prune", {"ratio": 0.3, "round_to": 16}),  # 16: AVX-512 blocked conv kernels
    ("channel 30% no recon", "channel_prune", {"ratio": 0.3, "round_to": 16, "reconstruct": False}),
    ("low-rank 95% energy", "lowrank", {}),
    ("palettize 4-bit", "palettize", {"bits": 4}),
]


def load(name: str):
    if name == "digits":
        m = onnx.load(str(default_model_path()))
        xc, _ = digits("calib")
        xt, yt = digits("test")
        return m, as_calibration(xc, m), as_calibration(xt, m, labels=yt), {"image": xt[:1]}
    if name == "mobilenetv2":
        from edgeopt.zoo import imagenet_samples, mobilenetv2_path

        m = onnx.load(str(mobilenetv2_path()))
        xc = imagenet_samples(64, seed=0)
        xt = imagenet_samples(100, seed=1)
        return m, as_calibration(xc, m), as_calibration(xt, m), {"input": xt[:1]}
    raise SystemExit(f"unknown model {name}")


def ort_default_int8(model: onnx.ModelProto, calib) -> onnx.ModelProto:
    from onnxruntime.quantization import quantize_static

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d, "in.onnx"), Path(d, "out.onnx")
        onnx.save(model, str(src))
        quantize_static(str(src), str(dst), calib.ort_reader())
        return onnx.load(str(dst))


def bench(name: str, threads: int, only: set[str] | None) -> list[dict]:
    model, calib, test, feed = load(name)
    rows: list[dict] = []
    models: dict[str, onnx.ModelProto] = {"fp32": model}
    info: dict[str, dict] = {"fp32": {"size": model.ByteSize(), "fidelity": compare(model, model, test)}}
    t = time.perf_counter()
    models["ORT quantize_static default"] = ort_default_int8(model, calib)
    info["ORT quantize_static default"] = {"size": models["ORT quantize_static default"].ByteSize(),
                                           "fidelity": compare(model, models["ORT quantize_static default"], test),
                                           "seconds": time.perf_counter() - t}
    for label, pass_name, cfg in RECIPES:
        if only and label not in only and pass_name not in only:
            continue
        t = time.perf_counter()
        try:
            res = run_pass(pass_name, model, cfg, calib, evaluate=False)
        except Exception as e:  # a pass failing is a result too
            print(f"[{name}] {label}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"model": name, "recipe": label, "error": f"{type(e).__name__}: {e}"})
            continue
        models[label] = res.model
        info[label] = {"size": res.model.ByteSize(), "fidelity": compare(model, res.model, test),
                       "seconds": time.perf_counter() - t, "changed": len(res.report.applied), "skipped": len(res.report.skipped)}
        print(f"[{name}] {label}: built in {info[label]['seconds']:.1f}s", file=sys.stderr)
    lat = interleaved_latency(models, feed, threads=threads)
    base = lat["fp32"]["p50"]
    for label in models:
        f = info[label]["fidelity"]
        rows.append({
            "model": name, "recipe": label, "size_bytes": info[label]["size"],
            "size_ratio": info[label]["size"] / info["fp32"]["size"], "p50_ms": lat[label]["p50"],
            "speedup": base / lat[label]["p50"], "top1_agreement": f.top1_agreement, "snr_db": f.snr_db,
            "accuracy": f.accuracy, "accuracy_delta": f.accuracy_delta,
            "nodes_changed": info[label].get("changed"), "nodes_skipped": info[label].get("skipped"),
        })
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | recipe | size | size ratio | p50 ms | speed-up | top-1 agree | SNR dB | accuracy (delta) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['recipe']} | failed: {r['error'][:60]} | | | | | | |")
            continue
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.4f} ({r['accuracy_delta']:+.4f})"
        agree = "" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['size_bytes'] / 1024:.0f} KiB | {r['size_ratio']:.2f} | "
                     f"{r['p50_ms']:.3f} | {r['speedup']:.2f}x | {agree} | {r['snr_db']:.1f} | {acc} |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[str]:
    out = []
    for model in sorted({r["model"] for r in rows}):
        by = {r["recipe"]: r for r in rows if r["model"] == model and "error" not in r}
        ref, ours = by.get("ORT quantize_static default"), by.get("int8 default")
        if ref and ours:
            ok = ours["speedup"] >= ref["speedup"] * 0.95 and (ours["top1_agreement"] or 0) >= (ref["top1_agreement"] or 0)
            out.append(f"{'PASS' if ok else 'FAIL'} {model}: int8 {ours['speedup']:.2f}x / agreement {ours['top1_agreement']:.3f}"
                       f" vs ORT default {ref['speedup']:.2f}x / {ref['top1_agreement']:.3f} (speed within 5% noise counts)")
        ch = by.get("channel 30%")
        if ch:
            out.append(f"{'PASS' if ch['speedup'] > 1.0 else 'FAIL'} {model}: channel pruning 30% speed-up {ch['speedup']:.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,mobilenetv2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", help="comma-separated recipe labels or pass names")
    ap.add_argument("--out", type=Path, help="write the rows as JSON")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    rows = [r for m in args.models.split(",") for r in bench(m.strip(), args.threads, only)]
    print(table(rows))
    print()
    print("\n".join(checks(rows)))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
