"""A model with its calibration and evaluation data, prepared once: what a build, a fleet and the latency table
read.  Its own module so that the stages using it need not import each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from .calibration import CalibrationData
    from .types import ModelAnalysis, ModelSource


@dataclass
class BuildInputs:
    """A model with its data, prepared once and shared by every target of a fleet."""

    path: Path
    model: onnx.ModelProto
    analysis: ModelAnalysis
    calib: CalibrationData | None
    evaluation: CalibrationData | None
    #: one run's inputs given by the user (``--inputs``), in the model's exact input shapes: what timing feeds first
    sample: dict[str, np.ndarray] | None = None
    #: how the model was exported when it was not an ONNX file (recorded in every artifact's manifest)
    source: ModelSource | None = None

    def timing_feed(self) -> tuple[dict[str, np.ndarray], str]:
        """What a timing run (and the smoke run) feeds, and a phrase saying what it is: the user's ``--inputs``,
        else the first evaluation sample, else the first calibration sample, else zeros of the analysed input shapes
        (only without any data: a model whose integer input selects a branch may then take the wrong one)."""
        if self.sample is not None:
            return self.sample, "the given --inputs"
        if self.evaluation is not None:
            return self.evaluation.first(), "the first evaluation sample"
        if self.calib is not None:
            return self.calib.first(), "the first calibration sample"
        return zeros_feed(self.model, self.analysis), "zeros (no --inputs, --eval or --calib data was given)"

    @classmethod
    def prepare(cls, path: str | Path, *, calib=None, eval_data=None, labels: np.ndarray | str | Path | None = None,
                input_shapes: dict[str, list[int]] | None = None, sample=None,
                source: ModelSource | None = None) -> BuildInputs:
        """``labels`` may be an .npy file (read with :func:`edgeopt.calibration.load_labels`: checked, no pickles);
        ``calib``/``eval_data`` anything :func:`edgeopt.calibration.as_calibration` takes (folders and files too);
        ``sample`` one run's inputs (``--inputs``: an .npz, an .npy for one input, or a mapping;
        :func:`edgeopt.calibration.as_sample`); ``source`` how the model file was exported (into manifests).  The
        model is smoke-run once on the first real sample (zeros only without data)."""
        from .calibration import as_calibration, as_sample, load_labels
        from .graph import analyze, load_model

        p = Path(path)
        model = load_model(p, load_external_data=True)
        analysis = analyze(p, input_shapes, model=model)
        labels_name = None
        if isinstance(labels, (str, Path)):  # read even when no data uses them: a bad file is an error, not ignored
            labels_name = f"labels file {labels}"
            labels = load_labels(labels)
        cal = as_calibration(calib, model) if calib is not None else None
        if eval_data is not None:
            ev = as_calibration(eval_data, model, labels=labels, labels_name=labels_name)
        elif cal is not None:
            ev = cal if labels is None else as_calibration(cal, model, labels=labels, labels_name=labels_name)
        else:
            ev = None
        one = as_sample(sample, model) if sample is not None else None
        inputs = cls(p, model, analysis, cal, ev, one, source)
        feed, how = inputs.timing_feed()
        smoke_run(model, analysis, feed, how)
        return inputs

    @classmethod
    def default_model(cls) -> BuildInputs:
        """The embedded digits CNN with its calibration split and labelled test split."""
        from .datasets import default_model_path, digits

        xc, _ = digits("calib")
        xt, yt = digits("test")
        return cls.prepare(default_model_path(), calib=xc, eval_data=xt, labels=yt)


def zeros_feed(model: onnx.ModelProto, analysis: ModelAnalysis) -> dict[str, np.ndarray]:
    """Zeros in the model's analysed input shapes (free dims 1): what runs only when no data was given at all."""
    from .calibration import model_inputs

    return {n: np.zeros([d if d > 0 else 1 for d in analysis.inputs.get(n, shape)], dtype)
            for n, shape, dtype in model_inputs(model)}


def smoke_run(model: onnx.ModelProto, analysis: ModelAnalysis, feed: dict[str, np.ndarray] | None = None,
              what: str = "") -> None:
    """Run the model once in onnxruntime on ``feed`` (a real sample: see :meth:`BuildInputs.timing_feed`; ``what``
    names it for messages), or on zeros of its analysed input shapes without data, so that a model onnxruntime cannot
    run (checks that pass the ONNX checker and shape inference, e.g. an If whose condition has many elements, a
    Conv bias of the wrong size) is refused here in one line, not deep in planning as an internal error.

    The run is bounded first: weights plus every activation the analysis knows (an upper bound; no reuse) must fit
    the memory limit (:func:`edgeopt.memory.max_memory`).

    Raises:
        MemoryLimitError: the bound is over the limit.
        ModelLoadError: onnxruntime refuses or fails to run the model.
    """
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - the validation extra is missing: nothing runs the model here anyway
        return
    from .errors import ModelLoadError
    from .memory import MemoryLimitError, limit_hint, max_memory
    from .units import fmt_bytes

    itemsize = {"float64": 8, "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2,
                "int8": 1, "uint8": 1, "bool": 1}
    need = analysis.total_weight_bytes + sum(t.elems * itemsize.get(t.dtype, 4) for t in analysis.tensors)
    limit = max_memory()
    if need > limit:
        raise MemoryLimitError(f"running {Path(analysis.path).name} once needs up to {fmt_bytes(need)} (weights and "
                               f"activations at the analysed input shapes), more than the memory limit of "
                               f"{fmt_bytes(limit)}; give smaller --input-shape values, or {limit_hint()}")
    if model.ByteSize() > 1_800_000_000:  # over protobuf's 2 GB: the backends run it from files; not smoke-tested
        return
    feeds = feed if feed is not None else zeros_feed(model, analysis)
    on = f" on {what}" if what else ""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    so.enable_cpu_mem_arena = False
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base class
        first = " ".join(str(e).split())[:300] or type(e).__name__
        hint = ("; if an input selects a mode (a sample rate, a flag), give real inputs with --inputs or --calib"
                if feed is None or what.startswith("zeros") else "")
        raise ModelLoadError(f"onnxruntime cannot run {Path(analysis.path).name}{on}: {first}{hint}") from None
