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

_PROJECT_MODEL = "ONNX model file (default: the model of the project file, ./edgeopt.yaml)"


def _add_model_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    if optional:
        p.add_argument("model", nargs="?", help=_PROJECT_MODEL)
    else:
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


def _add_latency_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-latency-ms", type=float, metavar="MS",
                   help="make the latency a limit: plans predicted slower than MS are refused (default: the target's "
                        "latency_ms is a goal: the fastest plan within RAM/storage is built and a miss is said)")


def _add_recover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recover", action="store_true",
                   help="recover compressed models by distillation fine-tuning against the original on the calibration "
                        "data (pruning and 4-bit weights are then planned at their predicted post-recovery accuracy; "
                        "the recovered artifact is measured); needs --calib and torch")
    p.add_argument("--recover-steps", type=int, default=300, metavar="N", help="recovery optimizer steps at most (300)")
    p.add_argument("--recover-time", type=float, default=600.0, metavar="S",
                   help="recovery time budget per build in seconds (600)")
    p.add_argument("--allow-resolution", action="store_true",
                   help="with --recover: a model over the target's RAM/flash may also get a smaller square input "
                        "(channel pruning alone otherwise)")


def _recover_settings(args: argparse.Namespace):
    """The recovery settings ``--recover`` asks for, or None."""
    if not getattr(args, "recover", False):
        return None
    from pydantic import ValidationError

    from .types import RecoverySettings

    try:
        return RecoverySettings(steps=args.recover_steps, time_budget_s=args.recover_time)
    except ValidationError as e:
        err = e.errors()[0]
        raise EdgeoptError(f"--recover-{'steps' if err['loc'][0] == 'steps' else 'time'}: {err['msg']}") from None


def _limited(target, args: argparse.Namespace):
    """The target with ``--max-latency-ms`` applied (a limit), or unchanged."""
    from .planner import with_latency_limit

    ms = getattr(args, "max_latency_ms", None)
    return target if ms is None else with_latency_limit(target, ms)


def _add_inputs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", type=Path,
                   help="one run's inputs as .npz (or .npy for one input), in the model's input shapes, like "
                        "profile's: what the smoke run and timing feed (default: the first --eval/--calib sample; "
                        "zeros only without any data)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="edgeopt", description="Hardware-aware deployment optimizer for ONNX models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="in a project folder:\n"
               "  edgeopt init                      # write edgeopt.yaml (the model, its data, budget, targets)\n"
               "  edgeopt build --target jetson     # one optimized artifact + manifest in build/jetson\n"
               "  edgeopt fleet --targets all       # a per-device fleet + report in build/fleet\n"
               "  edgeopt profile build/jetson --device ssh://orin.local\n"
               "'edgeopt COMMAND --help' shows a command's options.")
    ap.add_argument("--version", action="version", version=f"edgeopt {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    _add_max_memory_arg(ap, top=True)
    ap.add_argument("--project", type=Path, metavar="FILE",
                    help="the project file (default: ./edgeopt.yaml, else [tool.edgeopt] in ./pyproject.toml)")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", title="commands")

    i = sub.add_parser("init", help="write a commented edgeopt.yaml project file here")
    i.add_argument("--model", help="the ONNX model file (default: 'default', the embedded digits CNN)")
    i.add_argument("--target", help="the default target of build, plan, analyze and profile")
    i.add_argument("--targets", help="the fleet's targets: 'all' (default: one device per family), 'every', or a "
                                     "comma-separated list")
    i.add_argument("--force", action="store_true", help="replace an existing project file")

    t = sub.add_parser("targets", help="list or show device targets")
    tsub = t.add_subparsers(dest="targets_cmd", required=True, metavar="list|show|detect")
    tl = tsub.add_parser("list", help="the built-in devices by family, with each family's default and the aliases")
    tl.add_argument("--family", help="only this family (a family name or alias: jetson, mcu, x86, ...)")
    tl.add_argument("--json", action="store_true")
    ts = tsub.add_parser("show", help="one target, fully resolved, with the sources of its numbers")
    ts.add_argument("name", help="device, alias or family name (its default device), or path to a target .yaml")
    ts.add_argument("--json", action="store_true")
    td = tsub.add_parser("detect", help="this machine's CPU: ISA features and what they imply (int8 scheme, bf16, fp16)")
    td.add_argument("--json", action="store_true")

    a = sub.add_parser("analyze", help="per-layer params, MACs, memory; fit and cost on a target")
    _add_model_args(a, optional=True)
    a.add_argument("--target", help="built-in target name or .yaml path (default: the project's target, if any)")
    a.add_argument("--top", type=int, help="show only the N layers with the most arithmetic")
    a.add_argument("--json", action="store_true", help="print the analysis as JSON")

    pl = sub.add_parser("plan", help="choose backend and per-layer precision for a target")
    _add_model_args(pl, optional=True)
    pl.add_argument("--target", help="built-in target name or .yaml path (default: the project's target)")
    pl.add_argument("--backend", help="restrict to one backend of the target")
    recipes = ", ".join(precision_names())
    pl.add_argument("--precision", help=f"force one precision recipe ({recipes})")
    _add_data_args(pl)
    _add_latency_arg(pl)
    pl.set_defaults(objective=None)  # None: the project's, else latency
    pl.add_argument("-o", "--output", type=Path, help="write the plan as JSON to this file")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    b = sub.add_parser("build", help="plan, compress, convert, validate and time one artifact")
    b.add_argument("model", nargs="?", help="ONNX model file, or 'default' for the embedded digits CNN (default: the "
                                            "project's model)")
    b.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="static shape for a dynamic input")
    b.add_argument("--target", help="built-in target name or .yaml path (default: the project's target)")
    b.add_argument("--backend", help="restrict to one backend of the target")
    b.add_argument("--precision", help=f"force one precision recipe ({recipes})")
    b.add_argument("--plan", type=Path, help="replay this plan.json instead of planning")
    _add_data_args(b)
    _add_latency_arg(b)
    _add_recover_args(b)
    b.set_defaults(objective=None)
    _add_inputs_arg(b)
    _add_max_memory_arg(b)
    b.add_argument("-o", "--output", type=Path, help="output directory (replaced atomically; in a project folder "
                                                     "default <output>/<target>, e.g. build/jetson)")

    f = sub.add_parser("fleet", help="build every target in parallel, with an HTML report")
    f.add_argument("model", nargs="?", help="ONNX model file, or 'default' for the embedded digits CNN (default: the "
                                            "project's model)")
    f.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help="static shape for a dynamic input")
    f.add_argument("--targets", help="'all' (the default device of each family), 'every' (every device), or a "
                                     "comma-separated list of targets and families (default: the project's, else all)")
    f.add_argument("--jobs", type=int, default=2, help="targets built at once")
    _add_data_args(f)
    _add_latency_arg(f)
    _add_recover_args(f)
    f.set_defaults(objective=None)
    _add_inputs_arg(f)
    _add_max_memory_arg(f)
    f.add_argument("-o", "--output", type=Path, help="output directory (replaced atomically; in a project folder "
                                                     "default <output>/fleet, e.g. build/fleet)")

    c = sub.add_parser("compress", help="apply one compression pass (ONNX -> ONNX), report it")
    _add_model_args(c)
    c.add_argument("--pass", dest="pass_name", required=True,
                   help="cleanup, fp16, bf16, int8, weight_only, prune, channel_prune, lowrank, palettize")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help='a pass config field, value as JSON or a bare string, e.g. --set ratio=0.3 --set \'exclude=["/14/Gemm"]\'')
    c.add_argument("--calib", type=Path, help="calibration data: a folder of .npy/.npz files, or one .npy/.npz file")
    c.add_argument("--labels", type=Path, help=".npy labels for the calibration samples (reports accuracy)")
    c.add_argument("-o", "--output", type=Path, required=True, help="where to write the transformed .onnx")
    c.add_argument("--json", action="store_true", help="print the pass report as JSON")

    r = sub.add_parser("recover", help="distil a compressed model against its original (recovery)")
    r.add_argument("model", type=Path, help="the compressed model (e.g. from edgeopt compress --pass prune)")
    r.add_argument("--teacher", type=Path, required=True, help="the original model it was compressed from")
    r.add_argument("--calib", type=Path, required=True,
                   help="training inputs: a folder of .npy/.npz files, or one .npy/.npz file (no labels needed)")
    r.add_argument("--labels", type=Path, help=".npy labels of the --calib samples (adds a cross-entropy term)")
    r.add_argument("--steps", type=int, default=300, help="optimizer steps at most (default 300)")
    r.add_argument("--time", type=float, default=600.0, metavar="S", help="time budget in seconds (default 600)")
    r.add_argument("--block-steps", type=int, default=100, metavar="N",
                   help="block-wise steps per block first (default 100; 0: none)")
    r.add_argument("--weight-bits", type=int, choices=(4, 8),
                   help="also learn a per-channel weight grid of this many bits (LSQ) for every Conv/Gemm/MatMul")
    r.add_argument("-o", "--output", type=Path, required=True, help="where to write the recovered .onnx")
    r.add_argument("--json", action="store_true", help="print the recovery record as JSON")
    _add_max_memory_arg(r)

    d = sub.add_parser("demo", help="analyse and plan the embedded default model, a digits CNN")
    d.add_argument("--target", default="mcu-cortex-m7", help="target (default: mcu-cortex-m7)")

    pr = sub.add_parser("profile", help="measure an artifact on a device: latency, memory, ops")
    pr.add_argument("artifact", type=Path, nargs="?", help="artifact directory (from edgeopt build; in a project "
                                                           "folder default: the --target's build, e.g. build/jetson)")
    pr.add_argument("--target", help="in a project folder: the artifact edgeopt build --target TARGET wrote "
                                     "(<output>/TARGET; default: the project's target)")
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

    ag = sub.add_parser("agent", help="serve profiling on this device over HTTP, with a token")
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

    co = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    co.add_argument("shell", choices=("bash", "zsh"),
                    help="bash: eval \"$(edgeopt completion bash)\" in ~/.bashrc; zsh: the same in ~/.zshrc")
    return ap


def _cmd_targets(args: argparse.Namespace) -> int:
    from .targets import catalog, load_target

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
    cat = catalog()
    if args.targets_cmd == "list":
        families = list(cat.families.values())
        if args.family is not None:
            fam = cat.family(args.family)
            if fam is None:
                raise EdgeoptError(f"unknown family {args.family!r}; families: {', '.join(cat.families)}")
            families = [fam]
        groups = [(f, [load_target(d) for d in f.members]) for f in families]
        if args.json:
            print(json.dumps([{"family": f.name, "description": f.description, "default": f.default,
                               "aliases": list(f.aliases),
                               "devices": [t.model_dump(mode="json") for t in targets]} for f, targets in groups],
                             indent=2))
        else:
            from .render import console, targets_table

            targets_table(groups, console())
        return 0
    tg = load_target(args.name)
    if args.json:
        print(json.dumps(tg.model_dump(mode="json"), indent=2))
    else:
        from .render import console, target_detail

        builtin = cat.resolve(tg.name) == tg.name and load_target(tg.name) == tg  # not a user file of that name
        fam = cat.families.get(tg.family or "") if builtin else None
        target_detail(tg, console(), default_of=fam.name if fam and fam.default == tg.name else None)
    return 0


def _project(args: argparse.Namespace):
    """The project file (``--project``, else ./edgeopt.yaml, else ./pyproject.toml's [tool.edgeopt]), or None."""
    from .project import find_project

    return find_project(explicit=args.project)


#: project settings (:class:`edgeopt.project.Settings` fields) -> the argument each fills
_SETTING_ARGS = {"model": "model", "input_shapes": "input_shape", "calib": "calib", "eval_data": "eval_data",
                 "labels": "labels", "inputs": "inputs", "max_accuracy_drop": "max_accuracy_drop",
                 "min_snr_db": "min_snr_db", "objective": "objective", "target": "target", "targets": "targets",
                 "max_latency_ms": "max_latency_ms", "preprocess": "preprocess", "output": "output"}


def _use_project(args: argparse.Namespace, *, output_for: str | None = None, need_target: bool = False):
    """Fill the arguments not given on the command line from the project file (explicit ones win; see
    :func:`edgeopt.project.resolve`); returns the project, or None."""
    from .project import resolve

    given = {k: getattr(args, a, None) for k, a in _SETTING_ARGS.items() if k != "output"}
    settings = resolve(_project(args), **given, output=args.output if output_for else None, output_for=output_for,
                       need_target=need_target)
    for k, a in _SETTING_ARGS.items():
        if hasattr(args, a) and (k != "output" or output_for):
            setattr(args, a, getattr(settings, k))
    return settings.project


def _shown(path: Path) -> str:
    """A path as the user would type it here: relative to the current folder when inside it."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _load(args: argparse.Namespace):
    from .datasets import default_model_path
    from .graph import analyze, parse_input_shapes
    from .targets import load_target

    target = load_target(args.target) if getattr(args, "target", None) else None  # bad target: fail before the model
    model = default_model_path() if str(args.model) == "default" else Path(args.model)
    return analyze(model, parse_input_shapes(args.input_shape)), target


def _cmd_init(args: argparse.Namespace) -> int:
    from .project import PROJECT_FILE, init_project

    path = args.project or Path(PROJECT_FILE)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    proj = init_project(path, model=args.model, target=args.target, targets=targets, force=args.force)
    model = "the embedded digits CNN ('default')" if proj.model == "default" else _shown(Path(proj.model))
    print(f"wrote {_shown(proj.path)}: model {model}; edit it, then: edgeopt build --target "
          f"{args.target or 'NAME'}  (edgeopt targets list shows the targets)")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    if args.top is not None and args.top < 1:
        raise EdgeoptError(f"--top must be at least 1, not {args.top}")
    _use_project(args)
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

    _use_project(args, need_target=True)
    target = _limited(load_target(args.target), args)
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

    project = _use_project(args, output_for="build", need_target=True)
    target = _limited(load_target(args.target), args)
    plan = load_plan(args.plan) if args.plan else None
    inputs = _inputs(args)
    status, say = _progress()
    with status:
        art = build(inputs, target, args.output, plan=plan, backend=args.backend, precision=args.precision,
                    max_accuracy_drop=args.max_accuracy_drop, min_snr_db=args.min_snr_db, objective=args.objective,
                    progress=say, project=project.record() if project is not None else None,
                    recover=_recover_settings(args), allow_resolution=args.allow_resolution)
    out = console()
    plan_summary(art.plan, out, layers=False)
    print(f"artifact {_shown(args.output)}: {art.backend}, {art.size_bytes:,} bytes, predicted {art.predicted_latency_ms:.3f} ms, "
          f"{_measured_label(art)}")
    for step in art.accuracy_control:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in step.measured.items() if k in ("accuracy_delta", "top1_agreement", "snr_db"))
        print(f"accuracy control {step.iteration}: {step.summary}: {shown or 'not measured'}: {step.action}")
    if art.fit is not None:
        f = art.fit
        print(f"fit to {art.target}: {f.summary}")
        if f.recovery is not None and f.recovery.heldout_after:
            r = f.recovery
            shown = ", ".join(f"{k} {r.heldout_before[k]:.4f} -> {v:.4f}" for k, v in r.heldout_after.items()
                              if k in r.heldout_before)
            print(f"  against the original on {f.heldout_samples} held-out samples, fitted -> recovered: {shown} "
                  f"({'recovered model kept' if r.kept else 'recovery did not help: the fitted model kept'}); the "
                  "validation below compares the artifact with the fitted model")
    if art.recovery is not None:
        r = art.recovery
        held = ", ".join(f"{k} {r.heldout_before[k]:.4f} -> {v:.4f}" for k, v in r.heldout_after.items()
                         if k in r.heldout_before)
        print(f"recovery: {r.steps} steps in {r.time_s:.0f} s on {r.samples} samples; held-out: {held}; "
              + ("kept" if r.kept else "not kept: the post-training model was better"))
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

    project = _use_project(args, output_for="fleet")
    targets = [_limited(t, args) for t in load_targets(args.targets)]
    inputs = _inputs(args)
    status, say = _progress()
    with status:
        res = fleet(inputs, targets, args.output, jobs=args.jobs, max_accuracy_drop=args.max_accuracy_drop,
                    min_snr_db=args.min_snr_db, objective=args.objective, progress=say,
                    project=project.record() if project is not None else None,
                    recover=_recover_settings(args), allow_resolution=args.allow_resolution)
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
    out.print(f"report: {_shown(res.report)}")
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


def _cmd_recover(args: argparse.Namespace) -> int:
    from .calibration import as_calibration
    from .graph import load_model
    from .io import atomic_write_model
    from .recover import recover

    if args.steps < 1 or not args.time > 0 or args.block_steps < 0:
        raise EdgeoptError("--steps must be at least 1, --block-steps at least 0 and --time positive")
    student = load_model(args.model, load_external_data=True)
    teacher = load_model(args.teacher, load_external_data=True)
    calib = as_calibration(args.calib, teacher, labels=args.labels)
    status, say = _progress()
    with status:
        res = recover(teacher, student, calib, steps=args.steps, time_budget_s=args.time, block_steps=args.block_steps,
                      quantize={"*": args.weight_bits} if args.weight_bits else None,
                      progress=lambda i, n, loss: say(f"recovery {i}/{n}: loss {loss:.4g}"))
    atomic_write_model(res.model, args.output)
    rec = res.record
    if args.json:
        print(rec.model_dump_json(indent=2))
    else:
        print(f"recovered in {rec.steps} steps ({rec.time_s:.0f} s, {rec.device}, {rec.samples} samples, "
              f"{'labels and ' if rec.labels_used else ''}distillation){'; stopped early: ' + rec.stop_reason if rec.stopped_early else ''}")
        if rec.agreement_before is not None:
            print(f"top-1 agreement with the teacher on {rec.validation_samples} validation samples ({rec.validation}): "
                  f"{rec.agreement_before:.4f} -> {rec.agreement_after:.4f}")
        print(f"wrote {args.output}")
    return 0


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
    if args.artifact is None:
        args.artifact = _project_artifact(args)
    elif args.target is not None:
        raise EdgeoptError("give the artifact folder or --target (its build in the project), not both")
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


def _project_artifact(args: argparse.Namespace) -> Path:
    """``profile --target NAME`` (or no argument) in a project folder: the artifact ``build --target NAME`` wrote."""
    project = _project(args)
    if project is None:
        raise EdgeoptError("no artifact given: pass the artifact folder edgeopt build wrote (e.g. 'edgeopt profile "
                           "build/jetson'), or run in a project folder with --target NAME ('edgeopt init')")
    target = args.target or project.target
    if target is None:
        raise EdgeoptError(f"no artifact given: pass the artifact folder or --target NAME (the build in "
                           f"{_shown(project.output)}/NAME), or set 'target:' in {project.source}")
    path = project.build_dir(target)
    if not path.is_dir():
        raise EdgeoptError(f"no artifact at {_shown(path)}: run 'edgeopt build --target {target}' first")
    return path


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


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings]


def _completion_script(shell: str) -> str:
    """A bash completion function for ``edgeopt``, generated from the argument parser (commands, their subcommands,
    options and option choices; file names elsewhere).  zsh runs it through ``bashcompinit``."""
    from .targets import valid_names

    ap = _parser()
    commands = _subparsers(ap)
    value_opts = sorted({o for a in _options(ap) if a.nargs != 0 for o in a.option_strings})
    choices: dict[str, list[str]] = {}
    cases = []
    for name, sp in commands.items():
        words = [o for a in _options(sp) for o in a.option_strings]
        nested = _subparsers(sp)
        for a in sp._actions:
            if not a.option_strings and a.choices and not isinstance(a, argparse._SubParsersAction):
                words += list(a.choices)
        words += list(nested)
        for sub in nested.values():
            words += [o for a in _options(sub) for o in a.option_strings]
        for a in [*_options(sp), *(x for sub in nested.values() for x in _options(sub))]:
            if a.choices:
                for o in a.option_strings:
                    choices[o] = [str(c) for c in a.choices]
        cases.append(f'        {name}) words="{" ".join(dict.fromkeys(words))}";;')
    from .targets import alias_names

    choices.setdefault("--target", sorted({*valid_names(), *alias_names()}))
    choices.setdefault("--targets", ["all", "every", *valid_names()])
    prev_cases = [f'        {o}) COMPREPLY=($(compgen -W "{" ".join(c)}" -- "$cur")); return 0;;'
                  for o, c in sorted(choices.items())]
    top = [*commands, *(o for a in _options(ap) for o in a.option_strings)]
    script = f"""\
# edgeopt shell completion (generated by 'edgeopt completion {shell}' from edgeopt {__version__})
_edgeopt() {{
    local cur prev cmd words i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {"|".join(value_opts)}) ((i++));;
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; break;;
        esac
    done
    case "$prev" in
{chr(10).join(prev_cases)}
    esac
    case "$cmd" in
        "") words="{" ".join(top)}";;
{chr(10).join(cases)}
        *) words="";;
    esac
    if [[ "$cur" == -* || -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$(printf '%s\\n' $words | grep -v '^-')" -- "$cur") $(compgen -f -- "$cur"))
    fi
    return 0
}}
complete -o filenames -F _edgeopt edgeopt
"""
    if shell == "zsh":
        script = "#compdef edgeopt\nautoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def _cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(_completion_script(args.shell))
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    # converters' own progress bars (coremltools' MIL pass pipeline uses tqdm) would interleave with edgeopt's
    # progress display, in fleets from several threads at once; tqdm reads this when it is first imported
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = _parser().parse_args(argv)
    handler = {"targets": _cmd_targets, "analyze": _cmd_analyze, "plan": _cmd_plan, "compress": _cmd_compress,
               "recover": _cmd_recover,
               "build": _cmd_build, "fleet": _cmd_fleet, "demo": _cmd_demo, "profile": _cmd_profile,
               "agent": _cmd_agent, "init": _cmd_init, "completion": _cmd_completion}[args.cmd]
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
