"""Structured channel pruning: output channels of ``Conv``/``Gemm`` layers are
removed for real (smaller tensors, fewer MACs on any backend), their consumers
are rewired, and, training-free, the consumers' weights are re-fitted by least
squares so their outputs on calibration data match the original model's.

A *prunable group* is a producer ``P`` (``Conv`` with ``group=1`` or ``Gemm``)
whose output channels flow only through channel-wise ops -- activations
(``Relu``, ``Clip``, ``HardSwish``...), ``Add``/``Sub``/``Mul``/``Div``/``PRelu`` with a
scalar or per-channel constant, ``BatchNormalization``, pooling, depthwise
``Conv`` (pruned along, its output continuing the chain) -- into consumers that
can drop input channels: ``Conv`` (``group=1``), and ``Gemm``/``MatMul`` after
``Flatten``/``Reshape`` (a channel is a block of ``H*W`` flattened features) or
``GlobalAveragePool``.  Anything else on the way (a residual ``Add`` of two
activations, ``Concat``, ``Transpose``, a graph output...) makes the group
un-prunable; ``P`` is skipped with the blocking node named.  In MobileNetV2 the
expand 1x1 -> Clip -> depthwise -> Clip -> project 1x1 chain is the main target:
pruning the expansion channels shrinks all three convs.

Channels to drop are the ones with the smallest L1/L2 norm of ``P``'s weights;
each layer keeps ``(1 - ratio) * C`` channels rounded to the nearest multiple of
``round_to``, never fewer than ``min_channels``; a layer where rounding keeps every
channel is skipped.  Channel counts off the SIMD width are slow: onnxruntime's
x86 NCHWc convolutions need multiples of 8 (AVX2) or 16 (AVX-512) and fall back
to a slower path otherwise, so use ``round_to=16`` for AVX-512 hosts.

Reconstruction (``reconstruct=True``, needs calibration data): consumers are
re-fitted one after the other in graph order, so each one sees the pruned
model's real input (upstream errors included).  For a consumer the targets are
its original pre-activation outputs (restricted to its own kept channels when it
is pruned too) and the regressors its inputs in the pruned model: im2col patches
at sampled output positions for ``Conv``, feature rows for ``Gemm``/``MatMul``.
The weights and the bias are solved jointly by ridge regression pulled towards
the sliced original weights, which keeps the solution sane when samples are few.
More real samples help (MobileNetV2 50%: 11.8 dB on 128 crops, 12.9 dB on
1,024); random crops and flips of 128 do not (11.5 dB), unlike for ``prune``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator

from . import PassConfig, PassError, PassOutcome
from ._util import Graph
from .cleanup import normalize

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..calibration import CalibrationData

NEEDS_CALIBRATION = True

#: ops that act on each channel independently and keep the layout
UNARY = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
         "Softsign", "ThresholdedRelu", "Gelu", "Mish", "Abs", "Neg", "Identity", "Dropout", "Erf", "Exp", "Sqrt", "Cast"}
BINARY = {"Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min", "Pow"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}

#: ridge strength, relative to the mean diagonal of the regressors' Gram matrix
RIDGE = 0.1


class Config(PassConfig):
    ratio: float = Field(default=0.3, gt=0, lt=1, description="fraction of output channels removed per prunable layer")
    criterion: Literal["l1", "l2"] = Field(default="l1", description="channel importance: L1/L2 norm of the producer's weights")
    reconstruct: bool = Field(default=True, description="re-fit consumers by least squares on calibration data")
    round_to: int = Field(default=8, ge=1, description="keep channel counts a multiple of this when possible")
    min_channels: int = Field(default=8, ge=1, description="never keep fewer channels than this")
    calib_samples: int = Field(default=64, ge=1, description="calibration samples used for reconstruction")
    ratios: dict[str, float] = Field(default_factory=dict,
                                     description="per-producer fraction removed (node name -> ratio in [0, 1)), "
                                                 "overriding `ratio` for those layers; 0 leaves a layer whole")

    @field_validator("ratios")
    @classmethod
    def _check_ratios(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, r in v.items() if not 0 <= r < 1]
        if bad:
            raise ValueError(f"ratio of {bad[0]} is {v[bad[0]]}, not in [0, 1)")
        return v


def needs_calibration(config: Config) -> bool:
    """Whether the pass needs calibration data under ``config``.

    Args:
        config: the pass config.

    Returns:
        ``config.reconstruct`` (only the least-squares re-fit reads calibration data).
    """
    return config.reconstruct


def _attr(node: onnx.NodeProto, name: str, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    import onnx

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Inferred tensor shapes (None for unknown dims such as the batch)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        return {}
    out: dict[str, list[int | None]] = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    return out


@dataclass
class _Edit:
    """One slicing to do once the kept channels are known."""

    kind: str  # const | bn | dw | reshape | conv_in | gemm_in | matmul_in
    node: onnx.NodeProto
    index: int = 1  # const: input index
    axis: int = 0  # const: channel axis of the constant
    block: int = 1  # features per channel at this point (Flatten makes it H*W)


@dataclass
class _Group:
    producer: onnx.NodeProto
    channels: int
    edits: list[_Edit] = field(default_factory=list)
    tensors: set[str] = field(default_factory=set)  # the tensors carrying the pruned channels

    def nodes(self, kind: str) -> list[onnx.NodeProto]:
        return [e.node for e in self.edits if e.kind == kind]

    @property
    def consumers(self) -> list[onnx.NodeProto]:
        return [e.node for e in self.edits if e.kind in ("conv_in", "gemm_in", "matmul_in")]


class _Blocked(Exception):
    pass


def _own_weight(g: Graph, node: onnx.NodeProto, index: int = 1) -> np.ndarray:
    """The constant, unshared, floating-point weight at ``node.input[index]``, else :class:`_Blocked`."""
    name = node.input[index] if len(node.input) > index else ""
    w = g.array(name) if name else None
    if w is None:
        raise _Blocked(f"weight of {node.op_type} node {node.name} is not constant")
    if not np.issubdtype(w.dtype, np.floating):
        raise _Blocked(f"weight of {node.op_type} node {node.name} is {w.dtype}, not floating point")
    if len(g.consumers.get(name, [])) > 1 or name in g.outputs:
        raise _Blocked(f"weight {name} of {node.op_type} node {node.name} is shared with other nodes")
    return w


def _producer(g: Graph, node: onnx.NodeProto) -> tuple[int, int]:
    """(output channels, output rank) of a prunable producer, else :class:`_Blocked`."""
    if node.op_type == "Conv":
        w = _own_weight(g, node)
        if (_attr(node, "group", 1) or 1) != 1:
            raise _Blocked(f"grouped Conv (group={_attr(node, 'group')}) is pruned only along with the layer feeding it")
        if w.ndim < 3:
            raise _Blocked(f"Conv weight is {w.ndim}-D")
        if len(node.input) > 2 and node.input[2] and g.array(node.input[2]) is None:
            raise _Blocked("Conv bias is not constant")
        return w.shape[0], w.ndim
    if node.op_type == "Gemm":
        w = _own_weight(g, node)
        c = w.shape[0] if _attr(node, "transB", 0) else w.shape[1]
        if len(node.input) > 2 and node.input[2]:
            b = g.array(node.input[2])
            if b is None:
                raise _Blocked("Gemm bias is not constant")
            if b.ndim == 2 and b.shape[0] != 1:
                raise _Blocked(f"Gemm bias of shape {list(b.shape)} is not per-channel")
        return c, 2
    raise _Blocked(f"{node.op_type} is not a prunable producer (Conv with group=1, Gemm)")


def _trace(g: Graph, p: onnx.NodeProto, dims: dict[str, list[int | None]], excluded) -> _Group:
    """Follow ``p``'s output channels to the layers that consume them; :class:`_Blocked` names what stops it."""
    channels, rank = _producer(g, p)
    group = _Group(p, channels)
    stack: list[tuple[str, int, int]] = [(p.output[0], rank, 1)]
    chain: dict[str, tuple[int, int]] = {p.output[0]: (rank, 1)}  # tensor -> (rank, features per channel)
    seen: set[int] = {id(p)}
    joins: dict[int, tuple[onnx.NodeProto, str]] = {}  # element-wise nodes waiting for their other input

    def push(tensor: str, rank: int, block: int) -> None:
        chain[tensor] = (rank, block)
        stack.append((tensor, rank, block))

    def check_inputs(node, tensor: str) -> None:
        for i, name in enumerate(node.input):
            if name and name != tensor and g.array(name) is None:
                raise _Blocked(f"{node.op_type} node {node.name} combines the pruned channels with another activation "
                               f"({name})")
            if name == tensor and i != 0 and node.op_type not in BINARY:
                raise _Blocked(f"{node.op_type} node {node.name} takes the pruned tensor as input {i}")

    while stack:
        tensor, rank, block = stack.pop()
        feats = channels * block
        if tensor in g.outputs:
            raise _Blocked(f"tensor {tensor} is a graph output")
        for n in {id(c): c for c in g.consumers.get(tensor, [])}.values():
            op, name = n.op_type, n.name
            if id(n) in joins:  # x * f(x) and the like: both operands carry the same pruned channels
                if all(chain.get(i) == (rank, block) for i in n.input):
                    del joins[id(n)]
                    push(n.output[0], rank, block)
                continue
            if id(n) in seen:
                raise _Blocked(f"{op} node {name} is reached twice from the pruned channels")
            seen.add(id(n))
            if excluded(name):
                raise _Blocked(f"{op} node {name} on the path is excluded by the configuration")
            if op == "Conv":
                if n.input[0] != tensor:
                    raise _Blocked(f"Conv node {name} takes the pruned tensor as its weight or bias")
                w = _own_weight(g, n)
                grp = _attr(n, "group", 1) or 1
                if block != 1 or rank != w.ndim:
                    raise _Blocked(f"Conv node {name} reads a reshaped tensor")
                if grp == 1 and w.shape[1] == channels:
                    group.edits.append(_Edit("conv_in", n))
                elif grp == channels and w.shape[0] == channels and w.shape[1] == 1:
                    if len(n.input) > 2 and n.input[2] and g.array(n.input[2]) is None:
                        raise _Blocked(f"bias of depthwise Conv {name} is not constant")
                    group.edits.append(_Edit("dw", n))
                    push(n.output[0], rank, 1)
                else:
                    raise _Blocked(f"grouped Conv node {name} (group={grp}) mixes channels across groups")
            elif op in ("Gemm", "MatMul"):
                if n.input[0] != tensor:
                    raise _Blocked(f"{op} node {name} takes the pruned tensor as its right operand")
                if rank != 2:
                    raise _Blocked(f"{op} node {name} reads a {rank}-D tensor (the channel axis is not its K axis)")
                if op == "Gemm" and _attr(n, "transA", 0):
                    raise _Blocked(f"Gemm node {name} has transA=1")
                w = _own_weight(g, n)
                if w.ndim != 2:
                    raise _Blocked(f"{op} node {name} has a {w.ndim}-D weight")
                k = w.shape[1] if op == "Gemm" and _attr(n, "transB", 0) else w.shape[0]
                if k != feats:
                    raise _Blocked(f"{op} node {name} has K={k}, the pruned tensor has {feats} features")
                group.edits.append(_Edit("gemm_in" if op == "Gemm" else "matmul_in", n, block=block))
            elif op in UNARY:
                check_inputs(n, tensor)
                for extra in n.input[1:]:  # Clip min/max
                    if extra and g.array(extra).size != 1:
                        raise _Blocked(f"{op} node {name} has a non-scalar bound {extra}")
                if any(o and g.consumers.get(o) for o in n.output[1:]):
                    raise _Blocked(f"{op} node {name} has a second output in use")
                push(n.output[0], rank, block)
            elif op in BINARY:
                if len(n.input) != 2:
                    raise _Blocked(f"{op} node {name} has {len(n.input)} inputs")
                other = n.input[1] if n.input[0] == tensor else n.input[0]
                if g.array(other) is None:  # joins two activations: fine when both are this group's channels
                    if op in ("PRelu", "Pow"):
                        raise _Blocked(f"{op} node {name} combines the pruned channels with another activation ({other})")
                    if other != tensor:
                        joins[id(n)] = (n, other)
                        continue
                else:
                    idx = 1 if n.input[0] == tensor else 0
                    shape = g.array(n.input[idx]).shape
                    if op == "Pow" and idx == 0:
                        raise _Blocked(f"Pow node {name} uses the pruned channels as exponent")
                    if len(shape) > rank:
                        raise _Blocked(f"{op} node {name}: constant {n.input[idx]} of shape {list(shape)} adds dimensions")
                    ax = 1 - (rank - len(shape))
                    if ax >= 0 and shape[ax] == feats:
                        group.edits.append(_Edit("const", n, index=idx, axis=ax, block=block))
                    elif ax >= 0 and shape[ax] != 1:
                        raise _Blocked(f"{op} node {name}: constant {n.input[idx]} of shape {list(shape)} is not per-channel")
                push(n.output[0], rank, block)
            elif op == "BatchNormalization":
                check_inputs(n, tensor)
                if any(g.array(i).shape != (feats,) for i in n.input[1:5]):
                    raise _Blocked(f"BatchNormalization node {name} has parameters not of shape [{feats}]")
                if any(o and g.consumers.get(o) for o in n.output[1:]):
                    raise _Blocked(f"BatchNormalization node {name} is in training mode")
                group.edits.append(_Edit("bn", n, block=block))
                push(n.output[0], rank, block)
            elif op in POOLS:
                if rank < 3:
                    raise _Blocked(f"{op} node {name} reads a {rank}-D tensor")
                if any(o and g.consumers.get(o) for o in n.output[1:]):
                    raise _Blocked(f"{op} node {name} outputs indices")
                push(n.output[0], rank, block)
            elif op == "Flatten":
                axis = _attr(n, "axis", 1)
                axis = axis + rank if axis < 0 else axis
                if axis != 1:
                    raise _Blocked(f"Flatten node {name} has axis={axis} (only axis=1 keeps channels contiguous)")
                spatial = dims.get(tensor, [None])[2:] if rank > 2 else []
                if len(spatial) != rank - 2 or any(d is None for d in spatial):
                    raise _Blocked(f"Flatten node {name}: spatial size of {tensor} is unknown")
                push(n.output[0], 2, block * math.prod(spatial))
            elif op == "Reshape":
                shape = g.array(n.input[1]) if len(n.input) > 1 else None
                spatial = dims.get(tensor, [None])[2:] if rank > 2 else []
                if shape is None or len(shape) != 2:
                    raise _Blocked(f"Reshape node {name} does not flatten to 2-D with a constant shape")
                if len(spatial) != rank - 2 or any(d is None for d in spatial):
                    raise _Blocked(f"Reshape node {name}: spatial size of {tensor} is unknown")
                new_block = block * math.prod(spatial)
                if not (int(shape[1]) in (-1, channels * new_block) and (int(shape[0]) in (0, -1) or int(shape[1]) == -1)):
                    raise _Blocked(f"Reshape node {name} to {shape.tolist()} does not keep whole channels per sample")
                if n.input[1] in g.outputs:
                    raise _Blocked(f"Reshape node {name}: its shape is a graph output")
                group.edits.append(_Edit("reshape", n, block=new_block))
                push(n.output[0], 2, new_block)
            elif op == "Squeeze":
                axes = _attr(n, "axes") if len(n.input) < 2 else g.array(n.input[1])
                if axes is None:
                    raise _Blocked(f"Squeeze node {name} has no explicit axes")
                axes = [int(a) + rank if int(a) < 0 else int(a) for a in np.atleast_1d(axes)]
                if min(axes) < 2:
                    raise _Blocked(f"Squeeze node {name} removes the batch or channel axis")
                push(n.output[0], rank - len(axes), block)
            else:
                raise _Blocked(f"{op} node {name} is not channel-wise (Concat, Transpose, Reshape of channels... "
                               f"cannot follow pruned channels)")
    for n, other in joins.values():
        raise _Blocked(f"{n.op_type} node {n.name} combines the pruned channels with another activation ({other}): "
                       f"a residual connection, a gate...")
    if not group.consumers:
        raise _Blocked("the pruned channels reach no layer that can drop input channels")
    group.tensors = set(chain)
    return group


def _keep_count(channels: int, config: Config, ratio: float | None = None) -> int:
    """Channels kept: ``(1 - ratio) * C`` rounded to the nearest multiple of ``round_to`` (ties: keep more), at
    least ``min_channels`` (rounded up to a multiple); ``C`` when that removes nothing.  ``ratio``: this layer's
    ratio (default ``config.ratio``)."""
    r = config.round_to
    ratio = config.ratio if ratio is None else ratio
    if ratio <= 0:
        return channels
    keep = max(r, int(math.floor(channels * (1 - ratio) / r + 0.5)) * r)
    if keep < config.min_channels:
        keep = math.ceil(config.min_channels / r) * r
    return min(keep, channels)


def _importance(w: np.ndarray, node: onnx.NodeProto, criterion: str) -> np.ndarray:
    if node.op_type == "Gemm" and not _attr(node, "transB", 0):
        w = w.T
    a = np.abs(w.reshape(w.shape[0], -1).astype(np.float64))
    return a.sum(1) if criterion == "l1" else np.sqrt((a**2).sum(1))


def _block_index(keep: np.ndarray, block: int) -> np.ndarray:
    return (keep[:, None] * block + np.arange(block)[None, :]).ravel()


def _replace(g: Graph, node: onnx.NodeProto, index: int, value: np.ndarray, suffix: str) -> None:
    name = g.unique(f"{node.name}.{suffix}")
    g.set_initializer(name, value)
    node.input[index] = name


def _slice(g: Graph, group: _Group, keep: np.ndarray) -> None:
    p, k = group.producer, len(keep)
    w = g.array(p.input[1])
    if p.op_type == "Gemm" and not _attr(p, "transB", 0):
        _replace(g, p, 1, w[:, keep], "weight_pruned")
    else:
        _replace(g, p, 1, w[keep], "weight_pruned")
    if len(p.input) > 2 and p.input[2]:
        b = g.array(p.input[2])
        if b.ndim >= 1 and b.shape[-1] == group.channels:
            _replace(g, p, 2, np.take(b, keep, axis=b.ndim - 1), "bias_pruned")
    for e in group.edits:
        n = e.node
        idx = _block_index(keep, e.block)
        if e.kind == "const":
            _replace(g, n, e.index, np.take(g.array(n.input[e.index]), idx, axis=e.axis), f"in{e.index}_pruned")
        elif e.kind == "bn":
            for i in range(1, 5):
                _replace(g, n, i, g.array(n.input[i])[idx], f"in{i}_pruned")
        elif e.kind == "dw":
            _replace(g, n, 1, g.array(n.input[1])[keep], "weight_pruned")
            if len(n.input) > 2 and n.input[2]:
                _replace(g, n, 2, g.array(n.input[2])[keep], "bias_pruned")
            _set_attr(n, "group", k)
        elif e.kind == "reshape":
            shape = g.array(n.input[1]).copy()
            if int(shape[1]) != -1:
                shape[1] = k * e.block
                _replace(g, n, 1, shape, "shape_pruned")
        elif e.kind == "conv_in":
            _replace(g, n, 1, g.array(n.input[1])[:, keep], "weight_pruned")
        elif e.kind == "gemm_in":
            wc = g.array(n.input[1])
            _replace(g, n, 1, wc[:, idx] if _attr(n, "transB", 0) else wc[idx], "weight_pruned")
        elif e.kind == "matmul_in":
            _replace(g, n, 1, g.array(n.input[1])[idx], "weight_pruned")


# --------------------------------------------------------------------------- reconstruction


def _conv_geometry(node: onnx.NodeProto, w: np.ndarray, in_hw: tuple[int, int]):
    kh, kw = w.shape[2:]
    s = list(_attr(node, "strides", [1, 1]))
    d = list(_attr(node, "dilations", [1, 1]))
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i, (size, k) in enumerate(zip(in_hw, (kh, kw))):
            total = max((math.ceil(size / s[i]) - 1) * s[i] + (k - 1) * d[i] + 1 - size, 0)
            small = total // 2
            pads[i], pads[i + 2] = (small, total - small) if auto == "SAME_UPPER" else (total - small, small)
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    return (kh, kw), s, d, pads


def _patches(x: np.ndarray, pos: tuple[np.ndarray, np.ndarray, np.ndarray], node, w) -> np.ndarray:
    """im2col rows ``[R, I*kh*kw]`` of ``x`` for output positions ``pos`` = (n, oy, ox)."""
    (kh, kw), s, d, pads = _conv_geometry(node, w, x.shape[2:])
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, oy, ox = pos
    iy = oy[:, None] * s[0] + np.arange(kh)[None, :] * d[0]
    ix = ox[:, None] * s[1] + np.arange(kw)[None, :] * d[1]
    rows = xp[n[:, None, None], :, iy[:, :, None], ix[:, None, :]]  # [R, kh, kw, I]
    return rows.transpose(0, 3, 1, 2).reshape(len(n), -1)


def _rows_target(unknowns: int) -> int:
    return int(min(max(4096, 12 * unknowns), 20000))


def _positions(shape, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b, _, h, w = shape
    total = b * h * w
    rng = np.random.default_rng(seed)
    flat = rng.choice(total, size=min(rows, total), replace=False) if rows < total else np.arange(total)
    return np.unravel_index(np.sort(flat), (b, h, w))


def _linear_form(g: Graph, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None]:
    """(W [D, O], bias [O] or None) with the node's output = rows @ W + bias."""
    w = g.array(node.input[1]).astype(np.float64)
    b = g.array(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T, (b if b is not None else np.zeros(w.shape[0]))
    if node.op_type == "MatMul":
        return w, None
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    wm = alpha * (w.T if _attr(node, "transB", 0) else w)
    bias = np.zeros(wm.shape[1]) if b is None else np.broadcast_to(beta * b.reshape(-1), (wm.shape[1],)).copy()
    return wm, bias


def _write_linear(g: Graph, node: onnx.NodeProto, wm: np.ndarray, bias: np.ndarray | None) -> None:
    dtype = g.array(node.input[1]).dtype
    if node.op_type == "Conv":
        shape = g.array(node.input[1]).shape
        _replace(g, node, 1, wm.T.reshape(shape).astype(dtype), "weight_recon")
    elif node.op_type == "MatMul":
        _replace(g, node, 1, wm.astype(dtype), "weight_recon")
        return
    else:
        _replace(g, node, 1, (wm.T if _attr(node, "transB", 0) else wm).astype(dtype), "weight_recon")
        _set_attr(node, "alpha", 1.0)
        _set_attr(node, "beta", 1.0)
    bname = g.unique(f"{node.name}.bias_recon")
    g.set_initializer(bname, bias.astype(dtype))
    if len(node.input) > 2:
        node.input[2] = bname
    else:
        node.input.append(bname)


def _ridge(a: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """argmin |[a, 1] W - y|^2 + lam |W - W0|^2, bias included when ``b0`` is given."""
    if b0 is not None:
        a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
        w0 = np.concatenate([w0, b0[None, :]], axis=0)
    gram = a.T @ a
    lam = RIDGE * max(float(np.mean(np.diag(gram))), 1e-12)
    sol = np.linalg.solve(gram + lam * np.eye(len(gram)), a.T @ y + lam * w0)
    return (sol[:-1], sol[-1]) if b0 is not None else (sol, None)


def _reconstruct(original: onnx.ModelProto, model: onnx.ModelProto, consumers: list[onnx.NodeProto],
                 kept_out: dict[str, np.ndarray], calib: CalibrationData, out: PassOutcome,
                 solve=None) -> None:
    """Re-fit ``consumers`` one after the other in graph order (see the module docstring).

    ``solve(a, y, w0, b0, node) -> (W, bias)`` fits one consumer from its regressor rows ``a`` [R, D] (the pruned
    model's inputs), the original outputs ``y`` [R, O] and its current linear form; default: :func:`_ridge`.
    """
    from ..fidelity import session
    from ..graph import expose_outputs

    order = {id(n): i for i, n in enumerate(model.graph.node)}
    consumers = sorted({id(n): n for n in consumers}.values(), key=lambda n: order[id(n)])
    g = Graph(model)
    targets = [n.output[0] for n in consumers]
    # the original outputs, sampled at fixed positions per consumer and batch
    sess = session(expose_outputs(original, targets))
    ys: list[list[np.ndarray]] = [[] for _ in consumers]
    pos: list[list] = [[] for _ in consumers]
    n_total = len(calib)
    for b, feed in enumerate(calib.batches()):
        values = sess.run(targets, feed)
        for i, (node, y) in enumerate(zip(consumers, values)):
            keep = kept_out.get(node.name)
            if keep is not None:
                y = y[:, keep]
            if node.op_type == "Conv" and y.ndim == 4:
                w = g.array(node.input[1])
                rows = math.ceil(_rows_target(int(np.prod(w.shape[1:])) + 1) * len(y) / n_total)
                p = _positions(y.shape, rows, seed=1000 * i + b)
                pos[i].append(p)
                ys[i].append(y[p[0], :, p[1], p[2]])
            else:
                pos[i].append(None)
                ys[i].append(y.reshape(len(y), -1))
    del sess
    todo = [i for i, n in enumerate(consumers) if n.op_type != "Conv" or g.array(n.input[1]).ndim == 4]
    for i in sorted(set(range(len(consumers))) - set(todo)):
        out.notes.append(f"{consumers[i].name}: not reconstructed (only 2-D convolutions are)")
    # consumers are re-fitted one after the other; the graph is run segment by segment (each segment from the
    # cached tensors crossing the cut before the previous consumer to the cut before the next), so the whole
    # sequence costs about one pass of the model over the calibration data
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    cache = list(calib.batches())
    start = 0
    for i in todo:
        node = consumers[i]
        stop = position[id(node)]
        xs, cache = _run_segment(model, start, stop, node.input[0], cache)
        start = stop
        w = g.array(node.input[1])
        rows = [_patches(x, pos[i][b], node, w) if pos[i][b] is not None else x.reshape(len(x), -1) for b, x in enumerate(xs)]
        del xs
        a, y = np.concatenate(rows).astype(np.float64), np.concatenate(ys[i]).astype(np.float64)
        w0, b0 = _linear_form(g, node)
        wn, bn = _ridge(a, y, w0, b0) if solve is None else solve(a, y, w0, b0, node)

        def err(wm, bias, a=a, y=y):
            pred = a @ wm + (bias if bias is not None else 0)
            return float(np.sum((pred - y) ** 2) / max(np.sum(y**2), 1e-30))

        before, after = err(w0, b0), err(wn, bn)
        if after < before:
            _write_linear(g, node, wn, bn)
        out.notes.append(f"{node.name}: reconstructed on {len(a)} rows, relative output error {before:.4f} -> "
                         f"{min(after, before):.4f}")
        g.refresh()


def _run_segment(model: onnx.ModelProto, start: int, stop: int, want: str,
                 cache: list[dict[str, np.ndarray]]) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
    """Run nodes ``[start, stop)`` (topological order) from the ``cache`` of tensors crossing the cut before
    ``start``; returns ``want`` per batch and the tensors crossing the cut before ``stop``."""
    import onnx

    from ..fidelity import session

    nodes = model.graph.node
    inits = {t.name for t in model.graph.initializer}
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    crossing = {t for i, n in enumerate(nodes[stop:], start=stop) for t in n.input
                if t and t not in inits and produced.get(t, -1) < stop}
    crossing.add(want)
    seg_nodes = list(nodes[start:stop])
    outputs = sorted(t for t in crossing if start <= produced.get(t, -1) < stop)
    carried = sorted(t for t in crossing if t not in outputs)
    missing = [t for t in carried if t not in cache[0]]
    if missing:
        raise PassError(f"channel_prune: tensor(s) {missing[:3]} cannot be computed segment by segment")
    if outputs:
        used = {t for n in seg_nodes for t in n.input if t}
        feeds = sorted(t for t in used if t not in inits and produced.get(t, -1) < start)
        first = cache[0]
        graph = onnx.helper.make_graph(
            seg_nodes, "segment",
            [onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(first[t].dtype), [None] * first[t].ndim)
             for t in feeds],
            [onnx.helper.make_value_info(t, onnx.TypeProto()) for t in outputs],
            initializer=[t for t in model.graph.initializer if t.name in used])
        seg = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        seg.ir_version = model.ir_version
        seg.functions.extend(model.functions)
        sess = session(seg)
    new_cache: list[dict[str, np.ndarray]] = []
    for batch in cache:
        values = dict(zip(outputs, sess.run(outputs, {t: batch[t] for t in feeds}))) if outputs else {}
        new_cache.append({t: values[t] if t in values else batch[t] for t in crossing})
    return [b[want] for b in new_cache], new_cache


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def apply(model: onnx.ModelProto, config: Config, calib: CalibrationData | None = None) -> PassOutcome:
    """Remove the least important output channels of each prunable group and, optionally, re-fit its consumers.

    Args:
        model: the model (already a copy); normalised, sliced and re-fitted in place.
        config: ratio, criterion, rounding, minimum channels, reconstruction and node scoping.
        calib: calibration data; required when ``config.reconstruct`` (at most ``calib_samples`` are used).

    Returns:
        The outcome: the pruned model, the producers pruned, the producers skipped (with reasons), and
        notes with the parameter count before/after and each layer's channel counts.

    Raises:
        PassError: ``reconstruct`` is set and ``calib`` is None, or reconstruction cannot run the
            pruned model segment by segment.
    """
    import onnx

    if config.reconstruct and calib is None:
        raise PassError("channel_prune with reconstruct=True needs calibration data (or set reconstruct=False)")
    normalize(model)
    out = PassOutcome(model)
    params_before = _params(model)
    original = onnx.ModelProto()
    original.CopyFrom(model)

    g = Graph(model)
    dims = _dims(model)
    exclude = PassConfig(exclude=config.exclude)

    def excluded(name: str) -> bool:
        return bool(config.exclude) and not exclude.selects(name)

    groups: list[_Group] = []
    for node in list(model.graph.node):
        if node.op_type not in ("Conv", "Gemm") or not config.selects(node.name):
            continue
        if node.op_type == "Conv" and (_attr(node, "group", 1) or 1) != 1:
            continue  # depthwise/grouped convs are pruned with the layer feeding them
        try:
            group = _trace(g, node, dims, excluded)
        except _Blocked as e:
            out.skip(node.name, str(e))
            continue
        if group.channels <= config.min_channels:
            out.skip(node.name, f"{group.channels} output channels, not above min_channels={config.min_channels}")
            continue
        groups.append(group)

    kept_out: dict[str, np.ndarray] = {}
    consumers: list[onnx.NodeProto] = []
    for group in groups:
        p = group.producer
        k = _keep_count(group.channels, config, config.ratios.get(p.name))
        if k >= group.channels:
            out.skip(p.name, f"rounding {group.channels} channels to a multiple of {config.round_to} removes none")
            continue
        score = _importance(g.array(p.input[1]), p, config.criterion)
        keep = np.sort(np.argsort(-score, kind="stable")[:k])
        _slice(g, group, keep)
        kept_out[p.name] = keep
        consumers.extend(group.consumers)
        out.applied.append(p.name)
        extra = [n.name for n in group.nodes("dw")]
        out.notes.append(f"{p.name}: {group.channels} -> {k} channels"
                         + (f" (depthwise {', '.join(extra)} too)" if extra else "")
                         + f"; consumers {', '.join(c.name for c in group.consumers)}")
    del model.graph.value_info[:]  # channel counts changed; stale shapes would mislead runtimes
    g.remove_unused_initializers()
    if config.reconstruct and consumers:
        _reconstruct(original, model, consumers, kept_out, calib.subset(min(config.calib_samples, len(calib))), out)
        g.remove_unused_initializers()
    params_after = _params(model)
    out.notes.insert(0, f"parameters {params_before} -> {params_after} ({params_after / max(params_before, 1):.3f}x)")
    return out
