"""The accuracy budget and the combined error model the planner optimizes against.

A plan may lose at most its :class:`~edgeopt.types.AccuracyBudget`, in the metric the data
allows: top-1 accuracy drop with labels, top-1 disagreement with the original model on
classification outputs without labels, an output SNR floor otherwise.  The default is
1% (drop or disagreement) or 30 dB; ``--max-accuracy-drop`` and ``--min-snr-db`` override it.

Per-layer sensitivity gives each layer's output noise alone (noise power over signal power);
to first order these add.  :class:`ErrorModel` maps a total noise to the budget's metric with
a margin model of the original outputs: noise of relative power ``N`` perturbs each logit by
about ``sigma = k * sqrt(N * mean(y^2))``; a sample flips to a competitor ``j`` with probability
``Phi(-(y_top - y_j) / (sigma * sqrt 2))``.  ``k`` (1 in theory) is refitted on measured
combined points (:meth:`ErrorModel.fit`).  The planner searches under :meth:`ErrorModel.noise_cap`;
accuracy control (:func:`tightened_cap`) lowers the cap from what a built artifact measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .types import AccuracyBudget

#: default largest top-1 accuracy drop (labels) or disagreement (no labels)
DEFAULT_DROP = 0.01
#: default output SNR floor (dB) for outputs that are not class scores
DEFAULT_SNR_DB = 30.0
#: competitors of the top class a flip is considered to (the closest by margin)
COMPETITORS = 5


#: ops that end a classification head (class logits or probabilities); an output produced by anything else (mean
#: pooling, normalization: an embedding) is compared by SNR, not by its arg-max
CLASS_HEADS = frozenset({"Gemm", "MatMul", "Add", "Softmax", "LogSoftmax", "Sigmoid", "Conv", "GlobalAveragePool"})
#: ops that pass a tensor through unchanged in value (looked through to find the head)
_PASS_THROUGH = frozenset({"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast"})


def output_head(model, index: int = 0) -> str | None:
    """The op that computes graph output ``index`` of an ONNX ``model``, looking through reshapes and identities
    (None: a graph input or unknown)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = model.graph.output[index].name
    for _ in range(64):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type not in _PASS_THROUGH or not node.input:
            return node.op_type
        name = node.input[0]
    return None


def is_classification(out: np.ndarray, head: str | None = None) -> bool:
    """Whether a model output is class scores: ``[samples, classes]`` with more than one class, computed by a
    classification head (:data:`CLASS_HEADS`; ``head`` None: not known, the shape decides)."""
    return out.ndim == 2 and out.shape[1] > 1 and (head is None or head in CLASS_HEADS)


def choose_budget(classification: bool, labels: bool, max_accuracy_drop: float | None = None,
                  min_snr_db: float | None = None) -> AccuracyBudget:
    """The accuracy budget for a model and its data.

    Args:
        classification: the model's first output is class scores.
        labels: the evaluation data has labels.
        max_accuracy_drop: the user's largest top-1 loss (accuracy with labels, else agreement), or None.
        min_snr_db: the user's SNR floor in dB, or None.

    Returns:
        The budget: the user's where given (an SNR floor wins for non-classification outputs), else the default.
    """
    if classification and max_accuracy_drop is not None:
        metric = "accuracy_drop" if labels else "top1_disagreement"
        return AccuracyBudget(metric=metric, limit=max_accuracy_drop, source=f"--max-accuracy-drop {max_accuracy_drop:g}")
    if min_snr_db is not None:
        return AccuracyBudget(metric="snr_db", limit=min_snr_db, source=f"--min-snr-db {min_snr_db:g}")
    if classification:
        return AccuracyBudget(metric="accuracy_drop" if labels else "top1_disagreement", limit=DEFAULT_DROP, source="default")
    if max_accuracy_drop is not None:
        # no class scores to count flips on: the drop bounds the relative output error, 20 log10(1/drop) dB
        snr = -20 * math.log10(max(max_accuracy_drop, 1e-6))
        return AccuracyBudget(metric="snr_db", limit=round(snr, 2),
                              source=f"--max-accuracy-drop {max_accuracy_drop:g} as relative output error")
    return AccuracyBudget(metric="snr_db", limit=DEFAULT_SNR_DB, source="default")


def measured_value(budget: AccuracyBudget, metrics: Mapping[str, float]) -> float | None:
    """The budget's metric in a validation result (:func:`edgeopt.pipeline.validate`), or None when absent."""
    if budget.metric == "accuracy_drop" and "accuracy_delta" in metrics:
        return -float(metrics["accuracy_delta"])
    if budget.metric in ("accuracy_drop", "top1_disagreement") and "top1_agreement" in metrics:
        return 1.0 - float(metrics["top1_agreement"])
    if "snr_db" in metrics:
        v = float(metrics["snr_db"])
        return v if budget.metric == "snr_db" else None
    return None


def within(budget: AccuracyBudget, value: float | None) -> bool | None:
    """Whether a measured or predicted metric value meets the budget (None: unknown)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value >= budget.limit - 1e-9 if budget.metric == "snr_db" else value <= budget.limit + 1e-9


def _phi(x: np.ndarray) -> np.ndarray:
    """The standard normal CDF (Abramowitz & Stegun 7.1.26 erf, absolute error < 1.5e-7)."""
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-z * z)
    return 0.5 * (1.0 + np.sign(x) * erf)


class ErrorModel:
    """Predicted fidelity from total output noise (see the module docstring).

    Args:
        reference: the original model's first output on the evaluation data.
        labels: the evaluation labels, or None.
        budget: the accuracy budget whose metric is predicted.
    """

    def __init__(self, reference: np.ndarray, labels: np.ndarray | None, budget: AccuracyBudget):
        self.budget = budget
        self.k = 1.0
        self.points: list[tuple[float, float]] = []
        self.classes = is_classification(reference) and budget.metric != "snr_db"
        if not self.classes:
            return
        y = reference.astype(np.float64)
        order = np.argsort(-y, axis=1)[:, : COMPETITORS + 1]
        top = np.take_along_axis(y, order, axis=1)
        self.margins = top[:, :1] - top[:, 1:]  # [n, competitors]
        self.rms = float(np.sqrt(np.mean(y**2)))
        self.weights = np.ones_like(self.margins)  # what a flip to each competitor costs
        if labels is not None and budget.metric == "accuracy_drop":
            lab = np.asarray(labels[: len(y)]).reshape(-1)
            right = (order[:, 0] == lab).astype(np.float64)[:, None]
            to_label = (order[:, 1:] == lab[:, None]).astype(np.float64)
            self.weights = right - to_label

    def _flips(self, noise: float, k: float | None = None) -> np.ndarray:
        sigma = (self.k if k is None else k) * math.sqrt(max(noise, 0.0)) * self.rms
        if sigma <= 0:
            return np.zeros_like(self.margins)
        p = _phi(-self.margins / (sigma * math.sqrt(2.0)))
        total = p.sum(axis=1, keepdims=True)
        return p / np.maximum(total, 1.0)  # at most one flip per sample

    def predict(self, noise: float) -> float:
        """The budget's metric predicted for a total relative output noise ``noise``."""
        if self.budget.metric == "snr_db" or not self.classes:
            return float("inf") if noise <= 0 else -10 * math.log10(noise)
        return float(np.mean(np.sum(self._flips(noise) * self.weights, axis=1)))

    def noise_cap(self) -> float:
        """The largest total noise whose predicted metric meets the budget."""
        if self.budget.metric == "snr_db" or not self.classes:
            return 10 ** (-self.budget.limit / 10)
        lo, hi = -14.0, 1.0  # log10 noise
        if within(self.budget, self.predict(10**hi)):
            return 10**hi
        for _ in range(50):
            mid = (lo + hi) / 2
            if within(self.budget, self.predict(10**mid)):
                lo = mid
            else:
                hi = mid
        return 10**lo

    def fit(self, noise: float, disagreement: float) -> None:
        """Refit ``k`` so that the predicted top-1 disagreement at ``noise`` matches a measured one.

        Args:
            noise: the predicted total noise (sum of per-layer noise) of a measured plan.
            disagreement: its measured top-1 disagreement with the original.
        """
        if not self.classes or noise <= 0:
            return
        self.points.append((noise, disagreement))
        n = len(self.margins)

        def dis(k: float) -> float:
            return float(np.mean(self._flips(noise, k).sum(axis=1)))

        target = max(disagreement, 0.5 / n)  # zero flips seen: at most about half a sample
        lo, hi = math.log(1e-3), math.log(1e3)
        for _ in range(60):
            mid = (lo + hi) / 2
            if dis(math.exp(mid)) < target:
                lo = mid
            else:
                hi = mid
        k = math.exp((lo + hi) / 2)
        self.k = min(self.k, k) if disagreement == 0 else k


def tightened_cap(budget: AccuracyBudget, measured: float, noise: float) -> float:
    """A noise cap that should bring a plan measured over budget within it (accuracy control).

    Flips grow with the noise amplitude (``sqrt(noise)``) for small noise; the SNR is ``-10 log10(noise)``.

    Args:
        budget: the accuracy budget.
        measured: the metric measured on the built artifact.
        noise: the plan's predicted total noise.

    Returns:
        A cap at most 0.7x ``noise`` (each round must remove noise).
    """
    if budget.metric == "snr_db":
        factor = 10 ** (-(budget.limit - measured) / 10)
    else:
        factor = (budget.limit / measured) ** 2 if measured > 0 else 0.5
    return noise * min(0.7, factor * 0.8)
