"""Weight sparsification that keeps every shape: magnitude pruning zeroes the
smallest ``|w|`` of ``Conv``/``Gemm``/``MatMul`` weights.

* ``unstructured``: exactly ``round(sparsity * size)`` weights are zeroed, per layer
  (``scope="layer"``) or under one magnitude threshold across all selected layers
  (``scope="global"``: layers with small weights lose more).
* ``n:m`` (default 2:4): in every group of ``m`` consecutive weights along the
  reduction (input-channel) axis, only the ``n`` largest are kept, the layout that
  NVIDIA Ampere+ sparse tensor cores (TensorRT ``SPARSE_WEIGHTS``) accelerate:
  ``Conv`` ``W[O, I, kh, kw]`` groups input channels for each ``(o, kh, kw)``;
  ``Gemm`` groups along ``K`` (axis 1 of ``B`` when ``transB=1``, else axis 0);
  ``MatMul`` along axis -2 of its constant right operand.

The pass saves no bytes by itself (zeros are stored densely); it is the input to a
sparse backend or to compression.  Biases are never pruned.

``reconstruct=True`` (needs calibration data) chooses the weights to zero by their
effect on the layer's output instead of their magnitude, and re-fits the weights
that stay, as SparseGPT/OBC do: layer after layer in graph order, on the pruned
model's real inputs (upstream errors included) against the original model's
outputs.  For a layer with regressors ``A`` (im2col rows, plus a constant for the
bias) and targets ``Y``: ``W* = (A'A + lam I)^-1 (A'Y + lam W0)`` is the dense
least-squares optimum pulled towards the original weights; each weight's
saliency is the OBS cost of removing it, ``W*[q, o]^2 / [(A'A + lam I)^-1]_qq``;
the pattern (n:m, or the layer's sparsity) keeps the most salient ones; then
every output's kept weights and bias are solved exactly on that support.  The
masks obey the same pattern as magnitude pruning, and a layer whose re-fit would
not lower its output error keeps the magnitude result.  The fit reads up to
``calib_samples`` (1,024) samples; image data with fewer is filled up with random
crops and flips of its own samples (``augment``): a re-fit on 128 samples
reproduces them almost exactly and generalizes poorly
(:meth:`edgeopt.calibration.CalibrationData.augmented`).  The compensation holds only along the activations the
data excites: MobileNetV2 2:4 re-fitted on crops of nine photos agrees with fp32 0.79 on other crops of them and
0.04 on real ImageNet images (README, Recovery), so the data must represent the deployment.  Depthwise and 1-D
convolutions and N-D MatMul weights are pruned by magnitude only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, model_validator

from . import PassConfig, PassError, PassOutcome
from ._util import Graph, ensure_names
from .cleanup import constants_to_initializers

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData


def needs_calibration(config: Config) -> bool:
    """Whether the pass needs calibration data under ``config``: only the output-aware re-fit does.

    Args:
        config: the pass config.

    Returns:
        ``config.reconstruct``.
    """
    return config.reconstruct


#: ridge strength of the re-fit, relative to the mean diagonal of the regressors' Gram matrix
DAMP = 0.01


class Config(PassConfig):
    pattern: Literal["unstructured", "n:m"] = "unstructured"
    sparsity: float = Field(default=0.5, ge=0, lt=1, description="unstructured: fraction of weights set to zero")
    n: int = Field(default=2, ge=1, description="n:m: weights kept in each group")
    m: int = Field(default=4, ge=2, description="n:m: group size along the reduction axis")
    scope: Literal["layer", "global"] = Field(default="layer", description="unstructured: one threshold per layer or "
                                                                             "one across all selected layers")
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "Gemm", "MatMul"])
    reconstruct: bool = Field(default=False, description="choose the zeros by output error (OBS saliency) and re-fit "
                                                         "the kept weights by least squares on calibration data")
    calib_samples: int = Field(default=1024, ge=1, description="reconstruct: calibration samples the re-fit reads "
                                                                 "(image data with fewer: filled up with random "
                                                                 "crops/flips of its samples when augment)")
    augment: bool = Field(default=True, description="reconstruct: extend image calibration data with random crops "
                                                    "and flips up to calib_samples")
    damp: float = Field(default=DAMP, gt=0, description="reconstruct: ridge strength relative to the mean diagonal "
                                                         "of the regressors' Gram matrix")

    @model_validator(mode="after")
    def _n_below_m(self) -> Config:
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        return self


def _attr(node: onnx.NodeProto, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _reduction_axis(node: onnx.NodeProto, w: np.ndarray) -> tuple[int | None, str | None]:
    """Axis of ``w`` summed over by the layer (input channels / K), or the reason there is none."""
    op = node.op_type
    if op == "Conv":
        if w.ndim < 3:
            return None, f"Conv weight is {w.ndim}-D"
        return 1, None
    if op == "Gemm":
        if w.ndim != 2:
            return None, f"Gemm weight is {w.ndim}-D"
        return (1 if _attr(node, "transB", 0) else 0), None
    if op == "MatMul":
        if w.ndim < 2:
            return None, "MatMul weight is 1-D"
        return w.ndim - 2, None
    return None, f"{op} is not supported (Conv, Gemm, MatMul)"


def _eligible(node: onnx.NodeProto, g: Graph, config: Config, selected: set[str]) -> tuple[tuple[str, int] | None, str | None]:
    """(weight name, reduction axis) of a node the pass may prune, or the reason it may not."""
    if len(node.input) < 2 or not node.input[1]:
        return None, "no weight input"
    wname = node.input[1]
    w = g.array(wname)
    if w is None:
        return None, "weight is not constant (not an initializer or Constant)"
    if not np.issubdtype(w.dtype, np.floating):
        return None, f"weight dtype {w.dtype} is not floating point"
    if node.op_type in ("Gemm", "MatMul") and g.array(node.input[0]) is not None:
        return None, "input A is constant too (fold it instead)"
    if wname in g.outputs:
        return None, "weight is a graph output"
    others = [c for c in g.consumers.get(wname, []) if c is not node]
    for c in others:
        if c.name not in selected or c.input[1:2] != [wname]:
            return None, f"weight {wname} is shared with node {c.name} which this pass does not prune"
    axis, why = _reduction_axis(node, w)
    if axis is None:
        return None, why
    if config.pattern == "n:m":
        k = w.shape[axis]
        if node.op_type == "Conv" and k == 1 and (_attr(node, "group", 1) or 1) > 1:
            return None, f"depthwise Conv (one input channel per group) has no reduction axis for {config.n}:{config.m}"
        if k % config.m:
            return None, f"reduction dim {k} is not a multiple of m={config.m}"
    return (wname, axis), None


def _nm_mask(w: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """True for the ``n`` largest ``|w|`` in every group of ``m`` consecutive entries along ``axis``."""
    a = np.moveaxis(np.abs(w), axis, -1)
    groups = a.reshape(*a.shape[:-1], a.shape[-1] // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(a.shape), -1, axis)


def _smallest_mask(mags: np.ndarray, k: int) -> np.ndarray:
    """True except for exactly ``k`` of the smallest entries of a flat array."""
    keep = np.ones(mags.shape, bool)
    if k > 0:
        keep[np.argpartition(mags, k - 1)[:k]] = False
    return keep


def apply(model: onnx.ModelProto, config: Config, calib=None) -> PassOutcome:
    """Zero the smallest-magnitude weights of the selected layers (unstructured or n:m), keeping every shape.

    Args:
        model: the model (already a copy), modified in place.
        config: pattern, sparsity or n:m, scope, op types and node scoping.
        calib: calibration data; only ``reconstruct=True`` reads it.

    Returns:
        The outcome: the pruned model, the layers pruned, the layers skipped (with reasons) and
        per-weight and overall sparsity notes.
    """
    ensure_names(model)
    constants_to_initializers(model)
    out = PassOutcome(model)
    g = Graph(model)
    candidates = [n for n in model.graph.node if n.op_type in config.op_types and config.selects(n.name)]
    selected = {n.name for n in candidates}
    targets: dict[str, tuple[int, list[str]]] = {}  # weight -> (axis, node names)
    for node in candidates:
        info, why = _eligible(node, g, config, selected)
        if info is None:
            out.skip(node.name, why or "not eligible")
            continue
        wname, axis = info
        if wname in targets and targets[wname][0] != axis:
            out.skip(node.name, f"weight {wname} is shared with {targets[wname][1][0]} along another reduction axis")
            continue
        targets.setdefault(wname, (axis, []))[1].append(node.name)

    weights = {w: g.array(w) for w in targets}
    masks: dict[str, np.ndarray] = {}
    if config.pattern == "n:m":
        for w, (axis, _) in targets.items():
            masks[w] = _nm_mask(weights[w], axis, config.n, config.m)
    elif config.scope == "layer":
        for w in targets:
            flat = np.abs(weights[w]).ravel()
            masks[w] = _smallest_mask(flat, int(round(config.sparsity * flat.size))).reshape(weights[w].shape)
    elif targets:
        names = list(targets)
        flat = np.concatenate([np.abs(weights[w].astype(np.float64)).ravel() for w in names])
        keep = _smallest_mask(flat, int(round(config.sparsity * flat.size)))
        start = 0
        for w in names:
            size = weights[w].size
            masks[w] = keep[start : start + size].reshape(weights[w].shape)
            start += size

    import onnx

    original = None
    if config.reconstruct:
        if calib is None:
            raise PassError("prune with reconstruct=True needs calibration data (or set reconstruct=False)")
        original = onnx.ModelProto()
        original.CopyFrom(model)
    total = zeros = 0
    for w, (_, nodes) in targets.items():
        pruned = np.where(masks[w], weights[w], 0).astype(weights[w].dtype)
        g.set_initializer(w, pruned)
        nz = int(np.count_nonzero(pruned == 0))
        total += pruned.size
        zeros += nz
        out.applied.extend(nodes)
        what = f"{config.n}:{config.m}" if config.pattern == "n:m" else "unstructured"
        out.notes.append(f"{', '.join(nodes)}: {what} sparsity {nz / pruned.size:.3f} ({nz}/{pruned.size} zeros)")
    if total:
        out.notes.insert(0, f"overall sparsity of pruned weights {zeros / total:.3f} ({zeros}/{total})")
    if original is not None and targets:
        _refit(original, model, targets, config, calib, out)
    return out


def _fit_data(calib: CalibrationData, config: Config, out: PassOutcome) -> CalibrationData:
    """The first ``calib_samples`` calibration samples, filled up to that many with random crops and flips of them
    (image data, ``augment``; :meth:`~edgeopt.calibration.CalibrationData.augmented`): what the re-fit reads."""
    from ..memory import max_memory

    data = calib.subset(min(config.calib_samples, len(calib)))
    if config.augment and len(data) < config.calib_samples:
        # the re-fit holds the tensors crossing each cut for every sample: measured on MobileNetV2, about 10x the
        # input bytes per sample at its peak (5.9 GB for 1,024 samples of 224x224)
        per = sum(v[:1].nbytes for v in data.feeds().values())
        room = max(len(data), int(max_memory() // max(12 * per, 1)))
        data = data.augmented(min(config.calib_samples, room))
        if len(data) > len(calib):
            out.notes.append(f"re-fit on {len(calib)} calibration samples and {len(data) - len(calib)} random "
                             "crops/flips of them" + (" (fewer than calib_samples: the memory limit)"
                                                      if len(data) < config.calib_samples else ""))
    return data


def _refit(original: onnx.ModelProto, model: onnx.ModelProto, targets: dict[str, tuple[int, list[str]]],
           config: Config, calib, out: PassOutcome) -> None:
    """Re-select each pruned layer's zeros by OBS saliency and re-fit what stays (see the module docstring)."""
    from .channel_prune import _linear_form, _reconstruct

    g0 = Graph(original)
    by_name = {n.name: n for n in model.graph.node}
    nodes, dense = [], {}
    for w, (axis, names) in targets.items():
        for name in names:
            node = by_name[name]
            w0 = g0.array(w)
            if (node.op_type == "Conv" and w0.ndim != 4) or (node.op_type == "MatMul" and w0.ndim != 2):
                out.notes.append(f"{name}: pruned by magnitude (no re-fit for a {w0.ndim}-D {node.op_type} weight)")
                continue
            if node.op_type == "Conv" and (_attr(node, "group", 1) or 1) > 1:
                out.notes.append(f"{name}: pruned by magnitude (grouped convolutions are not re-fitted)")
                continue
            nodes.append(node)
            dense[name] = (_linear_form(g0, node), w0.shape, axis)

    def solve(a, y, w_now, b_now, node):  # from the dense original, not the magnitude-pruned weights now there
        (w0, b0), shape, axis = dense[node.name]
        return _obs_solve(a, y, w0, b0, node, shape, axis, config)

    _reconstruct(original, model, nodes, {}, _fit_data(calib, config, out), out, solve=solve)
    Graph(model).remove_unused_initializers()


def _to_weight(lin: np.ndarray, node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    """A ``[D, O]`` linear-form array in the layout of the node's weight."""
    if node.op_type == "Conv":
        return lin.T.reshape(shape)
    return lin.T if node.op_type == "Gemm" and _attr(node, "transB", 0) else lin


def _to_linear(arr: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    if node.op_type == "Conv":
        return arr.reshape(arr.shape[0], -1).T
    return arr.T if node.op_type == "Gemm" and _attr(node, "transB", 0) else arr


def _obs_solve(a: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: np.ndarray | None, node: onnx.NodeProto,
               shape: tuple[int, ...], axis: int, config: Config) -> tuple[np.ndarray, np.ndarray | None]:
    """The pruned, re-fitted linear form ``(W [D, O], bias [O] or None)`` of one layer."""
    d = w0.shape[0]
    if b0 is not None:
        a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
        w0 = np.concatenate([w0, b0[None, :]], axis=0)
    h = a.T @ a
    lam = config.damp * max(float(np.mean(np.diag(h))), 1e-12)
    h[np.diag_indices_from(h)] += lam
    rhs = a.T @ y + lam * w0
    try:
        chol = np.linalg.cholesky(h)
    except np.linalg.LinAlgError:
        h[np.diag_indices_from(h)] += lam * 10
        chol = np.linalg.cholesky(h)
    inv = np.linalg.inv(chol)  # h^-1 = inv' inv: one factorization for the saliencies and the dense optimum
    hinv_diag = np.sum(inv * inv, axis=0)  # diag of (L L')^-1 = column norms of L^-1
    wstar = inv.T @ (inv @ rhs)
    sal = wstar[:d] ** 2 / hinv_diag[:d, None]
    sal_w = _to_weight(sal, node, shape)
    if config.pattern == "n:m":
        keep_w = _nm_mask(sal_w, axis, config.n, config.m)
    else:
        keep_w = _smallest_mask(sal_w.ravel(), int(round(config.sparsity * sal_w.size))).reshape(sal_w.shape)
    keep = _to_linear(keep_w, node)  # [D, O]
    if b0 is not None:
        keep = np.concatenate([keep, np.ones((1, keep.shape[1]), bool)], axis=0)
    sol = np.zeros_like(wstar)
    counts = keep.sum(0)
    for k in np.unique(counts):
        cols = np.flatnonzero(counts == k)
        if k == 0:
            continue
        step = max(1, int(2**26 // (k * k)))  # about 512 MB of float64 systems at a time
        for c0 in range(0, len(cols), step):
            cs = cols[c0 : c0 + step]
            idx = np.stack([np.flatnonzero(keep[:, c]) for c in cs])  # [C, k]
            hs = h[idx[:, :, None], idx[:, None, :]]
            bs = rhs[idx, cs[:, None]]
            sol[idx, cs[:, None]] = np.linalg.solve(hs, bs[..., None])[..., 0]
    return (sol[:d], sol[d]) if b0 is not None else (sol, None)
