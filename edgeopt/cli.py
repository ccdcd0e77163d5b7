"""The ``edgeopt`` command line.  Thin: parses arguments, calls the library, prints.

Errors a user can fix print ``error: <one line>`` and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from . import __version__
from .errors import EdgeoptError
from .technique import precision_names


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="ONNX model file")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS",
                   help="static shape for a dynamic input, e.g. x=1x3x224x224 (repeatable)")
    _add_max_memory_arg(p)


def _add_max_memory_arg(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--max-memory SIZE``: on the main parser (``edgeopt --max-memory 4GiB build ...``, every command) and on
    subcommands (after the subcommand; SUPPRESS so an absent one does not undo the main parser's)."""
    p.add_argument("--max-memory", metavar="SIZE", default=None if top else argparse.SUPPRESS,
                   help="memory limit for loading, analysing and running the model to find its shapes and for reading "
                        "data, e.g. 4GiB or 512MB (default: $EDGEOPT_MAX_MEMORY, else half the available memory, at "
                        "most 8 GiB); what would need more is refused")


@contextlib.contextmanager
def _memory_limit(args: argparse.Namespace):
    """Apply ``--max-memory`` for one command (model loading and analysis, calibration and label data)."""
    from .memory import memory_limit, parse_size

    text = getattr(args, "max_memory", None)
    with memory_limit(parse_size(text) if text is not None else None):
        yield


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", type=Path, help="calibration data: folder of .npy/.npz, or one .npy/.npz file; a folder "
                                              "of JPEG/PNG images (with --preprocess) or of WAV files (raw waveform)")
    p.add_argument("--eval", dest="eval_data", type=Path, help="held-out inputs for accuracy (default: the calibration data)")
    p.add_argument("--preprocess", choices=("imagenet", "unit", "raw", "none"),
                   help="how images of an image folder become inputs: imagenet (resize 256/crop 224 scaled to the "
                        "model's size, [0,1], ImageNet mean/std, RGB), unit (centre crop, [0,1]) or raw (0..255); "
                        "layout from the model's input shape")
    p.add_argument("--labels", type=Path, help=".npy labels of the --eval (or --calib) samples")
    p.add_argument("--max-accuracy-drop", type=float,
                   help="accuracy the plan may lose: top-1 accuracy with --labels, else top-1 agreement with the "
                        "original (absolute; default 0.01)")
    p.add_argument("--min-snr-db", type=float,
                   help="output SNR floor in dB for models without class scores (default 30)")
    p.add_argument("--objective", choices=("latency", "fidelity"), default="latency",
                   help="latency (default): the fastest plan within the accuracy budget, checked on the built "
                        "artifact; fidelity: the most faithful plan that meets the target's budgets")


def _add_inputs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", type=Path,
                   help="one run's inputs as .npz (or .npy for one input), in the model's input shapes, like "
                        "profile's: what the smoke run and timing feed (default: the first --eval/--calib sample; "
                        "zeros only without any data)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgeopt", description="Hardware-aware deployment optimizer for ONNX models.")
    ap.add_argument("--version", action="version", version=f"edgeopt {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    _add_max_memory_arg(ap, top=True)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("targets", help="list or show device targets")
    tsub = t.add_subparsers(dest="targets_cmd", required=True, metavar="list|show|detect")
    tl = tsub.add_parser("list", help="the built-in targets")
    tl.add_argument("--json", action="store_true")
    ts = tsub.add_parser("show", help="one target, fully resolved")
    ts.add_argument("name", help="built-in name or path to a target .yaml")
    ts.add_argument("--json", action="store_true")
    td = tsub.add_parser("detect", help="this machine's CPU: ISA features and what they imply (int8 scheme, bf16, fp16)")
    td.add_argument("--json", action="store_true")

    a = sub.add_parser("analyze", help="per-layer params, MACs, memory; op pre-flight and predicted latency on a target")
    _add_model_args(a)
    a.add_argument("--target", help="built-in target name or .yaml path")
    a.add_argument("--top", type=int, help="show only the N layers with the most arithmetic")
    a.add_argument("--json", action="store_true", help="print the analysis as JSON")

    pl = sub.add_parser("plan", help="choose backend and per-layer precision for a target")
    _add_model_args(pl)
    pl.add_argument("--target", required=True, help="built-in target name or .yaml path")
    pl.add_argument("--backend", help="restrict to one backend of the target")
    recipes = ", ".join(precision_names())
    pl.add_argument("--precision", help=f"force one precision recipe ({recipes})")
    _add_data_args(pl)
    pl.add_argument("-o", "--output", type=Path, help="write the plan as JSON to this file")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    b = sub.add_parser("build", help="plan, compress, convert, validate and profile one artifact for a target")
    b.add_argument("model", help="ONNX model file, or 'default' for the embedded digits CNN")
    b.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="static shape for a dynamic input")
    b.add_argument("--target", required=True, help="built-in target name or .yaml path")
    b.add_argument("--backend", help="restrict to one backend of the target")
    b.add_argument("--precision", help=f"force one precision recipe ({recipes})")
    b.add_argument("--plan", type=Path, help="replay this plan.json instead of planning")
    _add_data_args(b)
    _add_inputs_arg(b)
    _add_max_memory_arg(b)
    b.add_argument("-o", "--output", type=Path, required=True, help="output directory (replaced atomically)")

    f = sub.add_parser("fleet", help="build every target in parallel, with an HTML report")
    f.add_argument("model", help="ONNX model file, or 'default' for the embedded digits CNN")
    f.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="static shape for a dynamic input")
    f.add_argument("--targets", default="all", help="'all' or a comma-separated list of targets")
    f.add_argument("--jobs", type=int, default=2, help="targets built at once")
    _add_data_args(f)
    _add_inputs_arg(f)
    _add_max_memory_arg(f)
    f.add_argument("-o", "--output", type=Path, required=True, help="output directory (replaced atomically)")

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

    pr = sub.add_parser("profile", help="measure an artifact on a device: latency percentiles, peak memory, per-op times")
    pr.add_argument("artifact", type=Path, help="artifact directory (from edgeopt build)")
    pr.add_argument("--device", default="local",
                    help="local (default), ssh://[user@]host[:port], adb:SERIAL, or http://host:port (an edgeopt agent)")
    pr.add_argument("--token", help="the agent's token for --device http://... (default: $EDGEOPT_AGENT_TOKEN)")
    pr.add_argument("--ca-cert", type=Path, help="PEM certificate an https:// agent's certificate is checked against "
                                                 "(default: $EDGEOPT_AGENT_CA, else the system's trusted CAs)")
    pr.add_argument("--threads", type=int, help="intra-op threads (default: the artifact's setting, else every usable CPU)")
    pr.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    pr.add_argument("--repeats", type=int, default=100, help="timed runs (default 100)")
    pr.add_argument("--inputs", type=Path, help="inputs as .npz (or .npy for one input); default: random, local device only")
    pr.add_argument("--profiles-dir", type=Path, default=Path("profiles"),
                    help="where profiles are saved and calibration reads them (default: ./profiles)")
    pr.add_argument("--no-save", action="store_true", help="do not save the profile")
    pr.add_argument("--top", type=int, default=10, help="ops shown (default 10)")
    pr.add_argument("--json", action="store_true", help="print the profile as JSON (the saved path goes to stderr)")

    ag = sub.add_parser("agent", help="serve profiling on this device over HTTP (POST /profile with a token)")
    ag.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ag.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    ag.add_argument("--token", help="bearer token clients must send (default: $EDGEOPT_AGENT_TOKEN)")
    ag.add_argument("--max-upload-mb", type=float, default=256, help="largest artifact upload accepted (default 256 MiB)")
    ag.add_argument("--profiles-dir", type=Path, help="also save every profile measured here under this directory")
    ag.add_argument("--timeout", type=float, default=30.0,
                    help="seconds a connection may take to send a request's headers, and may wait on one read or write "
                         "(default 30); uploads must also keep up 64 KiB/s after that")
    ag.add_argument("--max-connections", type=int, default=16,
                    help="connections served at once (default 16); more wait 5 s for a free worker, then get HTTP 503")
    ag.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate (chain); needs --tls-key")
    ag.add_argument("--tls-key", type=Path, help="the PEM private key for --tls-cert")
    return ap


def _cmd_targets(args: argparse.Namespace) -> int:
    from .targets import builtin_names, load_target

    if args.targets_cmd == "detect":
        from .hostinfo import detect, implications

        cpu = detect()
        if args.json:
            print(json.dumps({**cpu.model_dump(mode="json"), "kernel_class": cpu.kernel_class,
                              "implications": dict(implications(cpu))}, indent=2))
        else:
            from .render import console, host_detail

            host_detail(cpu, console())
        return 0
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
    if args.top is not None and args.top < 1:
        raise EdgeoptError(f"--top must be at least 1, not {args.top}")
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


def _read_array_sources(args: argparse.Namespace):
    """The calibration and eval sources: folders or .npy/.npz files passed through (``edgeopt.calibration`` reads
    them with every check: regular files, no pickles, sizes within the memory limit, finite samples); folders of
    images (``--preprocess``) or WAV files read by ``edgeopt.datasources``."""
    from .datasources import wrap_data

    return wrap_data(args.calib, args.eval_data, preprocess=getattr(args, "preprocess", None))


def _inputs(args: argparse.Namespace):
    from .graph import parse_input_shapes
    from .pipeline import BuildInputs

    if str(args.model) == "default":
        if args.calib or args.eval_data or getattr(args, "inputs", None):
            raise EdgeoptError("'default' brings its own digits data; drop --calib/--eval/--inputs")
        return BuildInputs.default_model()
    calib, eval_data = _read_array_sources(args)
    return BuildInputs.prepare(Path(args.model), calib=calib, eval_data=eval_data, labels=args.labels,
                               input_shapes=parse_input_shapes(args.input_shape),
                               sample=getattr(args, "inputs", None))


def _progress():
    """A rich progress display for long work (stderr) and the callback that updates it.

    Status lines of the form ``"<stage> i/n: <detail>"`` (sensitivity, fleet targets) drive a bar with the elapsed
    time and an ETA; other lines show with a spinner and the elapsed time.
    """
    import re
    import threading

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                        transient=True)
    state: dict = {"task": None, "stage": None}
    counter = re.compile(r"^(?P<stage>[^:]*?)\s*(?P<i>\d+)/(?P<n>\d+)")
    lock = threading.Lock()  # a fleet reports from several threads

    def say(msg) -> None:
        with lock:
            _say(str(msg))

    def _say(msg: str) -> None:
        m = counter.match(msg)
        stage = m.group("stage") if m else msg.split(":")[0]
        if state["task"] is None or stage != state["stage"]:
            if state["task"] is not None:
                progress.remove_task(state["task"])
            state["task"] = progress.add_task(msg[:90], total=int(m.group("n")) if m else None)
            state["stage"] = stage
        if m:
            progress.update(state["task"], description=msg[:90], completed=int(m.group("i")) - 1,
                            total=int(m.group("n")))
        else:
            progress.update(state["task"], description=msg[:90])

    return progress, say


def _cmd_plan(args: argparse.Namespace) -> int:
    from .pipeline import plan_for
    from .targets import load_target

    target = load_target(args.target)
    inputs = _inputs(args)
    status, say = _progress()
    with status:
        plan = plan_for(inputs, target, backend=args.backend, precision=args.precision,
                        max_accuracy_drop=args.max_accuracy_drop, min_snr_db=args.min_snr_db, objective=args.objective,
                        progress=say)
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


def _cmd_build(args: argparse.Namespace) -> int:
    from .pipeline import build, load_plan
    from .render import console, plan_summary
    from .targets import load_target

    target = load_target(args.target)
    plan = load_plan(args.plan) if args.plan else None
    inputs = _inputs(args)
    status, say = _progress()
    with status:
        art = build(inputs, target, args.output, plan=plan, backend=args.backend, precision=args.precision,
                    max_accuracy_drop=args.max_accuracy_drop, min_snr_db=args.min_snr_db, objective=args.objective,
                    progress=say)
    out = console()
    plan_summary(art.plan, out, layers=False)
    print(f"artifact {args.output}: {art.backend}, {art.size_bytes:,} bytes, predicted {art.predicted_latency_ms:.3f} ms, "
          f"{_measured_label(art)}")
    for step in art.accuracy_control:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in step.measured.items() if k in ("accuracy_delta", "top1_agreement", "snr_db"))
        print(f"accuracy control {step.iteration}: {step.summary}: {shown or 'not measured'}: {step.action}")
    if art.accuracy:
        print("validated: " + ", ".join(f"{k} {v:.4f}" for k, v in art.accuracy.items()))
    print(f"fidelity: {art.fidelity}")
    return 0


def _measured_label(art, *, short: bool = False) -> str:
    """A measured latency, labelled with the machine it came from: a host figure is never shown as the device's."""
    if art.measured_latency_ms is None:
        return "not runnable here"
    ms = f"{art.measured_latency_ms:.3f} ms"
    if art.measured_on_target:
        return f"measured {ms} on this host (of the target's class)" if short else \
            f"{ms} measured on this host ({art.measured_on}), of the target's class"
    if short:
        return f"host {ms} (this machine, not a {art.target})"
    return f"{ms} measured on this host ({art.measured_on}), which is not a {art.target}: not the device's latency"


def _cmd_fleet(args: argparse.Namespace) -> int:
    from .pipeline import fleet
    from .render import console
    from .targets import load_targets

    targets = load_targets(args.targets)
    inputs = _inputs(args)
    status, say = _progress()
    with status:
        res = fleet(inputs, targets, args.output, jobs=args.jobs, max_accuracy_drop=args.max_accuracy_drop,
                    min_snr_db=args.min_snr_db, objective=args.objective, progress=say)
    out = console()
    for e in res.entries:
        if e.ok:
            a = e.artifact
            acc = a.accuracy.get("accuracy", a.accuracy.get("top1_agreement"))
            out.print(f"[green]ok[/]   {e.target:16} {a.backend:12} {a.size_bytes:>10,} B  predicted {a.predicted_latency_ms:.3f} ms"
                      + (f"  {_measured_label(a, short=True)}" if a.measured_latency_ms is not None else "")
                      + (f"  quality {acc:.4f}" if acc is not None else ""))
        else:
            out.print(f"[red]fail[/] {e.target:16} {e.error}")
    out.print(f"report: {res.report}")
    failed = [e.target for e in res.entries if not e.ok]
    if failed:
        raise EdgeoptError(f"{len(failed)} of {len(res.entries)} target(s) failed: {', '.join(failed)} (see {res.report})")
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
    from .calibration import as_calibration
    from .graph import load_model
    from .io import atomic_write_model
    from .passes import run_pass

    model = load_model(args.model, load_external_data=True)
    calib = None
    if args.calib is not None:  # a folder or an .npy/.npz file; labels an .npy file (both read with every check)
        calib = as_calibration(args.calib, model, labels=args.labels)
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


def _cmd_profile(args: argparse.Namespace) -> int:
    from .backends.base import read_manifest
    from .profiling import calibration_for, render_profile, save_profile
    from .remote import parse_device, profile_artifact

    device = parse_device(args.device, token=args.token, ca_cert=args.ca_cert)  # a bad device string fails first
    artifact = read_manifest(args.artifact)
    status, say = _progress()
    with status:
        say(f"profiling {args.artifact} on {device.spec}")
        prof = profile_artifact(args.artifact, device, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                                inputs=args.inputs)
    before = None if args.json else calibration_for(artifact.plan, args.profiles_dir)
    saved = None if args.no_save else save_profile(prof, args.profiles_dir)
    if args.json:
        print(prof.model_dump_json(indent=2))
        if saved:
            print(f"saved {saved}", file=sys.stderr)
        return 0
    from .render import console

    after = calibration_for(artifact.plan, args.profiles_dir) if saved else None
    render_profile(prof, console(), before=before, after=after, top=args.top)
    print(f"saved {saved}" if saved else "not saved (--no-save)")
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    import os

    from .agent import check_token, serve

    token = check_token(args.token or os.environ.get("EDGEOPT_AGENT_TOKEN"))
    if args.max_upload_mb <= 0:
        raise EdgeoptError("--max-upload-mb must be positive")
    if not args.timeout > 0:
        raise EdgeoptError("--timeout must be a positive number of seconds")
    if args.max_connections < 1:
        raise EdgeoptError("--max-connections must be at least 1")
    serve(args.host, args.port, token, max_upload_bytes=int(args.max_upload_mb * 2**20), profiles_dir=args.profiles_dir,
          timeout=args.timeout, max_workers=args.max_connections, tls_cert=args.tls_cert, tls_key=args.tls_key)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"targets": _cmd_targets, "analyze": _cmd_analyze, "plan": _cmd_plan, "compress": _cmd_compress,
               "build": _cmd_build, "fleet": _cmd_fleet, "demo": _cmd_demo, "profile": _cmd_profile,
               "agent": _cmd_agent}[args.cmd]
    from .io import run_scratch

    try:
        with run_scratch(), _memory_limit(args):  # temp files of this run in one folder, removed after (or by the next run)
            return handler(args)
    except EdgeoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line, the traceback on request
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"internal error: {type(e).__name__}: {first} (a bug in edgeopt {__version__}; rerun with "
              "'edgeopt --debug ...' for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
