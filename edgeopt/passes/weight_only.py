"""Weight-only blockwise quantization of dense layers (4 or 8 bits) with onnxruntime's
``MatMulNBitsQuantizer``: a ``MatMul`` whose right operand is a constant 2-D ``[K, N]``
weight becomes a ``com.microsoft.MatMulNBits`` node holding the packed weight and one
scale (plus a zero point when asymmetric) per ``block_size`` values along ``K``.
Activations stay float; the kernel dequantizes on the fly (``accuracy_level`` 4
lets it quantize the activations to int8 on the fly for int8 dot products).

``Gemm`` nodes with a constant ``B`` are first rewritten into ``MatMul`` (+ ``Add``
for ``C``): ``transB`` transposes the stored weight, ``alpha`` is folded into it and
``beta`` into a constant ``C``.  ``transA=1``, a non-constant ``B`` and ``beta != 1``
with a non-constant ``C`` are skipped.  A layer is also skipped when ``K`` is not a
multiple of ``block_size`` (the last block would be zero-padded, which some
execution providers reject) or its weight is shared with other nodes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator

from . import PassConfig, PassError, PassOutcome
from ._util import Graph, ensure_names
from .cleanup import constants_to_initializers

if TYPE_CHECKING:  # pragma: no cover
    import onnx

NEEDS_CALIBRATION = False


class Config(PassConfig):
    bits: Literal[4, 8] = Field(default=4, description="bits per weight")
    block_size: int = Field(default=32, description="weights per scale along K (a power of two >= 16)")
    symmetric: bool = Field(default=True, description="symmetric blocks (no zero points)")
    accuracy_level: int | None = Field(default=None, ge=0, le=4,
                                       description="MatMulNBits accuracy_level (4: int8 activations in the kernel); None: kernel default")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError("block_size must be a power of two >= 16 (MatMulNBits)")
        return v


def _attrs(node: onnx.NodeProto) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _weight(node: onnx.NodeProto, g: Graph) -> tuple[np.ndarray | None, str | None]:
    """The constant right operand of a Gemm/MatMul, or why there is none usable."""
    if len(node.input) < 2 or node.input[1] not in g.inits:
        return None, "weight is not a constant initializer"
    if g.array(node.input[0]) is not None:
        return None, "input A is constant (fold it instead)"
    w = g.array(node.input[1])
    if w.dtype != np.float32:
        return None, f"weight dtype {w.dtype} is not float32"
    if w.ndim != 2:
        return None, f"weight is {w.ndim}-D (only 2-D weights are quantized)"
    if len(g.consumers.get(node.input[1], [])) > 1 or node.input[1] in g.outputs:
        return None, "weight is shared with other nodes"
    return w, None


def _check(node: onnx.NodeProto, g: Graph, config: Config) -> tuple[np.ndarray | None, str | None]:
    """The weight as ``[K, N]`` (``x @ W`` form) when the node can be quantized, else the reason."""
    w, why = _weight(node, g)
    if w is None:
        return None, why
    if node.op_type == "Gemm":
        a = _attrs(node)
        if a.get("transA", 0):
            return None, "Gemm with transA=1 is not rewritten into MatMul"
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if c is not None and a.get("beta", 1.0) != 1.0 and g.array(c) is None:
            return None, "Gemm with beta != 1 and a non-constant C cannot be rewritten exactly"
        w = w.T if a.get("transB", 0) else w
    k = w.shape[0]
    if k % config.block_size:
        return None, f"K={k} is not a multiple of block_size={config.block_size}"
    return w, None


def gemm_to_matmul(node: onnx.NodeProto, g: Graph, w_kn: np.ndarray) -> onnx.NodeProto | None:
    """Rewrite a Gemm (transA=0, constant B) in place into ``MatMul(A, alpha * B')``; returns the ``Add(beta * C)``
    to insert after it (named ``<name>/bias``), if any.  The MatMul keeps the Gemm's name.

    Args:
        node: the Gemm node, rewritten in place.
        g: the graph helper of the node's model (receives the new weight and scaled-bias initializers).
        w_kn: the Gemm's weight as ``[K, N]`` (already transposed when ``transB``).

    Returns:
        The ``Add`` node the caller must insert after the MatMul, or None when there is no ``C`` or ``beta`` is 0.
    """
    import onnx

    a = _attrs(node)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    w_name = g.unique(f"{node.name}.weight_kn")
    g.set_initializer(w_name, (w_kn * np.float32(alpha)).astype(np.float32) if alpha != 1.0 else np.ascontiguousarray(w_kn))
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    add = None
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c_val = g.array(c)
            c_name = g.unique(f"{node.name}.bias_scaled")
            g.set_initializer(c_name, (c_val * np.asarray(beta, c_val.dtype)).astype(c_val.dtype))
            c = c_name
        mm_out = g.unique(f"{out}_matmul")
        add = onnx.helper.make_node("Add", [mm_out, c], [out], name=g.unique(f"{node.name}/bias"))
        out = mm_out
    x = node.input[0]
    node.op_type = "MatMul"
    del node.input[:]
    node.input.extend([x, w_name])
    del node.attribute[:]
    node.output[0] = out
    return add


def _quantizer_class():
    """Import ``MatMulNBitsQuantizer`` without letting its module's ``logging.basicConfig(INFO)`` stick."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        raise PassError(f"weight-only quantization needs onnxruntime's MatMulNBitsQuantizer ({e}); "
                        "pip install onnx-ir ml-dtypes") from e
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    return MatMulNBitsQuantizer


def apply(model: onnx.ModelProto, config: Config, calib=None) -> PassOutcome:
    """Quantize the selected MatMul/Gemm weights blockwise into ``MatMulNBits`` nodes.

    Args:
        model: the model (already a copy); Constants and eligible Gemms are rewritten in place first.
        config: bits, block size, symmetry, accuracy level and node scoping.
        calib: unused.

    Returns:
        The outcome: the quantized model, the layers quantized, and the layers skipped (with reasons).

    Raises:
        PassError: onnxruntime's ``MatMulNBitsQuantizer`` cannot be imported.
    """
    ensure_names(model)
    out = PassOutcome(model)
    converted = constants_to_initializers(model)
    if converted:
        out.notes.append(f"normalised: Constant -> initializer: {len(converted)}")
    g = Graph(model)
    targets: list[tuple[onnx.NodeProto, np.ndarray]] = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        if not config.selects(n.name):
            out.skip(n.name, "excluded by node scoping: left in float")
            continue
        w, why = _check(n, g, config)
        if w is None:
            out.skip(n.name, why)
        else:
            targets.append((n, w))
    rewritten = 0
    adds: dict[str, onnx.NodeProto] = {}
    for n, w in targets:
        if n.op_type == "Gemm":
            add = gemm_to_matmul(n, g, w)
            if add is not None:
                adds[n.name] = add
            rewritten += 1
    if rewritten:
        nodes = []
        for n in model.graph.node:
            nodes.append(n)
            if n.name in adds:
                nodes.append(adds[n.name])
        if adds:
            del model.graph.node[:]
            model.graph.node.extend(nodes)
        Graph(model).remove_unused_initializers()
        out.notes.append(f"Gemm rewritten into MatMul (+Add): {rewritten}")
    names = {n.name for n, _ in targets}
    if not names:
        out.notes.append("no MatMul/Gemm could be quantized (see skipped)")
        return out
    quantizer_cls = _quantizer_class()
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
    qlog = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    old_level = qlog.level
    qlog.setLevel(logging.WARNING)
    try:
        quant = quantizer_cls(model, bits=config.bits, block_size=config.block_size, is_symmetric=config.symmetric,
                              accuracy_level=config.accuracy_level, nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
        quant.process()
    finally:
        qlog.setLevel(old_level)
    result = quant.model.model
    done = {n.name for n in result.graph.node if n.op_type == "MatMulNBits"}
    for n, _ in targets:
        if f"{n.name}_Q{config.bits}" in done:
            out.applied.append(n.name)
        else:
            out.skip(n.name, "MatMulNBitsQuantizer left it unchanged")
    out.notes.append(f"MatMulNBits: {len(out.applied)} layer(s), {config.bits}-bit, block {config.block_size}, "
                     f"{'symmetric' if config.symmetric else 'asymmetric'}")
    out.model = result
    return out
