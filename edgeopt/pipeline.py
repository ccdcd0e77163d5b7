"""The one orchestrator: plan -> structural passes -> backend convert -> validate -> profile -> manifest.

Everything it writes goes to a temporary directory beside the destination that
replaces the destination only when the whole build succeeded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import EdgeoptError, PlanError
from .inputs import BuildInputs
from .types import AccuracyBudget, Artifact, Plan, RecoverySettings, Target

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


def recoverable(plan: Plan) -> bool:
    """Whether recovery can help the plan: it prunes, or stores weights in a format recovery trains for (4-bit)."""
    from .technique import get

    return any(lp.sparsity != "none" or get(lp.precision).recovered_noise < 1.0 for lp in plan.layers)


def recover_model(inputs: BuildInputs, model: onnx.ModelProto, plan: Plan, settings: RecoverySettings,
                  progress: Progress | None = None):
    """Fine-tune ``model`` (the pruned student) against the original (``inputs.model``) on the calibration data
    (:func:`edgeopt.recover.recover`), with LSQ fake-quant for the weights the plan stores in 4 bits; returns the
    recovered model and its :class:`~edgeopt.types.RecoveryRecord`."""
    from .recover import recover
    from .technique import get

    weights = {ly.name: ly.weights for ly in inputs.analysis.layers}
    present = {t.name for t in model.graph.initializer}
    quantize = {w: get(lp.precision).weight_bits for lp in plan.layers
                if get(lp.precision).recovered_noise < 1.0 and get(lp.precision).weight_bits <= 4
                for w in weights.get(lp.name, [])[:1] if w in present}
    say = progress or (lambda _msg: None)
    last = [0.0]

    def step(i: int, n: int, loss: float) -> None:
        import time

        if time.monotonic() - last[0] >= 2 or i == n:
            last[0] = time.monotonic()
            say(f"recovery {i}/{n}: loss {loss:.4g}")

    # checkpoints are scored on the held-out data when there is some (else on calibration samples held out of
    # training: the post-training re-fits read the first ones)
    res = recover(inputs.model, model, inputs.calib, steps=settings.steps, lr=settings.lr,
                  time_budget_s=settings.time_budget_s, quantize=quantize or None, seed=settings.seed, progress=step,
                  validation=inputs.evaluation, block_steps=settings.block_steps)
    # recovery must beat post-training where it counts: on held-out samples, by the budget's own measure
    from .fidelity import compare_outputs, run

    held = inputs.evaluation if inputs.evaluation is not None else inputs.calib
    ref = run(inputs.model, held, EVAL_LIMIT, original=True)
    before = compare_outputs(ref, run(model, held, EVAL_LIMIT), held.labels)
    after = compare_outputs(ref, run(res.model, held, EVAL_LIMIT), held.labels)

    kept = _rank(after) >= _rank(before)
    record = res.record.model_copy(update={"heldout_before": _shown(before), "heldout_after": _shown(after),
                                           "kept": kept})
    return (res.model if kept else model), record


def fit_inputs(inputs: BuildInputs, target: Target, settings: RecoverySettings, allow_resolution: bool,
               refused: Exception, *, backend: str | None = None, progress: Progress | None = None):
    """Make a model that misses ``target``'s RAM/storage fit (``--recover``): :func:`edgeopt.fit.fit_search` proposes
    channel pruning (and a smaller square input with ``allow_resolution``), :func:`edgeopt.fit.apply_fit` applies it
    (consumers re-fitted on the calibration data), :func:`edgeopt.recover.recover` fine-tunes it against the original
    (at a lower resolution through a fixed resampling prefix, so that both see the same images), and the result comes
    back as new build inputs (data resampled to the new size) with a :class:`~edgeopt.types.FitRecord`.

    Raises:
        ``refused`` (the planner's own refusal), with what the fit tried appended, when no proposal fits or the
        model already fits (then the refusal was not about RAM/storage).
    """
    import tempfile

    import onnx

    from .calibration import as_calibration
    from .fidelity import compare_outputs, run
    from .fit import apply_fit, fit_search, resize_images, strip_resize_prefix, with_resize_prefix
    from .recover import recover
    from .types import FitRecord

    say = progress or (lambda _msg: None)
    runnable, _, _ = _runnable(inputs.analysis, target, backend)
    option = runnable[0]
    why: list[str] = []
    say(f"{target.name}: searching for channel pruning{' and a lower resolution' if allow_resolution else ''} "
        "that fits")
    prop = fit_search(inputs.model, inputs.analysis, target, option, allow_resolution=allow_resolution, why=why)
    if prop is None or not prop.ratios and prop.resolution is None:
        tried = "; ".join(why) if why else "the model already fits its RAM and storage"
        hint = "" if allow_resolution else " (--allow-resolution lets it lower the input size)"
        raise type(refused)(f"{refused}; fitting by channel pruning found nothing: {tried}{hint}") from None
    say(f"{target.name}: fitting: {prop.summary()}")
    calib, held = inputs.calib, inputs.evaluation if inputs.evaluation is not None else inputs.calib
    if calib.per_sample or len(inputs.analysis.inputs) != 1:
        raise EdgeoptError("fitting a model to its target needs one stacked image-like input (per-sample data and "
                           "several inputs are not supported)")
    fitted = apply_fit(inputs.model, prop, calib)
    side, src = prop.resolution, prop.original_side
    student = with_resize_prefix(fitted, src, side) if side else fitted
    ref = run(inputs.model, held, EVAL_LIMIT, original=True)
    before = compare_outputs(ref, run(student, held, EVAL_LIMIT), held.labels)
    say(f"{target.name}: recovering the fitted model (at most {settings.steps} steps)")
    res = recover(inputs.model, student, calib, steps=settings.steps, lr=settings.lr,
                  time_budget_s=settings.time_budget_s, seed=settings.seed, validation=inputs.evaluation,
                  block_steps=settings.block_steps)
    after = compare_outputs(ref, run(res.model, held, EVAL_LIMIT), held.labels)
    kept = _rank(after) >= _rank(before)
    chosen = res.model if kept else student
    model = strip_resize_prefix(chosen, side) if side else chosen
    name = next(iter(inputs.analysis.inputs))

    def data(d):
        x = d.feeds()[name]
        return as_calibration(resize_images(x, side) if side else x, model, labels=d.labels)

    work = Path(tempfile.mkdtemp(prefix="edgeopt-fit-"))  # inside the run's scratch folder (io.run_scratch)
    path = work / f"{inputs.path.stem}.fitted.onnx"
    onnx.save(model, path)
    fitted_inputs = BuildInputs.prepare(path, calib=data(calib), eval_data=data(held) if held is not calib else None,
                                        source=inputs.source)
    record = FitRecord(summary=prop.summary(), rationale=list(prop.rationale), original_side=src, resolution=side,
                       params_before=prop.params_before, params_after=prop.params_after,
                       predicted_ram=prop.predicted_ram, predicted_storage=prop.predicted_storage,
                       heldout_samples=before.samples, agreement_fitted=before.top1_agreement,
                       agreement_recovered=after.top1_agreement, snr_db_fitted=before.snr_db,
                       snr_db_recovered=after.snr_db,
                       recovery=res.record.model_copy(update={"kept": kept, "heldout_before": _shown(before),
                                                              "heldout_after": _shown(after)}))
    return fitted_inputs, record


def _rank(f) -> tuple:
    """How a candidate compares with another against the original: accuracy (labels), else top-1 agreement, then SNR."""
    first = f.accuracy if f.accuracy is not None else f.top1_agreement
    return (first if first is not None else 0.0, f.snr_db)


def _shown(f) -> dict[str, float]:
    return {k: v for k, v in (("accuracy", f.accuracy), ("top1_agreement", f.top1_agreement), ("snr_db", f.snr_db))
            if v is not None}


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
    """The artifact's outputs over ``data``: batch 1 (artifacts may have fixed shapes), the model's fixed batch, or
    one sample at a time in the model's exact input shapes (per-sample data), joined like the reference's
    (:func:`edgeopt.fidelity.run`)."""
    from .fidelity import join_outputs

    parts: list[list[np.ndarray]] = []
    for feed, real in data.counted_batches(1, limit=limit):
        res = runner.run(feed)
        padded = not data.per_sample and real < len(next(iter(feed.values())))
        parts.append([np.asarray(r, dtype=np.float32)[:real] if padded and np.ndim(r) else np.asarray(r, np.float32)
                      for r in res])
    return join_outputs(parts, data.per_sample)


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
    ref = reference if reference is not None else run(inputs.model, inputs.evaluation, limit, original=True)
    f = compare_outputs(ref, _outputs(runner, inputs.evaluation, limit), inputs.evaluation.labels)
    out = {"snr_db": f.snr_db, "cosine": f.cosine}
    if f.top1_agreement is not None:
        out["top1_agreement"] = f.top1_agreement
    if f.accuracy is not None:
        out.update({"accuracy": f.accuracy, "baseline_accuracy": f.reference_accuracy, "accuracy_delta": f.accuracy_delta})
    return out


def check_numerics(artifact_dir: Path, runner, inputs: BuildInputs, on_target: bool,
                   reference: list[np.ndarray] | None = None) -> tuple[dict[str, float], str]:
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
        reference: the original model's outputs on the evaluation data, when already computed.

    Returns:
        (accuracy metrics as :func:`validate` returns them, possibly with ``host_*`` keys; a sentence
        saying how they were obtained).  ``({}, "")`` without evaluation data; the sentence is empty
        when nothing could be run.
    """
    from .backends.base import open_reference
    from .fidelity import run

    if inputs.evaluation is None:
        return {}, ""
    ref = reference if reference is not None else run(inputs.model, inputs.evaluation, EVAL_LIMIT, original=True)
    if runner is not None and on_target:
        return validate(runner, inputs, reference=ref), "the artifact's runtime on this host, of the target's CPU class"
    exact_runner = open_reference(artifact_dir)
    try:
        exact = validate(exact_runner, inputs, reference=ref) if exact_runner is not None else {}
    finally:
        if exact_runner is not None:
            exact_runner.close()
    host = validate(runner, inputs, reference=ref) if runner is not None else {}
    if exact:
        how = getattr(exact_runner, "description", None) or (
            "exact reference numerics (QDQ run as written, onnxruntime graph optimizations off), independent of this CPU")
        return {**exact, **{f"host_{k}": v for k, v in host.items()}}, how + ("; this host's kernels (another CPU class): "
                                                                             "host_* keys" if host else "")
    return host, ("the artifact's runtime on this host, which is not of the target's class" if host else "")


def measure(runner, inputs: BuildInputs, repeats: int = 50) -> float:
    """Median latency (ms, batch 1) of the artifact's ``runner`` here.

    Args:
        runner: the artifact's runner.
        inputs: what is fed: :meth:`BuildInputs.timing_feed` (the given ``--inputs``, else the first evaluation or
            calibration sample as the model takes it; zeros of the model's input shapes only without any data).
        repeats: timed runs (after 5 warm-up runs).

    Returns:
        The median run time in milliseconds.
    """
    from .profiling import time_runs

    feed, _ = inputs.timing_feed()
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
    """Zeros in the model's input shapes: fed only when no data was given at all (see :meth:`BuildInputs.timing_feed`)."""
    from .inputs import zeros_feed

    return zeros_feed(inputs.model, inputs.analysis)


#: builds accuracy control may make for one artifact (the last one is the float fallback)
MAX_CONTROL_ROUNDS = 4


@dataclass
class Planning:
    """What planning knows about one model on one target, kept across accuracy-control rounds: the accuracy budget,
    the error model fitted on measured artifacts, the per-layer sensitivity measured so far, and the original model's
    outputs on the evaluation data."""

    inputs: BuildInputs
    target: Target
    backend: str | None = None
    max_accuracy_drop: float | None = None
    min_snr_db: float | None = None
    sensitivity: dict = field(default_factory=dict)
    progress: Progress | None = None
    measured: object | None = None  # a latency table for the first option, when profiled
    reference: list[np.ndarray] | None = None
    budget: AccuracyBudget | None = None
    error_model: object | None = None  # accuracy.ErrorModel
    #: the build recovers compressed models (--recover): pruning and 4-bit weights are planned at their predicted
    #: post-recovery noise (planner.after_recovery)
    recover: bool = False

    def prepare(self) -> None:
        """Compute the reference outputs, the budget and the error model (once; needs data)."""
        from .accuracy import ErrorModel, choose_budget, is_classification, output_head
        from .fidelity import check_finite_reference, run

        data = self.inputs.evaluation or self.inputs.calib
        if self.budget is not None or data is None:
            return
        if self.reference is None:
            self.reference = run(self.inputs.model, data, EVAL_LIMIT, original=True)
            check_finite_reference(self.reference)
        labels = data.labels is not None
        classes = is_classification(self.reference[0], output_head(self.inputs.model))
        self.budget = choose_budget(classes, labels, self.max_accuracy_drop, self.min_snr_db)
        self.error_model = ErrorModel(self.reference[0], data.labels, self.budget)

    int8_choices: dict = field(default_factory=dict)  # layout json -> (chosen settings, note)

    def int8_settings(self, option) -> tuple[dict, dict, str]:
        """The int8 pass settings for a backend option: the layout its unit runs exactly and the backend requires,
        and the calibration chosen for this model by measurement (:data:`INT8_CANDIDATES`: the full-model int8 graph
        run as written on the comparison samples, lowest output noise wins).

        Returns:
            (settings sensitivity simulates with, the chosen calibration settings for the plan, a rationale line).
        """
        from . import backends
        from .backends.base import int8_layout
        from .hostinfo import int8_scheme

        backend = backends.get(option.backend).BACKEND
        if "int8" not in option.precisions or self.inputs.calib is None or not backend.uses_int8_pass:
            return {}, {}, ""
        unit = self.target.compute_units[option.unit]
        layout = {**int8_layout(int8_scheme(option.backend, unit.arch, unit.isa) if unit.arch else None),
                  **backend.int8_config}
        key = json.dumps(layout, sort_keys=True)
        if key not in self.int8_choices:
            if self.progress:
                self.progress(f"choosing int8 calibration for {option.label} ({len(INT8_CANDIDATES)} candidates)")
            noise = {json.dumps(c, sort_keys=True): int8_noise(self.inputs, {**layout, **c}) for c in INT8_CANDIDATES}
            best = min(noise, key=noise.get)
            shown = ", ".join(f"{_calib_label(json.loads(k))} {v:.3g}" for k, v in noise.items())
            note = f"int8 calibration for this model, by measured whole-model output noise: {shown}; chose {_calib_label(json.loads(best))}"
            chosen = json.loads(best)
            from .techniques.int8 import refine_ranges

            overrides, why = refine_ranges(self.inputs.model, self.inputs.calib, {**layout, **chosen},
                                           progress=self.progress)
            if overrides:
                chosen["range_overrides"] = {k: [float(lo), float(hi)] for k, (lo, hi) in sorted(overrides.items())}
            note += f"; {why}" if why else ""
            self.int8_choices[key] = (chosen, note)
        chosen, note = self.int8_choices[key]
        return {**layout, **chosen}, chosen, note

    def measure_sensitivity(self, techniques: list[str], int8_config: dict | None = None,
                            sparsity_layers: list[str] | None = None) -> dict:
        """Measure the techniques not yet measured (on-disk cache shared with other runs); int8 under
        ``int8_config`` (the only technique whose simulation depends on chosen settings); pruning patterns only on
        ``sparsity_layers`` where given (pruning pays on the layers that cost time; each trial refits weights).

        Returns:
            ``(layer, technique) -> Sensitivity`` for the requested techniques.
        """
        from . import technique
        from .sensitivity import measure

        out: dict = {}
        sparse = [t for t in techniques if technique.get(t).kind == "sparsity"]
        groups = [([t for t in techniques if t != "int8" and t not in sparse], None, None),
                  (sparse, None, sparsity_layers),
                  (["int8"] if "int8" in techniques else [], int8_config, None)]
        for techs, cfg, layers in groups:
            if not techs:
                continue
            key = ("configs", json.dumps(cfg or {}, sort_keys=True))
            store = self.sensitivity if cfg is None else self.sensitivity.setdefault(key, {})
            have = {k[1] for k in store if k[0] != "configs"}
            missing = [t for t in techs if t not in have]
            if missing and self.inputs.calib is not None:
                store.update(measure(self.inputs.model, self.inputs.calib, options=missing, progress=self.progress,
                                     configs={"int8": cfg} if cfg else None, layers=layers))
            out.update({k: v for k, v in store.items() if k[0] != "configs" and k[1] in techs})
        return out


#: int8 calibration settings tried per model (the int8 pass's percentile default, a wider percentile, min/max)
INT8_CANDIDATES: tuple[dict, ...] = ({"calibration": "percentile", "percentile": 99.99},
                                     {"calibration": "percentile", "percentile": 99.99, "bias_correction": True},
                                     {"calibration": "percentile", "percentile": 99.999},
                                     {"calibration": "minmax"})


def _calib_label(c: dict) -> str:
    what = f"percentile {c['percentile']:g}" if c.get("calibration") == "percentile" else str(c.get("calibration"))
    return what + (" + bias correction" if c.get("bias_correction") else "")


def int8_noise(inputs: BuildInputs, config: dict, samples: int = 16) -> float:
    """Output noise (power relative to the signal) of the whole model in int8 with the int8 pass's ``config``
    calibrated on the first ``samples`` calibration samples (a quarter of the usual: this only ranks settings), run as
    written (exact numerics) on the same samples; cached on disk like sensitivity.

    Args:
        inputs: the model and its calibration data.
        config: int8 pass settings.
        samples: samples compared.

    Returns:
        The relative noise power of the first output (inf when the graph cannot be quantized or run).
    """
    import onnx

    from .calibration import fingerprint
    from .fidelity import relative_noise, run_feeds, session
    from .passes import PassError
    from .technique import ApplyContext, get
    from .zoo import cache_dir

    calib = inputs.calib
    store = cache_dir() / "int8choice" / f"{fingerprint(inputs.analysis.sha256, calib, {'v': 2, 'samples': samples, **config})[:24]}.json"
    if store.is_file():
        try:
            return float(json.loads(store.read_text())["noise"])
        except (ValueError, KeyError, TypeError):
            pass
    sub = calib.subset(min(samples, len(calib)))
    feeds = sub.feeds()
    model = onnx.ModelProto()
    model.CopyFrom(inputs.model)
    layers = [n.name for n in model.graph.node]  # as a plan's int8 region: activations between layers too
    try:
        q, _ = get("int8").apply(model, layers, ApplyContext(calib=sub, configs={"int8": config}))
        out = run_feeds(session(q, optimize=False), feeds)[0]
    except (PassError, EdgeoptError):
        return float("inf")
    noise = relative_noise(run_feeds(session(inputs.model), feeds)[0], out)
    from .io import atomic_write_text

    atomic_write_text(store, json.dumps({"noise": noise, "config": config}))
    return noise


def _runnable(analysis, target: Target, backend: str | None) -> tuple[list, list[str], list[str]]:
    """The target's options that run the model (pre-flight, before anything expensive), rationale, refusals."""
    from .planner import candidate_options, check_option, option_refusal

    runnable, rationale, unsupported = [], [], []
    for option in candidate_options(target, backend):
        reasons = check_option(analysis, option)
        if reasons:
            unsupported.append(option_refusal(analysis, target, option, reasons))
            rationale.append(f"skipped {option.label}: {len(reasons)} layer(s) unsupported, first: {reasons[0]}")
        else:
            runnable.append(option)
    if not runnable:
        from .errors import UnsupportedOpError

        raise UnsupportedOpError(f"no backend of target {target.name} can run this model: " + " | ".join(unsupported))
    return runnable, rationale, unsupported


def plan_latency(pl: Planning, *, noise_cap: float | None = None, float_only: bool = False,
                 enforce_budgets: bool = True) -> Plan:
    """The fastest plan within the accuracy budget (the default objective).

    Without calibration data only formats presumed faithful (fp32, fp16) are considered: nothing else can be
    calibrated or measured.  With it, the per-layer search (:func:`~edgeopt.planner.optimize_option`) runs on each
    backend option in the target's preference order, measuring sensitivity only for the techniques that option
    runs, under the noise cap the error model derives from the budget (or ``noise_cap``).

    Args:
        pl: the planning state (budget, error model and sensitivity are filled in and reused).
        noise_cap: the largest predicted total noise (accuracy control passes a tightened one); None: from the budget.
        float_only: consider only formats presumed faithful (accuracy control's last resort).
        enforce_budgets: raise when no plan meets the RAM/storage/latency budgets; else return the closest.

    Returns:
        The plan, with its accuracy prediction and rationale.

    Raises:
        UnsupportedOpError: no backend option runs the model's ops (checked first).
        BudgetError: no plan meets the budgets and ``enforce_budgets`` is True.
    """
    from . import technique
    from .errors import BudgetError
    from .planner import _describe, fastest_recipe, missed_goals, optimize_option, summarize, to_plan
    from .types import AccuracyPrediction

    inputs, target = pl.inputs, pl.target
    analysis = inputs.analysis
    runnable, rationale, _ = _runnable(analysis, target, pl.backend)
    faithful = [t.name for t in technique.precisions() if t.presumed_faithful]
    best = fitting = None
    if inputs.calib is None or float_only:
        why = ("accuracy control's last resort" if float_only else
               "no calibration data: formats that need data to calibrate or to measure their accuracy are not considered "
               "(give --calib)")
        rationale.append(f"{why}; candidates: {', '.join(faithful)}")
        for option in runnable:
            allowed = ["int8"] if option.requires_full_integer else faithful
            ev = fastest_recipe(analysis, target, option, allowed)
            if ev is None:
                rationale.append(f"skipped {option.label}: it runs none of {', '.join(allowed)}")
                continue
            if option.requires_full_integer and inputs.calib is None:
                rationale.append(f"{option.label} runs full-integer models only: the build needs calibration data")
            if ev.fits:
                if ev.meets_goals:
                    rationale.append(f"chose the fastest: {_describe(ev)}")
                    return _float_plan(pl, ev, rationale)
                rationale.append(f"fits, misses a goal: {_describe(ev)}")
                fitting = ev if fitting is None or ev.latency_ms < fitting.latency_ms else fitting
                continue
            rationale.append(f"rejected {_describe(ev)}")
            best = ev if best is None or ev.overshoot < best.overshoot else best
        if fitting is not None:  # no option meets the latency goal: the fastest within the limits
            rationale.append(f"chose the fastest: {_describe(fitting)}")
            rationale.append(missed_goals(fitting.checks, target.name))
            return _float_plan(pl, fitting, rationale)
        if best is None:
            raise BudgetError(f"no backend option of {target.name} runs {', '.join(faithful)}; give calibration data "
                              f"(--calib) so that quantized formats can be planned")
        if not enforce_budgets:
            return to_plan(analysis, target, best, rationale)
        raise BudgetError(f"no plan meets the budgets of {target.name}; closest: {_describe(best)}"
                          + ("" if inputs.calib is not None else "; calibration data (--calib) would allow quantized formats"))

    pl.prepare()
    model = pl.error_model
    cap = noise_cap if noise_cap is not None else model.noise_cap()
    rationale.append(f"objective: fastest plan with {pl.budget.describe()}: predicted total output noise <= {cap:.3g}")
    if pl.recover:
        rationale.append("with recovery (--recover): pruning and 4-bit weights planned at their predicted noise after "
                         "distillation fine-tuning (each technique's recovered_noise share of the post-training noise); "
                         "the recovered artifact is measured")
    best_res = None
    chosen_configs: dict = {}
    for option in runnable:
        techs = [t for t in [*option.precisions, *(s.pattern for s in option.sparsity)]
                 if t != technique.REFERENCE and technique.get(t).simulate is not None]
        sim_int8, chosen, note = pl.int8_settings(option)
        if note:
            rationale.append(f"{option.label}: {note}")
        # layers are ranked without the chosen bias correction (it re-runs the model per layer; it lowers every
        # layer's noise a little, so the ranking stays and the prediction errs on the safe side)
        sim_int8 = {k: v for k, v in sim_int8.items() if k != "bias_correction"}
        heavy = costly_layers(analysis, target, option)
        sens = pl.measure_sensitivity(techs, sim_int8 or None, sparsity_layers=heavy)
        if pl.recover:
            from .planner import after_recovery

            sens = after_recovery(sens)
        chosen_configs = {"int8": chosen} if chosen else {}
        measured = pl.measured if pl.measured is not None and getattr(pl.measured, "option", None) == option.label else None
        res = None
        for variant in _float_variants(option):
            r = optimize_option(analysis, target, variant, sens, cap, measured=measured)
            if r is not None and (res is None or _better(r, res, cap)):
                res = r
        if res is None:
            ev = fastest_recipe(analysis, target, option, faithful)
            if ev is None:
                continue
            noise = 0.0
            rationale.append(f"{option.label}: no layer with measured sensitivity; fastest faithful recipe {ev.recipe}")
        else:
            ev, noise = res.evaluation, res.noise
            rationale.append(f"{option.label}: from the '{res.start}' start, {res.moves} move(s), {res.evaluations} "
                             f"evaluation(s), stopped: {res.stopped}; {summarize(ev.layers)}; predicted noise {noise:.3g} "
                             f"(cap {cap:.3g}); {_describe(ev)}")
        if all(lp.precision == technique.REFERENCE and lp.sparsity == "none" for lp in ev.layers):
            rationale.append(f"{option.label}: kept {technique.REFERENCE}: {_why_reference(analysis, target, option, sens, cap)}")
        acc = AccuracyPrediction(budget=pl.budget, predicted_noise=noise, noise_cap=cap,
                                 predicted=round(model.predict(noise), 6) if noise > 0 else None)
        if ev.fits and noise <= cap * (1 + 1e-9):
            if ev.meets_goals:
                return to_plan(analysis, target, ev, rationale, accuracy=acc, configs=chosen_configs)
            rationale.append(f"{option.label}: fits and meets the accuracy budget, misses a goal")
            if fitting is None or ev.latency_ms < fitting[0].latency_ms:
                fitting = (ev, acc, chosen_configs)
            continue
        if best_res is None or ev.overshoot < best_res[0].overshoot:
            best_res = (ev, acc, chosen_configs)
    if fitting is not None:  # no option meets the latency goal: the fastest within the limits and the accuracy budget
        rationale.append(f"chose {fitting[0].option.label}: {missed_goals(fitting[0].checks, target.name)}")
        return to_plan(analysis, target, fitting[0], rationale, accuracy=fitting[1], configs=fitting[2])
    if best_res is None:
        raise BudgetError(f"no backend option of {target.name} has a plan")
    if not enforce_budgets:
        rationale.append(f"no plan meets every budget; kept the closest: {_describe(best_res[0])}")
        return to_plan(analysis, target, best_res[0], rationale, accuracy=best_res[1], configs=best_res[2])
    ev, acc = best_res[0], best_res[1]
    if ev.fits:  # every resource budget is met: the accuracy budget is what no plan meets
        predicted = f" (predicted: {acc.predicted:.4g})" if acc.predicted is not None else ""
        raise BudgetError(f"no plan of {target.name} meets both its resource budgets and the accuracy budget "
                          f"({pl.budget.describe()}): the least noisy plan within the resource budgets "
                          f"({summarize(ev.layers)}; {_describe(ev)}) has predicted output noise "
                          f"{acc.predicted_noise:.3g} > cap {acc.noise_cap:.3g}{predicted}; allow more with "
                          f"--max-accuracy-drop or --min-snr-db, or relax the target's budgets")
    raise BudgetError(f"no plan meets the budgets of {target.name}; closest: {_describe(ev)}")


def _float_plan(pl: Planning, ev, rationale: list[str]) -> Plan:
    """The plan of a whole-model faithful recipe (no sensitivity measured): predicted noise 0 under the budget."""
    from .planner import to_plan
    from .types import AccuracyPrediction

    pl.prepare()
    acc = AccuracyPrediction(budget=pl.budget, predicted_noise=0.0, noise_cap=0.0) if pl.budget is not None else None
    return to_plan(pl.inputs.analysis, pl.target, ev, rationale, accuracy=acc)


#: pruning is tried on the costliest layers that together take this share of the predicted time ...
PRUNE_SHARE = 0.8
#: ... and at most this many of them
PRUNE_LAYERS = 24


def costly_layers(analysis, target: Target, option) -> list[str]:
    """The weighted layers worth trying pruning on: the costliest in the option's float format (predicted) that
    together take :data:`PRUNE_SHARE` of the time, at most :data:`PRUNE_LAYERS`."""
    from .planner import _float_precision, evaluate
    from .technique import WEIGHTED

    fp = _float_precision(option)
    ev = evaluate(analysis, target, option, fp if fp in option.precisions else option.precisions[0])
    weighted = {ly.name for ly in analysis.layers if ly.quantizable and ly.op_type in WEIGHTED}
    rows = sorted(((lp.predicted_ms, lp.name) for lp in ev.layers if lp.name in weighted), reverse=True)
    total = sum(ms for ms, _ in rows) or 1.0
    out, acc = [], 0.0
    for ms, name in rows:
        if acc >= PRUNE_SHARE * total or len(out) >= PRUNE_LAYERS:
            break
        out.append(name)
        acc += ms
    return out


def _float_variants(option) -> list:
    """The option itself, or, for a runtime that computes all float layers in one format, one copy per float format
    it runs (each offering that format and the non-float ones), searched apart."""
    from . import backends, technique

    floats = [p for p in option.precisions if (technique.get(p).activation_bits or 0) >= 16]
    if not backends.get(option.backend).BACKEND.uniform_float or len(floats) < 2:
        return [option]
    return [option.model_copy(update={"precisions": [p for p in option.precisions if p == f or p not in floats]})
            for f in floats]


def _better(a, b, cap: float) -> bool:
    """Whether search result ``a`` beats ``b``: within the noise cap and the budgets, then faster, then smaller."""
    def key(r):
        return (not (r.evaluation.fits and r.noise <= cap * (1 + 1e-9)), round(r.evaluation.latency_ms, 9),
                r.evaluation.storage)

    return key(a) < key(b)


def _why_reference(analysis, target: Target, option, sens: dict, cap: float) -> str:
    """Why a plan stayed in the reference format, from the measurements: no faster candidate, or the least noisy
    faster one already exceeds the noise cap alone, or the faster choices did not pay in the whole plan."""
    from .planner import _candidate_table

    table = _candidate_table(analysis, target, option, sens)
    faster = []
    for name, rows in table.items():
        ref = next((r for r in rows if r[0].precision == "fp32" and r[0].sparsity == "none"), None)
        if ref is not None:
            faster += [(r[1], name, r[0]) for r in rows if r[2] < ref[2] * 0.99]
    if not faster:
        return "no other format or pruning is predicted faster for any layer on this target"
    n, name, c = min(faster, key=lambda f: f[0])
    what = c.precision + (f" + {c.sparsity}" if c.sparsity != "none" else "")
    if n > cap:
        return (f"the least noisy faster choice ({name} in {what}) alone costs output noise {n:.3g}, over the "
                f"budget's cap {cap:.3g}")
    return "the faster choices within the noise cap do not pay once format conversions between layers are counted"


def build(inputs: BuildInputs, target: Target, out_dir: str | Path, *, plan: Plan | None = None,
          backend: str | None = None, precision: str | None = None, max_accuracy_drop: float | None = None,
          min_snr_db: float | None = None, objective: str = "latency", sensitivity: dict | None = None,
          validate_artifact: bool = True, profile: bool = True, progress: Progress | None = None,
          project: dict[str, str] | None = None, recover: RecoverySettings | None = None,
          allow_resolution: bool = False, _fit: bool = True) -> Artifact:
    """Build one optimized artifact for ``target`` in ``out_dir`` (replaced atomically) and return its manifest.

    With the latency objective (the default) the plan is the fastest within the accuracy budget, and the build
    controls accuracy: it measures the built artifact against the original (exact numerics of its backend where this
    host is not of the target's class), and while the artifact misses the budget it re-plans under a tighter noise
    cap (the most damaging layers go back up) and rebuilds, at most :data:`MAX_CONTROL_ROUNDS` times, the last one
    in a faithful float format.  The manifest lists the rounds.

    Args:
        inputs: the model, its analysis, and optional calibration and evaluation data.
        target: the target to build for.
        out_dir: the destination directory; it receives the artifact's files, its manifest, ``plan.json`` and,
            when passes ran, ``passes.json``.
        plan: a saved plan to replay (checked with :func:`check_replay`; no accuracy control); None plans here.
        backend: restrict planning to this backend.
        precision: force this whole-model recipe when planning (no accuracy control).
        max_accuracy_drop: the accuracy budget (top-1 drop with labels, else disagreement); None: the default.
        min_snr_db: an output SNR floor instead (models without class scores).
        objective: ``latency`` (fastest within the budget) or ``fidelity`` (most faithful that meets the target's
            budgets; ``max_accuracy_drop`` is then checked on the artifact, as before).
        sensitivity: per-layer sensitivity already measured (shared by a fleet; extended in place).
        validate_artifact: measure the artifact's accuracy on the evaluation data.
        profile: time the artifact on this host where its runtime runs here.
        progress: called with one status line per stage.
        project: the project file the settings came from (:meth:`edgeopt.project.Project.record`), recorded in the
            manifest.
        recover: fine-tune the pruned / 4-bit model against the original after the structural passes
            (:func:`recover_model`; needs calibration data) and plan with recovery in mind; and when no plan meets
            the target's RAM/storage, make the model fit first (:func:`fit_inputs`: channel pruning, and a smaller
            input with ``allow_resolution``), recover it, and build that.  None: post-training only.
        allow_resolution: with ``recover``, the fit may lower a square image input's resolution.

    Returns:
        The artifact's manifest, with measured accuracy and latency where they were obtained.

    Raises:
        PlanError: ``plan`` does not match the model or target.
        EdgeoptError: the validated artifact misses the accuracy budget after accuracy control, or planning or
            conversion fails (e.g. :class:`~edgeopt.errors.BudgetError`).
    """
    from .accuracy import measured_value, tightened_cap, within
    from .backends.base import build_artifact, write_manifest
    from .io import atomic_dir
    from .planner import summarize
    from .types import ControlStep

    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    pl = None
    if objective not in ("latency", "fidelity"):
        raise EdgeoptError(f"unknown objective '{objective}'; valid: latency, fidelity")
    if recover is not None and inputs.calib is None:
        raise EdgeoptError("--recover fine-tunes on the calibration data: give --calib")
    if allow_resolution and recover is None:
        raise EdgeoptError("--allow-resolution lowers the input size of a model made to fit, which needs --recover")
    if recover is not None and plan is None and _fit:
        from .errors import BudgetError

        kw = dict(backend=backend, precision=precision, max_accuracy_drop=max_accuracy_drop, min_snr_db=min_snr_db,
                  objective=objective, sensitivity=sensitivity, validate_artifact=validate_artifact, profile=profile,
                  progress=progress, project=project)
        try:
            return build(inputs, target, out_dir, recover=recover, **kw, _fit=False)
        except BudgetError as e:
            fitted, fit_record = fit_inputs(inputs, target, recover, allow_resolution, e, backend=backend,
                                            progress=progress)
        from .backends.base import write_manifest

        art = build(fitted, target, out_dir, recover=None, **kw)
        art = art.model_copy(update={"fit": fit_record})
        write_manifest(art, out_dir)
        return art
    record = None
    # the work folder (and its temp files) exists from the start: a build killed while planning leaves nothing
    with atomic_dir(out_dir) as tmp:
        if plan is None:
            say(f"{target.name}: planning")
            if objective == "latency" and precision is None:
                pl = Planning(inputs, target, backend=backend, max_accuracy_drop=max_accuracy_drop, min_snr_db=min_snr_db,
                              sensitivity=sensitivity if sensitivity is not None else {}, progress=say,
                              recover=recover is not None)
                plan = plan_latency(pl)
            else:
                plan = plan_for(inputs, target, backend=backend, precision=precision, max_accuracy_drop=max_accuracy_drop,
                                objective="fidelity", sensitivity=sensitivity, progress=say)
        else:
            check_replay(plan, inputs, target)
        control = pl is not None and validate_artifact and inputs.evaluation is not None and plan.accuracy is not None
        budget = plan.accuracy.budget if plan.accuracy is not None else None
        steps: list[ControlStep] = []
        runner = None
        try:
            for rnd in range(1, MAX_CONTROL_ROUNDS + 1):
                say(f"{target.name}: passes" + (f" (accuracy control round {rnd})" if rnd > 1 else ""))
                model, notes = structural_passes(inputs.model, plan, inputs.calib)
                record = None
                if recover is not None and recoverable(plan):
                    say(f"{target.name}: recovering (distillation fine-tuning, at most {recover.steps} steps)")
                    model, record = recover_model(inputs, model, plan, recover, progress=say)
                    notes.append(f"recovery: {record.steps} steps; held-out {record.heldout_before} -> "
                                 f"{record.heldout_after}: {'kept' if record.kept else 'not kept (post-training was better)'}")
                say(f"{target.name}: converting with {plan.backend}")
                artifact_dir = tmp / f"artifact-{rnd}"
                artifact = build_artifact(model, plan, artifact_dir, inputs.calib)
                on_target = host_is(target, plan.unit)
                runner = open_here(artifact_dir) if validate_artifact or profile else None
                accuracy, how = {}, ""
                if validate_artifact:
                    say(f"{target.name}: validating")
                    accuracy, how = check_numerics(artifact_dir, runner, inputs, on_target,
                                                   reference=pl.reference if pl is not None else None)
                value = measured_value(budget, accuracy) if budget is not None and accuracy else None
                ok = within(budget, value) if budget is not None else None
                noise = plan.accuracy.predicted_noise if plan.accuracy is not None else None
                if not control or ok is not False:
                    action = "kept (fidelity not measured)" if ok is None else "kept"
                    if steps or (control and ok):
                        steps.append(ControlStep(iteration=rnd, summary=summarize(plan.layers), predicted_noise=noise,
                                                 measured=accuracy, within_budget=ok, action=action))
                    break
                faithful_now = all(_faithful(lp.precision) and lp.sparsity == "none" for lp in plan.layers)
                if faithful_now or rnd == MAX_CONTROL_ROUNDS:
                    steps.append(ControlStep(iteration=rnd, summary=summarize(plan.layers), predicted_noise=noise,
                                             measured=accuracy, within_budget=False, action="kept: nothing left to revert"))
                    break
                if pl.error_model is not None and "top1_agreement" in accuracy and noise:
                    pl.error_model.fit(noise, 1.0 - accuracy["top1_agreement"])
                last = rnd == MAX_CONTROL_ROUNDS - 1
                new_plan = None
                if not last and noise:
                    cap = tightened_cap(budget, value, noise)
                    new_plan = plan_latency(pl, noise_cap=cap)
                    if [(lp.precision, lp.sparsity) for lp in new_plan.layers] == [(lp.precision, lp.sparsity)
                                                                                   for lp in plan.layers]:
                        new_plan = None
                    action = f"over budget: re-planned under noise cap {cap:.3g}"
                if new_plan is None:
                    new_plan = plan_latency(pl, float_only=True)
                    action = "over budget: fell back to the fastest faithful float format"
                steps.append(ControlStep(iteration=rnd, summary=summarize(plan.layers), predicted_noise=noise,
                                         measured=accuracy, within_budget=False, action=action))
                say(f"{target.name}: {action}")
                runner.close() if runner is not None else None
                runner = None
                shutil.rmtree(artifact_dir, ignore_errors=True)
                plan = new_plan.model_copy(update={"rationale": [*new_plan.rationale, *(
                    f"accuracy control round {s.iteration}: {s.summary}: {_fmt_metrics(s.measured)}; {s.action}"
                    for s in steps)]})
            if (control and profile and on_target and runner is not None and budget is not None
                    and within(budget, measured_value(budget, accuracy))):
                best = _faster_alternative(pl, plan, runner, tmp, target, say)
                if best is not None:
                    runner.close()
                    shutil.rmtree(artifact_dir, ignore_errors=True)
                    planned = plan
                    plan, artifact_dir, artifact, runner, accuracy, how, notes, step = best
                    steps.append(step.model_copy(update={"iteration": len(steps) + 1}))
                    plan = plan.model_copy(update={"rationale": [*planned.rationale, *plan.rationale, (
                        f"measured on this host (the target's class): {step.action}")]})
            measured = measure(runner, inputs) if profile and runner is not None else None
        finally:
            if runner is not None:
                runner.close()
        fidelity = _fidelity_note(inputs, accuracy, how, budget, validate_artifact)
        # keep what the backend validated itself (Core ML: its ONNX equivalent), add what ran here
        timed = {"timed_with": inputs.timing_feed()[1]} if measured is not None else {}
        update = {"accuracy": {**artifact.accuracy, **accuracy}, "measured_latency_ms": measured, "plan": plan,
                  "numerics": {**artifact.numerics, **({"validated_with": how} if how else {}), **timed},
                  "fidelity": fidelity, "accuracy_control": steps, "project": project}
        if inputs.source is not None:
            update["source"] = inputs.source
        if record is not None:
            update["recovery"] = record
        if measured is not None:
            update["measured_on"], update["measured_on_target"] = host_description(), on_target
        artifact = artifact.model_copy(update=update)
        if budget is not None and accuracy and within(budget, measured_value(budget, accuracy)) is False:
            if not all(_faithful(lp.precision) and lp.sparsity == "none" for lp in plan.layers):
                raise EdgeoptError(f"{target.name}: the built artifact misses the accuracy budget "
                                   f"({budget.describe()}): {_fmt_metrics(accuracy)}; plan with a larger budget or "
                                   f"more calibration data")
        if objective == "fidelity" or precision is not None or plan.accuracy is None:
            drop = -accuracy.get("accuracy_delta", 1.0 - accuracy.get("top1_agreement", 1.0))
            if max_accuracy_drop is not None and accuracy and drop > max_accuracy_drop:
                raise EdgeoptError(f"{target.name}: the built artifact loses {drop:.4f} accuracy, more than "
                                   f"--max-accuracy-drop {max_accuracy_drop}; plan with a smaller drop or more "
                                   f"calibration data")
        write_manifest(artifact, artifact_dir)
        for p in list(artifact_dir.iterdir()):
            p.rename(tmp / p.name)
        artifact_dir.rmdir()
        (tmp / "plan.json").write_text(plan.model_dump_json(indent=2) + "\n")
        if notes:
            (tmp / "passes.json").write_text(json.dumps(notes, indent=2) + "\n")
    say(f"{target.name}: done")
    return artifact


def _alternative_plans(pl: Planning, plan: Plan) -> list[tuple[str, Plan]]:
    """Whole-model alternatives to a controlled plan worth measuring on the target: its fastest faithful float
    format, and uniform int8 with the plan's int8 settings where the option runs int8."""
    from .backends.base import _option_for
    from .planner import evaluate, to_plan

    out = [("faithful float", plan_latency(pl, float_only=True))]
    option = _option_for(plan)
    if "int8" in option.precisions and pl.inputs.calib is not None and not option.requires_full_integer:
        _, chosen, _ = pl.int8_settings(option)
        ev = evaluate(pl.inputs.analysis, pl.target, option, "int8")
        if ev.fits:
            out.append(("uniform int8", to_plan(pl.inputs.analysis, pl.target, ev, [f"uniform int8 on {option.label}"],
                                                accuracy=plan.accuracy, configs={"int8": chosen} if chosen else {})))
    layers = [(lp.precision, lp.sparsity) for lp in plan.layers]
    return [(k, p) for k, p in out if [(lp.precision, lp.sparsity) for lp in p.layers] != layers
            and p.backend == plan.backend and p.unit == plan.unit]


def _interleaved(runners: dict, feed: dict[str, np.ndarray], rounds: int = 5, repeats: int = 10) -> dict[str, float]:
    """Median ms of each runner on ``feed``, timed in alternating rounds so machine noise hits all alike."""
    from .profiling import time_runs

    for r in runners.values():
        time_runs(lambda r=r: r.run(feed), warmup=5, repeats=0)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            samples[k] += time_runs(lambda r=r: r.run(feed), repeats=repeats)
    return {k: float(np.median(v)) for k, v in samples.items()}


def _faster_alternative(pl: Planning, plan: Plan, runner, tmp: Path, target: Target, say):
    """On a host of the target's class, build the whole-model alternatives (:func:`_alternative_plans`), keep those
    that meet the accuracy budget as measured, and time them interleaved with the controlled plan's artifact
    (batch 1, same feed).  Returns the fastest alternative when it beats the plan by more than 3%, as
    (plan, artifact dir, artifact, runner, accuracy, how, notes, control step), else None."""
    from .accuracy import measured_value, within
    from .backends.base import build_artifact
    from .planner import summarize
    from .types import ControlStep

    inputs = pl.inputs
    feed, _ = inputs.timing_feed()
    budget = plan.accuracy.budget
    contenders = {"plan": runner}
    built: dict[str, tuple] = {}
    try:
        for i, (label, alt) in enumerate(_alternative_plans(pl, plan)):
            say(f"{target.name}: measuring an alternative ({label})")
            model, notes = structural_passes(inputs.model, alt, inputs.calib)
            d = tmp / f"alternative-{i}"
            art = build_artifact(model, alt, d, inputs.calib)
            r = open_here(d)
            if r is None:
                continue
            acc, how = check_numerics(d, r, inputs, True, reference=pl.reference)
            if not within(budget, measured_value(budget, acc)):
                r.close()
                shutil.rmtree(d, ignore_errors=True)
                continue
            contenders[label] = r
            built[label] = (alt, d, art, r, acc, how, notes)
        if len(contenders) == 1:
            return None
        ms = _interleaved(contenders, feed)
        best = min(ms, key=ms.get)
        shown = ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
        if best == "plan" or ms[best] > ms["plan"] * 0.97:
            return None
        alt, d, art, r, acc, how, notes = built.pop(best)
        step = ControlStep(iteration=0, summary=summarize(alt.layers), predicted_noise=None,
                           measured={**acc, "latency_ms": ms[best]}, within_budget=True,
                           action=f"{best} meets the budget and runs faster than the per-layer plan ({shown}): kept it")
        return alt, d, art, r, acc, how, notes, step
    finally:
        for _, d, _, r, _, _, _ in built.values():
            r.close()
            shutil.rmtree(d, ignore_errors=True)


def _faithful(precision: str) -> bool:
    from .technique import get

    return get(precision).presumed_faithful


def _fmt_metrics(m: dict[str, float]) -> str:
    keys = ("accuracy_delta", "top1_agreement", "snr_db")
    shown = [f"{k} {m[k]:.4f}" for k in keys if k in m]
    return ", ".join(shown) or "not measured"


def _fidelity_note(inputs: BuildInputs, accuracy: dict, how: str, budget, validated: bool) -> str:
    """What the manifest says about the artifact's measured fidelity, or why it was not measured."""
    from .accuracy import measured_value, within

    if not validated:
        return "not measured: validation was turned off"
    if inputs.evaluation is None:
        return "not measured: no evaluation data (give --eval, or --calib which is then used)"
    if not accuracy:
        return ("not measured: the artifact's runtime does not run on this host and its backend has no exact "
                "reference numerics here")
    n = min(len(inputs.evaluation), EVAL_LIMIT)
    verdict = ""
    if budget is not None:
        ok = within(budget, measured_value(budget, accuracy))
        verdict = f"; {'meets' if ok else 'misses' if ok is False else 'cannot be checked against'} {budget.describe()}"
    return f"measured on {n} evaluation sample(s) with {how}: {_fmt_metrics(accuracy)}{verdict}"


def plan_for(inputs: BuildInputs, target: Target, *, backend: str | None = None, precision: str | None = None,
             max_accuracy_drop: float | None = None, min_snr_db: float | None = None, objective: str = "latency",
             sensitivity: dict | None = None, measure_latency: bool = False,
             progress: Progress | None = None) -> Plan:
    """The planner's choice for a model on a target.

    ``objective="latency"`` (the default): the fastest plan within the accuracy budget (:func:`plan_latency`).
    ``objective="fidelity"``: the most faithful plan that meets the target's budgets: the per-layer search on
    measured sensitivity when calibration data exists, trading up to ``max_accuracy_drop`` predicted top-1
    flips for latency, else the whole-model recipe search.  A forced ``precision`` skips both searches.
    ``measure_latency`` profiles uniform builds on this machine (it must be the target device) and plans on
    measured layer times.

    Args:
        inputs: the model, its analysis and optional calibration data.
        target: the target to plan for.
        backend: restrict the search to this backend.
        precision: force this whole-model recipe (skips the per-layer search).
        max_accuracy_drop: the accuracy budget (see :func:`build`).
        min_snr_db: an output SNR floor instead.
        objective: ``latency`` or ``fidelity``.
        sensitivity: per-layer sensitivity already measured (extended in place); None measures what is needed.
        measure_latency: profile layer latency for the first candidate backend option on this machine.
        progress: called with status lines while measuring.

    Returns:
        The plan.

    Raises:
        EdgeoptError: ``max_accuracy_drop`` is given without calibration data, the objective is unknown, or the
            planner finds no plan (e.g. :class:`~edgeopt.errors.BudgetError`).
        UnsupportedOpError: no backend option runs the model's ops (checked before anything is measured).
    """
    from .planner import make_plan, search_plan

    if objective not in ("latency", "fidelity"):
        raise EdgeoptError(f"unknown objective '{objective}'; valid: latency, fidelity")
    if max_accuracy_drop is not None and inputs.calib is None and precision is None:
        raise EdgeoptError("--max-accuracy-drop needs calibration data (--calib) to measure layer sensitivity")
    _runnable(inputs.analysis, target, backend)  # op pre-flight before anything expensive
    measured = None
    if measure_latency:
        from . import latency_table
        from .planner import candidate_options

        option = candidate_options(target, backend)[0]
        if progress:
            progress(f"profiling layer latency on this machine ({option.label})")
        measured = latency_table.measure(inputs, target, option)
    if precision is None and objective == "latency":
        pl = Planning(inputs, target, backend=backend, max_accuracy_drop=max_accuracy_drop, min_snr_db=min_snr_db,
                      sensitivity=sensitivity if sensitivity is not None else {}, progress=progress, measured=measured)
        return plan_latency(pl)
    if precision is not None or inputs.calib is None:
        return make_plan(inputs.analysis, target, backend=backend, precision=precision)
    if sensitivity is None:
        from .sensitivity import measure

        sensitivity = measure(inputs.model, inputs.calib, progress=progress)
    return search_plan(inputs.analysis, target, sensitivity, backend=backend, max_accuracy_drop=max_accuracy_drop,
                       measured=measured)


@dataclass
class FleetResult:
    entries: list  # report.FleetEntry
    report: Path


def fleet(inputs: BuildInputs, targets: list[Target], out_dir: str | Path, *, jobs: int = 2,
          max_accuracy_drop: float | None = None, min_snr_db: float | None = None, objective: str = "latency",
          progress: Progress | None = None, project: dict[str, str] | None = None,
          recover: RecoverySettings | None = None, allow_resolution: bool = False) -> FleetResult:
    """Build every target into ``out_dir/<target>/`` in parallel, sharing calibration data and
    sensitivity; write ``fleet.json`` and ``report.html``.  The directory is replaced atomically.

    A target that fails (a user error or a bug) is recorded as a failed entry; the others still build.

    Args:
        inputs: the model, its analysis, and optional calibration and evaluation data.
        targets: the targets to build.
        out_dir: the destination directory.
        jobs: targets built at once (at least 1).
        max_accuracy_drop: the accuracy budget of every target (see :func:`build`).
        min_snr_db: an output SNR floor instead.
        objective: ``latency`` or ``fidelity`` (see :func:`build`).
        progress: called with status lines.
        project: the project file the settings came from, recorded in every manifest (see :func:`build`).
        recover: recover every target's compressed model, and fit models over a target's RAM/storage (see
            :func:`build`).
        allow_resolution: the fit may lower the input resolution (see :func:`build`).

    Returns:
        One entry per target (in ``targets`` order) and the path of ``report.html``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .io import atomic_dir
    from .report import FleetEntry, fleet_html

    say = progress or (lambda _msg: None)
    if recover is not None and inputs.calib is None:
        raise EdgeoptError("--recover fine-tunes on the calibration data: give --calib")
    sensitivity: dict = {}
    if inputs.calib is not None:
        from . import technique
        from .sensitivity import measure

        # what any target's backend options can use, measured once before the targets build in parallel
        wanted = sorted({t for tg in targets for o in tg.backends for t in [*o.precisions, *(s.pattern for s in o.sparsity)]
                         if t != technique.REFERENCE and technique.get(t).simulate is not None})
        say("measuring layer sensitivity (shared by all targets)")
        sensitivity = measure(inputs.model, inputs.calib, options=wanted, progress=say)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:

        def one(target: Target) -> FleetEntry:
            try:
                art = build(inputs, target, tmp / target.name, max_accuracy_drop=max_accuracy_drop, min_snr_db=min_snr_db,
                            objective=objective, sensitivity=dict(sensitivity), progress=say, project=project,
                            recover=recover, allow_resolution=allow_resolution)
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
