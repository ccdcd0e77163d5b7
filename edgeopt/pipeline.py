"""The one orchestrator: plan -> structural passes -> backend convert -> validate -> profile -> manifest.

Everything it writes goes to a temporary directory beside the destination that
replaces the destination only when the whole build succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import EdgeoptError, PlanError
from .inputs import BuildInputs
from .types import Artifact, Plan, Target

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from .calibration import CalibrationData

Progress = Callable[[str], None]


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan JSON file.

    Args:
        path: the plan file.

    Returns:
        The parsed plan.

    Raises:
        PlanError: the file does not exist or is not a valid plan.
    """
    from pydantic import ValidationError

    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file {p} does not exist")
    try:
        return Plan.model_validate_json(p.read_text())
    except ValidationError as e:
        first = e.errors()[0]
        raise PlanError(f"{p} is not a valid plan: {'.'.join(map(str, first['loc']))}: {first['msg']}") from e
    except ValueError as e:
        raise PlanError(f"{p} is not a valid plan: {e}") from e


def check_replay(plan: Plan, inputs: BuildInputs, target: Target) -> None:
    """Check that a saved plan can be replayed on this model and target.

    Args:
        plan: the saved plan.
        inputs: the model (its analysis) the plan is replayed on.
        target: the target the plan is replayed for.

    Raises:
        PlanError: the plan was made for another model (sha256) or target, the target's definition
            changed since (its sha256 differs), or the plan names layers the model does not have.
    """
    from .targets import target_sha256

    if plan.model_sha256 != inputs.analysis.sha256:
        raise PlanError(f"the plan was made for another model (sha256 {plan.model_sha256[:12]}, this one "
                        f"{inputs.analysis.sha256[:12]})")
    if plan.target != target.name:
        raise PlanError(f"the plan is for target {plan.target}, not {target.name}")
    if plan.target_sha256 != target_sha256(target):
        raise PlanError(f"target {target.name} changed since the plan was made; plan again")
    layers = {ly.name for ly in inputs.analysis.layers}
    unknown = [lp.name for lp in plan.layers if lp.name not in layers]
    if unknown:
        raise PlanError(f"the plan names layers the model does not have: {', '.join(unknown[:5])}")


def structural_passes(model: onnx.ModelProto, plan: Plan, calib: CalibrationData | None) -> tuple[onnx.ModelProto, list[str]]:
    """Apply the pruning the plan asks for, before the backend sets numeric formats.

    Args:
        model: the float ONNX model.
        plan: the plan; layers with a sparsity other than ``none`` are pruned by that technique's ``apply``, one call
            per (pattern, ratio).
        calib: calibration data (channel pruning re-fits consumers on it).

    Returns:
        The pruned model and one note per pass run.

    Raises:
        EdgeoptError: a planned sparsity has no ``apply`` (it cannot be written into an ONNX graph).
    """
    from .technique import ApplyContext, get

    notes: list[str] = []
    by_ratio: dict[tuple[str, float], list[str]] = {}
    for lp in plan.layers:
        if lp.sparsity != "none":
            by_ratio.setdefault((lp.sparsity, round(lp.sparsity_ratio, 4)), []).append(lp.name)
    for (kind, ratio), names in sorted(by_ratio.items()):
        t = get(kind)
        if t.apply is None:
            raise EdgeoptError(f"sparsity {kind} cannot be written into an ONNX graph")
        model, note = t.apply(model, names, ApplyContext(calib=calib, backend_options=plan.backend_options, ratio=ratio))
        if note:
            notes.append(note)
    return model, notes


def open_here(artifact_dir: Path):
    """A runner for the artifact in its own runtime on this machine, or None where that runtime cannot run here.

    Args:
        artifact_dir: the artifact's directory (with its manifest).

    Returns:
        The backend's runner (the caller closes it), or None when the runtime is unavailable on this
        host or not installed.
    """
    from .backends.base import RuntimeUnavailable, open_artifact
    from .errors import BackendNotInstalledError

    try:
        return open_artifact(artifact_dir)[1]
    except (RuntimeUnavailable, BackendNotInstalledError):
        return None


def _outputs(runner, data: CalibrationData, limit: int) -> list[np.ndarray]:
    outs: list[list[np.ndarray]] = []
    for feed in data.batches(1, limit=limit):  # batch 1: artifacts may have fixed shapes
        res = runner.run(feed)
        outs = outs or [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(np.asarray(r, dtype=np.float32))
    return [np.concatenate(o) for o in outs]


#: Evaluation samples a build validates on.
EVAL_LIMIT = 512


def validate(runner, inputs: BuildInputs, limit: int = EVAL_LIMIT, reference: list[np.ndarray] | None = None) -> dict[str, float]:
    """Accuracy of the built artifact (its ``runner``) against the original ONNX model (empty without eval data);
    ``reference``: the original model's outputs on the eval data, when already computed.

    Args:
        runner: the artifact's runner (``run(feed)`` returns its outputs).
        inputs: the original model and its evaluation data.
        limit: at most this many evaluation samples, run at batch 1.
        reference: the original model's outputs on those samples; None computes them.

    Returns:
        ``snr_db`` and ``cosine``, plus ``top1_agreement`` for classification outputs and
        ``accuracy``, ``baseline_accuracy`` and ``accuracy_delta`` when the data has labels;
        empty without evaluation data.
    """
    from .fidelity import compare_outputs, run

    if inputs.evaluation is None:
        return {}
    ref = reference if reference is not None else run(inputs.model, inputs.evaluation, limit)
    f = compare_outputs(ref, _outputs(runner, inputs.evaluation, limit), inputs.evaluation.labels)
    out = {"snr_db": f.snr_db, "cosine": f.cosine}
    if f.top1_agreement is not None:
        out["top1_agreement"] = f.top1_agreement
    if f.accuracy is not None:
        out.update({"accuracy": f.accuracy, "baseline_accuracy": f.reference_accuracy, "accuracy_delta": f.accuracy_delta})
    return out


def check_numerics(artifact_dir: Path, runner, inputs: BuildInputs, on_target: bool) -> tuple[dict[str, float], str]:
    """The artifact's accuracy and how it was obtained.

    When this host is of the target's CPU class (``on_target``), the artifact's runtime here (``runner``) is what the
    device runs and decides.  Otherwise the artifact's exact numerics decide (its backend's reference, e.g. a QDQ graph
    run as written, where the backend has one) and this host's kernels are reported under ``host_*`` keys: an int8
    artifact for a VNNI CPU can saturate on an AVX2 host's kernels, and a TensorRT engine cannot run here at all.

    Args:
        artifact_dir: the artifact's directory (its backend's reference is opened from it).
        runner: the artifact's runner on this host, or None where its runtime cannot run here.
        inputs: the original model and its evaluation data.
        on_target: whether this host is of the target's CPU class.

    Returns:
        (accuracy metrics as :func:`validate` returns them, possibly with ``host_*`` keys; a sentence
        saying how they were obtained).  ``({}, "")`` without evaluation data; the sentence is empty
        when nothing could be run.
    """
    from .backends.base import open_reference
    from .fidelity import run

    if inputs.evaluation is None:
        return {}, ""
    if runner is not None and on_target:
        return validate(runner, inputs), "the artifact's runtime on this host, of the target's CPU class"
    ref = run(inputs.model, inputs.evaluation, EVAL_LIMIT)
    reference = open_reference(artifact_dir)
    try:
        exact = validate(reference, inputs, reference=ref) if reference is not None else {}
    finally:
        if reference is not None:
            reference.close()
    host = validate(runner, inputs, reference=ref) if runner is not None else {}
    if exact:
        how = "exact reference numerics (QDQ run as written, onnxruntime graph optimizations off), independent of this CPU"
        return {**exact, **{f"host_{k}": v for k, v in host.items()}}, how + ("; this host's kernels (another CPU class): "
                                                                             "host_* keys" if host else "")
    return host, ("the artifact's runtime on this host, which is not of the target's class" if host else "")


def measure(runner, inputs: BuildInputs, repeats: int = 50) -> float:
    """Median latency (ms, batch 1) of the artifact's ``runner`` here.

    Args:
        runner: the artifact's runner.
        inputs: the first evaluation batch is fed, or zeros of the model's input shapes without evaluation data.
        repeats: timed runs (after 5 warm-up runs).

    Returns:
        The median run time in milliseconds.
    """
    from .profiling import time_runs

    feed = next(inputs.evaluation.batches(1)) if inputs.evaluation is not None else _zeros(inputs)
    return float(np.median(time_runs(lambda: runner.run(feed), warmup=5, repeats=repeats)))


def host_description() -> str:
    """A one-line description of this host's CPU, for the manifest's ``measured_on``.

    Returns:
        ``"<arch> <CPU model> [<kernel class>] (<host name>)"``.
    """
    import platform

    from .hostinfo import detect

    cpu = detect()
    return f"{cpu.arch} {cpu.model_name} [{cpu.kernel_class}] ({platform.node()})".strip()


def host_is(target: Target, unit: str | None = None) -> bool:
    """Whether this machine stands for the target: a CPU unit (``unit``, else any) of the same architecture and
    kernel class (:func:`edgeopt.hostinfo.kernel_class`) as this host's CPU.

    Args:
        target: the target.
        unit: the name of one of the target's compute units; None checks them all.

    Returns:
        True when the unit (or any unit) runs like this host's CPU.
    """
    from .hostinfo import runs_like_host

    units = [target.compute_units[unit]] if unit else list(target.compute_units.values())
    return any(runs_like_host(u.arch, u.isa) for u in units)


def _zeros(inputs: BuildInputs) -> dict[str, np.ndarray]:
    from .calibration import model_inputs

    return {n: np.zeros(inputs.analysis.inputs[n], dtype) for n, _, dtype in model_inputs(inputs.model)}


def build(inputs: BuildInputs, target: Target, out_dir: str | Path, *, plan: Plan | None = None,
          backend: str | None = None, precision: str | None = None, max_accuracy_drop: float | None = None,
          validate_artifact: bool = True, profile: bool = True, progress: Progress | None = None) -> Artifact:
    """Build one optimized artifact for ``target`` in ``out_dir`` (replaced atomically) and return its manifest.

    Args:
        inputs: the model, its analysis, and optional calibration and evaluation data.
        target: the target to build for.
        out_dir: the destination directory; it receives the artifact's files, its manifest, ``plan.json`` and,
            when passes ran, ``passes.json``.
        plan: a saved plan to replay (checked with :func:`check_replay`); None plans with :func:`plan_for`.
        backend: restrict planning to this backend.
        precision: force this whole-model recipe when planning.
        max_accuracy_drop: the largest accuracy loss allowed, used in planning and checked on the built artifact.
        validate_artifact: measure the artifact's accuracy on the evaluation data.
        profile: time the artifact on this host where its runtime runs here.
        progress: called with one status line per stage.

    Returns:
        The artifact's manifest, with measured accuracy and latency where they were obtained.

    Raises:
        PlanError: ``plan`` does not match the model or target.
        EdgeoptError: the validated artifact loses more than ``max_accuracy_drop``, or planning or
            conversion fails (e.g. :class:`~edgeopt.errors.BudgetError`).
    """
    from .backends.base import build_artifact, write_manifest
    from .io import atomic_dir

    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    if plan is None:
        say(f"{target.name}: planning")
        plan = plan_for(inputs, target, backend=backend, precision=precision, max_accuracy_drop=max_accuracy_drop,
                        progress=say)
    else:
        check_replay(plan, inputs, target)
    say(f"{target.name}: passes")
    model, notes = structural_passes(inputs.model, plan, inputs.calib)
    with atomic_dir(out_dir) as tmp:
        say(f"{target.name}: converting with {plan.backend}")
        artifact_dir = tmp / "artifact"
        artifact = build_artifact(model, plan, artifact_dir, inputs.calib)
        accuracy, measured, how = {}, None, ""
        on_target = host_is(target, plan.unit)
        runner = open_here(artifact_dir) if validate_artifact or profile else None
        try:
            if validate_artifact:
                say(f"{target.name}: validating")
                accuracy, how = check_numerics(artifact_dir, runner, inputs, on_target)
            measured = measure(runner, inputs) if profile and runner is not None else None
        finally:
            if runner is not None:
                runner.close()
        # keep what the backend validated itself (Core ML: its ONNX equivalent), add what ran here
        update = {"accuracy": {**artifact.accuracy, **accuracy}, "measured_latency_ms": measured,
                  "numerics": {**artifact.numerics, **({"validated_with": how} if how else {})}}
        if measured is not None:
            update["measured_on"], update["measured_on_target"] = host_description(), on_target
        artifact = artifact.model_copy(update=update)
        drop = -accuracy.get("accuracy_delta", 1.0 - accuracy.get("top1_agreement", 1.0))
        if max_accuracy_drop is not None and accuracy and drop > max_accuracy_drop:
            raise EdgeoptError(f"{target.name}: the built artifact loses {drop:.4f} accuracy, more than --max-accuracy-drop "
                               f"{max_accuracy_drop}; plan with a smaller drop or more calibration data")
        write_manifest(artifact, artifact_dir)
        for p in list(artifact_dir.iterdir()):
            p.rename(tmp / p.name)
        artifact_dir.rmdir()
        (tmp / "plan.json").write_text(plan.model_dump_json(indent=2) + "\n")
        if notes:
            (tmp / "passes.json").write_text(json.dumps(notes, indent=2) + "\n")
    say(f"{target.name}: done")
    return artifact


def plan_for(inputs: BuildInputs, target: Target, *, backend: str | None = None, precision: str | None = None,
             max_accuracy_drop: float | None = None, sensitivity: dict | None = None, measure_latency: bool = False,
             progress: Progress | None = None) -> Plan:
    """The planner's choice: per-layer search on measured sensitivity when calibration data exists
    (and no precision is forced), else the whole-model recipe search.  ``measure_latency`` profiles
    uniform builds on this machine (it must be the target device) and plans on measured layer times.

    Args:
        inputs: the model, its analysis and optional calibration data.
        target: the target to plan for.
        backend: restrict the search to this backend.
        precision: force this whole-model recipe (skips the per-layer search).
        max_accuracy_drop: the largest predicted top-1 drop the per-layer search may trade for latency.
        sensitivity: per-layer sensitivity already measured; None measures it on the calibration data.
        measure_latency: profile layer latency for the first candidate backend option on this machine.
        progress: called with status lines while measuring.

    Returns:
        The plan from :func:`~edgeopt.planner.search_plan` or :func:`~edgeopt.planner.make_plan`.

    Raises:
        EdgeoptError: ``max_accuracy_drop`` is given without calibration data, or the planner finds
            no plan (e.g. :class:`~edgeopt.errors.BudgetError`).
    """
    from .planner import make_plan, search_plan

    if precision is not None or inputs.calib is None:
        if max_accuracy_drop is not None and inputs.calib is None:
            raise EdgeoptError("--max-accuracy-drop needs calibration data (--calib) to measure layer sensitivity")
        return make_plan(inputs.analysis, target, backend=backend, precision=precision)
    if sensitivity is None:
        from .sensitivity import measure

        sensitivity = measure(inputs.model, inputs.calib, progress=progress)
    measured = None
    if measure_latency:
        from . import latency_table
        from .planner import candidate_options

        option = candidate_options(target, backend)[0]
        if progress:
            progress(f"profiling layer latency on this machine ({option.label})")
        measured = latency_table.measure(inputs, target, option)
    return search_plan(inputs.analysis, target, sensitivity, backend=backend, max_accuracy_drop=max_accuracy_drop,
                       measured=measured)


@dataclass
class FleetResult:
    entries: list  # report.FleetEntry
    report: Path


def fleet(inputs: BuildInputs, targets: list[Target], out_dir: str | Path, *, jobs: int = 2,
          max_accuracy_drop: float | None = None, progress: Progress | None = None) -> FleetResult:
    """Build every target into ``out_dir/<target>/`` in parallel, sharing calibration data and
    sensitivity; write ``fleet.json`` and ``report.html``.  The directory is replaced atomically.

    A target that fails (a user error or a bug) is recorded as a failed entry; the others still build.

    Args:
        inputs: the model, its analysis, and optional calibration and evaluation data.
        targets: the targets to build.
        out_dir: the destination directory.
        jobs: targets built at once (at least 1).
        max_accuracy_drop: passed to :func:`plan_for` for every target (the built artifacts are not checked against it).
        progress: called with status lines.

    Returns:
        One entry per target (in ``targets`` order) and the path of ``report.html``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .io import atomic_dir
    from .report import FleetEntry, fleet_html

    say = progress or (lambda _msg: None)
    sensitivity = None
    if inputs.calib is not None:
        from .sensitivity import measure

        say("measuring layer sensitivity (shared by all targets)")
        sensitivity = measure(inputs.model, inputs.calib, progress=say)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:

        def one(target: Target) -> FleetEntry:
            try:
                plan = plan_for(inputs, target, max_accuracy_drop=max_accuracy_drop, sensitivity=sensitivity)
                art = build(inputs, target, tmp / target.name, plan=plan, progress=say)
                return FleetEntry(target=target.name, ok=True, artifact=art)
            except EdgeoptError as e:
                say(f"{target.name}: failed: {e}")
                return FleetEntry(target=target.name, ok=False, error=str(e))
            except Exception as e:  # a bug in one backend must not sink the other targets; it is reported
                say(f"{target.name}: internal error: {type(e).__name__}: {e}")
                return FleetEntry(target=target.name, ok=False, error=f"internal error: {type(e).__name__}: {e}")

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            entries = list(pool.map(one, targets))
        (tmp / "fleet.json").write_text(json.dumps([e.model_dump(mode="json") for e in entries], indent=2) + "\n")
        (tmp / "report.html").write_text(fleet_html(inputs.path.name, entries))
    return FleetResult(entries, out_dir / "report.html")
