"""Is the planner's artifact on or beyond the Pareto front of fixed recipes?

    python scripts/bench_planner.py [--models digits,mobilenetv2] [--drops 0.005,0.02] [--threads 1]

For the x86-cpu target (onnxruntime backend) it builds, in one run: the fixed
recipes fp32, fp16, uniform int8 static and weight-only int8, and the planner's
artifacts for each accuracy budget (``--max-accuracy-drop``); then measures
all of them interleaved (batch 1, fixed threads) and scores them on held-out
data (digits: accuracy vs labels; MobileNetV2: top-1 agreement with fp32 on
crops not used for calibration).  A planner point passes when no fixed recipe
is both faster and at least as good.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeopt.fidelity import compare  # noqa: E402
from edgeopt.pipeline import BuildInputs, plan_for  # noqa: E402
from edgeopt.planner import make_plan  # noqa: E402
from edgeopt.profiling import interleaved_latency  # noqa: E402
from edgeopt.sensitivity import measure  # noqa: E402
from edgeopt.targets import load_target  # noqa: E402


def inputs_for(name: str) -> BuildInputs:
    if name == "digits":
        return BuildInputs.default_model()
    if name == "mobilenetv2":
        from edgeopt.zoo import imagenet_samples, mobilenetv2_path

        return BuildInputs.prepare(mobilenetv2_path(), calib=imagenet_samples(64, seed=0),
                                   eval_data=imagenet_samples(128, seed=1))
    raise SystemExit(f"unknown model {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,mobilenetv2")
    ap.add_argument("--drops", default="0.005,0.02,0.05")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-measure-latency", dest="measure_latency", action="store_false",
                    help="plan on the roofline model only, not on layer times profiled here")
    args = ap.parse_args()
    import onnx

    from edgeopt.backends.onnxruntime import apply_precisions
    from edgeopt.pipeline import structural_passes

    target = load_target("x86-cpu")
    ok_all = True
    for name in args.models.split(","):
        inp = inputs_for(name)
        sens = measure(inp.model, inp.calib, progress=lambda m: print(m, end="\r", file=sys.stderr))
        models: dict[str, onnx.ModelProto] = {}
        for recipe in ("fp32", "int8", "wint8"):
            plan = make_plan(inp.analysis, target, backend="onnxruntime", precision=recipe)
            models[f"recipe {recipe}"], _ = apply_precisions(inp.model, plan, inp.calib)
        fp16_plan = make_plan(inp.analysis, load_target("gpu-server"), backend="onnxruntime", precision="fp16")
        models["recipe fp16"], _ = apply_precisions(inp.model, fp16_plan, inp.calib)
        plans = {}
        for drop in [float(d) for d in args.drops.split(",")]:
            plan = plan_for(inp, target, backend="onnxruntime", max_accuracy_drop=drop, sensitivity=sens,
                            measure_latency=args.measure_latency)
            structural, _ = structural_passes(inp.model, plan, inp.calib)
            models[f"planner drop<={drop}"], _ = apply_precisions(structural, plan, inp.calib)
            plans[f"planner drop<={drop}"] = plan
        feed = next(inp.evaluation.batches(1))
        with tempfile.TemporaryDirectory():
            lat = interleaved_latency(models, feed, threads=args.threads)
        quality = {}
        for k, m in models.items():
            f = compare(inp.model, m, inp.evaluation)
            quality[k] = f.accuracy if f.accuracy is not None else f.top1_agreement
        print(f"\n{name} on x86-cpu (onnxruntime, {args.threads} thread(s), batch 1)")
        print("| artifact | p50 ms | quality | layers int8/wint8/fp32/pruned |")
        print("|---|---|---|---|")
        for k in models:
            mix = ""
            if k in plans:
                lps = plans[k].layers
                mix = "/".join(str(sum(lp.precision == p for lp in lps if lp.op_type in ("Conv", "Gemm", "MatMul")))
                               for p in ("int8", "wint8", "fp32"))
                mix += f"/{sum(lp.sparsity != 'none' for lp in lps)}"
            print(f"| {k} | {lat[k]['p50']:.3f} | {quality[k]:.4f} | {mix} |")
        for k in plans:
            beaten_by = [r for r in models if r.startswith("recipe") and lat[r]["p50"] < lat[k]["p50"] * 0.97
                         and quality[r] >= quality[k]]
            ok = not beaten_by
            ok_all &= ok
            print(f"{'PASS' if ok else 'FAIL'} {name} {k}: " + ("on or beyond the recipes' Pareto front" if ok else
                                                              f"dominated by {', '.join(beaten_by)}"))
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
