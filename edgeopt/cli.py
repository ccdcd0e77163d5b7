"""The ``edgeopt`` command line.  Thin: parses arguments, calls the library, prints.

Errors a user can fix print ``error: <one line>`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import EdgeoptError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="ONNX model file")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS",
                   help="static shape for a dynamic input, e.g. x=1x3x224x224 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgeopt", description="Hardware-aware deployment optimizer for ONNX models.")
    ap.add_argument("--version", action="version", version=f"edgeopt {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("targets", help="list or show device targets")
    tsub = t.add_subparsers(dest="targets_cmd", required=True, metavar="list|show")
    tl = tsub.add_parser("list", help="the built-in targets")
    tl.add_argument("--json", action="store_true")
    ts = tsub.add_parser("show", help="one target, fully resolved")
    ts.add_argument("name", help="built-in name or path to a target .yaml")
    ts.add_argument("--json", action="store_true")

    a = sub.add_parser("analyze", help="per-layer params, MACs, memory; op pre-flight and predicted latency on a target")
    _add_model_args(a)
    a.add_argument("--target", help="built-in target name or .yaml path")
    a.add_argument("--top", type=int, help="show only the N layers with the most arithmetic")
    a.add_argument("--json", action="store_true", help="print the analysis as JSON")

    pl = sub.add_parser("plan", help="choose backend and per-layer precision for a target")
    _add_model_args(pl)
    pl.add_argument("--target", required=True, help="built-in target name or .yaml path")
    pl.add_argument("--backend", help="restrict to one backend of the target")
    pl.add_argument("--precision", help="force one precision recipe (fp32, fp16, bf16, int8, wint8, wint4)")
    pl.add_argument("-o", "--output", type=Path, help="write the plan as JSON to this file")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    c = sub.add_parser("compress", help="apply one compression pass (ONNX -> ONNX) and report its effect")
    _add_model_args(c)
    c.add_argument("--pass", dest="pass_name", required=True,
                   help="cleanup, fp16, bf16, int8, weight_only, prune, channel_prune, lowrank, palettize")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help='a pass config field, value as JSON or a bare string, e.g. --set ratio=0.3 --set \'exclude=["/14/Gemm"]\'')
    c.add_argument("--calib", type=Path, help="calibration data: a folder of .npy/.npz files, or one .npy/.npz file")
    c.add_argument("--labels", type=Path, help=".npy labels for the calibration samples (reports accuracy)")
    c.add_argument("-o", "--output", type=Path, required=True, help="where to write the transformed .onnx")
    c.add_argument("--json", action="store_true", help="print the pass report as JSON")

    d = sub.add_parser("demo", help="analyse and plan the embedded default model (a digits CNN)")
    d.add_argument("--target", default="mcu-cortex-m7", help="target (default: mcu-cortex-m7)")
    return ap


def _cmd_targets(args: argparse.Namespace) -> int:
    from .targets import builtin_names, load_target

    if args.targets_cmd == "list":
        targets = [load_target(n) for n in builtin_names()]
        if args.json:
            print(json.dumps([t.model_dump(mode="json") for t in targets], indent=2))
        else:
            from .render import console, targets_table

            targets_table(targets, console())
        return 0
    tg = load_target(args.name)
    if args.json:
        print(json.dumps(tg.model_dump(mode="json"), indent=2))
    else:
        from .render import console, target_detail

        target_detail(tg, console())
    return 0


def _load(args: argparse.Namespace):
    from .graph import analyze, parse_input_shapes
    from .targets import load_target

    target = load_target(args.target) if getattr(args, "target", None) else None  # bad target: fail before the model
    return analyze(args.model, parse_input_shapes(args.input_shape)), target


def _cmd_analyze(args: argparse.Namespace) -> int:
    analysis, target = _load(args)
    if args.json:
        print(analysis.model_dump_json(indent=2))
        return 0
    from .render import analysis_summary, console, target_fit

    out = console()
    analysis_summary(analysis, out, top=args.top)
    if target is not None:
        target_fit(analysis, target, out)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .planner import make_plan

    analysis, target = _load(args)
    plan = make_plan(analysis, target, backend=args.backend, precision=args.precision)
    if args.output:
        from .io import atomic_write_text

        atomic_write_text(args.output, plan.model_dump_json(indent=2) + "\n")
    if args.json:
        print(plan.model_dump_json(indent=2))
    else:
        from .render import console, plan_summary

        plan_summary(plan, console())
        if args.output:
            print(f"wrote {args.output}")
    return 0


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgeoptError(f"bad --set '{item}'; expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_compress(args: argparse.Namespace) -> int:
    import numpy as np

    from .calibration import as_calibration
    from .graph import load_model
    from .io import atomic_write_model
    from .passes import run_pass

    model = load_model(args.model, load_external_data=True)
    calib = None
    if args.calib is not None:
        if not args.calib.exists():
            raise EdgeoptError(f"calibration data {args.calib} does not exist")
        labels = np.load(args.labels) if args.labels else None
        if args.calib.is_dir():
            data = args.calib
        elif args.calib.suffix == ".npz":
            with np.load(args.calib) as z:
                data = {k: z[k] for k in z.files}
        else:
            data = np.load(args.calib)
        calib = as_calibration(data, model, labels=labels)
    result = run_pass(args.pass_name, model, _parse_sets(args.set), calib, eval_limit=None)
    atomic_write_model(result.model, args.output)
    if args.json:
        print(result.report.model_dump_json(indent=2))
    else:
        print(result.report.summary())
        for s in result.report.skipped:
            print(f"  skipped {s.node}: {s.reason}")
        for n in result.report.notes:
            print(f"  note: {n}")
        print(f"wrote {args.output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .datasets import default_model_path, digits
    from .graph import analyze
    from .planner import make_plan
    from .render import analysis_summary, console, plan_summary, target_fit
    from .targets import load_target

    target = load_target(args.target)
    out = console()
    out.print("[bold]edgeopt demo[/]: a small CNN trained on scikit-learn's digits (8x8 images, 10 classes)\n")
    analysis = analyze(default_model_path())
    analysis_summary(analysis, out)
    try:
        import onnxruntime as ort
    except ImportError:
        out.print("(onnxruntime is not installed: accuracy not measured; pip install 'edgeopt[onnxruntime]')")
    else:
        x, y = digits("test")
        sess = ort.InferenceSession(str(default_model_path()), providers=["CPUExecutionProvider"])
        acc = float((sess.run(None, {"image": x})[0].argmax(1) == y).mean())
        out.print(f"fp32 accuracy on {len(y)} held-out digits: {acc:.4f} (onnxruntime {ort.__version__})")
    target_fit(analysis, target, out)
    plan_summary(make_plan(analysis, target), out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"targets": _cmd_targets, "analyze": _cmd_analyze, "plan": _cmd_plan, "compress": _cmd_compress,
               "demo": _cmd_demo}[args.cmd]
    try:
        return handler(args)
    except EdgeoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
