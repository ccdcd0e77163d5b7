"""Low-rank factorization: a dense layer ``x @ W`` (``W`` is ``[m, n]``) becomes
``(x @ P) @ Q`` with ``P`` ``[m, r]`` and ``Q`` ``[r, n]`` from a truncated SVD.

Handled: ``Gemm`` (constant ``B``, any ``transB``/``alpha``/``beta``; ``transA=1``
is skipped), ``MatMul`` with a constant 2-D right operand and 1x1 ``Conv``
(``group=1``; the first conv keeps the stride and pads, the second is a plain
1x1 conv carrying the bias).  The rank is ``ceil(rank_ratio * min(m, n))`` or the
smallest rank keeping ``energy`` of the squared singular values, rounded up to a
multiple of ``round_to``; a layer is factored only when its weight parameters
drop by at least ``min_saving``.

With ``data_aware=True`` (needs calibration data) the SVD is weighted by the
layer's input covariance, so the truncation minimizes the error of the layer's
*outputs* on the calibration data rather than of its weights, and for Gemm/Conv
the bias absorbs the mean output shift.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from . import PassConfig, PassError, PassOutcome
from ._util import Graph, ensure_names
from .cleanup import constants_to_initializers

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData

NEEDS_CALIBRATION = False


class Config(PassConfig):
    rank_ratio: float | None = Field(default=None, gt=0, le=1, description="rank = ceil(ratio * min(m, n)); None: use energy")
    energy: float = Field(default=0.95, gt=0, le=1, description="keep this fraction of the squared singular values")
    min_saving: float = Field(default=0.1, ge=-1, lt=1, description="factor only when weight params drop by this fraction")
    round_to: int = Field(default=8, ge=1, description="round the rank up to a multiple of this")
    op_types: list[str] = Field(default_factory=lambda: ["Gemm", "MatMul", "Conv"])
    data_aware: bool = Field(default=False, description="weight the SVD by calibration input statistics")
    calib_samples: int = Field(default=128, ge=1, description="calibration samples read when data_aware")
    damping: float = Field(default=0.01, ge=0, description="data_aware: add this fraction of the mean input variance to "
                                                            "the covariance diagonal (guards against few samples)")


def _attrs(node: onnx.NodeProto) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


class _Target:
    """One layer to factor: ``W`` as ``[m, n]`` in ``x @ W`` form."""

    def __init__(self, node, kind: str, w_mat: np.ndarray, bias_in: str | None):
        self.node, self.kind, self.w, self.bias_in = node, kind, w_mat, bias_in


def _eligible(node, g: Graph) -> tuple[_Target | None, str | None]:
    """The layer's weight as an ``[m, n]`` matrix, or the reason it cannot be factored."""
    op = node.op_type
    if op not in ("Gemm", "MatMul", "Conv"):
        return None, f"{op} is not supported (Gemm, MatMul, 1x1 Conv)"
    if len(node.input) < 2:
        return None, "no weight input"
    w = g.array(node.input[1])
    if w is None:
        return None, "weight is not constant"
    if not np.issubdtype(w.dtype, np.floating):
        return None, f"weight dtype {w.dtype} is not floating point"
    if not np.all(np.isfinite(w)):
        return None, "weight has non-finite values"
    if len(g.consumers.get(node.input[1], [])) > 1 or node.input[1] in g.outputs:
        return None, "weight is shared with other nodes"
    a = _attrs(node)
    if op == "Gemm":
        if a.get("transA", 0):
            return None, "Gemm with transA=1 is not supported"
        if g.array(node.input[0]) is not None:
            return None, "Gemm input A is constant (fold it instead)"
        mat = w.T if a.get("transB", 0) else w
        return _Target(node, op, mat, node.input[2] if len(node.input) > 2 and node.input[2] else None), None
    if op == "MatMul":
        if w.ndim != 2:
            return None, f"MatMul weight is {w.ndim}-D (only 2-D weights are factored)"
        if g.array(node.input[0]) is not None:
            return None, "MatMul input A is constant (fold it instead)"
        return _Target(node, op, w, None), None
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        return None, f"Conv kernel {list(w.shape[2:])} is not 1x1"
    if a.get("group", 1) != 1:
        return None, f"grouped Conv (group={a['group']})"
    return _Target(node, op, w[:, :, 0, 0].T, node.input[2] if len(node.input) > 2 and node.input[2] else None), None


def _rank(s: np.ndarray, m: int, n: int, config: Config) -> int:
    full = min(m, n)
    if config.rank_ratio is not None:
        r = math.ceil(config.rank_ratio * full)
    else:
        e = s.astype(np.float64) ** 2
        total = e.sum()
        if total <= 0:
            r = 1
        else:
            cum = np.cumsum(e) / total
            r = int(np.searchsorted(cum, config.energy - 1e-12) + 1)
    r = max(1, r)
    r = math.ceil(r / config.round_to) * config.round_to
    return min(r, full)


class _Stats:
    """Input mean and covariance of a layer over calibration data, streamed batch by batch."""

    def __init__(self, dim: int):
        self.n = 0
        self.s1 = np.zeros(dim)
        self.s2 = np.zeros((dim, dim))

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64, copy=False)
        self.n += len(x)
        self.s1 += x.sum(0)
        self.s2 += x.T @ x

    def mean(self) -> np.ndarray:
        return self.s1 / max(self.n, 1)

    def second_moment(self, centered: bool) -> np.ndarray:
        m2 = self.s2 / max(self.n, 1)
        if centered:
            mu = self.mean()
            m2 = m2 - np.outer(mu, mu)
        return m2


def _input_rows(t: _Target, x: np.ndarray) -> np.ndarray:
    """A layer's input as rows of length m (the positions the layer actually reads)."""
    if t.kind == "Conv":
        s = _attrs(t.node).get("strides", [1, 1])
        x = x[:, :, :: s[0], :: s[1]] if x.ndim == 4 else x
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _collect_stats(model: onnx.ModelProto, targets: list[_Target], calib: CalibrationData, limit: int) -> dict[str, _Stats]:
    import onnx

    from ..fidelity import session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    tensors = list(dict.fromkeys(t.node.input[0] for t in targets))
    have = {o.name for o in m.graph.output}
    for name in tensors:
        if name not in have:
            m.graph.output.add().name = name
    sess = session(m, optimize=False)
    stats: dict[str, _Stats] = {}
    for feed in calib.batches(limit=limit):
        values = dict(zip(tensors, sess.run(tensors, feed)))
        for t in targets:
            rows = _input_rows(t, values[t.node.input[0]])
            stats.setdefault(t.node.name, _Stats(t.w.shape[0])).add(rows)
    return stats


def _svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD through the eigendecomposition of the smaller Gram matrix (several times faster
    than LAPACK's SVD here; singular values below ~1e-8 of the largest lose relative accuracy,
    which does not matter for truncation)."""
    m, n = w.shape
    if m < n:
        v, s, ut = _svd(w.T)
        return ut.T, s, v.T
    evals, v = np.linalg.eigh(w.T @ w)
    order = np.argsort(evals)[::-1]
    evals, v = np.maximum(evals[order], 0.0), v[:, order]
    s = np.sqrt(evals)
    good = s > s[0] * 1e-12 if s.size and s[0] > 0 else np.zeros_like(s, bool)
    u = np.where(good, (w @ v) / np.where(good, s, 1.0), 0.0)
    return u, s, v.T


def _factor(w: np.ndarray, stats: _Stats | None, centered: bool, config: Config) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(P [m, r], Q [r, n], r, kept weight energy) with ``P @ Q ~= W``.

    The rank always comes from the weight's own singular values (``rank_ratio`` or
    ``energy``), so a data-aware run keeps the same rank and only picks the rank-r
    subspace that best preserves the layer's outputs on the calibration inputs:
    with the input second moment ``C = L L^T``, ``||X (W - PQ)||`` is minimized by the
    truncated SVD of ``L^T W`` mapped back through ``L^-T``.
    """
    w64 = w.astype(np.float64)
    m, n = w64.shape
    u, s, vt = _svd(w64)
    r = _rank(s, m, n, config)
    kept = float(np.sum(s[:r] ** 2) / max(np.sum(s**2), 1e-300))
    if stats is None:
        root = np.sqrt(s[:r])
        return u[:, :r] * root, root[:, None] * vt[:r], r, kept
    cov = stats.second_moment(centered)
    cov = (cov + cov.T) / 2
    diag = np.maximum(np.diag(cov), 0.0)
    cov[np.diag_indices(m)] += max(config.damping * float(diag.mean()), float(diag.max(initial=0.0)) * 1e-9, 1e-12)
    lower = np.linalg.cholesky(cov)
    u, s2, vt = _svd(lower.T @ w64)
    root = np.sqrt(s2[:r])
    return np.linalg.solve(lower.T, u[:, :r] * root), root[:, None] * vt[:r], r, kept


def apply(model: onnx.ModelProto, config: Config, calib: CalibrationData | None = None) -> PassOutcome:
    """Factor the selected dense layers into two thinner ones by truncated SVD where that saves enough parameters.

    Args:
        model: the model (already a copy); each factored node is replaced in place by a pair named
            ``<name>/lowrank_a`` and ``<name>/lowrank_b``.
        config: rank selection, minimum saving, op types, data-aware settings and node scoping.
        calib: calibration data; required when ``config.data_aware`` (at most ``calib_samples`` are read).

    Returns:
        The outcome: the factored model, the layers factored, the layers skipped (with reasons) and
        per-layer rank and parameter notes.

    Raises:
        PassError: ``data_aware`` is set and ``calib`` is None.
    """
    from onnx import helper

    ensure_names(model)
    constants_to_initializers(model)
    out = PassOutcome(model)
    if config.data_aware and calib is None:
        raise PassError("lowrank with data_aware=True needs calibration data")
    g = Graph(model)
    opset = _opset(model)

    targets: list[_Target] = []
    for node in model.graph.node:
        if node.op_type not in config.op_types or not config.selects(node.name):
            continue
        t, reason = _eligible(node, g)
        if t is None:
            out.skip(node.name, reason or "not eligible")
            continue
        m, n = t.w.shape
        if min(m, n) < 2:
            out.skip(node.name, f"weight {m}x{n} has rank 1 already")
            continue
        # even the smallest useful rank must save enough
        if min(config.round_to, m, n) * (m + n) > (1 - config.min_saving) * m * n:
            out.skip(node.name, f"weight {m}x{n} is too small: no rank saves {config.min_saving:.0%} of its parameters")
            continue
        targets.append(t)

    stats: dict[str, _Stats] = {}
    if config.data_aware and targets:
        stats = _collect_stats(model, targets, calib, config.calib_samples)
        out.notes.append(f"data-aware SVD on {min(len(calib), config.calib_samples)} calibration samples")

    replacements: dict[int, list[onnx.NodeProto]] = {}
    before_total = after_total = 0
    for t in targets:
        node, a = t.node, _attrs(t.node)
        m, n = t.w.shape
        centered = t.kind != "MatMul"
        st = stats.get(node.name)
        p, q, r, kept = _factor(t.w, st, centered, config)
        params_before, params_after = m * n, r * (m + n)
        if params_after > (1 - config.min_saving) * params_before:
            out.skip(node.name, f"rank {r} of {min(m, n)} (weight energy {kept:.3f}) saves only "
                                f"{1 - params_after / params_before:.1%} of {m}x{n} parameters (min_saving {config.min_saving:.0%})")
            continue
        dtype = t.w.dtype
        bias = g.array(t.bias_in) if t.bias_in else None
        delta = None
        if st is not None and centered:
            # the truncation error's mean over the data goes into the bias
            delta = st.mean() @ (t.w.astype(np.float64) - p @ q)
        wname = node.input[1]
        pa, qb = g.unique(f"{wname}/lowrank_a"), g.unique(f"{wname}/lowrank_b")
        mid = g.unique(f"{node.name}/lowrank_mid")
        na, nb = f"{node.name}/lowrank_a", f"{node.name}/lowrank_b"
        x, y = node.input[0], node.output[0]
        if t.kind == "Gemm":
            alpha, beta, trans_b = a.get("alpha", 1.0), a.get("beta", 1.0), a.get("transB", 0)
            g.set_initializer(pa, ((p * alpha).T if trans_b else p * alpha).astype(dtype))
            g.set_initializer(qb, (q.T if trans_b else q).astype(dtype))
            inputs_b = [mid, qb]
            if delta is not None:
                c = bias.astype(np.float64) if bias is not None else None
                if c is None or beta == 0:
                    c, beta = alpha * delta, 1.0
                else:
                    c = c + alpha * delta / beta
                cname = g.unique(f"{node.name}/lowrank_bias")
                g.set_initializer(cname, c.astype(dtype))
                inputs_b.append(cname)
            elif t.bias_in:
                inputs_b.append(t.bias_in)
            if opset >= 11:
                first = helper.make_node("Gemm", [x, pa], [mid], name=na, transB=trans_b)
            else:
                g.set_initializer(pa, (p * alpha).astype(dtype))
                first = helper.make_node("MatMul", [x, pa], [mid], name=na)
            extra = {"beta": beta} if len(inputs_b) > 2 else {}
            second = helper.make_node("Gemm", inputs_b, [y], name=nb, transB=trans_b, **extra)
        elif t.kind == "MatMul":
            g.set_initializer(pa, p.astype(dtype))
            g.set_initializer(qb, q.astype(dtype))
            first = helper.make_node("MatMul", [x, pa], [mid], name=na)
            second = helper.make_node("MatMul", [mid, qb], [y], name=nb)
        else:  # 1x1 Conv
            g.set_initializer(pa, p.T[:, :, None, None].astype(dtype))
            g.set_initializer(qb, q.T[:, :, None, None].astype(dtype))
            keep = {k: v for k, v in a.items() if k in ("strides", "pads", "auto_pad", "dilations")}
            first = helper.make_node("Conv", [x, pa], [mid], name=na, kernel_shape=[1, 1], **keep)
            inputs_b = [mid, qb]
            if delta is not None:
                c = (bias.astype(np.float64) if bias is not None else 0.0) + delta
                cname = g.unique(f"{node.name}/lowrank_bias")
                g.set_initializer(cname, np.asarray(c).astype(dtype))
                inputs_b.append(cname)
            elif t.bias_in:
                inputs_b.append(t.bias_in)
            second = helper.make_node("Conv", inputs_b, [y], name=nb, kernel_shape=[1, 1])
        replacements[id(node)] = [first, second]
        before_total += params_before
        after_total += params_after
        out.applied.append(node.name)
        out.notes.append(f"{node.name}: rank {r} of {min(m, n)} (weight energy {kept:.3f}), params {params_before} -> {params_after}")

    if replacements:
        nodes = [new for n in model.graph.node for new in replacements.get(id(n), [n])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        out.notes.append(f"factored {len(replacements)} layer(s): weight params {before_total} -> {after_total}")
    Graph(model).remove_unused_initializers()
    return out
