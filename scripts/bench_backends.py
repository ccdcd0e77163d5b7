"""fp32 vs int8 artifacts per backend, next to the peers' own defaults.

    python scripts/bench_backends.py [--models digits,mobilenetv2] [--threads 1]

For every backend whose runtime exists here (onnxruntime, OpenVINO, LiteRT with
XNNPACK on this x86 host) it builds an fp32 and an int8 artifact with edgeopt,
measures both in the backend's runtime (batch 1, fixed threads, interleaved), and
adds the peer default: onnxruntime ``quantize_static()`` with default arguments,
and ``nncf.quantize()`` with default arguments on the OpenVINO IR.  Quality is the
top-1 agreement with the ONNX fp32 model on held-out inputs (digits: accuracy).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeopt.backends.base import build_artifact, open_artifact  # noqa: E402
from edgeopt.fidelity import compare_outputs, run  # noqa: E402
from edgeopt.pipeline import BuildInputs  # noqa: E402
from edgeopt.planner import make_plan  # noqa: E402
from edgeopt.profiling import time_runs  # noqa: E402
from edgeopt.targets import load_target  # noqa: E402

BACKENDS = (("onnxruntime", "x86-cpu"), ("openvino", "x86-cpu"), ("tflite", "android-mid"))


def inputs_for(name: str) -> BuildInputs:
    if name == "digits":
        return BuildInputs.default_model()
    from edgeopt.zoo import imagenet_samples, mobilenetv2_path

    return BuildInputs.prepare(mobilenetv2_path(), calib=imagenet_samples(64, seed=0), eval_data=imagenet_samples(64, seed=1))


def quality(inp: BuildInputs, runner_run) -> float:
    ref = run(inp.model, inp.evaluation)
    outs = [np.asarray(runner_run(f)[0]) for f in inp.evaluation.batches(1)]
    f = compare_outputs(ref, [np.concatenate(outs)], inp.evaluation.labels)
    return f.accuracy if f.accuracy is not None else f.top1_agreement


def peers(inp: BuildInputs, threads: int, d: Path) -> dict[str, object]:
    """Runners for onnxruntime's and nncf's default int8."""
    import onnx
    import openvino as ov
    from onnxruntime.quantization import quantize_static

    from edgeopt.backends.onnxruntime import OrtRunner
    from edgeopt.backends.openvino import OpenVinoRunner

    src, dst = d / "fp32.onnx", d / "ort_default.onnx"
    onnx.save(inp.model, str(src))
    quantize_static(str(src), str(dst), inp.calib.ort_reader())
    import nncf

    ov_model = ov.convert_model(str(src))
    q = nncf.quantize(ov_model, nncf.Dataset(list(inp.calib.batches(1))))
    ov.save_model(q, str(d / "nncf_default.xml"), compress_to_fp16=False)
    cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    return {"onnxruntime quantize_static()": OrtRunner(dst, threads=threads).run,
            "nncf.quantize() (OpenVINO)": OpenVinoRunner(d / "nncf_default.xml", "CPU", cfg).run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,mobilenetv2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    for name in args.models.split(","):
        inp = inputs_for(name)
        feed = next(inp.evaluation.batches(1))
        runners: dict[str, object] = {}
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            for backend, target_name in BACKENDS:
                target = load_target(target_name)
                for precision in ("fp32", "int8"):
                    plan = make_plan(inp.analysis, target, backend=backend, precision=precision)
                    opts = dict(plan.backend_options, threads=args.threads)
                    plan = plan.model_copy(update={"backend_options": opts})
                    target_opts = [o for o in target.backends if o.backend == backend][0]
                    plan = plan.model_copy(update={"target_definition": target.model_copy(update={"backends": [
                        target_opts.model_copy(update={"options": opts})]})})
                    out = d / f"{backend}-{precision}"
                    build_artifact(inp.model, plan, out, inp.calib)
                    runners[f"edgeopt {backend} {precision}"] = open_artifact(out)[1].run
            runners.update(peers(inp, args.threads, d))
            for r in runners.values():
                time_runs(lambda r=r, f=feed: r(f), warmup=10, repeats=0)
            samples: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(args.rounds):
                for k, r in runners.items():
                    samples[k] += time_runs(lambda r=r, f=feed: r(f), repeats=20)
            p50 = {k: float(np.median(v)) for k, v in samples.items()}
            print(f"\n{name}: batch 1, {args.threads} thread(s)")
            print("| artifact | p50 ms | vs its fp32 | quality |")
            print("|---|---|---|---|")
            for k, r in runners.items():
                backend = k.split()[1] if k.startswith("edgeopt") else ("onnxruntime" if "onnxruntime" in k else "openvino")
                base = p50.get(f"edgeopt {backend} fp32")
                print(f"| {k} | {p50[k]:.3f} | {base / p50[k]:.2f}x | {quality(inp, r):.4f} |")


if __name__ == "__main__":
    main()
