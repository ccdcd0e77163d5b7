"""The Python API: the ``edgeopt`` commands as functions that return objects instead of printing.

One to one with the command line (option names in snake_case; ``--eval`` is ``eval``, ``--input-shape`` is
``input_shape``), plus what only Python can pass:

* ``model``: a path to an ONNX file, ``"default"`` (the embedded digits CNN), an ``onnx.ModelProto``, a
  ``torch.nn.Module`` with ``example_inputs=`` or a ``torch.export.ExportedProgram`` (exported and checked by
  :mod:`edgeopt.modelsrc`; the export is recorded in the manifest's ``source``);
* ``calib`` / ``eval``: a folder or file of .npy/.npz, a folder of JPEG/PNG images (with ``preprocess=``), a folder
  of WAV files, an array, a dict ``{input: array}``, an iterable of samples or ``(sample, label)`` pairs
  (:mod:`edgeopt.datasources`);
* ``progress``: a callable receiving the status lines the command line shows.

Each call runs like one command: temporary files in one scratch folder removed afterwards, and ``max_memory`` (a
size such as ``"4GiB"`` or a number of bytes) applied for the call.  Errors a user can fix raise
:class:`edgeopt.errors.EdgeoptError` with the command line's one-line message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EdgeoptError

if TYPE_CHECKING:  # pragma: no cover
    from .datasources import Preprocess
    from .inputs import BuildInputs
    from .pipeline import FleetResult
    from .types import Artifact, ModelAnalysis, Plan, Profile, RecoverySettings, Target

Progress = Callable[[str], None]
InputShape = Mapping[str, Any] | list[str] | None


@contextlib.contextmanager
def _run(max_memory: str | int | None) -> Iterator[Path]:
    """One call's scratch folder and memory limit (what the command line sets up around every command)."""
    from .io import run_scratch
    from .memory import memory_limit, parse_size

    limit = parse_size(max_memory, "max_memory") if isinstance(max_memory, str) else max_memory
    with run_scratch() as scratch, memory_limit(limit):
        yield scratch


def _input_shapes(spec: InputShape) -> dict[str, list[int]]:
    """``input_shape``: ``{"x": [1, 3, 224, 224]}`` or ``{"x": "1x3x224x224"}``, or the command line's
    ``["x=1x3x224x224"]``."""
    from .graph import parse_input_shapes

    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = []
        for k, v in spec.items():
            dims = v if isinstance(v, str) else "x".join(str(d) for d in v)
            items.append(f"{k}={dims}")
        return parse_input_shapes(items)
    if isinstance(spec, str):
        return parse_input_shapes([spec])
    return parse_input_shapes(list(spec))


def _target(target: str | Path | Target, max_latency_ms: float | None = None) -> Target:
    from .planner import with_latency_limit
    from .targets import load_target
    from .types import Target

    tg = target if isinstance(target, Target) else load_target(str(target))
    return tg if max_latency_ms is None else with_latency_limit(tg, max_latency_ms)


def _recovery(recover: bool | RecoverySettings) -> RecoverySettings | None:
    """``recover=True`` (the CLI's ``--recover`` with its defaults) or explicit settings; False: none."""
    from .types import RecoverySettings

    if isinstance(recover, RecoverySettings):
        return recover
    return RecoverySettings() if recover else None


def _is_default(model: Any) -> bool:
    return isinstance(model, str) and model == "default"


def prepare(model: Any, scratch: Path, *, calib: Any = None, eval: Any = None, labels: Any = None,  # noqa: A002
            inputs: Any = None, input_shape: InputShape = None, preprocess: str | Preprocess | Mapping | None = None,
            sample_rate: int | None = None, classes: list[str] | str | None = None, example_inputs: Any = None,
            input_names: list[str] | None = None) -> BuildInputs:
    """The model and its data, prepared once (what ``plan``, ``build`` and ``fleet`` run on): the model exported or
    saved into ``scratch`` when it is not a file, the data wrapped by :func:`edgeopt.datasources.wrap_data`."""
    from .datasources import wrap_data
    from .inputs import BuildInputs
    from .modelsrc import materialize

    if _is_default(model):
        if calib is not None or eval is not None or inputs is not None:
            raise EdgeoptError("'default' brings its own digits data; drop calib/eval/inputs")
        return BuildInputs.default_model()
    shapes = _input_shapes(input_shape)  # a bad shape fails before a long export
    path, source = materialize(model, scratch, example_inputs=example_inputs, input_names=input_names)
    cal, ev = wrap_data(calib, eval, preprocess=preprocess, sample_rate=sample_rate, classes=classes,
                        flag="preprocess=")
    return BuildInputs.prepare(path, calib=cal, eval_data=ev, labels=labels, input_shapes=shapes, sample=inputs,
                               source=source)


def analyze(model: Any, *, input_shape: InputShape = None, target: str | Path | Target | None = None,
            example_inputs: Any = None, input_names: list[str] | None = None,
            max_memory: str | int | None = None) -> ModelAnalysis:
    """``edgeopt analyze``: per-layer parameters, MACs, memory and shapes.  ``target`` is loaded (an unknown one
    raises) as the command line does; the target fit it prints is for display (see :func:`plan`)."""
    from .datasets import default_model_path
    from .graph import analyze as _analyze
    from .modelsrc import materialize

    with _run(max_memory) as scratch:
        if target is not None:
            _target(target)
        shapes = _input_shapes(input_shape)
        if _is_default(model):
            path = default_model_path()
        else:
            path, _ = materialize(model, scratch, example_inputs=example_inputs, input_names=input_names)
        return _analyze(path, shapes)


def plan(model: Any, *, target: str | Path | Target, backend: str | None = None, precision: str | None = None,
         calib: Any = None, eval: Any = None, labels: Any = None,  # noqa: A002 - the command line's --eval
         max_accuracy_drop: float | None = None, min_snr_db: float | None = None, objective: str = "latency",
         max_latency_ms: float | None = None, output: str | Path | None = None, input_shape: InputShape = None,
         preprocess: str | Preprocess | Mapping | None = None, sample_rate: int | None = None,
         classes: list[str] | str | None = None, example_inputs: Any = None, input_names: list[str] | None = None,
         max_memory: str | int | None = None, progress: Progress | None = None) -> Plan:
    """``edgeopt plan``: the backend and per-layer precision for ``target``; written as JSON to ``output`` if
    given."""
    from .pipeline import plan_for

    with _run(max_memory) as scratch:
        tg = _target(target, max_latency_ms)
        prepared = prepare(model, scratch, calib=calib, eval=eval, labels=labels, input_shape=input_shape,
                           preprocess=preprocess, sample_rate=sample_rate, classes=classes,
                           example_inputs=example_inputs, input_names=input_names)
        result = plan_for(prepared, tg, backend=backend, precision=precision, max_accuracy_drop=max_accuracy_drop,
                          min_snr_db=min_snr_db, objective=objective, progress=progress)
        if output is not None:
            from .io import atomic_write_text

            atomic_write_text(output, result.model_dump_json(indent=2) + "\n")
        return result


def build(model: Any, *, target: str | Path | Target, output: str | Path, backend: str | None = None,
          precision: str | None = None, plan: Plan | str | Path | None = None, calib: Any = None,
          eval: Any = None, labels: Any = None, inputs: Any = None,  # noqa: A002 - the command line's --eval
          max_accuracy_drop: float | None = None, min_snr_db: float | None = None, objective: str = "latency",
          max_latency_ms: float | None = None, recover: bool | RecoverySettings = False, allow_resolution: bool = False,
          input_shape: InputShape = None, preprocess: str | Preprocess | Mapping | None = None,
          sample_rate: int | None = None, classes: list[str] | str | None = None, example_inputs: Any = None,
          input_names: list[str] | None = None, max_memory: str | int | None = None,
          progress: Progress | None = None) -> Artifact:
    """``edgeopt build``: plan (or replay ``plan``, a :class:`~edgeopt.types.Plan` or plan.json), compress,
    convert, validate and profile one artifact into ``output`` (replaced atomically); returns its manifest."""
    from .pipeline import build as _build
    from .pipeline import load_plan
    from .types import Plan

    with _run(max_memory) as scratch:
        tg = _target(target, max_latency_ms)
        replay = plan if isinstance(plan, Plan) or plan is None else load_plan(plan)
        prepared = prepare(model, scratch, calib=calib, eval=eval, labels=labels, inputs=inputs,
                           input_shape=input_shape, preprocess=preprocess, sample_rate=sample_rate, classes=classes,
                           example_inputs=example_inputs, input_names=input_names)
        return _build(prepared, tg, output, plan=replay, backend=backend, precision=precision,
                      max_accuracy_drop=max_accuracy_drop, min_snr_db=min_snr_db, objective=objective,
                      progress=progress, recover=_recovery(recover),
                      allow_resolution=allow_resolution)


def fleet(model: Any, *, output: str | Path, targets: str | list[str | Path | Target] = "all", jobs: int = 2,
          calib: Any = None, eval: Any = None, labels: Any = None, inputs: Any = None,  # noqa: A002
          max_accuracy_drop: float | None = None, min_snr_db: float | None = None, objective: str = "latency",
          max_latency_ms: float | None = None, recover: bool | RecoverySettings = False, allow_resolution: bool = False,
          input_shape: InputShape = None, preprocess: str | Preprocess | Mapping | None = None,
          sample_rate: int | None = None, classes: list[str] | str | None = None, example_inputs: Any = None,
          input_names: list[str] | None = None, max_memory: str | int | None = None,
          progress: Progress | None = None) -> FleetResult:
    """``edgeopt fleet``: every target (``"all"``, a comma-separated string or a list) built in parallel into
    ``output/<target>/`` with ``report.html``; returns the entries (``ok``, ``artifact`` or ``error``) and the
    report's path.  Unlike the command line, failed targets do not raise: look at each entry's ``ok``."""
    from .pipeline import fleet as _fleet
    from .targets import load_targets

    with _run(max_memory) as scratch:
        tgs = [_target(t, max_latency_ms) for t in (load_targets(targets) if isinstance(targets, str) else targets)]
        if not tgs:
            raise EdgeoptError("targets is empty; give 'all' or a list of targets")
        prepared = prepare(model, scratch, calib=calib, eval=eval, labels=labels, inputs=inputs,
                           input_shape=input_shape, preprocess=preprocess, sample_rate=sample_rate, classes=classes,
                           example_inputs=example_inputs, input_names=input_names)
        return _fleet(prepared, tgs, output, jobs=jobs, max_accuracy_drop=max_accuracy_drop, min_snr_db=min_snr_db,
                      objective=objective, progress=progress, recover=_recovery(recover),
                      allow_resolution=allow_resolution)


def profile(artifact: str | Path, *, device: str = "local", token: str | None = None,
            ca_cert: str | Path | None = None, threads: int | None = None, warmup: int = 10, repeats: int = 100,
            inputs: Any = None, profiles_dir: str | Path = "profiles", no_save: bool = False,
            max_memory: str | int | None = None) -> Profile:
    """``edgeopt profile``: measure an artifact directory on ``device`` (``local``, ``ssh://...``, ``adb:SERIAL``,
    ``http(s)://host:port``); saved under ``profiles_dir`` unless ``no_save`` (where the predictions of the target
    are calibrated from)."""
    from .backends.base import read_manifest
    from .profiling import save_profile
    from .remote import parse_device, profile_artifact

    with _run(max_memory):
        dev = parse_device(device, token=token, ca_cert=ca_cert)
        read_manifest(Path(artifact))  # not an artifact: refused before connecting
        prof = profile_artifact(artifact, dev, threads=threads, warmup=warmup, repeats=repeats, inputs=inputs)
        if not no_save:
            save_profile(prof, profiles_dir)
        return prof
