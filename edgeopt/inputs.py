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
    from .types import ModelAnalysis


@dataclass
class BuildInputs:
    """A model with its data, prepared once and shared by every target of a fleet."""

    path: Path
    model: onnx.ModelProto
    analysis: ModelAnalysis
    calib: CalibrationData | None
    evaluation: CalibrationData | None

    @classmethod
    def prepare(cls, path: str | Path, *, calib=None, eval_data=None, labels: np.ndarray | str | Path | None = None,
                input_shapes: dict[str, list[int]] | None = None) -> BuildInputs:
        """``labels`` may be an .npy file (read with :func:`edgeopt.calibration.load_labels`: checked, no pickles);
        ``calib``/``eval_data`` anything :func:`edgeopt.calibration.as_calibration` takes (folders and files too)."""
        from .calibration import as_calibration, load_labels
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
        return cls(p, model, analysis, cal, ev)

    @classmethod
    def default_model(cls) -> BuildInputs:
        """The embedded digits CNN with its calibration split and labelled test split."""
        from .datasets import default_model_path, digits

        xc, _ = digits("calib")
        xt, yt = digits("test")
        return cls.prepare(default_model_path(), calib=xc, eval_data=xt, labels=yt)
