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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, model_validator

from . import PassConfig, PassOutcome
from ._util import Graph, ensure_names
from .cleanup import constants_to_initializers

if TYPE_CHECKING:  # pragma: no cover
    import onnx

NEEDS_CALIBRATION = False


class Config(PassConfig):
    pattern: Literal["unstructured", "n:m"] = "unstructured"
    sparsity: float = Field(default=0.5, ge=0, lt=1, description="unstructured: fraction of weights set to zero")
    n: int = Field(default=2, ge=1, description="n:m: weights kept in each group")
    m: int = Field(default=4, ge=2, description="n:m: group size along the reduction axis")
    scope: Literal["layer", "global"] = Field(default="layer", description="unstructured: one threshold per layer or "
                                                                             "one across all selected layers")
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "Gemm", "MatMul"])

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
        calib: unused.

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
    return out
