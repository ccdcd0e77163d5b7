"""Weight palettization: each selected weight is clustered by 1-D k-means into
``2**bits`` values (one lookup table per tensor or per output channel) and
stored as packed ``bits``-bit indices plus the table.  Standard ONNX ops decode
it in the graph (``Cast``/``Gather``/``Reshape``; bit planes add ``BitShift``,
``Mod``, ``Mul``, ``ReduceSum``), so any runtime loads the file; onnxruntime
folds the constant decode subgraph at session creation, so inference speed is
unchanged and only the file (and download) shrinks.

Index storage (``packing``):

* ``uint4``: ONNX ``UINT4`` tensors (two indices a byte) for ``bits <= 4``;
  needs opset 21 (the model is converted with ``onnx.version_converter`` when
  older; if that fails the pass falls back to bit planes);
* ``bitplanes``: the indices' ``bits`` bit planes, each packed 8 a byte, so any
  bit width costs exactly ``bits`` bits per weight (opset >= 11);
* ``uint8``: one byte per index;
* ``auto`` (default): ``uint8`` for 8 bits, ``uint4`` for 4 bits when the model
  is already at opset >= 21, else ``bitplanes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from . import PassConfig, PassError, PassOutcome
from ._util import Graph, ensure_names, output_channel_axis
from .cleanup import constants_to_initializers

if TYPE_CHECKING:  # pragma: no cover
    import onnx

NEEDS_CALIBRATION = False
SUPPORTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Config(PassConfig):
    bits: int = Field(default=4, ge=1, le=8, description="index bits: 2**bits values per lookup table")
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    iterations: int = Field(default=25, ge=0, description="Lloyd iterations of the k-means")
    min_elements: int = Field(default=1024, ge=1, description="smaller weights are left alone")
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "Gemm", "MatMul"])
    packing: Literal["auto", "uint4", "bitplanes", "uint8"] = "auto"


# ----------------------------------------------------------------------------- k-means


def _init_centroids(z: np.ndarray, k: int) -> np.ndarray:
    """Initial centroids [C, k] for rows of ``z`` in [0, 1]: equal mass of the cube-rooted
    histogram density (the high-resolution optimum of 1-D quantization; plain quantiles
    starve the tails, where the squared error is largest), interpolated within bins."""
    rows, n = z.shape
    bins = int(np.clip(n // 32, 16, 2048))
    b = np.minimum((z * bins).astype(np.int64), bins - 1)
    hist = np.bincount((b + np.arange(rows)[:, None] * bins).ravel(), minlength=rows * bins).reshape(rows, bins)
    cdf = np.cumsum(np.cbrt(hist.astype(np.float64)), axis=1)
    cdf = np.concatenate([np.zeros((rows, 1)), cdf / cdf[:, -1:]], axis=1)  # at the bin edges
    targets = (np.arange(k) + 0.5) / k
    out = np.empty((rows, k))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for r in range(rows):  # np.interp is fast; rows are few (output channels)
        out[r] = np.interp(targets, cdf[r], edges)
    return out


def kmeans_rows(x: np.ndarray, k: int, iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means of each row of ``x`` [C, R]: (centroids [C, k], indices [C, R]).

    Vectorised over rows: every row is scaled to [0, 1] and shifted by twice its
    row number, so one sorted array (and its prefix sums) serves all rows and each
    Lloyd step is a ``searchsorted`` of the cluster boundaries.  Initialized from the
    cube-rooted density (or at the distinct values, for a row with at most ``k`` of them);
    the returned centroids are the means of the values assigned to them.

    Args:
        x: the values, one row per lookup table.
        k: clusters per row.
        iterations: at most this many Lloyd steps (they stop early once the centroids settle).

    Returns:
        (centroids [C, k] as float64, in ascending order per row; indices [C, R] into each row's centroids).
    """
    x = np.asarray(x, np.float64)
    rows, n = x.shape
    lo, hi = x.min(1), x.max(1)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = (x - lo[:, None]) / span[:, None]
    zs = np.sort(z, axis=1)
    off = 2.0 * np.arange(rows)[:, None]
    flat = (zs + off).ravel()
    csum = np.concatenate([[0.0], np.cumsum(zs.ravel())])
    cent = _init_centroids(z, k)
    distinct = 1 + np.count_nonzero(np.diff(zs, axis=1) > 0, axis=1)
    for r in np.nonzero(distinct <= k)[0]:
        u = np.unique(zs[r])
        cent[r] = np.concatenate([u, np.full(k - len(u), u[-1])])
    row_start = (np.arange(rows) * n)[:, None]
    for _ in range(iterations):
        cent = np.sort(cent, axis=1)
        bnd = (cent[:, :-1] + cent[:, 1:]) / 2
        pos = np.searchsorted(flat, (bnd + off).ravel(), side="right").reshape(rows, k - 1)
        starts = np.concatenate([row_start, pos], axis=1)
        ends = np.concatenate([pos, row_start + n], axis=1)
        cnt = ends - starts
        new = np.where(cnt > 0, (csum[ends] - csum[starts]) / np.maximum(cnt, 1), cent)
        if np.allclose(new, cent, rtol=0, atol=1e-9):
            cent = new
            break
        cent = new
    cent = np.sort(cent, axis=1)
    bnd = ((cent[:, :-1] + cent[:, 1:]) / 2 + off).ravel()
    idx = np.searchsorted(bnd, (z + off).ravel(), side="left").reshape(rows, n) - np.arange(rows)[:, None] * (k - 1)
    ids = (idx + np.arange(rows)[:, None] * k).ravel()
    sums = np.bincount(ids, weights=x.ravel(), minlength=rows * k).reshape(rows, k)
    counts = np.bincount(ids, minlength=rows * k).reshape(rows, k)
    centroids = np.where(counts > 0, sums / np.maximum(counts, 1), lo[:, None] + cent * span[:, None])
    return centroids, idx


# ----------------------------------------------------------------------------- graph


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _upgrade_to_21(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """The model converted to opset 21 (checked), or None and why not."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, 21)
        converted.ir_version = max(converted.ir_version, 10)
        onnx.checker.check_model(converted)
    except Exception as e:  # the converter lacks an adapter, or produced an invalid model
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return converted, ""


class _Builder:
    def __init__(self, g: Graph, opset: int):
        self.g, self.opset, self.nodes = g, opset, []

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.g.unique(base)
        self.g.set_initializer(name, value)
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        from onnx import helper

        out = self.g.unique(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.g.unique(f"{base}_{op}"), **attrs))
        return out


def _encode_indices(b: _Builder, base: str, idx: np.ndarray, bits: int, packing: str) -> str:
    """Store ``idx`` (uint8, any shape) packed; return the name of its int32 decoding in that shape."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto

    shape = np.array(idx.shape, np.int64)
    if packing == "uint8":
        stored = b.const(f"{base}/palette_idx", idx.astype(np.uint8))
        return b.node("Cast", [stored], f"{base}/palette_idx_i32", to=TensorProto.INT32)
    if packing == "uint4":
        t = onnx.numpy_helper.from_array(np.ascontiguousarray(idx.astype(ml_dtypes.uint4)), b.g.unique(f"{base}/palette_idx"))
        b.g.graph.initializer.append(t)
        b.g.inits[t.name] = b.g.graph.initializer[-1]
        return b.node("Cast", [t.name], f"{base}/palette_idx_i32", to=TensorProto.INT32)
    # bit planes: plane p holds bit p of every index, 8 indices a byte (first index in the high bit)
    flat = idx.ravel().astype(np.uint8)
    n = flat.size
    planes = np.packbits(((flat[None, :] >> np.arange(bits, dtype=np.uint8)[:, None]) & 1).astype(np.uint8), axis=1)
    stored = b.const(f"{base}/palette_planes", planes[:, :, None])  # [bits, ceil(n/8), 1]
    shifts = b.const(f"{base}/palette_shifts", np.arange(7, -1, -1, dtype=np.uint8))
    two = b.const(f"{base}/palette_two", np.array(2, np.uint8))
    weights = b.const(f"{base}/palette_bitweights", (1 << np.arange(bits, dtype=np.int32)).reshape(bits, 1, 1))
    x = b.node("BitShift", [stored, shifts], f"{base}/palette_bits", direction="RIGHT")  # [bits, m, 8]
    x = b.node("Mod", [x, two], f"{base}/palette_bits")
    x = b.node("Cast", [x], f"{base}/palette_bits", to=TensorProto.INT32)
    x = b.node("Mul", [x, weights], f"{base}/palette_bits")
    if b.opset >= 13:
        axes = b.const(f"{base}/palette_axes", np.array([0], np.int64))
        x = b.node("ReduceSum", [x, axes], f"{base}/palette_idx_i32", keepdims=0)  # [m, 8]
    else:
        x = b.node("ReduceSum", [x], f"{base}/palette_idx_i32", axes=[0], keepdims=0)
    x = b.node("Reshape", [x, b.const(f"{base}/palette_flat", np.array([-1], np.int64))], f"{base}/palette_idx_i32")
    if planes.shape[1] * 8 != n:
        x = b.node("Slice", [x, b.const(f"{base}/palette_start", np.array([0], np.int64)),
                             b.const(f"{base}/palette_end", np.array([n], np.int64))], f"{base}/palette_idx_i32")
    return b.node("Reshape", [x, b.const(f"{base}/palette_view", shape)], f"{base}/palette_idx_i32")


def _tensor_bytes(g: Graph, names: list[str]) -> int:
    return sum(g.inits[n].ByteSize() for n in names if n in g.inits)


def apply(model: onnx.ModelProto, config: Config, calib=None) -> PassOutcome:
    """Replace each selected weight by a k-means lookup table, packed indices and an in-graph decode.

    A weight is palettized only when every node reading it is selected and the estimated storage is smaller.

    Args:
        model: the model (already a copy), modified in place (or converted to opset 21 for ``uint4`` indices).
        config: bits, granularity, k-means iterations, minimum size, op types, packing and node scoping.
        calib: unused.

    Returns:
        The outcome: the palettized model, the nodes whose weight was palettized, the nodes skipped (with
        reasons) and per-weight size notes.

    Raises:
        PassError: ``packing="uint4"`` with more than 4 bits, or ``op_types`` names an op it does not handle.
    """

    ensure_names(model)
    constants_to_initializers(model)
    if config.packing == "uint4" and config.bits > 4:
        raise PassError(f"packing uint4 holds at most 4 bits, not {config.bits}")
    unsupported = [op for op in config.op_types if op not in SUPPORTED]
    if unsupported:
        raise PassError(f"palettize handles {', '.join(SUPPORTED)}; not {', '.join(unsupported)}")
    out = PassOutcome(model)
    g = Graph(model)

    # weights to palettize, with every node that reads them
    chosen: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type not in config.op_types or not config.selects(node.name) or len(node.input) < 2:
            continue
        w = g.array(node.input[1])
        if w is None:
            out.skip(node.name, "weight is not constant")
        elif not np.issubdtype(w.dtype, np.floating):
            out.skip(node.name, f"weight dtype {w.dtype} is not floating point")
        elif not np.all(np.isfinite(w)):
            out.skip(node.name, "weight has non-finite values")
        elif w.size < config.min_elements:
            out.skip(node.name, f"weight has {w.size} elements (< min_elements {config.min_elements})")
        else:
            chosen.setdefault(node.input[1], []).append(node)
    opset = _opset(model)
    packing = config.packing
    if packing == "auto":
        packing = "uint8" if config.bits == 8 else "uint4" if config.bits == 4 and opset >= 21 else "bitplanes"
    k = 2**config.bits
    plan: list[tuple[str, list[onnx.NodeProto], int]] = []
    for wname, nodes in chosen.items():
        readers = g.consumers.get(wname, [])
        w = g.array(wname)
        axes = {output_channel_axis(n, w.ndim) for n in nodes}
        if len(readers) != len(nodes) or wname in g.outputs or any(n.input[0] == wname for n in nodes):
            for n in nodes:
                out.skip(n.name, f"weight '{wname}' is also read by nodes outside the pass's scope")
        elif config.granularity == "per_channel" and len(axes) > 1:
            for n in nodes:
                out.skip(n.name, f"weight '{wname}' is shared by nodes with different output-channel axes")
        else:
            axis = axes.pop()
            c = w.shape[axis] if config.granularity == "per_channel" and w.ndim >= 1 else 1
            index_bytes = {"uint8": w.size, "uint4": (w.size + 1) // 2}.get(packing, config.bits * -(-w.size // 8))
            estimate = index_bytes + c * k * w.dtype.itemsize
            if estimate >= w.nbytes:
                for n in nodes:
                    out.skip(n.name, f"{config.bits}-bit {config.granularity} storage (~{estimate} bytes: {c} LUT(s) of {k} "
                                     f"+ indices) is not smaller than the weight ({w.nbytes} bytes)")
            else:
                plan.append((wname, nodes, axis))
    if not plan:
        return out
    if packing == "uint4" and opset < 21:
        converted, why = _upgrade_to_21(model)
        if converted is None:
            out.notes.append(f"opset {opset} -> 21 conversion failed ({why}); indices stored as bit planes instead of UINT4")
            packing = "bitplanes"
        else:
            out.notes.append(f"model converted from opset {opset} to 21 for UINT4 indices")
            model = converted
            out.model = model
            g = Graph(model)
            opset = 21
            plan = [(w, [n for n in model.graph.node if n.name in {x.name for x in nodes}], ax) for w, nodes, ax in plan]
    if packing == "bitplanes" and opset < 11:
        out.notes.append(f"opset {opset} has no BitShift; indices stored as uint8")
        packing = "uint8"

    b = _Builder(g, opset)
    total_before = total_after = done = 0
    for wname, nodes, axis in plan:
        w = g.array(wname)
        shape = w.shape
        if config.granularity == "per_channel" and w.ndim >= 1:
            c = shape[axis]
            pre, post = int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis + 1 :], dtype=np.int64))
            view = (pre, c, post)
            rows = np.moveaxis(w.reshape(view), 1, 0).reshape(c, -1)
        else:
            c, view = 1, (w.size,)
            rows = w.reshape(1, -1)
        cent, idx = kmeans_rows(rows, k, config.iterations)
        if c > 1:
            idx_view = np.moveaxis(idx.reshape(c, pre, post), 0, 1)  # back to [pre, c, post]
        else:
            idx_view = idx.reshape(view)
        n_before = len(g.graph.initializer)
        base = wname
        lut = b.const(f"{base}/palette_lut", cent.reshape(-1).astype(w.dtype))
        ind = _encode_indices(b, base, idx_view.astype(np.uint8), config.bits, packing)
        if c > 1:
            offsets = b.const(f"{base}/palette_offsets", (np.arange(c, dtype=np.int32) * k).reshape(1, c, 1))
            ind = b.node("Add", [ind, offsets], f"{base}/palette_idx_i32")
        dec = b.node("Gather", [lut, ind], f"{base}/palette_values", axis=0)
        dec = b.node("Reshape", [dec, b.const(f"{base}/palette_shape", np.array(shape, np.int64))], f"{base}/palettized")
        for n in nodes:
            n.input[1] = dec
        new_inits = [t.name for t in list(g.graph.initializer)[n_before:]]
        size_before, size_after = g.inits[wname].ByteSize(), _tensor_bytes(g, new_inits)
        total_before += size_before
        done += 1
        total_after += size_after
        distinct = len(np.unique(cent))
        luts = f"{c} LUTs of {k}" if c > 1 else f"1 LUT of {k}"
        out.applied.extend(n.name for n in nodes)
        out.notes.append(f"{', '.join(n.name for n in nodes)}: {config.bits}-bit {config.granularity} ({luts}, "
                         f"{distinct} distinct values), {size_before} -> {size_after} bytes")

    decode = b.nodes
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(decode + rest)
    Graph(model).remove_unused_initializers()
    out.notes.append(f"{done} weight(s) palettized ({packing} indices): {total_before} -> {total_after} bytes")
    return out
